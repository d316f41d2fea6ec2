"""The checkpoint of a :func:`~moller_scg.fit` run: what it holds beside the model and optimizer, writing it, and
resuming from it.

A run's checkpoint is a :mod:`moller_scg.checkpoint` file whose ``extra`` entry is a :class:`RunState`, written as a
plain dict (:meth:`RunState.to_extra`) so that it loads with ``weights_only=True``. Every field has a default, so a
checkpoint written before a field existed still resumes (:meth:`RunState.from_extra`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from moller_scg import _vectors as vec
from moller_scg import distributed as _dist
from moller_scg.accumulate import GradientAccumulator
from moller_scg.annealing import Annealer
from moller_scg.checkpoint import (
    CheckpointError,
    check_checkpoint_target,
    load_checkpoint,
    make_checkpoint,
    restore,
    save_checkpoint,
)
from moller_scg.fingerprint import describe_difference, fingerprints_match
from moller_scg.history import History
from moller_scg.scg import SCG
from moller_scg.stopping import EarlyStopping
from moller_scg.subsampling import CurvatureCursor, upgraded_cursor_state
from moller_scg.weight_decay import validate_weight_decay

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunState:
    """What a checkpoint of a ``fit`` run holds about the run, beside the model, the optimizer, the History's
    columns and the random generators: its ``extra`` entry, one field per key.

    ``optimizer_at_weights`` says whether SCG's saved E and r were computed at the saved weights (see
    :meth:`RunCheckpoint.optimizer_at_weights`); ``restarts`` is written by a run with annealing restarts and by one
    whose History has some (a run resumed without annealing), ``annealing`` only by a run with annealing restarts.
    """

    stop_reason: str | None = None
    best_iteration: int | None = None
    early_stopping: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)
    elapsed: float = 0.0
    """Seconds of training so far, counted against ``max_time``."""
    world_size: int = 1
    curvature_window: dict[str, Any] = dataclasses.field(default_factory=lambda: CurvatureCursor().state_dict())
    """The :class:`~moller_scg.subsampling.CurvatureCursor`'s state: where the rotating curvature subsets go on."""
    data_fingerprint: dict[str, Any] | None = None
    weight_decay: Any = 0.0
    """ν of the objective's penalty (ν/2)|w|² (:mod:`moller_scg.weight_decay`): part of the objective E and r are of.
    As read from a checkpoint, unchecked; :func:`resume_run` validates it before loading anything."""
    optimizer_at_weights: bool = False
    loss: str | None = None
    """The training loss as :func:`describe_loss` names it: part of the objective E and r are of (``None`` in a
    checkpoint written before it was recorded)."""
    restarts: list[dict[str, Any]] | None = None
    annealing: dict[str, Any] | None = None

    def to_extra(self) -> dict[str, Any]:
        """The checkpoint's ``extra`` dict (without the annealing keys when the run has no annealing)."""
        extra: dict[str, Any] = {
            "stop_reason": self.stop_reason,
            "best_iteration": self.best_iteration,
            "early_stopping": self.early_stopping.state_dict(),
            "elapsed": self.elapsed,
            "world_size": self.world_size,
            "curvature_window": self.curvature_window,
            "data_fingerprint": self.data_fingerprint,
            "weight_decay": self.weight_decay,
            "optimizer_at_weights": self.optimizer_at_weights,
            "loss": self.loss,
        }
        if self.restarts is not None:
            extra["restarts"] = self.restarts
        if self.annealing is not None:
            extra["annealing"] = self.annealing
        return extra

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> RunState:
        """The run state in a checkpoint's ``extra``; keys it lacks (an older checkpoint) take their defaults."""
        return cls(
            stop_reason=extra.get("stop_reason"),
            best_iteration=extra.get("best_iteration"),
            early_stopping=EarlyStopping.from_state_dict(extra.get("early_stopping", {})),
            elapsed=float(extra.get("elapsed", 0.0)),
            world_size=extra.get("world_size", 1),
            curvature_window=upgraded_cursor_state(extra.get("curvature_window", {"window": 0})),
            data_fingerprint=extra.get("data_fingerprint"),
            weight_decay=extra.get("weight_decay", 0.0),
            optimizer_at_weights=extra.get("optimizer_at_weights") is True,
            loss=extra.get("loss"),
            restarts=extra.get("restarts"),
            annealing=extra.get("annealing"),
        )


@dataclasses.dataclass
class RunCheckpoint:
    """Writes the checkpoint of a running ``fit``, and knows whether SCG's saved E and r belong to the weights the
    model holds.

    ``optimizer_at_weights`` is true while the parameters are as the optimizer's last step left them (their
    version counters and storage unchanged, :func:`~moller_scg._vectors.write_marks`): restoring the best weights
    after a ``max_fail`` stop, or a callback that writes the weights, makes it false, and a resume then recomputes E
    and r instead of trusting them.
    """

    path: str | os.PathLike[str] | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: GradientAccumulator
    history: History
    early: EarlyStopping
    fingerprint: dict[str, Any] | None
    annealer: Annealer | None = None
    _versions_after_step: list[tuple[int, int]] | None = None

    def stepped(self) -> None:
        """Remember the parameters' versions right after ``optimizer.step``."""
        self._versions_after_step = self._versions()

    def optimizer_at_weights(self) -> bool:
        return self._versions_after_step is not None and self._versions_after_step == self._versions()

    def run_state(self, started: float) -> RunState:
        """The run's state now, ``started`` being the ``time.perf_counter()`` the elapsed time counts from."""
        return RunState(
            stop_reason=self.history.stop_reason,
            best_iteration=self.history.best_iteration,
            early_stopping=self.early,
            elapsed=time.perf_counter() - started,
            world_size=_dist.world_size(),
            curvature_window=self.train.curvature_cursor.state_dict(),
            data_fingerprint=self.fingerprint,
            weight_decay=self.train.weight_decay,
            optimizer_at_weights=self.optimizer_at_weights(),
            loss=describe_loss(self.train),
            # The restarts of a run with annealing, and those a resumed run without it carries on (its History's).
            restarts=self.history.restarts if self.annealer is not None or self.history.restarts else None,
            annealing=None if self.annealer is None else self.annealer.state_dict(),
        )

    def save(self, started: float) -> None:
        """Write the run's state, if there is a checkpoint; distributed, only rank 0 writes (all hold the same)."""
        if self.path is None or not _dist.is_main_process():
            return
        checkpoint = make_checkpoint(
            self.model,
            self.optimizer,
            iteration=len(self.history),
            history=self.history.columns,
            extra=self.run_state(started).to_extra(),
        )
        save_checkpoint(self.path, checkpoint)

    def _versions(self) -> list[tuple[int, int]]:
        return vec.write_marks(list(self.model.parameters()))


def check_checkpoint_path(path: str | os.PathLike[str], resume: bool, overwrite: bool) -> None:
    """Before training: the checkpoint can be written, and an existing one is only resumed or knowingly replaced.

    Distributed, rank 0 (the writer) checks and every rank raises if it found a problem.
    """
    problem: Exception | None = None
    if _dist.is_main_process():
        try:
            check_checkpoint_target(path, resume=resume, overwrite=overwrite)
        except (ValueError, FileExistsError) as error:
            problem = error
    failed = _dist.agree_on_max(int(problem is not None)) if _dist.is_distributed() else problem is not None
    if problem is not None:
        raise problem
    if failed:
        raise ValueError(f"rank 0 cannot use the checkpoint {os.fspath(path)!r}: see its error")


H0_RESUME_HINT = (
    "fit's own SCG takes its H₀ from preconditioner: resume with the one the run was started with, and a checkpoint "
    "fit wrote while its default H₀ was γI with preconditioner='scalar'"
)
"""What a refused resume says of ``fit``'s ``preconditioner`` (its default was ``"scalar"`` before ``"auto"``)."""

SCG_SETTINGS = ("sigma", "lambd", "hvp", "restart", "memory", "diagonal_scaling")
"""The settings of an SCG that a resumed fit must share with the run it continues (load_state_dict would take the
saved ones over silently, past fit's checks of the given optimizer against its other arguments)."""


def _differing_scg_settings(optimizer: torch.optim.Optimizer, saved_optimizer: Any) -> str:
    """The saved SCG settings that differ from ``optimizer``'s, as ``"hvp='finite-difference' (this one has
    'double-backward'), …"``; empty when they agree, or when either is not an SCG state (the restore names that)."""
    groups = saved_optimizer.get("param_groups") if isinstance(saved_optimizer, Mapping) else None
    if not isinstance(optimizer, SCG) or not isinstance(groups, list) or not groups or not isinstance(groups[0], dict):
        return ""
    saved = {"diagonal_scaling": False} | groups[0]  # diagonal_scaling: False in a state saved before the option
    own = optimizer.param_groups[0]
    differing = [  # a setting the saved state does not record (an older version's) is not compared
        f"{key}={saved[key]!r} (this one has {own.get(key)!r})"
        for key in SCG_SETTINGS
        if key in saved and saved[key] != own.get(key)
    ]
    entry = saved_optimizer.get("scg")
    pairs = entry.get("secant_pairs") if isinstance(entry, Mapping) else None
    if isinstance(pairs, Mapping) and ("kronecker_factors" in pairs) != (optimizer.kronecker_factors is not None):
        had, has = ("KroneckerFactors", "none") if "kronecker_factors" in pairs else ("none", "KroneckerFactors")
        differing.append(f"kronecker_factors={had} (this one has {has})")
    return ", ".join(differing)


def describe_loss(train: GradientAccumulator) -> str:
    """The training loss as a checkpoint records it: its type (or function) and the reduction the accumulator
    applies, e.g. ``"torch.nn.modules.loss.MSELoss, reduction 'mean'"``. Settings inside a loss module (class
    weights, label smoothing) are not part of it."""
    loss_fn = train.loss_fn
    named = type(loss_fn) if isinstance(loss_fn, nn.Module) else loss_fn  # a module by its class, a function itself
    name = f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', type(named).__qualname__)}"
    return f"{name}, reduction {train.reduction!r}"


def resume_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    path: str | os.PathLike[str],
    train: GradientAccumulator,
    fingerprint: dict[str, Any] | None,
    annealer: Annealer | None = None,
) -> tuple[History, RunState, bool, bool]:
    """Load a checkpoint into model, optimizer and annealer (all or nothing) and return the History and run state
    it holds, whether the loaded optimizer state was kept as it belongs to the loaded weights, and whether the
    objective is the saved run's (the same data, weight decay and loss: then the saved losses are this run's too).

    SCG's saved E and r are kept only if the checkpoint shows they were computed at its weights, on data with
    this ``fingerprint`` and with the accumulator's ``weight_decay``; otherwise SCG is restarted, so that its next
    step evaluates E and r at the loaded weights.
    """
    state = load_checkpoint(path)
    try:
        saved = RunState.from_extra(state["extra"])
        history = History.from_dict(
            {"columns": state["history"], "best_iteration": saved.best_iteration, "restarts": saved.restarts}
        )
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        # A checkpoint written by another loop with moller_scg.checkpoint's functions, whose run state is not fit's.
        raise CheckpointError(
            f"cannot resume from {path}: its run state is not one fit wrote ({type(error).__name__}: {error}). "
            f"Resume it with the loop that wrote it, or pass resume=False to start afresh"
        ) from None
    world_size = _dist.world_size()
    if saved.world_size != world_size:
        raise CheckpointError(
            f"cannot resume from {path}: it was written by a run over {saved.world_size} process(es), but this run "
            f"has {world_size}. Resume with the same world size (torchrun --nproc-per-node {saved.world_size}), "
            f"or pass resume=False to start afresh"
        )
    try:
        saved_weight_decay = validate_weight_decay(saved.weight_decay)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"cannot resume from {path}: its weight_decay is invalid: {error}") from None
    cursor = CurvatureCursor()
    try:
        cursor.load_state_dict(saved.curvature_window)
    except ValueError as error:
        raise CheckpointError(f"cannot resume from {path}: its curvature_window is invalid: {error}") from None
    settings = _differing_scg_settings(optimizer, state.get("optimizer"))
    if settings:
        raise CheckpointError(
            f"cannot resume from {path}: the SCG that wrote it had {settings}. Build the optimizer with the "
            f"settings it was saved with (fit checks them against its other arguments; {H0_RESUME_HINT}), or pass "
            f"resume=False to start afresh"
        )
    if annealer is not None and saved.annealing is not None:
        annealer.load_state_dict(saved.annealing)  # checked before anything else is loaded
    restore(model, optimizer, state, source=path)
    train.curvature_cursor.load_state_dict(cursor.state_dict())  # the rotating curvature subsets go on where they were
    same_data = fingerprint is not None and fingerprints_match(saved.data_fingerprint, fingerprint)
    if fingerprint is not None and isinstance(saved.data_fingerprint, dict) and not same_data:
        warnings.warn(
            f"resuming from {os.fspath(path)!r} on other training data than the run that wrote it: "
            f"{describe_difference(saved.data_fingerprint, fingerprint)}. The loss and gradient are recomputed at the "
            f"loaded weights; the run goes on from them but is not a continuation of the saved run",
            stacklevel=3,
        )
    same_penalty = saved_weight_decay == train.weight_decay
    if not same_penalty:
        warnings.warn(
            f"resuming from {os.fspath(path)!r} with weight_decay={train.weight_decay} where the run that wrote it had "
            f"{saved_weight_decay}: another objective. The loss and gradient are recomputed at the loaded weights; "
            f"the run goes on from them but is not a continuation of the saved run",
            stacklevel=3,
        )
    same_loss = saved.loss is None or saved.loss == describe_loss(train)  # an older checkpoint: not recorded
    if not same_loss:
        warnings.warn(
            f"resuming from {os.fspath(path)!r} with the loss {describe_loss(train)} where the run that wrote it had "
            f"{saved.loss}: another objective. The loss and gradient are recomputed at the loaded weights; the run "
            f"goes on from them but is not a continuation of the saved run",
            stacklevel=3,
        )
    trusted = same_data and same_penalty and same_loss and saved.optimizer_at_weights
    if isinstance(optimizer, SCG) and not trusted:
        optimizer.restart()
        logger.info("SCG restarts at the weights loaded from %s: its saved E and r may belong to others", path)
    return history, saved, trusted, same_data and same_penalty and same_loss
