"""``minimize(fun, x0)``: SCG on a function of a tensor or of a pytree of tensors, like ``scipy.optimize.minimize``.

For curve fitting, system identification and physics-informed losses, where there is no ``nn.Module`` and no
dataset: ``fun(x)`` returns a scalar tensor, x0 is a tensor or a dict/list/tuple of tensors, and the result
(:class:`OptimizeResult`) says where the run stopped, why, and what it cost. Today ``minimize`` drives
:class:`moller_scg.SCG` through its public ``step(closure)`` API with a
:class:`~moller_scg.objective.FunctionObjective` as the closure; the numbers come from SCG's trace.

The module is named after ``scipy.optimize``, where ``minimize`` and ``OptimizeResult`` live; the package re-exports
both, so ``moller_scg.minimize`` is the function (this module is ``moller_scg.optimize``).

Stopping rules, checked after each iteration k:

* ``status 0`` (success): |E'(x)| ≤ ``tol``, the Euclidean norm of the gradient at the accepted x (scipy's gtol);
* ``status 2`` (success): an accepted step changed the loss by at most ``ftol`` relative to the loss,
  (Eₖ₋₁ − Eₖ) / max(|Eₖ₋₁|, |Eₖ|) ≤ ``ftol``, with L-BFGS-B's default ftol (scipy's factr = 1e7 times the
  float64 machine epsilon). Unlike L-BFGS-B, the denominator has no floor of 1: with it, a loss whose minimum is 0
  (an exact fit) would stop once the loss changes by 2e-9 in absolute terms, long before ``tol`` is met. A rejected
  SCG step leaves the loss unchanged and is not a sign of convergence, so only accepted steps count;
* ``status 1``: ``max_iter`` iterations (SCG counts accepted and rejected steps alike);
* ``status 3``: the loss or gradient is not finite at x0, or SCG met non-finite trial points too often (its
  ``FloatingPointError``); x is then the last accepted point, never a non-finite one;
* ``status 4``: ``callback(x)`` returned a true value (``True``, ``numpy.True_``, a tensor holding true, 1);
* ``status 5``: SCG stalled (:attr:`moller_scg.scg.SCGTrace.stalled`): λ reached its bound, or an accepted step
  changed nothing, so the loss cannot be lowered at this precision (scipy's "precision loss"); not a success.

The callback is called after every iteration, the last one included, before these rules are checked.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from moller_scg.objective import HVP_MODES, FunctionObjective
from moller_scg.scg import SCG, SCGStalledWarning
from moller_scg.stopping import callback_says_stop

METHODS = ("scg", "lbfgs")
DEFAULT_FTOL = 1e7 * torch.finfo(torch.float64).eps
"""Relative loss change at which an accepted step stops the run: scipy L-BFGS-B's default (factr = 1e7)."""

STATUS_GRADIENT = 0
STATUS_MAX_ITER = 1
STATUS_LOSS_CHANGE = 2
STATUS_NON_FINITE = 3
STATUS_CALLBACK = 4
STATUS_STALLED = 5
_SUCCESSFUL_STATUSES = (STATUS_GRADIENT, STATUS_LOSS_CHANGE)


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    """Where a :func:`minimize` run stopped, why, and what it cost (the fields of ``scipy.optimize.OptimizeResult``).

    Attributes:
        x: the solution, in x0's structure, on x0's device and with its dtypes (new tensors).
        fun: E(x), as a Python float.
        jac: E'(x) in x0's structure (``None`` when the run failed before a gradient was known).
        nit: iterations done (SCG: accepted and rejected steps alike).
        nfev: evaluations of ``fun``.
        njev: evaluations of its gradient (each one with an evaluation of ``fun``).
        nhev: Hessian-vector products (exact, or finite differences of gradients).
        success: whether a convergence rule stopped the run (``status`` 0 or 2).
        status: 0 gradient norm ≤ tol, 1 max_iter reached, 2 loss change ≤ ftol, 3 non-finite values,
            4 stopped by the callback, 5 SCG stalled at the loss's rounding level.
        message: the reason in words.
    """

    x: Any
    fun: float
    jac: Any
    nit: int
    nfev: int
    njev: int
    nhev: int
    success: bool
    status: int
    message: str


def minimize(
    fun: Callable[[Any], torch.Tensor],
    x0: Any,
    *,
    method: str = "scg",
    hvp: str = "double-backward",
    max_iter: int = 1000,
    tol: float = 1e-5,
    ftol: float = DEFAULT_FTOL,
    callback: Callable[[Any], Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> OptimizeResult:
    """Minimize a scalar function of a tensor, or of a dict/list/tuple of tensors, with SCG.

    Args:
        fun: ``fun(x) → scalar tensor``, x in x0's structure; differentiable twice by autograd for
            ``hvp="double-backward"``, once for ``"finite-difference"``.
        x0: the starting point: a real (or complex) floating-point tensor of any shape, or a dict/list/tuple
            pytree of them, on any device. Never modified.
        method: ``"scg"`` (:class:`moller_scg.SCG`), or ``"lbfgs"`` (``torch.optim.LBFGS`` with a strong-Wolfe
            line search, for comparison; its ``tol`` is on the largest absolute gradient entry, and ``ftol`` is its
            ``tolerance_change``).
        hvp: how SCG obtains E''(x)v: ``"double-backward"`` (exact) or ``"finite-difference"`` (Møller's).
        max_iter: at most this many iterations.
        tol: stop when |E'(x)| ≤ tol (Euclidean norm).
        ftol: stop when an accepted step changes the loss by ≤ ftol relative to it (see the module docstring);
            0 turns the rule off.
        callback: ``callback(x)`` after each iteration (the last one included), x a new copy in x0's structure;
            returning a true value stops. SCG only.
        options: keyword arguments of the optimizer: ``sigma``, ``lambd``, ``restart`` for SCG; for ``"lbfgs"``
            ``torch.optim.LBFGS``'s ``lr``, ``history_size``, ``max_eval`` and ``line_search_fn`` (its
            ``max_iter``, ``tolerance_grad`` and ``tolerance_change`` are ``minimize``'s ``max_iter``, ``tol`` and
            ``ftol``).

    Returns:
        An :class:`OptimizeResult`.

    Raises:
        TypeError: ``fun`` or ``callback`` is not callable, x0 is not a tensor pytree, ``fun`` returns something
            other than a real scalar (a tensor of several elements, a complex value, ``None``, …).
        ValueError: an unknown ``method`` or ``hvp``, an invalid ``max_iter``, ``tol``, ``ftol`` or option;
            ``fun``'s value does not depend on x through autograd (a Python number, a detached tensor, a graph
            that does not reach x).

    Example:
        >>> import torch
        >>> from moller_scg import minimize
        >>> def rosenbrock(x):
        ...     return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        >>> result = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), tol=1e-10)
        >>> result.success, result.message
        (True, 'the gradient norm 8.16e-12 is ≤ tol = 1e-10')
        >>> bool((result.x - 1).abs().max() < 1e-10)
        True
    """
    _validate(method, hvp, max_iter, tol, ftol, callback, options)
    if method == "lbfgs":
        if callback is not None:
            raise ValueError(
                "callback is supported with method='scg' only (torch.optim.LBFGS runs its iterations alone)"
            )
        # LBFGS needs gradients only: no graph is kept for second derivatives.
        return _minimize_lbfgs(FunctionObjective(fun, x0, "finite-difference"), max_iter, tol, ftol, options or {})
    return _minimize_scg(FunctionObjective(fun, x0, hvp), hvp, max_iter, tol, ftol, callback, options or {})


def _minimize_scg(
    objective: FunctionObjective,
    hvp: str,
    max_iter: int,
    tol: float,
    ftol: float,
    callback: Callable[[Any], Any] | None,
    options: Mapping[str, Any],
) -> OptimizeResult:
    unknown = set(options) - {"sigma", "lambd", "restart"}
    if unknown:
        raise ValueError(f"unknown SCG options {sorted(unknown)}: method='scg' takes sigma, lambd and restart")
    optimizer = SCG(objective.params, hvp=hvp, **options)
    try:
        status, message = _iterate(optimizer, objective, max_iter, tol, ftol, callback)
        trace = optimizer.trace
        params = objective.params
        residual = [optimizer.state[p].get("residual") for p in params]  # r = −E'(x), SCG's documented state
        jac = None if any(r is None for r in residual) else objective.structured([-r for r in residual])
        # A failure at x0 (a non-finite gradient) leaves no trace: E(x0) is still what the result reports.
        fun = float(objective.loss()) if trace is None else trace.loss
        return OptimizeResult(
            x=objective.structured(_copies(params)),
            fun=fun,
            jac=jac,
            nit=0 if trace is None else trace.k,
            nfev=objective.counts.nfev,
            njev=objective.counts.ngev,
            nhev=0 if trace is None else trace.hvp_calls,
            success=status in _SUCCESSFUL_STATUSES,
            status=status,
            message=message,
        )
    finally:
        objective.release_graph()


def _iterate(
    optimizer: SCG,
    objective: FunctionObjective,
    max_iter: int,
    tol: float,
    ftol: float,
    callback: Callable[[Any], Any] | None,
) -> tuple[int, str]:
    """SCG's steps until a stopping rule of the module docstring holds: (status, message)."""
    with warnings.catch_warnings():
        # minimize stops a stalled run itself (status 5); the warning's advice is for a user's own step loop.
        warnings.simplefilter("ignore", SCGStalledWarning)
        for _ in range(max_iter):
            previous_loss = None if optimizer.trace is None else optimizer.trace.loss
            try:
                # The objective is the closure; in double-backward mode SCG asks its hvp() for E''(x)p.
                optimizer.step(objective)
            except FloatingPointError as error:
                return STATUS_NON_FINITE, str(error)
            trace = optimizer.trace
            assert trace is not None  # every step leaves one
            if callback is not None:
                answer = callback(objective.structured(_copies(objective.params)))
                if callback_says_stop(callback, answer):
                    return STATUS_CALLBACK, "the callback returned a true value"
            if trace.residual_norm <= tol:
                return STATUS_GRADIENT, f"the gradient norm {trace.residual_norm:.3g} is ≤ tol = {tol:g}"
            if (
                ftol > 0  # 0 turns the rule off
                and trace.success
                and previous_loss is not None
                and _relative_change(previous_loss, trace.loss) <= ftol
            ):
                return STATUS_LOSS_CHANGE, f"the relative loss change of an accepted step is ≤ ftol = {ftol:g}"
            if trace.stalled:
                return STATUS_STALLED, (
                    f"SCG stalled at a gradient norm of {trace.residual_norm:.3g}: λ reached its bound or an accepted "
                    f"step changed nothing, so the loss cannot be lowered at this precision"
                )
    return STATUS_MAX_ITER, f"the maximum number of iterations ({max_iter}) was reached"


_MINIMIZE_OWNS = {"max_iter": "max_iter", "tolerance_grad": "tol", "tolerance_change": "ftol"}
"""The LBFGS arguments that ``minimize``'s own arguments set, with the argument that does."""
_REFUSED_LBFGS_OPTIONS = {"maximize": "minimize minimizes: to maximize f, minimize −f"}
"""LBFGS arguments ``minimize`` cannot take, with the reason."""


def _minimize_lbfgs(
    objective: FunctionObjective, max_iter: int, tol: float, ftol: float, options: Mapping[str, Any]
) -> OptimizeResult:
    _check_lbfgs_options(options)
    settings = {"line_search_fn": "strong_wolfe", **options}
    optimizer = torch.optim.LBFGS(
        objective.params, max_iter=max_iter, tolerance_grad=tol, tolerance_change=ftol, **settings
    )
    first: list[bool] = []  # whether E and E' were finite at x0, once the first evaluation has run

    def closure() -> Any:
        loss = objective()
        if not first:
            gradients = [p.grad for p in objective.params if p.grad is not None]
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            first.append(math.isfinite(value) and all(bool(torch.isfinite(g).all()) for g in gradients))
        return loss

    try:
        optimizer.step(closure)
        state = optimizer.state[objective.params[0]]  # LBFGS keeps its state on its first parameter
        # LBFGS does not say why it stopped, nor is its last evaluation always at the final x: one more evaluation.
        loss, gradients = objective.value_and_grad()
    finally:
        objective.release_graph()
    fun = float(loss)
    largest_gradient = max(float(g.abs().max()) for g in gradients)
    max_eval = optimizer.param_groups[0]["max_eval"]
    if not first[0]:
        status, message = STATUS_NON_FINITE, "the loss or gradient at x0 is not finite: LBFGS started from it anyway"
    elif not math.isfinite(fun) or not math.isfinite(largest_gradient):
        status, message = STATUS_NON_FINITE, f"the loss or gradient at the final x is not finite (loss {fun})"
    elif largest_gradient <= tol:
        status, message = STATUS_GRADIENT, f"the largest gradient entry {largest_gradient:.3g} is ≤ tol = {tol:g}"
    elif state.get("n_iter", 0) >= max_iter or state.get("func_evals", 0) >= max_eval:
        status, message = STATUS_MAX_ITER, f"the iteration ({max_iter}) or evaluation ({max_eval}) budget was reached"
    else:
        status, message = STATUS_LOSS_CHANGE, f"the loss or step changed by ≤ ftol = {ftol:g} (LBFGS tolerance_change)"
    return OptimizeResult(
        x=objective.structured(_copies(objective.params)),
        fun=fun,
        jac=objective.structured(gradients),
        nit=int(state.get("n_iter", 0)),
        nfev=objective.counts.nfev,
        njev=objective.counts.ngev,
        nhev=0,
        success=status in _SUCCESSFUL_STATUSES,
        status=status,
        message=message,
    )


def _check_lbfgs_options(options: Mapping[str, Any]) -> None:
    """``options`` must be keyword arguments of ``torch.optim.LBFGS`` that ``minimize`` does not set itself."""
    for key, argument in _MINIMIZE_OWNS.items():
        if key in options:
            raise ValueError(f"options[{key!r}] is minimize's {argument}= for method='lbfgs': pass {argument}=…")
    for key, reason in _REFUSED_LBFGS_OPTIONS.items():
        if key in options:
            raise ValueError(f"options[{key!r}] is refused: {reason}")
    accepted = set(inspect.signature(torch.optim.LBFGS).parameters) - {
        "params",
        *_MINIMIZE_OWNS,
        *_REFUSED_LBFGS_OPTIONS,
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"unknown LBFGS options {unknown}: method='lbfgs' takes {', '.join(sorted(accepted))} "
            f"(and minimize's max_iter, tol and ftol)"
        )


def _relative_change(previous: float, current: float) -> float:
    """(Eₖ₋₁ − Eₖ) / max(|Eₖ₋₁|, |Eₖ|): L-BFGS-B's measure of progress without its floor of 1 (0 when both are 0)."""
    scale = max(abs(previous), abs(current))
    return 0.0 if scale == 0.0 else (previous - current) / scale


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _validate(method: Any, hvp: Any, max_iter: Any, tol: Any, ftol: Any, callback: Any, options: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"Invalid method value: {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    if hvp not in HVP_MODES:
        raise ValueError(f"Invalid hvp value: {hvp!r}; choose one of {', '.join(map(repr, HVP_MODES))}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Invalid max_iter value: {max_iter!r}; it must be an int ≥ 1")
    for name, value in (("tol", tol), ("ftol", ftol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) < math.inf):
            raise ValueError(f"Invalid {name} value: {value!r}; it must be a finite number ≥ 0")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(x), got {type(callback).__name__}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict of optimizer keyword arguments, got {type(options).__name__}")
