"""What :class:`~moller_scg.SCG` remembers between steps and what it reports after each one.

- :class:`SCGScalars` — the scalars of Møller's iteration (k, E, λ, λ̄, δ, success) and the call totals (added up
  from the objective's own counts, :class:`~moller_scg.scg_objective.EvaluationTally`), besides
  the per-parameter vectors p and r held in ``optimizer.state``;
- :class:`SCGTrace` — the numbers of the latest iteration (:func:`make_trace`), with :attr:`SCGTrace.stalled`, the
  signal to stop a plain ``step`` loop (:class:`SCGStalledWarning` when it turns true, :func:`warn_when_stalled`);
- the ``"scg"`` entry of ``SCG.state_dict()``, which holds both (:func:`scg_entry`, :func:`read_scg_entry`).

Each is re-exported by :mod:`moller_scg.scg`, whose iteration fills them in.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from typing import Any, cast

import torch

LAMBDA_MAX = 1e100
"""Upper bound on λ (netlab's ``betamax`` plays the same role). Once the loss no longer changes at rounding level,
Δ = 0 on every step and step 8 doubles λ each iteration; the bound keeps λ finite so that further steps are
harmless no-ops. ``fit`` reports a run whose λ reaches it as stalled."""


class SCGStalledWarning(UserWarning):
    """SCG has stalled (:attr:`SCGTrace.stalled`): further steps cost full price and change nothing."""


@dataclasses.dataclass(frozen=True)
class SCGTrace:
    """The numbers of the latest iteration — what the blog's Figure 3 plots.

    Attributes:
        k: iterations done so far (successful or not).
        loss: E(w) at the weights the parameters hold after the step.
        success: whether the trial point w + αp was accepted (Δ ≥ 0).
        lambd: λ after the update of steps 7–8, the scale used by the next iteration.
        delta: δ = pᵀs + λ|p|², the scaled curvature along p (after step 4).
        comparison: Δ = 2δ(E(w) − E(w + αp)) / μ², the comparison ratio (step 6); NaN for a non-finite trial.
        mu: μ = pᵀr (step 5).
        alpha: α = μ / δ, the step length (step 5).
        residual_norm: |r| = |E'(w)| at the weights held after the step.
        direction_norm: |p| of the direction the next iteration searches along.
        closure_calls: closure evaluations since the optimizer was made: the evaluations of E (nfev) its
            objectives counted during its steps, with their gradient or, for a trial its loss alone rejected,
            without (:class:`~moller_scg.scg_objective.EvaluationTally`).
        hvp_calls: curvature evaluations since the optimizer was made: the Hessian-vector products (nhev) its
            objectives counted during its steps, plus the finite differences of Møller's step 2 (each from one
            gradient evaluation, which is also a closure call).
    """

    k: int
    loss: float
    success: bool
    lambd: float
    delta: float
    comparison: float
    mu: float
    alpha: float
    residual_norm: float
    direction_norm: float
    closure_calls: int
    hvp_calls: int

    @property
    def stalled(self) -> bool:
        """Whether SCG has stopped making progress, so that a plain ``step`` loop should stop.

        True when λ has reached ``LAMBDA_MAX``, or when the iteration changed nothing: an accepted trial with
        Δ = 0 reproduced E(w) and E'(w) exactly (αp is below the resolution of the weights). Both last: λ only
        grows from there. Computed from the fields, so it is not saved separately.
        """
        return self.lambd >= LAMBDA_MAX or (self.success and self.comparison == 0.0)


@dataclasses.dataclass
class SCGScalars:
    """What SCG remembers between steps besides the per-parameter vectors p (direction) and r (residual).

    Every field is a Python ``int``, ``bool`` or ``float`` (IEEE float64), whatever the parameters' dtype, so a
    ``state_dict`` round trip keeps them exactly.

    Attributes:
        k: iterations done (the paper's k − 1); restarts happen when the paper's k is a multiple of N.
        loss: E(w) at the accepted weights; NaN before the first evaluation.
        lambd: λ, the Levenberg–Marquardt scale of the next iteration.
        lambd_bar: λ̄, the scale already contained in ``delta`` (reset to 0 after a success).
        delta: δ of the last iteration, reused when the last trial failed (step 2 is then skipped).
        success: whether the last trial succeeded, i.e. whether the next iteration needs fresh curvature.
        non_finite_trials: non-finite trials in a row.
        closure_calls: closure evaluations so far, as the objectives counted them (``SCGTrace.closure_calls``).
        hvp_calls: curvature evaluations so far, as the objectives counted them, and finite differences
            (``SCGTrace.hvp_calls``).
        started: whether E(w₁) and r₁ have been evaluated (step 1).
    """

    k: int = 0
    loss: float = math.nan
    lambd: float = 0.0
    lambd_bar: float = 0.0
    delta: float = 0.0
    success: bool = True
    non_finite_trials: int = 0
    closure_calls: int = 0
    hvp_calls: int = 0
    started: bool = False


def make_trace(
    scalars: SCGScalars,
    calls: tuple[int, int],
    residual_sq: float,
    direction_sq: float,
    *,
    comparison: float,
    mu: float,
    alpha: float,
    success: bool,
) -> SCGTrace:
    """The trace of the iteration just done: the scalars after it, the call totals ``calls`` (``closure_calls``,
    ``hvp_calls``) with its evaluations, and |r|² and |p|² of the r and p held after it."""
    return SCGTrace(
        k=scalars.k,
        loss=scalars.loss,
        success=success,
        lambd=scalars.lambd,
        delta=scalars.delta,
        comparison=comparison,
        mu=mu,
        alpha=alpha,
        residual_norm=math.sqrt(residual_sq),
        direction_norm=math.sqrt(direction_sq),
        closure_calls=calls[0],
        hvp_calls=calls[1],
    )


def warn_when_stalled(trace: SCGTrace | None, warned: bool) -> bool:
    """Warn (:class:`SCGStalledWarning`) when the trace turns stalled; again only after a step that was not stalled.

    Called by ``SCG.step`` itself, so that the warning names the line that called ``step``. ``warned``: whether
    the previous step was stalled (what the previous call returned). Returns whether this trace is stalled.
    """
    stalled = trace is not None and trace.stalled
    if stalled and not warned:
        trace = cast(SCGTrace, trace)
        warnings.warn(
            f"SCG stalled at iteration {trace.k} (E = {trace.loss:.6g}, λ = {trace.lambd:.3g}): the step no "
            f"longer changes the loss, and further steps cost full price for nothing. Stop the loop when "
            f"optimizer.trace.stalled is true (fit(...) does), or change something (optimizer.restart())",
            SCGStalledWarning,
            stacklevel=_stacklevel_of_the_caller(),
        )
    return stalled


_INTERNAL_PREFIXES = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)
"""Where moller_scg's and torch's files are: the frames between a user's call of ``step`` (or ``fit``) and the
warning (``SCG.step``, torch's ``no_grad`` decorator, torch.optim's step wrapper when it runs, ``fit``'s loop)."""


def _stacklevel_of_the_caller() -> int:
    """``warnings.warn``'s stacklevel, for the function that calls this, of the first frame outside moller_scg and
    torch: the line that called ``SCG.step`` (or ``fit``), however many decorators and wrappers lie between."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_PREFIXES):
        frame = frame.f_back
        level += 1
    return level


def scg_entry(
    scalars: SCGScalars,
    trace: SCGTrace | None,
    secant_pairs_state: dict[str, Any] | None,
    held_products: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """The ``"scg"`` entry of ``SCG.state_dict()``: the scalars, the latest trace, with memory the secant pairs, and
    the products (|r|², μ = pᵀr, |p|²) of the r and p held as the last step formed them (``"held_products"``), so that
    a resume takes them as they were, not formed again in other last bits."""
    entry: dict[str, Any] = {
        "scalars": dataclasses.asdict(scalars),
        "trace": None if trace is None else dataclasses.asdict(trace),
    }
    if secant_pairs_state is not None:
        entry["secant_pairs"] = secant_pairs_state
    if held_products is not None:
        entry["held_products"] = list(held_products)
    return entry


def read_held_products(state_dict: dict[str, Any]) -> tuple[float, float, float] | None:
    """The ``"held_products"`` of an SCG state_dict's ``"scg"`` entry (``None`` if it was saved without them).

    ``ValueError`` if they are not three numbers.
    """
    products = state_dict["scg"].get("held_products")
    if products is None:
        return None
    if not (
        isinstance(products, (list, tuple))
        and len(products) == 3
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in products)
    ):
        raise ValueError(
            "the 'held_products' of this SCG state_dict's 'scg' entry must be three numbers (|r|², pᵀr, |p|²), "
            f"got {products!r}"
        )
    residual_sq, mu, direction_sq = (float(x) for x in products)
    return residual_sq, mu, direction_sq


def read_scg_entry(state_dict: Any, memory: int) -> tuple[SCGScalars, SCGTrace | None, dict[str, Any] | None]:
    """The scalars, the trace and the secant pairs' state (``None`` if there is none to load) of an SCG state_dict.

    ``ValueError`` for a state_dict that is not SCG's, whose entries have the wrong fields or types, or whose secant
    pairs do not match ``memory`` (m of the optimizer that loads it).
    """
    entry = state_dict.get("scg") if isinstance(state_dict, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("scalars"), dict):
        raise ValueError(
            "this is not an SCG state_dict: it has no 'scg' entry with the scalars λ, λ̄, δ, k "
            "(was it saved by another optimizer?)"
        )
    scalars = _typed_dataclass(SCGScalars, entry["scalars"])
    trace = None if entry.get("trace") is None else _typed_dataclass(SCGTrace, entry["trace"])
    if "secant_pairs" in entry and memory == 0:
        raise ValueError(
            "this SCG state_dict holds secant pairs (it was saved by an SCG with memory ≥ 1), but this SCG has "
            "memory=0: build the optimizer with the memory it was saved with"
        )
    if memory == 0 or not scalars.started:
        return scalars, trace, None
    if "secant_pairs" not in entry:
        raise ValueError(
            f"this SCG state_dict has no secant pairs, but this SCG keeps memory={memory} of them: it was "
            f"saved by an SCG with memory=0; build the optimizer with the memory it was saved with"
        )
    return scalars, trace, entry["secant_pairs"]


def _typed_dataclass(cls: type, values: Any) -> Any:
    """``cls(**values)`` after checking that ``values`` has exactly ``cls``'s fields, each of its declared type."""
    # Each field's type is its name as a string: this module's annotations are postponed (__future__ annotations).
    fields = {field.name: cast(str, field.type) for field in dataclasses.fields(cls)}
    if not isinstance(values, dict) or set(values) != set(fields):
        raise ValueError(
            f"the 'scg' entry of this state_dict does not match {cls.__name__}: expected the fields {sorted(fields)}, "
            f"got {sorted(values) if isinstance(values, dict) else type(values).__name__}"
        )
    kinds: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool}
    for name, declared in fields.items():
        value = values[name]
        wrong_bool = isinstance(value, bool) and declared != "bool"
        if wrong_bool or not isinstance(value, kinds[declared]):
            raise ValueError(f"the 'scg' entry of this state_dict has {name} = {value!r}, which is not a {declared}")
    return cls(**{name: float(value) if fields[name] == "float" else value for name, value in values.items()})
