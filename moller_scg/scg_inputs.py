"""What a user hands :class:`~moller_scg.SCG`, checked at the boundary: hyperparameters and parameter groups (the
closure's loss is checked by the objective that wraps it, :mod:`moller_scg.objective`).

- the hyperparameters σ, λ₁, ``hvp``, N and m: their modes (:data:`HVP_MODES`) and bounds (:data:`SIGMA_MAX`,
  ``LAMBDA_MAX``), checked with a message that carries the value (:func:`_validate_hyperparameters`), equal in
  every parameter group (:func:`_refuse_differing_group`);
- the options of ``torch.optim.LBFGS`` and Adam that SCG does not have, each refused with what SCG does instead
  (:func:`_other_optimizer_options_message`), including the learning rate an LR scheduler asks a group for
  (:class:`_ParamGroup`);
- the parameters: each listed once, floating point or complex (:func:`_refuse_unoptimizable`);
- what ``step`` is called with: a closure or an objective, on at least one parameter
  (:func:`_checked_step_closure`).

Re-exported by :mod:`moller_scg.scg`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch

from moller_scg.objective import Objective
from moller_scg.scg_state import LAMBDA_MAX

HVP_MODES = ("double-backward", "finite-difference", "secant")
"""How s = E''(w)p, or δ = pᵀs, is obtained; ``"secant"`` (the quasi-Newton model's δ) needs ``memory`` ≥ 1."""
SIGMA_MAX = 1.0
"""Largest σ accepted. The finite-difference probe w + σₖp with σₖ = σ/|p| lies at distance exactly σ from w, so σ is
a length in weight space; (E'(w + σₖp) − E'(w))/σₖ approximates E''(w)p only for a probe short against the scale on
which E' bends. A unit-length probe is already 10⁴ times the paper's largest σ (1e-4); beyond it the quotient is not
a curvature, and σ = 1e300 makes σₖ overflow."""

# What users of torch.optim.LBFGS and Adam pass by habit, and what SCG offers instead.
_OPTIONS_OF_OTHER_OPTIMIZERS = {
    "lr": "SCG has no learning rate: the step length α = μ/δ comes from the curvature along p (step 5)",
    "line_search_fn": "SCG does no line search: one trial point per iteration decides the step (step 6)",
    "max_iter": (
        "one SCG.step is one iteration, not max_iter of them (LBFGS's max_iter=20 default means 20 iterations per "
        "step): call step max_iter times, or use fit(..., max_iter=...)"
    ),
    "max_eval": "one SCG.step makes 1 or 2 closure calls: bound the calls by the number of steps",
    "tolerance_grad": (
        "SCG.step does not stop by itself: stop the loop when optimizer.trace.residual_norm (|E'(w)|) is small "
        "enough, or use fit(..., min_grad=...)"
    ),
    "tolerance_change": (
        "SCG.step does not stop by itself: stop the loop when optimizer.trace.stalled is true, or use fit(...), "
        "which stops a stalled run"
    ),
    "history_size": (
        "SCG's history of secant pairs is memory=m: SCG(params, memory=20) keeps the 20 latest (memory=0, the "
        "default of SCG(params), is Møller's SCG without them)"
    ),
    "betas": (
        "SCG has no Adam moments to tune: with memory ≥ 1, diagonal_scaling=True keeps a second moment of the "
        "gradients for the preconditioner's H₀, with a fixed β"
    ),
    "eps": "SCG has no Adam moments to tune: diagonal_scaling=True's second moment has a fixed ε",
    "weight_decay": (
        "add the penalty to the loss the closure returns (e.g. + wd/2 * Σ|w|²), or pass fit(..., weight_decay=wd) "
        "or GradientAccumulator(..., weight_decay=wd)"
    ),
    "momentum": "SCG's conjugate direction p = r + βp plays the role of momentum, with β from Møller's formula",
}


def _default_hvp(memory: Any) -> str:
    """``hvp`` when the user gives none: ``"secant"`` with m ≥ 1 secant pairs (free δ), else ``"double-backward"``."""
    return "secant" if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0 else HVP_MODES[0]


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    """``ValueError`` naming the value and the valid range for σ, λ₁, ``hvp``, N (``restart``), m (``memory``) or
    ``diagonal_scaling``."""
    sigma, lambd, hvp, restart = group["sigma"], group["lambd"], group["hvp"], group["restart"]
    memory = group["memory"]
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise ValueError(
            f"Invalid memory (m) value: {memory!r}; it must be an int ≥ 0 (0: Møller's SCG, no secant pairs)"
        )
    diagonal_scaling = group.get("diagonal_scaling", False)
    if not isinstance(diagonal_scaling, bool):
        raise ValueError(f"Invalid diagonal_scaling value: {diagonal_scaling!r}; it must be True or False")
    if diagonal_scaling and memory == 0:
        raise ValueError(
            "diagonal_scaling=True shapes the quasi-Newton preconditioner's H₀, but memory=0 keeps no secant pairs: "
            "pass memory=m ≥ 1 (e.g. SCG(params, memory=20, diagonal_scaling=True))"
        )
    if hvp == "secant" and memory == 0:
        raise ValueError(
            "hvp='secant' takes δ from the quasi-Newton model of the secant pairs, but memory=0 keeps none: "
            "pass memory=m ≥ 1 (e.g. SCG(params, memory=20)), or choose hvp='double-backward' or 'finite-difference'"
        )
    # The isinstance checks stay apart from the comparisons, so that sigma and lambd stay Any for the type checker:
    # typeshed's numbers.Real cannot be compared with a float (CoBA's hz_lambda check does the same).
    sigma_is_real = isinstance(sigma, numbers.Real) and not isinstance(sigma, bool)
    lambd_is_real = isinstance(lambd, numbers.Real) and not isinstance(lambd, bool)
    if not sigma_is_real or not (0.0 < sigma <= SIGMA_MAX):
        raise ValueError(
            f"Invalid sigma (σ) value: {sigma!r}; it must be a number with 0 < σ ≤ SIGMA_MAX = {SIGMA_MAX:g}, the "
            f"length of the finite-difference probe in weight space (the paper uses ≤ 1e-4)"
        )
    if not lambd_is_real or not (0.0 < lambd < LAMBDA_MAX):
        raise ValueError(
            f"Invalid lambd (λ₁) value: {lambd!r}; it must be a number with 0 < λ₁ < LAMBDA_MAX = {LAMBDA_MAX:g}, "
            f"the bound SCG keeps λ under (the paper uses ≤ 1e-6)"
        )
    if hvp not in HVP_MODES:
        raise ValueError(f"Invalid hvp value: {hvp!r}; choose one of {', '.join(map(repr, HVP_MODES))}")
    if restart is not None and (isinstance(restart, bool) or not isinstance(restart, int) or restart < 1):
        raise ValueError(f"Invalid restart (N) value: {restart!r}; it must be an int ≥ 1, or None for n = #weights")


def _refuse_differing_group(group: dict[str, Any], param_groups: list[dict[str, Any]], keys: Iterable[str]) -> None:
    """``ValueError`` when ``group``, the last of ``param_groups``, differs from group 0 in one of ``keys``."""
    first = param_groups[0]
    for key in keys:
        if group[key] != first[key]:
            raise ValueError(
                f"SCG optimizes all parameters as one vector, so every parameter group needs the same {key!r}: got "
                f"{group[key]!r} in group {len(param_groups) - 1} and {first[key]!r} in group 0. Set it once, as "
                f"SCG(params, {key}=...), not per group"
            )


def _other_optimizer_options_message(options: dict[str, Any]) -> str:
    """Why SCG refuses keyword arguments it does not have, and what to do instead of each known one."""
    known = [name for name in options if name in _OPTIONS_OF_OTHER_OPTIMIZERS]
    unknown = [name for name in options if name not in _OPTIONS_OF_OTHER_OPTIMIZERS]
    lines = [
        f"SCG got keyword arguments it does not have: {', '.join(f'{name}={options[name]!r}' for name in options)}. "
        f"SCG's options are sigma, lambd, hvp, restart, memory and diagonal_scaling; remove the others."
    ]
    lines += [f"  {name}: {_OPTIONS_OF_OTHER_OPTIMIZERS[name]}." for name in known]
    if unknown:
        lines.append(f"  {', '.join(unknown)}: not an option of SCG.")
    return "\n".join(lines)


class _ParamGroup(dict):
    """A parameter group that answers a request for a learning rate with the reason there is none.

    LR schedulers read ``group["lr"]`` (and ``group["initial_lr"]``); on a plain dict that is a bare
    ``KeyError: 'lr'``. ``get`` and ``in`` behave as for any dict.
    """

    def __missing__(self, key: Any) -> Any:
        if key in ("lr", "initial_lr"):
            raise KeyError(
                f"SCG has no learning rate ({key!r}), so an LR scheduler has nothing to schedule: SCG's step length "
                f"α = μ/δ comes from the curvature along the search direction at every iteration. Drop the "
                f"scheduler; to train on, call step again, and stop on optimizer.trace.stalled or use fit(...)"
            )
        raise KeyError(key)


def _refuse_unoptimizable(param_group: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """``ValueError`` for a parameter listed twice, ``TypeError`` for one that is not floating point or complex.

    Runs before ``torch.optim.Optimizer.add_param_group`` (which only warns about a repeat inside a group): ``params``
    is already a list, of tensors or of (name, tensor) pairs.
    """
    entries = [entry if isinstance(entry, tuple) else (None, entry) for entry in param_group["params"]]
    seen: dict[int, int] = {}
    for position, (name, param) in enumerate(entries):
        described = f"{name!r}" if name is not None else f"#{position} of group {len(param_groups)}"
        if id(param) in seen:
            raise ValueError(
                f"parameter {described} appears twice in one parameter group (also as #{seen[id(param)]}): SCG "
                f"would move it twice per step. List each parameter once (model.parameters() does)"
            )
        seen[id(param)] = position
        for index, group in enumerate(param_groups):
            if any(param is other for other in group["params"]):
                raise ValueError(
                    f"parameter {described} is already in parameter group {index}: each parameter may belong to "
                    f"one group only"
                )
        if isinstance(param, torch.Tensor) and not (param.is_floating_point() or param.is_complex()):
            raise TypeError(
                f"parameter {described} has dtype {param.dtype}: SCG optimizes floating-point or complex "
                f"parameters only (an integer or boolean tensor has no gradient). Leave it out of the optimizer, "
                f"or register it as a buffer"
            )


def _checked_step_closure(closure: Any, params: list[torch.Tensor]) -> Callable[[], Any] | Objective:
    """What ``SCG.step`` was given, once checked: ``TypeError`` when it is not a closure or an objective,
    ``ValueError`` when SCG has no parameters."""
    if closure is None or not (callable(closure) or isinstance(closure, Objective)):
        raise TypeError(
            f"SCG.step needs a closure that re-evaluates the model and returns the loss, got {closure!r:.80}. "
            f"As for torch.optim.LBFGS: def closure(): optimizer.zero_grad(); loss = loss_fn(model(x), y); "
            f"loss.backward(create_graph=True); return loss — then optimizer.step(closure)"
        )
    if not params:
        raise ValueError(
            "SCG has no parameters to optimize: its parameter groups are empty (pass e.g. model.parameters())"
        )
    return closure
