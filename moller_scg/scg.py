"""Møller's Scaled Conjugate Gradient (SCG) as a ``torch.optim.Optimizer``.

One call of :meth:`SCG.step` is one iteration of the paper (steps 2–9). The step length comes from a
Levenberg–Marquardt-scaled quadratic model along the conjugate direction, so there is no learning rate and no
line search. Each step is marked in the code with the paper's step number; ``docs/algorithm.md`` maps them.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch

from moller_scg import _vectors as vec
from moller_scg import quasi_newton, step_arithmetic
from moller_scg.flat_vector import FlatBuffers, FlatLayout
from moller_scg.objective import ClosureObjective, Objective, as_objective, is_plain_closure, same_tensors
from moller_scg.scg_inputs import (
    HVP_MODES,
    SIGMA_MAX,
    _default_hvp,
    _other_optimizer_options_message,
    _ParamGroup,
    _refuse_differing_group,
    _refuse_unoptimizable,
    _validate_hyperparameters,
)
from moller_scg.scg_state import (
    LAMBDA_MAX,
    SCGScalars,
    SCGStalledWarning,
    SCGTrace,
    read_scg_entry,
    scg_entry,
)
from moller_scg.step_arithmetic import UNRESOLVED_DECREASE_ULPS

logger = logging.getLogger(__name__)

DEFAULT_MEMORY = 20
"""m of the preconditioned mode that ``fit`` and ``moller-scg mnist`` use by default (``SCG(params)`` keeps m = 0):
the best m of ``benchmarks/peers.py`` over its five problems (docs/performance.md)."""

# Constants of the paper (Møller 1993, steps 7 and 8).
GOOD_COMPARISON = 0.75  # Δ ≥ 0.75: the quadratic model is good, reduce the scale λ (step 7)
POOR_COMPARISON = 0.25  # Δ < 0.25: the quadratic model is poor, raise the scale λ (step 8)
LAMBDA_DECREASE_FACTOR = 4.0  # λ ← λ / 4 on a good step (step 7)

# Safeguards of this implementation (not in the paper).
NON_FINITE_COMPARISON = -2.0
"""Δ assumed for λ's increase (step 8) when the trial loss or gradient is not finite: the next α shrinks 4×."""
MAX_NON_FINITE_TRIALS = 20
"""Non-finite trials in a row after which :meth:`SCG.step` raises ``FloatingPointError`` instead of going on."""
# UNRESOLVED_DECREASE_ULPS, the rounding level below which step 6 estimates the loss decrease from the slopes, is
# defined beside that estimate in moller_scg.step_arithmetic. LAMBDA_MAX, the bound step 8 keeps λ under, is
# defined in moller_scg.scg_state (a trace at it is stalled), and the
# hyperparameters' HVP_MODES and SIGMA_MAX in moller_scg.scg_inputs; like the trace and the scalars, they are
# imported above and exported from here.
__all__ = [
    "SCG",
    "SCGTrace",
    "SCGScalars",
    "SCGStalledWarning",
    "DEFAULT_MEMORY",
    "HVP_MODES",
    "GOOD_COMPARISON",
    "POOR_COMPARISON",
    "LAMBDA_DECREASE_FACTOR",
    "NON_FINITE_COMPARISON",
    "LAMBDA_MAX",
    "MAX_NON_FINITE_TRIALS",
    "UNRESOLVED_DECREASE_ULPS",
    "SIGMA_MAX",
]


class SCG(torch.optim.Optimizer):
    r"""Møller's Scaled Conjugate Gradient: full-batch, second-order-aware, no learning rate, no line search.

    Each :meth:`step` is one iteration of Møller (1993), steps 2–9:

    2. after a successful step, the curvature along p: σₖ = σ/|p|, s = E''(w)p, δ = pᵀs;
    3. scale: δ ← δ + (λ − λ̄)|p|²;
    4. if δ ≤ 0, make it positive: λ̄ = 2(λ − δ/|p|²), δ ← −δ + λ|p|², λ ← λ̄;
    5. μ = pᵀr, α = μ/δ;
    6. Δ = 2δ(E(w) − E(w + αp)) / μ² from one evaluation at the trial point w + αp;
    7. if Δ ≥ 0, accept: w ← w + αp, r ← −E'(w), λ̄ ← 0; restart p ← r when k mod N = 0, otherwise
       β = (|r₊|² − r₊ᵀr)/μ and p ← r₊ + βp; if Δ ≥ 0.75, λ ← λ/4. Otherwise keep w and set λ̄ ← λ;
    8. if Δ < 0.25, λ ← λ + δ(1 − Δ)/|p|²;
    9. k ← k + 1.

    The first call also evaluates E(w₁) and r₁ = p₁ = −E'(w₁) (step 1). The gradient of an accepted trial is
    r of the next iteration, so no point is evaluated twice.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer`` (``named_parameters()``
            works too). SCG treats all parameters as one vector w, so every group must use the same σ, λ₁,
            ``hvp`` and ``restart``.
        sigma: σ, the finite-difference scale (σₖ = σ/|p|); the paper suggests 0 < σ ≤ 1e-4. Default 5e-5, MATLAB
            ``trainscg``'s. Used only with
            ``hvp="finite-difference"``.
        lambd: λ₁, the initial Levenberg–Marquardt scale; the paper suggests 0 < λ₁ ≤ 1e-6. Default 5e-7,
            ``trainscg``'s.
        hvp: how s = E''(w)p is obtained. ``"double-backward"`` (default): exactly, by double-backward through
            the graph of the evaluation that produced the current gradient — the closure must call
            ``loss.backward(create_graph=True)``. ``"finite-difference"``: Møller's
            s = (E'(w + σₖp) − E'(w))/σₖ, one extra closure call. In ``"double-backward"`` mode a closure
            with an ``hvp(vectors)`` method (such as :class:`moller_scg.GradientAccumulator`) is asked for the
            exact product instead. ``"secant"``: from the quasi-Newton model, free (needs ``memory`` ≥ 1, see
            below). Default: ``"double-backward"``, or ``"secant"`` when ``memory`` ≥ 1.
        restart: N, the restart period: p ← r whenever the iteration count k is a multiple of N (k counts
            every iteration). Default: the number of real scalars in the parameters, as in the paper.
        memory: m, the number of secant pairs kept to precondition the direction (2m parameter-sized buffers).
            ``0`` (default) is Møller's SCG exactly. With m ≥ 1, every accepted step stores its free secant pair
            (s = αp, y = r − r₊) and the direction after a success is p₊ = H r₊, with H the limited-memory
            quasi-Newton inverse of the last m pairs (:mod:`moller_scg.quasi_newton`), in place of Møller's
            p₊ = r₊ + βp; a restart also forgets the pairs. λ, δ, Δ and the acceptance test are Møller's.
            ``hvp`` then defaults to ``"secant"``: δ = pᵀBp = pᵀr = μ from the quasi-Newton model B = H⁻¹ itself,
            so a step costs one closure call (α = μ/(μ + λ|p|²), the quasi-Newton step scaled by λ). H₀ = γI with
            γ = maxᵢ sᵢᵀyᵢ/yᵢᵀyᵢ over the pairs held. The very first step, before any pair, takes LBFGS's first
            step length α₀ = min(1, 1/|r₁|₁) (δ = μ/α₀); a later step without pairs (after a restart) takes
            Møller's finite difference. ``hvp="double-backward"`` or
            ``"finite-difference"`` measure the curvature along H r instead (one more product per step).
            ``docs/performance.md`` has the measurements behind ``SCG(params, memory=20)``.
        **options_of_other_optimizers: none are accepted. Options of ``torch.optim.LBFGS`` or Adam kept by habit
            (``lr``, ``line_search_fn``, ``max_iter``, ``tolerance_grad``, ``history_size``, ``weight_decay``, …)
            raise a ``TypeError`` that says what SCG does instead of each.

    SCG has no learning rate, so its parameter groups have no ``"lr"``: an LR scheduler built on it raises a
    ``KeyError`` that says so. One :meth:`step` is one iteration; ``torch.optim.LBFGS.step`` runs up to
    ``max_iter`` (20 by default) iterations.

    Closure calls per step: a success costs 1 trial call (plus 1 curvature call with finite differences); a
    failure costs 1 trial call. The first step adds the evaluation of w₁.

    Example:
        >>> import torch
        >>> from moller_scg import SCG
        >>> w = torch.nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
        >>> optimizer = SCG([w])
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2
        ...     loss.backward(create_graph=True)
        ...     return loss
        >>> for _ in range(120):
        ...     loss = optimizer.step(closure)
        ...     if optimizer.trace.stalled:
        ...         break
        >>> bool(loss < 1e-12)
        True
    """

    # What cannot outlive this object, set by _reset_transient (declared here, where the type checker looks first).
    _closure: Any
    _objective: Objective | None
    _objective_hvp_mode: str | None
    _param_versions: list[int] | None
    _known_products: tuple[list[torch.Tensor], list[int], tuple[float, float, float]] | None
    _flat: FlatBuffers | None
    _warned_stalled: bool

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]],
        sigma: float = 5e-5,
        lambd: float = 5e-7,
        hvp: str | None = None,
        restart: int | None = None,
        memory: int = 0,
        **options_of_other_optimizers: Any,
    ) -> None:
        if options_of_other_optimizers:
            raise TypeError(_other_optimizer_options_message(options_of_other_optimizers))
        if hvp is None:
            hvp = _default_hvp(memory)
        defaults = {"sigma": sigma, "lambd": lambd, "hvp": hvp, "restart": restart, "memory": memory}
        _validate_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._scalars = SCGScalars(lambd=float(lambd))
        self._secant_pairs: quasi_newton.SecantPairs | None = None  # made at step 1 when memory ≥ 1
        self._trace: SCGTrace | None = None
        self._reset_transient()

    # ----------------------------------------------------------------------------------------------------------
    # torch.optim.Optimizer interface

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its σ, λ₁, ``hvp`` and ``restart`` must equal the other groups' (SCG has one w).

        Raises:
            ValueError: a parameter is listed twice (in this group or another), or a hyperparameter is invalid or
                differs from the other groups'.
            TypeError: a parameter is not floating point or complex.
        """
        if isinstance(param_group, dict):
            param_group = _ParamGroup(param_group)
            if not isinstance(param_group.get("params"), (torch.Tensor, set)):
                param_group["params"] = list(param_group.get("params", []))
                _refuse_unoptimizable(param_group, self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_hyperparameters(group)
            _refuse_differing_group(group, self.param_groups, self.defaults)
        except ValueError:
            self.param_groups.pop()  # the optimizer stays as it was
            raise
        if hasattr(self, "_scalars"):
            # A parameter added after construction has no direction yet: the next step starts again at step 1.
            self._scalars.started = False

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus ``"scg"``: the scalars of :class:`SCGScalars` and the latest trace.

        As with ``torch.optim`` optimizers, the tensors are the optimizer's own, not copies: the next :meth:`step`
        updates the direction p in place. Save the state (or ``copy.deepcopy`` it) before stepping on.
        """
        state = super().state_dict()
        secant_pairs_state = None if self._secant_pairs is None else self._secant_pairs.state_dict()
        state["scg"] = scg_entry(self._scalars, self._trace, secant_pairs_state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; the run then continues exactly as it would have."""
        memory = self.param_groups[0]["memory"]
        scalars, trace, secant_pairs_state = read_scg_entry(state_dict, memory)
        secant_pairs = None
        if secant_pairs_state is not None:
            secant_pairs = quasi_newton.SecantPairs(self._params(), memory)
            secant_pairs.load_state_dict(secant_pairs_state)
        super().load_state_dict(state_dict)
        # torch keeps a loaded tensor that already has the parameter's dtype and device, so r and p would be shared
        # with the caller's dict (or with the optimizer it came from); step 7 updates p in place, so SCG copies them.
        # Hooks may keep entries of their own in optimizer.state (torch's tests put a bool there): only the
        # parameters' dicts hold r and p.
        for param_state in self.state.values():
            if not isinstance(param_state, dict):
                continue
            for key in ("residual", "direction"):
                if isinstance(param_state.get(key), torch.Tensor):
                    param_state[key] = param_state[key].clone()
        self.param_groups = [_ParamGroup(group) for group in self.param_groups]
        self._scalars = scalars
        self._trace = trace
        self._secant_pairs = secant_pairs
        self._reset_transient()

    def __getstate__(self) -> dict[str, Any]:
        # The autograd graph of the last evaluation cannot be copied or pickled; it is rebuilt when needed.
        state = super().__getstate__()
        state["_scalars"] = dataclasses.replace(self._scalars)
        state["_trace"] = self._trace
        state["_secant_pairs"] = self._secant_pairs
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.param_groups = [_ParamGroup(group) for group in self.param_groups]
        self._reset_transient()

    def restart(self) -> None:
        """Forget the search direction: the next :meth:`step` starts again at step 1 from the current weights.

        Use it after writing new weights into the parameters (SCG notices such writes between steps by itself,
        but not right after :meth:`load_state_dict`). λ returns to λ₁; the iteration count k goes on.
        """
        self._scalars.started = False

    @property
    def trace(self) -> SCGTrace | None:
        """The latest iteration's k, E, success, λ, δ, Δ, μ, α, |r|, |p| and call counts (``None`` before a step)."""
        return self._trace

    @property
    def uses_exact_curvature(self) -> bool:
        """Whether each step asks its closure or objective for s = E''(w)p itself (``hvp="double-backward"``).

        ``"finite-difference"`` and ``"secant"`` take δ from gradients alone (Møller's σ, or the quasi-Newton
        model), so they never call an ``hvp`` method: a subsampled curvature (``curvature_fraction`` < 1 in
        :class:`~moller_scg.GradientAccumulator`) would go unused. Every group has the same ``hvp``.
        """
        return self.param_groups[0]["hvp"] == "double-backward"

    # ----------------------------------------------------------------------------------------------------------
    # The iteration

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | Objective | None = None) -> torch.Tensor:  # type: ignore[override]
        """One iteration of SCG (Møller 1993, steps 2–9); the first call also does step 1.

        Args:
            closure: re-evaluates the model and returns the loss E(w) after setting each parameter's ``.grad`` to
                E'(w) (``zero_grad``, forward, ``backward``), as for ``torch.optim.LBFGS``. With
                ``hvp="double-backward"`` it calls ``loss.backward(create_graph=True)``, unless it has an
                ``hvp(vectors)`` method. Or an :class:`~moller_scg.objective.Objective`, asked for E, E' and E''p.

        Returns:
            E(w) at the weights the parameters hold after the step, as a detached float64 scalar tensor.

        Raises:
            TypeError: the closure is missing or returns something other than a scalar loss, or a gradient is
                sparse.
            ValueError: the objective, accumulator or closure with ``params`` differentiates other tensors than
                the optimizer's, or in another order.
            FloatingPointError: the loss or gradient at the accepted weights, or the curvature, is not finite, or
                the trial was not finite ``MAX_NON_FINITE_TRIALS`` times in a row. The weights are never left
                at a trial point or set to a non-finite value.
        """
        if closure is None or not (callable(closure) or isinstance(closure, Objective)):
            raise TypeError(
                f"SCG.step needs a closure that re-evaluates the model and returns the loss, got {closure!r:.80}. "
                f"As for torch.optim.LBFGS: def closure(): optimizer.zero_grad(); loss = loss_fn(model(x), y); "
                f"loss.backward(create_graph=True); return loss — then optimizer.step(closure)"
            )
        params = self._params()
        if not params:
            raise ValueError(
                "SCG has no parameters to optimize: its parameter groups are empty (pass e.g. model.parameters())"
            )
        objective = self._objective_for(closure, params)
        if not self._scalars.started or self._weights_changed_outside(params):
            self._start(objective, params)
        else:
            self._hold_state_in_flat_buffers(params)
        accepted = self._copy_of_weights(params)
        try:
            self._iterate(objective, params, accepted)
        except BaseException:
            # Whatever the closure raised, the parameters hold the accepted point w afterwards.
            vec.copy_(params, accepted)
            raise
        finally:
            self._param_versions = [p._version for p in params]
        self._warn_once_when_stalled()
        return torch.tensor(self._scalars.loss, dtype=torch.float64)

    def _start(self, objective: Objective, params: list[torch.Tensor]) -> None:
        """Step 1: evaluate E(w₁) and r₁ = −E'(w₁); p₁ = r₁; λ = λ₁, λ̄ = 0, success = true."""
        if self._scalars.started:
            logger.info("parameters were changed outside SCG.step: restarting SCG from the current weights")
        loss, gradients = self._evaluate(objective)
        step_arithmetic.require_finite(loss, gradients, "at the starting weights")
        memory = self.param_groups[0]["memory"]
        if memory > 0 and FlatLayout.fits(params):
            if self._flat is None or not self._flat.layout.matches(params):
                self._flat = FlatBuffers(FlatLayout(params))
            flat = self._flat
            flat.layout.gather(gradients, out=flat.residual).neg_()
            flat.direction.copy_(flat.residual)
            self._point_state_at(params, flat)
        else:
            self._flat = None
            for p, r in zip(params, vec.negated(gradients)):
                self.state[p]["residual"] = r
                self.state[p]["direction"] = r.clone()
        if memory > 0:
            # H = I: p₁ = r₁. The storage of the pairs is kept across restarts while the parameters stay the same.
            if self._secant_pairs is None or not self._secant_pairs.fits(params):
                self._secant_pairs = quasi_newton.SecantPairs(params, memory)
            self._secant_pairs.clear()
        scalars = self._scalars
        scalars.loss = loss
        scalars.lambd = float(self.param_groups[0]["lambd"])
        scalars.lambd_bar = 0.0
        scalars.delta = 0.0
        scalars.success = True
        scalars.non_finite_trials = 0
        scalars.started = True
        residual, _ = self._state_vectors(params)
        residual_sq = vec.squared_norm(residual)  # also p₁ᵀr₁ and |p₁|²: p₁ is a copy of r₁
        self._remember_state_products(params, (residual_sq, residual_sq, residual_sq))
        self._trace = self._make_trace(
            residual_sq, residual_sq, comparison=math.nan, mu=math.nan, alpha=0.0, success=False
        )

    def _iterate(self, objective: Objective, params: list[torch.Tensor], accepted: list[torch.Tensor]) -> None:
        """Steps 2–9. State is committed only once every closure call of the iteration has returned.

        Parameter-sized buffers held besides w and the closure's gradients: the accepted copy of w, r and p
        throughout, and one more — s = E''p until δ = pᵀs is formed (step 2), then r₊ from the trial on. The new
        direction p₊ = r₊ + βp is formed in p's storage, after the last closure call: 4 buffers at the peak.
        """
        group = self.param_groups[0]
        scalars = self._scalars
        flat = self._flat
        residual, stored_direction = self._state_vectors(params)
        residual_sq, mu, stored_direction_sq = self._state_products(residual, stored_direction)
        direction, direction_sq = stored_direction, stored_direction_sq
        success = scalars.success
        lambd, lambd_bar = scalars.lambd, scalars.lambd_bar
        lost_descent = mu < 0.0 and self._secant_pairs is not None
        if residual_sq != 0.0 and (mu == 0.0 or lost_descent):
            # p ⟂ r would give α = 0 and Δ = 0/0; search along steepest descent instead (not in the paper). The
            # search direction is r itself; p's storage takes it over in step 7, after the last closure call.
            # With memory, p = H r is a descent direction unless rounding made H indefinite: the pairs are dropped.
            if self._secant_pairs is not None:
                self._secant_pairs.clear()
            direction, direction_sq = residual, residual_sq
            mu, success, lambd_bar = residual_sq, True, 0.0
        if residual_sq == 0.0 or mu * mu == 0.0:
            # r = 0 (step 9 terminates), or so small that μ² underflows and Δ cannot be formed: w is stationary
            # in float64, and the weights stay as they are.
            self._trace = self._make_trace(
                residual_sq, stored_direction_sq, comparison=math.nan, mu=mu, alpha=0.0, success=False
            )
            return

        # Step 2: the second-order information along p, only after a success.
        first_step_length = (
            step_arithmetic.first_step_length(residual) if scalars.k == 0 and group["hvp"] == "secant" else None
        )
        if success and group["hvp"] == "secant" and self._secant_pairs:
            delta = mu  # p = H r, so the quasi-Newton model B = H⁻¹ has Bp = r and δ = pᵀBp = pᵀr = μ
        elif success and first_step_length is not None:
            delta = mu / first_step_length  # the very first step, p = r: α = α₀ while λ is negligible
        elif success:
            delta = self._curvature_along(
                self._per_parameter(direction), direction_sq, objective, params, accepted, group
            )
        else:
            delta = scalars.delta
        # Step 3: scale δ by λ.
        delta += (lambd - lambd_bar) * direction_sq
        # Step 4: make the Hessian positive definite along p.
        if delta <= 0.0:
            lambd_bar = 2.0 * (lambd - delta / direction_sq)
            delta = -delta + lambd * direction_sq
            lambd = lambd_bar
        # Step 5: the step length.
        alpha = mu / delta
        # Step 6: the comparison ratio, from one evaluation at the trial point.
        vec.add_(params, self._per_parameter(direction), alpha)
        trial_loss, trial_gradients = self._evaluate(objective)
        # That was the last closure call of the iteration: from here on, state may be committed and p overwritten.
        if flat is not None:
            new_residual = [flat.layout.gather(trial_gradients).neg_()]
        else:
            new_residual = vec.negated(trial_gradients)
        new_residual_sq, new_dot_old, new_dot_direction = vec.dots(
            [(new_residual, new_residual), (new_residual, residual), (new_residual, direction)]
        )
        finite = math.isfinite(trial_loss) and step_arithmetic.all_finite_given_squared_norm(
            new_residual, new_residual_sq
        )
        if finite:
            unchanged = trial_loss == scalars.loss and new_residual_sq == new_dot_old == residual_sq
            decrease = step_arithmetic.loss_decrease(
                scalars.loss,
                trial_loss,
                alpha,
                mu,
                new_dot_direction,
                step_arithmetic.loss_epsilon(params),
                unchanged=unchanged,
            )
            comparison = 2.0 * delta * decrease / mu**2
        else:
            comparison = math.nan

        # Step 7: accept or reject the trial point.
        scalars.k += 1
        if direction is not stored_direction:
            vec.copy_(stored_direction, direction)  # the steepest-descent fallback searched along p = r
        if finite and comparison >= 0.0:
            if scalars.k % self._restart_period(params) == 0:
                vec.copy_(stored_direction, new_residual)  # restart: p ← r₊
                if self._secant_pairs is not None:
                    self._secant_pairs.clear()
                new_mu = new_direction_sq = new_residual_sq
            elif self._secant_pairs is not None:
                new_direction_sq, new_mu = self._quasi_newton_direction(
                    params, stored_direction, alpha, residual, new_residual
                )
            else:
                beta = (new_residual_sq - new_dot_old) / mu
                vec.scale_add_(stored_direction, beta, new_residual)  # p ← r₊ + βp
                # |p₊|² for the trace, and p₊ᵀr₊, the next iteration's μ (step 5), together.
                new_direction_sq, new_mu = vec.dots(
                    [(stored_direction, stored_direction), (stored_direction, new_residual)]
                )
            if flat is not None:
                flat.residual.copy_(new_residual[0])
            else:
                for p, r in zip(params, new_residual):
                    self.state[p]["residual"] = r
            held = (new_residual_sq, new_mu, new_direction_sq)  # (|r|², pᵀr, |p|²) of the r and p now held
            scalars.loss = trial_loss
            lambd_bar = 0.0
            success = True
            if comparison >= GOOD_COMPARISON:
                lambd = lambd / LAMBDA_DECREASE_FACTOR
            scalars.non_finite_trials = 0
        else:
            vec.copy_(params, accepted)
            held = (residual_sq, mu, direction_sq)  # the same r and p (after the fallback: p = r and μ = |r|²)
            lambd_bar = lambd
            success = False
            scalars.non_finite_trials = 0 if finite else scalars.non_finite_trials + 1
        # Step 8: raise the scale when the quadratic model was poor.
        effective_comparison = comparison if finite else NON_FINITE_COMPARISON
        if effective_comparison < POOR_COMPARISON:
            lambd = min(lambd + delta * (1.0 - effective_comparison) / direction_sq, LAMBDA_MAX)
        scalars.lambd, scalars.lambd_bar, scalars.delta, scalars.success = lambd, lambd_bar, delta, success
        self._remember_state_products(params, held)
        held_residual_sq, _, held_direction_sq = held
        self._trace = self._make_trace(
            held_residual_sq, held_direction_sq, comparison=comparison, mu=mu, alpha=alpha, success=success
        )
        if scalars.non_finite_trials >= MAX_NON_FINITE_TRIALS:
            raise FloatingPointError(
                f"the loss or gradient at the trial point was not finite {scalars.non_finite_trials} times in a row "
                f"(last trial loss: {trial_loss}), although each trial step was 4× shorter than the one before; "
                f"the weights were kept at the last accepted point. The loss is probably not finite arbitrarily "
                f"close to these weights: look for NaN in the data or an operation that fails there (log of 0, sqrt "
                f"of a negative number); torch.autograd.set_detect_anomaly(True) names the operation"
            )

    # ----------------------------------------------------------------------------------------------------------
    # Helpers, each one idea

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _restart_period(self, params: list[torch.Tensor]) -> int:
        """N: the user's restart period, or the number of real scalars in w (the paper's default)."""
        restart = self.param_groups[0]["restart"]
        return restart if restart is not None else sum(vec.as_real(p).numel() for p in params)

    def _objective_for(self, closure: Callable[[], Any] | Objective, params: list[torch.Tensor]) -> Objective:
        """The objective this step evaluates: what ``closure`` is, as :func:`~moller_scg.objective.as_objective` sees
        it; made when a new object comes, kept while the same one does.

        A plain closure is wrapped in SCG's own :class:`~moller_scg.objective.ClosureObjective`, and a new plain
        closure only replaces that wrapper's closure: PyTorch Lightning wraps its training step in a new closure at
        every step, and the graph of the accepted trial's evaluation, which the wrapper keeps, must still serve the
        next step's product E''(w)p.
        """
        group = self.param_groups[0]
        # The exact product, or gradients alone: SCG forms Møller's finite difference itself (also in "secant" mode,
        # before the first pair).
        hvp_mode = "double-backward" if group["hvp"] == "double-backward" else "finite-difference"
        objective = self._objective
        if objective is not None and self._objective_hvp_mode == hvp_mode and same_tensors(objective.params, params):
            if closure is self._closure:
                return objective
            if type(objective) is ClosureObjective and objective.closure is self._closure and is_plain_closure(closure):
                objective.closure = closure  # SCG's own wrapper (never an objective the caller passed) goes on
                self._closure = closure
                return objective
        objective = as_objective(closure, params, hvp_mode, group["sigma"])
        self._closure, self._objective, self._objective_hvp_mode = closure, objective, hvp_mode
        return objective

    def _evaluate(self, objective: Objective) -> tuple[float, list[torch.Tensor]]:
        """E(w) and E'(w) at the weights the parameters hold, by one evaluation of the objective.

        The gradients are the objective's ``copy=False`` ones (the ``.grad`` tensors, a ``None`` one as zero): SCG
        is done with them before it evaluates again, and never writes into them.
        """
        with torch.enable_grad():
            loss, gradients = objective.value_and_grad(copy=False)
        self._scalars.closure_calls += 1
        return float(loss), gradients

    def _curvature_along(
        self,
        direction: list[torch.Tensor],
        direction_sq: float,
        objective: Objective,
        params: list[torch.Tensor],
        accepted: list[torch.Tensor],
        group: dict[str, Any],
    ) -> float:
        """Step 2: δ = pᵀs with s ≈ E''(w)p at the accepted weights w.

        Møller's finite difference is formed here from r = −E'(w), which SCG holds (so it needs E' at w + σₖp
        only, also right after a ``load_state_dict``); the exact product is the objective's. s is needed for δ
        only: it is released when this returns, before the trial point is evaluated.
        """
        self._scalars.hvp_calls += 1
        if group["hvp"] in ("finite-difference", "secant"):  # "secant" before its first pair: Møller's σ
            sigma_k = group["sigma"] / math.sqrt(direction_sq)
            vec.add_(params, direction, sigma_k)
            _, shifted_gradients = self._evaluate(objective)
            vec.copy_(params, accepted)
            residual = [self.state[p]["residual"] for p in params]
            curvature = step_arithmetic.finite_difference_from_residual(shifted_gradients, residual, sigma_k)
            (delta,) = vec.dots([(direction, curvature)])
            # A non-finite E'(w + σₖp) makes s and then δ non-finite (0·inf is NaN too), so it is looked for only then.
            if not math.isfinite(delta) and not vec.all_finite(shifted_gradients):
                raise FloatingPointError(
                    f"the gradient at w + σₖp (σₖ = {sigma_k:.3g}) for the finite-difference curvature is not finite: "
                    f"lower sigma (now {group['sigma']!r}), or use hvp='double-backward' for exact curvature"
                )
        else:
            (delta,) = vec.dots([(direction, self._exact_curvature(direction, objective))])
        if not math.isfinite(delta):
            raise FloatingPointError(
                f"the curvature δ = pᵀs along the search direction is not finite ({delta}): the second "
                f"derivatives overflow at the accepted weights. Check the model for operations that overflow "
                f"(exp, log near 0, division), or train in float64"
            )
        return delta

    def _exact_curvature(self, direction: list[torch.Tensor], objective: Objective) -> list[torch.Tensor]:
        """s = E''(w)p at the accepted weights w, from the objective.

        The objective takes it from the graph of its last evaluation when that was at w (the accepted trial's, or
        step 1's), and evaluates once more otherwise (after a ``load_state_dict`` or a copy): such an evaluation
        counts as a closure call.
        """
        evaluations_before = objective.counts.ngev
        with torch.enable_grad():
            products = objective.hvp(direction)
        self._scalars.closure_calls += objective.counts.ngev - evaluations_before
        return products

    def _quasi_newton_direction(
        self,
        params: list[torch.Tensor],
        direction: list[torch.Tensor],
        alpha: float,
        residual: list[torch.Tensor],
        new_residual: list[torch.Tensor],
    ) -> tuple[float, float]:
        """Step 7 with memory: keep the pair (s, y) = (αp, r − r₊) of the accepted step, then p ← H r₊ in p's storage.

        Returns |p₊|² and p₊ᵀr₊ (the next μ), formed from the tensors :meth:`_state_vectors` gives (the flat buffers
        on the fast path) as :meth:`_state_products` would form them after a ``load_state_dict``, so a resumed run
        takes the same bits. The pair update holds one 3 × n buffer (y, s and r₊ flattened) and H r₊ besides the
        stored pairs (:meth:`SecantPairs.advance`).
        """
        pairs = cast(quasi_newton.SecantPairs, self._secant_pairs)
        if self._flat is not None:
            pairs.advance_flat(direction[0], alpha, residual[0], new_residual[0])
        else:
            vec.copy_(direction, pairs.advance(direction, alpha, residual, new_residual))
        new_direction_sq, new_mu = vec.dots([(direction, direction), (direction, new_residual)])
        return new_direction_sq, new_mu

    def _state_products(
        self, residual: list[torch.Tensor], direction: list[torch.Tensor]
    ) -> tuple[float, float, float]:
        """(|r|², μ = pᵀr, |p|²) of the state's r and p.

        The previous step already formed them for its trace and its successor (:meth:`_remember_state_products`);
        they are reused when r and p are still the same tensors, unmodified since, and computed otherwise (after a
        ``load_state_dict``, or when something wrote into the state). Same bits either way.
        """
        tensors = residual + direction
        if self._known_products is not None:
            known_tensors, known_versions, products = self._known_products
            if len(known_tensors) == len(tensors) and all(a is b for a, b in zip(known_tensors, tensors)):
                if known_versions == [t._version for t in tensors]:
                    return products
        residual_sq, mu, direction_sq = vec.dots([(residual, residual), (direction, residual), (direction, direction)])
        return residual_sq, mu, direction_sq

    def _remember_state_products(self, params: list[torch.Tensor], products: tuple[float, float, float]) -> None:
        """Keep (|r|², pᵀr, |p|²) of the r and p now in the state for :meth:`_state_products`."""
        residual, direction = self._state_vectors(params)
        tensors = residual + direction
        self._known_products = (tensors, [t._version for t in tensors], products)

    def _state_vectors(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """r and p as the vector operations take them: ``[flat r]``, ``[flat p]`` on the fast path (memory ≥ 1), the
        per-parameter tensors of ``optimizer.state`` otherwise."""
        if self._flat is not None:
            return [self._flat.residual], [self._flat.direction]
        return [self.state[p]["residual"] for p in params], [self.state[p]["direction"] for p in params]

    def _per_parameter(self, vector: list[torch.Tensor]) -> list[torch.Tensor]:
        """r or p one tensor per parameter, for operations that pair them with the parameters (w + αp)."""
        return self._flat.per_parameter(vector[0]) if self._flat is not None else vector

    def _hold_state_in_flat_buffers(self, params: list[torch.Tensor]) -> None:
        """On the fast path (:mod:`moller_scg.flat_vector`), make sure ``optimizer.state``'s r and p are views of the
        flat buffers: after a ``load_state_dict``, a copy or an assignment by hand they are separate tensors, and
        are gathered into new buffers (same numbers)."""
        if self.param_groups[0]["memory"] == 0:
            return  # Møller's SCG keeps r and p per parameter (self._flat stays None)
        residual = [self.state[p]["residual"] for p in params]
        direction = [self.state[p]["direction"] for p in params]
        if self._flat is not None and self._flat.layout.matches(params) and self._flat.holds(residual, direction):
            return
        if not FlatLayout.fits(params):
            self._flat = None
            return
        # New buffers, not the old ones: a state tensor may still be a view of them.
        flat = FlatBuffers(FlatLayout(params))
        flat.layout.gather(residual, out=flat.residual)
        flat.layout.gather(direction, out=flat.direction)
        self._point_state_at(params, flat)
        self._flat = flat

    def _point_state_at(self, params: list[torch.Tensor], flat: FlatBuffers) -> None:
        """Make ``optimizer.state``'s r and p of each parameter the views of the flat buffers."""
        for p, r, d in zip(params, flat.residual_views, flat.direction_views):
            self.state[p]["residual"] = r
            self.state[p]["direction"] = d

    def _copy_of_weights(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The accepted w, copied before the trial: into the flat buffer's views on the fast path, new tensors
        otherwise."""
        if self._flat is None:
            return vec.clone(params)
        vec.copy_(self._flat.accepted_views, params)
        return self._flat.accepted_views

    def _weights_changed_outside(self, params: list[torch.Tensor]) -> bool:
        """Whether the parameters were written to since the last step (then r and E are stale)."""
        return self._param_versions is not None and self._param_versions != [p._version for p in params]

    def _make_trace(
        self,
        residual_sq: float,
        direction_sq: float,
        *,
        comparison: float,
        mu: float,
        alpha: float,
        success: bool,
    ) -> SCGTrace:
        """The trace of the iteration just done, from |r|² and |p|² of the r and p held after it."""
        scalars = self._scalars
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
            closure_calls=scalars.closure_calls,
            hvp_calls=scalars.hvp_calls,
        )

    def _warn_once_when_stalled(self) -> None:
        """Warn when the trace turns stalled; again only after a step that was not stalled."""
        stalled = self._trace is not None and self._trace.stalled
        if stalled and not self._warned_stalled:
            trace = cast(SCGTrace, self._trace)
            warnings.warn(
                f"SCG stalled at iteration {trace.k} (E = {trace.loss:.6g}, λ = {trace.lambd:.3g}): the step no "
                f"longer changes the loss, and further steps cost full price for nothing. Stop the loop when "
                f"optimizer.trace.stalled is true (fit(...) does), or change something (optimizer.restart())",
                SCGStalledWarning,
                stacklevel=3,
            )
        self._warned_stalled = stalled

    def _reset_transient(self) -> None:
        """Forget what cannot outlive this object: the objective of the last step (with the graph of its last
        evaluation), the weights' versions and the inner products of the state's r and p."""
        self._closure = None
        self._objective = None
        self._objective_hvp_mode = None
        self._param_versions = None
        self._known_products = None
        self._warned_stalled = False
        self._flat = None
