"""The record of a training run: one row per iteration, and why the run stopped.

A :class:`History` is what :func:`moller_scg.fit` returns (the role of ``scipy.optimize.OptimizeResult``): per
iteration the trace of the optimizer — k, E, success, λ, δ, Δ, μ, α, |r|, |p|, closure and HVP calls, wall
time — and the validation loss and metric when there is validation data; at the end the stop reason, and the
annealing restarts when there were any (``fit(..., annealing=...)``). It round-trips through CSV and through a
plain dict (which ``torch.load(weights_only=True)`` accepts), and draws the blog's Figure 3.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = (
    "k",
    "loss",
    "success",
    "lambd",
    "delta",
    "comparison",
    "mu",
    "alpha",
    "residual_norm",
    "direction_norm",
    "closure_calls",
    "hvp_calls",
    "time",
    "val_loss",
    "val_metric",
)
"""The per-iteration columns. ``loss`` is E at the weights held after the iteration; ``time`` is wall seconds since
the run (including any run it resumed) began; ``val_loss`` and ``val_metric`` are NaN without validation data."""

RUN_COLUMNS = ("stop_reason", "best_iteration", "detail", "restarts")
"""The CSV columns after :data:`COLUMNS` that describe the whole run; every row repeats them (``restarts`` as JSON).
An empty cell is ``None``."""

_INTEGER_COLUMNS = {"k", "closure_calls", "hvp_calls"}
_BOOLEAN_COLUMNS = {"success"}

STOP_REASONS = {
    "max_iter": "the iteration budget max_iter was used up",
    "goal": "the training loss reached the goal",
    "min_grad": "the gradient norm |E'(w)| fell to min_grad",
    "max_time": "the time budget max_time ran out",
    "max_fail": "the validation loss did not improve for max_fail successful iterations; best weights restored",
    "stalled": "no progress: λ reached its bound or the loss stopped decreasing (converged to rounding level?)",
    "callback": "a callback asked to stop",
    "non_finite": "the loss or gradient became non-finite (see detail); the weights hold the last accepted point",
    "interrupted": "interrupted (Ctrl-C or SIGTERM) after a completed iteration",
}
"""Every reason :func:`moller_scg.fit` can stop for, with the sentence that explains it."""


@dataclasses.dataclass
class History:
    """Per-iteration records of a run, and how it ended.

    Attributes:
        columns: column name → list of values, one per iteration (see :data:`COLUMNS`), from the first
            iteration (k = 1) on.
        stop_reason: a key of :data:`STOP_REASONS`, or ``None`` while the run is going on.
        best_iteration: the k with the lowest validation loss, or ``None`` without validation data.
        detail: more about the stop when there is more to say (the error behind ``"non_finite"``).
        restarts: one dict of plain values per simulated-annealing pass of ``fit(..., annealing=...)``, in order:
            the iterations done before it, why it ran, its temperature, perturbation size, moves, accepted moves,
            and the loss before and after (the keys are :data:`moller_scg.annealing.EVENT_KEYS`). Empty otherwise.
    """

    columns: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: {name: [] for name in COLUMNS})
    stop_reason: str | None = None
    best_iteration: int | None = None
    detail: str | None = None
    restarts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def append(self, **row: Any) -> None:
        """Add one iteration's row; missing columns are NaN, unknown columns are an error."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown History columns {sorted(unknown)}; the columns are {list(COLUMNS)}")
        for name in COLUMNS:
            self.columns[name].append(row.get(name, math.nan))

    def __len__(self) -> int:
        return len(self.columns["k"])

    def __getitem__(self, name: str) -> list[Any]:
        return self.columns[name]

    def rows(self) -> Iterator[dict[str, Any]]:
        """Each iteration as a dict of column → value."""
        for index in range(len(self)):
            yield {name: self.columns[name][index] for name in COLUMNS}

    @property
    def last(self) -> dict[str, Any]:
        """The latest row."""
        if not len(self):
            raise IndexError("the History has no rows yet: read History.last after the first iteration")
        return {name: self.columns[name][-1] for name in COLUMNS}

    @property
    def message(self) -> str:
        """Why the run stopped, in words."""
        return STOP_REASONS.get(self.stop_reason, "the run has not stopped") if self.stop_reason else "running"

    # ----------------------------------------------------------------------------------------------------------
    # Round trips

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and strings only: safe for JSON and for ``torch.load(weights_only=True)``."""
        return {
            "columns": {name: list(values) for name, values in self.columns.items()},
            "stop_reason": self.stop_reason,
            "best_iteration": self.best_iteration,
            "detail": self.detail,
            "restarts": [dict(event) for event in self.restarts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """The inverse of :meth:`to_dict`; ``ValueError`` if the columns or restarts are not as expected.

        A dict without ``"restarts"`` (written before annealing existed) gives an empty list.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("columns"), Mapping):
            raise ValueError("a History dict needs a 'columns' mapping of column name → list")
        columns = data["columns"]
        if set(columns) != set(COLUMNS):
            raise ValueError(f"History columns {sorted(columns)} differ from the expected {sorted(COLUMNS)}")
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"History columns have different lengths {sorted(lengths)}")
        restarts = data.get("restarts") or []
        if not isinstance(restarts, list) or not all(isinstance(event, Mapping) for event in restarts):
            raise ValueError(f"History restarts must be a list of dicts, got {restarts!r:.120}")
        return cls(
            columns={name: list(columns[name]) for name in COLUMNS},
            stop_reason=data.get("stop_reason"),
            best_iteration=data.get("best_iteration"),
            detail=data.get("detail"),
            restarts=[dict(event) for event in restarts],
        )

    def to_csv(self, path: str | Path) -> None:
        """Write one row per iteration with a header line; floats are written with full precision (``repr``).

        The per-iteration :data:`COLUMNS` are followed by the run-level :data:`RUN_COLUMNS` (stop reason, best
        iteration, detail, annealing restarts as JSON), repeated on every row so that each row stands alone in a
        spreadsheet or a data frame. A History without rows is written as one row with only the run-level cells.
        """
        run = self._run_cells()
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(COLUMNS + RUN_COLUMNS)
            for row in self.rows():
                # float(value): NumPy 2 writes a np.float64 as "np.float64(0.25)", which from_csv cannot read
                cells = [repr(float(value)) if isinstance(value, float) else value for value in row.values()]
                writer.writerow(cells + run)
            if not len(self):
                writer.writerow([""] * len(COLUMNS) + run)

    @classmethod
    def from_csv(cls, path: str | Path) -> History:
        """Read a file written by :meth:`to_csv`: the rows and the run-level fields, exactly.

        A file written before the run-level columns existed (only :data:`COLUMNS`) is read with ``stop_reason``,
        ``best_iteration`` and ``detail`` ``None`` and no restarts.
        """
        history = cls()
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            header = tuple(reader.fieldnames or ())
            if header not in (COLUMNS, COLUMNS + RUN_COLUMNS):
                raise ValueError(
                    f"{path}: the header {reader.fieldnames} is not the History columns {list(COLUMNS + RUN_COLUMNS)}"
                )
            run_cells = None
            for row in reader:
                run_cells = [row[name] for name in RUN_COLUMNS] if header != COLUMNS else None
                if row["k"] != "":  # a History without rows is written as one row of run-level cells only
                    history.append(**{name: _parse(name, row[name]) for name in COLUMNS})
        if run_cells is not None:
            history._set_run_cells(run_cells, path)
        return history

    def _run_cells(self) -> list[str]:
        """The run-level fields as CSV cells, in :data:`RUN_COLUMNS` order; ``None`` is an empty cell."""
        return [
            "" if self.stop_reason is None else self.stop_reason,
            "" if self.best_iteration is None else str(self.best_iteration),
            "" if self.detail is None else self.detail,
            json.dumps(self.restarts) if self.restarts else "",
        ]

    def _set_run_cells(self, cells: list[str], path: str | Path) -> None:
        """The inverse of :meth:`_run_cells`."""
        stop_reason, best_iteration, detail, restarts = cells
        self.stop_reason = stop_reason or None
        self.best_iteration = int(best_iteration) if best_iteration else None
        self.detail = detail or None
        events = json.loads(restarts) if restarts else []
        if not isinstance(events, list) or not all(isinstance(event, dict) for event in events):
            raise ValueError(f"{path}: the restarts cell must hold a JSON list of objects, got {restarts!r:.120}")
        self.restarts = events

    # ----------------------------------------------------------------------------------------------------------
    # Figure 3

    def plot(self, filename: str | Path | None = None, title: str | None = None) -> Figure:
        """Draw the blog's Figure 3: (a) loss and success, (b) |p| and |r|, (c) δ and λ, against iterations.

        Annealing restarts, if any, are dotted vertical lines in panel (a). A panel whose values are all 0 or NaN
        (a run that diverged at once, or a loss that was 0 from the start) keeps a linear axis instead of a
        logarithmic one, so it still draws what it can.

        With ``filename`` the figure is drawn on a bare ``matplotlib.figure.Figure`` and saved: pyplot's figure
        list and matplotlib's backend are not touched, so a later ``plt.show()`` or a notebook works as before.
        Without it, the figure comes from ``pyplot`` (so ``plt.show()`` shows it). matplotlib is imported here,
        so it is needed only for plotting (``pip install moller-scg[examples]``).

        Returns:
            The matplotlib ``Figure``; it is also saved to ``filename`` when given.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("History.plot needs matplotlib: pip install 'moller-scg[examples]'") from error
        size = (15, 4.2)
        if filename is None:
            import matplotlib.pyplot as plt

            figure = plt.figure(figsize=size)
        else:
            figure = Figure(figsize=size)
        loss_axes, vector_axes, scale_axes = figure.subplots(1, 3)
        k, losses = self.columns["k"], self.columns["loss"]
        loss_axes.plot(k, losses, label="training loss")
        if any(math.isfinite(value) for value in self.columns["val_loss"]):
            loss_axes.plot(k, self.columns["val_loss"], "--", label="validation loss")
        # A NaN (no verdict, as in LBFGS's rows) is truthy, so a success is a bool that is true, NumPy's included.
        successes = [
            index
            for index, success in zip(k, self.columns["success"])
            if isinstance(success, (bool, np.bool_)) and success
        ]
        loss_scale_is_log = _log_scale_if_possible(loss_axes, losses, self.columns["val_loss"])
        if successes:
            lowest = _lowest(losses, loss_scale_is_log)
            loss_axes.plot(successes, [lowest] * len(successes), "|", color="tab:green", label="successful step")
        for index, event in enumerate(self.restarts):
            label = "annealing restart" if index == 0 else None
            loss_axes.axvline(event["iteration"] + 0.5, color="tab:red", linestyle=":", linewidth=1, label=label)
        loss_axes.set(title="a) loss and successful steps", xlabel="iteration k")
        vector_axes.plot(k, self.columns["direction_norm"], label="|p| (search direction)")
        vector_axes.plot(k, self.columns["residual_norm"], label="|r| = |E'(w)| (gradient)")
        _log_scale_if_possible(vector_axes, self.columns["direction_norm"], self.columns["residual_norm"])
        vector_axes.set(title="b) direction and gradient norms", xlabel="iteration k")
        positive_delta = [value if value > 0 else math.nan for value in self.columns["delta"]]
        scale_axes.plot(k, positive_delta, label="δ (scaled curvature)")
        scale_axes.plot(k, self.columns["lambd"], label="λ (scale)")
        _log_scale_if_possible(scale_axes, positive_delta, self.columns["lambd"])
        scale_axes.set(title="c) δ and λ", xlabel="iteration k")
        for axes in (loss_axes, vector_axes, scale_axes):
            axes.legend(fontsize="small")
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        if filename is not None:
            figure.savefig(filename, dpi=110)
        return figure


def _positive(values: list[Any]) -> list[float]:
    """The values a logarithmic axis can show: finite and > 0."""
    return [value for value in values if math.isfinite(value) and value > 0]


def _lowest(losses: list[Any], log_scale: bool) -> float:
    """Where the success marks sit: the lowest loss the axis shows (the lowest positive one on a log axis, else the
    lowest finite one; 0 when there is none)."""
    shown = _positive(losses) if log_scale else [value for value in losses if math.isfinite(value)]
    return min(shown, default=0.0)


def _log_scale_if_possible(axes: Any, *columns: list[Any]) -> bool:
    """A logarithmic y axis when some value is finite and > 0 and none is negative (a negative loss, such as a
    Gaussian negative log-likelihood's, would vanish from it); otherwise the axis stays linear. Whether it is log."""
    values = [value for column in columns for value in column]
    log_scale = bool(_positive(values)) and not any(value < 0 for value in values if math.isfinite(value))
    if log_scale:
        axes.set_yscale("log")
    return log_scale


def _parse(name: str, text: str) -> Any:
    if name in _BOOLEAN_COLUMNS:
        return {"True": True, "False": False}.get(text, math.nan)
    if name in _INTEGER_COLUMNS:
        return math.nan if text == "nan" else int(text)  # NaN: an optimizer that does not count (LBFGS's calls)
    return float(text)
