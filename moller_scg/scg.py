"""Møller's Scaled Conjugate Gradient (SCG) as a ``torch.optim.Optimizer``.

One call of :meth:`SCG.step` is one iteration of the paper (steps 2–9). The step length comes from a
Levenberg–Marquardt-scaled quadratic model along the conjugate direction, so there is no learning rate and no
line search. Each step is marked in the code with the paper's step number; ``docs/algorithm.md`` maps them.

The iteration reads here; the pieces it uses each have a module: ``scg_curvature`` (step 2's δ = pᵀs),
``scg_trial`` (step 6's trial point and Δ), ``scg_direction`` (step 7's next direction p₊), ``step_arithmetic``
(α₀, the loss decrease of step 6's Δ), ``scg_storage`` (where r and p live), ``scg_objective`` (what a step
evaluates and what it cost), ``scg_state`` (the scalars k, λ, λ̄, δ, the trace, the ``state_dict`` entry) and
``scg_inputs`` (the checks of what a user passes).

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from moller_scg import _vectors as vec
from moller_scg import quasi_newton, step_arithmetic
from moller_scg.kronecker import KroneckerFactors
from moller_scg.objective import Objective
from moller_scg.scg_curvature import curvature_along
from moller_scg.scg_direction import next_direction, restart_period
from moller_scg.scg_inputs import (
    HVP_MODES,
    SIGMA_MAX,
    _checked_step_closure,
    _default_hvp,
    _other_optimizer_options_message,
    _ParamGroup,
    _refuse_differing_group,
    _refuse_unoptimizable,
    _validate_hyperparameters,
)
from moller_scg.scg_objective import EvaluationTally, _StepObjective, evaluate
from moller_scg.scg_state import (
    LAMBDA_MAX,
    SCGScalars,
    SCGStalledWarning,
    SCGTrace,
    make_trace,
    read_held_products,
    read_scg_entry,
    scg_entry,
    warn_when_stalled,
)
from moller_scg.scg_storage import _copy_loaded_vectors, _StateVectors, _vectors_of_their_own
from moller_scg.scg_trial import trial_at
from moller_scg.step_arithmetic import UNRESOLVED_DECREASE_ULPS
from moller_scg.step_wrapper import profile_hook_step_when_needed

logger = logging.getLogger(__name__)

DEFAULT_MEMORY = 20
"""m of the preconditioned mode that ``fit`` and ``moller-scg mnist`` use by default (``SCG(params)`` keeps m = 0):
the best m of ``benchmarks/peers.py`` over its five problems (docs/performance.md)."""

# Constants of the paper (Møller 1993, steps 7 and 8).
GOOD_COMPARISON = 0.75  # Δ ≥ 0.75: the quadratic model is good, reduce the scale λ (step 7)
POOR_COMPARISON = 0.25  # Δ < 0.25: the quadratic model is poor, raise the scale λ (step 8)
LAMBDA_DECREASE_FACTOR = 4.0  # λ ← λ / 4 on a good step (step 7)
SECANT_LAMBDA_DECREASE_FACTOR = 2.0
"""λ ← λ / 2 on a good step in the secant mode (``hvp="secant"``, δ = μ from the quasi-Newton model; not in the
paper): there every rejection is single and the next good step divided λ by 4 only for the step after it to be
rejected again; dividing by 2 took fewer gradient passes to the 99 % and 99.9 % targets on five seeds of three
problems and the same on MNIST (``benchmarks/results/levers_passes_lambda.txt``, docs/performance.md)."""

# Safeguards of this implementation (not in the paper).
NON_FINITE_COMPARISON = -2.0
"""Δ assumed for λ's increase (step 8) when the trial loss or gradient is not finite: the next α shrinks 4×."""
MAX_NON_FINITE_TRIALS = 20
"""Non-finite trials in a row after which :meth:`SCG.step` raises ``FloatingPointError`` instead of going on."""
# Defined beside what uses them, exported from here: UNRESOLVED_DECREASE_ULPS (step_arithmetic), LAMBDA_MAX
# (scg_state: a trace at it is stalled), HVP_MODES and SIGMA_MAX (scg_inputs).
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
    "SECANT_LAMBDA_DECREASE_FACTOR",
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
        memory: m, the number of secant pairs kept to precondition the direction (2m parameter-sized buffers,
            2m + 5 in all with r, p, the accepted w, the trial's r₊ and y = r − r₊, none allocated per step).
            ``0`` (default) is Møller's SCG exactly. With m ≥ 1, every accepted step stores its free secant pair
            (s = αp, y = r − r₊) and the direction after a success is p₊ = H r₊, with H the limited-memory
            quasi-Newton inverse of the last m pairs (:mod:`moller_scg.quasi_newton`), in place of Møller's
            p₊ = r₊ + βp; a restart also forgets the pairs. λ, δ, Δ and the acceptance test are Møller's.
            ``hvp`` then defaults to ``"secant"``: δ = pᵀBp = pᵀr = μ from the quasi-Newton model B = H⁻¹ itself,
            so a step costs one closure call (α = μ/(μ + λ|p|²), the quasi-Newton step scaled by λ). H₀ = γI with
            γ = maxᵢ sᵢᵀyᵢ/yᵢᵀyᵢ over the pairs held. The very first step, before any pair, takes LBFGS's first
            step length α₀ = min(1, 1/|r₁|₁) (δ = μ/α₀); a later step without pairs (after a restart) takes
            Møller's finite difference. After a good step λ is divided by 2, not Møller's 4
            (:data:`SECANT_LAMBDA_DECREASE_FACTOR`). ``hvp="double-backward"`` or
            ``"finite-difference"`` measure the curvature along H r instead (one more product per step).
            ``docs/performance.md`` has the measurements behind ``SCG(params, memory=20)``.
        diagonal_scaling: with ``memory`` ≥ 1, H₀ = γ_D Λ in place of γI: Λ = diag(1/(v^¼ + ε mean v^¼)) from the
            second moment v ← 0.99 v + 0.01 g² of the gradients of the accepted steps (as Adam's, with a fourth
            root), γ_D = maxᵢ sᵢᵀyᵢ / yᵢᵀΛyᵢ (:mod:`moller_scg.diagonal_scaling`). Two more parameter-sized
            buffers (v and Λ), no more evaluations. It took fewer gradient passes than γI on the physics-informed
            net, the regression's 99.9 % target and the MNIST CNN of ``benchmarks/peers.py``, but the CNN it trained
            on the embedded MNIST digits tested 0.3–1.8 points lower (3 seeds) on the cross-entropy alone, so
            ``fit`` gives it only to what K-FAC's factors do not take (its ``preconditioner="auto"``). Default
            ``False``.
        kronecker_factors: with ``memory`` ≥ 1, a :class:`~moller_scg.kronecker.KroneckerFactors` over the model
            and its training inputs: H₀ = γ_K K⁻¹ in place of γI, K K-FAC's Kronecker-factored Fisher of the
            network's ``nn.Linear`` and ``nn.Conv2d`` layers, formed at the first accepted step and then every T
            accepted steps over a share of the samples, with labels drawn from the model; γ_K = maxᵢ sᵢᵀyᵢ /
            yᵢᵀK⁻¹yᵢ (:mod:`moller_scg.kronecker`). Every parameter must belong to such a layer, all of one dtype
            and device. Its refreshes are forwards and backwards of the model that the objective does not count.
            Not with ``diagonal_scaling``. The factors are held in the state dict. Default ``None``; ``fit`` builds
            them for a cross-entropy or squared-error loss (its default ``preconditioner="auto"``).
        **options_of_other_optimizers: none are accepted. Options of ``torch.optim.LBFGS`` or Adam kept by habit
            (``lr``, ``line_search_fn``, ``max_iter``, ``tolerance_grad``, ``history_size``, ``weight_decay``, …)
            raise a ``TypeError`` that says what SCG does instead of each.

    SCG has no learning rate, so its parameter groups have no ``"lr"``: an LR scheduler built on it raises a
    ``KeyError`` that says so. One :meth:`step` is one iteration; ``torch.optim.LBFGS.step`` runs up to
    ``max_iter`` (20 by default) iterations.

    Closure calls per step: a success costs 1 trial call (plus 1 curvature call with finite differences); a
    failure costs 1 trial call. The first step adds the evaluation of w₁. :attr:`trace` reports them as its
    objective counted them (``closure_calls``: its ngev; ``hvp_calls``: its nhev plus Møller's finite differences).

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
    _step_objective: _StepObjective
    _storage: _StateVectors
    _param_versions: list[tuple[int, int]] | None
    _warned_stalled: bool

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]],
        sigma: float = 5e-5,
        lambd: float = 5e-7,
        hvp: str | None = None,
        restart: int | None = None,
        memory: int = 0,
        diagonal_scaling: bool = False,
        kronecker_factors: KroneckerFactors | None = None,
        **options_of_other_optimizers: Any,
    ) -> None:
        if options_of_other_optimizers:
            raise TypeError(_other_optimizer_options_message(options_of_other_optimizers))
        if hvp is None:
            hvp = _default_hvp(memory)
        defaults = {
            "sigma": sigma,
            "lambd": lambd,
            "hvp": hvp,
            "restart": restart,
            "memory": memory,
            "diagonal_scaling": diagonal_scaling,
        }
        _validate_hyperparameters(defaults)
        if kronecker_factors is not None:
            _check_kronecker_factors(kronecker_factors, memory, diagonal_scaling)
        super().__init__(params, defaults)
        self._kronecker_factors = kronecker_factors
        if kronecker_factors is not None:
            kronecker_factors.bind(self._params())
        if self.param_groups[0]["memory"] > 0:  # (every group has the same m)
            quasi_newton.import_linear_algebra()  # here, not inside the first step (a one-time import of SciPy)
        self._scalars = SCGScalars(lambd=float(lambd))
        self._secant_pairs: quasi_newton.SecantPairs | None = None  # made at step 1 when memory ≥ 1
        self._trace: SCGTrace | None = None
        self._reset_transient()

    # ----------------------------------------------------------------------------------------------------------
    # torch.optim.Optimizer interface

    # torch.optim's step wrapper (profiler range, step hooks) only when a profiler or a hook listens: it cost a tenth
    # of a gradient pass per step on a millisecond problem (moller_scg.step_wrapper).
    profile_hook_step = staticmethod(profile_hook_step_when_needed)

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
        updates the direction p in place. Save the state (or ``copy.deepcopy`` it) before stepping on. (With
        ``memory`` ≥ 1, r and p live in flat buffers, p beside the step's other vectors, and are given as copies of
        their per-parameter views, so that a saved state holds n numbers for each, not the buffers.)
        """
        state = super().state_dict()
        state["state"] = _vectors_of_their_own(state["state"])
        secant_pairs_state = None if self._secant_pairs is None else self._secant_pairs.state_dict()
        state["scg"] = scg_entry(self._scalars, self._trace, secant_pairs_state, self._held_products())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; the run then continues exactly as it would have.

        Like every ``torch.optim`` optimizer it takes the saved hyperparameters, ``diagonal_scaling`` among them (a
        state saved before that option existed has ``False``); ``memory`` must match (``ValueError`` otherwise).
        """
        memory = self.param_groups[0]["memory"]
        saved_memory = _saved_setting(state_dict, "memory")
        if saved_memory is not None and saved_memory != memory:
            raise ValueError(
                f"this SCG state_dict was saved by an SCG with memory={saved_memory!r}, but this SCG has "
                f"memory={memory}: build the optimizer with the memory it was saved with"
            )
        scalars, trace, secant_pairs_state = read_scg_entry(state_dict, memory)
        held_products = read_held_products(state_dict)
        secant_pairs = None
        if secant_pairs_state is not None:
            diagonal_scaling = bool(_saved_setting(state_dict, "diagonal_scaling", False))  # False: saved before it
            secant_pairs = quasi_newton.SecantPairs(self._params(), memory, diagonal_scaling, self._kronecker_factors)
            secant_pairs.load_state_dict(secant_pairs_state)
        super().load_state_dict(state_dict)
        _copy_loaded_vectors(self.state)  # r and p, not shared with the dict: step 7 updates p in place
        self.param_groups = [_ParamGroup(group) for group in self.param_groups]
        for group in self.param_groups:
            group.setdefault("diagonal_scaling", False)
        self._scalars = scalars
        self._trace = trace
        self._secant_pairs = secant_pairs
        self._reset_transient()
        self._remember_held_products(held_products)

    def __getstate__(self) -> dict[str, Any]:
        # The autograd graph of the last evaluation cannot be copied or pickled; it is rebuilt when needed.
        state = super().__getstate__()
        state["state"] = defaultdict(dict, _vectors_of_their_own(state["state"]))  # r, p without the flat buffers
        state["_scalars"] = dataclasses.replace(self._scalars)
        state["_trace"] = self._trace
        state["_secant_pairs"] = self._secant_pairs
        state["_kronecker_factors"] = self._kronecker_factors  # (a copy holds a copy of the model and its inputs)
        state["_held_products"] = self._held_products()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        held_products = state.pop("_held_products", None)
        if "_kronecker_factors" not in state and "_kronecker_factors" not in self.__dict__:
            state["_kronecker_factors"] = None  # pickled before the option existed (load_state_dict passes no such key)
        super().__setstate__(state)
        self.param_groups = [_ParamGroup(group) for group in self.param_groups]
        self._reset_transient()
        self._remember_held_products(held_products)

    def restart(self) -> None:
        """Forget the search direction: the next :meth:`step` starts again at step 1 from the current weights.

        SCG notices writes to the parameters between steps by itself and restarts: in-place writes (``p.copy_``
        under ``torch.no_grad()``, ``model.load_state_dict``) and new storage (``p.data = …``,
        ``torch.nn.utils.vector_to_parameters``). Call this after the writes it cannot notice: in-place writes through
        ``.data`` (``p.data.copy_(…)``, ``p.data.clamp_(…)``), which escape autograd's version counter, and writes
        made between :meth:`load_state_dict` and the next step. λ returns to λ₁; the iteration count k goes on.
        """
        self._scalars.started = False

    @property
    def trace(self) -> SCGTrace | None:
        """The latest iteration's k, E, success, λ, δ, Δ, μ, α, |r|, |p| and call counts (``None`` before a step)."""
        return self._trace

    @property
    def kronecker_factors(self) -> KroneckerFactors | None:
        """The :class:`~moller_scg.KroneckerFactors` whose K⁻¹ is H₀'s shape (``None``: H₀ = γI or the diagonal)."""
        return self._kronecker_factors

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
        params = self._params()
        closure = _checked_step_closure(closure, params)
        group = self.param_groups[0]
        objective = self._step_objective.objective_for(closure, params, group["hvp"], group["sigma"])
        tally = EvaluationTally(objective)  # SCG counts no evaluation itself: the objective does
        try:
            if not self._scalars.started or self._weights_changed_outside(params):
                self._start(objective, params, tally)
            else:
                self._storage.hold_in_flat_buffers(self.state, params, group["memory"])
            accepted = self._storage.copy_of_weights(params)
            try:
                self._iterate(objective, params, accepted, tally)
            except BaseException:
                # Whatever the closure raised, the parameters hold the accepted point w afterwards.
                vec.copy_(params, accepted)
                raise
            finally:
                self._param_versions = vec.write_marks(params)
        finally:
            self._trace = tally.add_to(self._scalars, self._trace)  # closure_calls, hvp_calls: what it counted
        self._warned_stalled = warn_when_stalled(self._trace, self._warned_stalled)
        return torch.tensor(self._scalars.loss, dtype=torch.float64)

    def _start(self, objective: Objective, params: list[torch.Tensor], tally: EvaluationTally) -> None:
        """Step 1: evaluate E(w₁) and r₁ = −E'(w₁); p₁ = r₁; λ = λ₁, λ̄ = 0, success = true."""
        if self._scalars.started:
            logger.info("parameters were changed outside SCG.step: restarting SCG from the current weights")
        loss, gradients = evaluate(objective)
        where = "at the starting weights"
        step_arithmetic.require_finite_loss(loss, where)
        scalars = self._scalars
        scalars.started = False  # until r₁ is known to be finite: a state saved after a failure here restarts
        memory = self.param_groups[0]["memory"]
        self._storage.start(self.state, params, gradients, memory)  # r₁ = −E'(w₁), p₁ = r₁
        residual, _ = self._storage.residual_and_direction(self.state, params)
        # |r₁|², also p₁ᵀr₁ and |p₁|² (p₁ is a copy of r₁); finite unless an element of r₁ is not (or it overflows)
        residual_sq = self._storage.squared_norm(residual)
        step_arithmetic.require_finite_gradient(gradients, where, residual_sq)
        if memory > 0:
            # H = I: p₁ = r₁. The storage of the pairs is kept across restarts while the parameters stay the same.
            diagonal_scaling = self._diagonal_scaling
            pairs = self._secant_pairs
            kronecker_factors = self._kronecker_factors
            if (
                pairs is None
                or not pairs.fits(params)
                or (pairs.scaling is not None) != diagonal_scaling
                or pairs.kronecker is not kronecker_factors
            ):
                if kronecker_factors is not None:
                    kronecker_factors.bind(params)  # (a parameter group added since construction)
                pairs = quasi_newton.SecantPairs(params, memory, diagonal_scaling, kronecker_factors)
                self._secant_pairs = pairs
            pairs.clear()
            pairs.start_scaling(gradients)
        scalars.loss = loss
        scalars.lambd = float(self.param_groups[0]["lambd"])
        scalars.lambd_bar = 0.0
        scalars.delta = 0.0
        scalars.success = True
        scalars.non_finite_trials = 0
        scalars.started = True
        self._storage.remember_products(self.state, params, (residual_sq, residual_sq, residual_sq))
        self._trace = make_trace(
            scalars,
            tally.totals(scalars),
            residual_sq,
            residual_sq,
            comparison=math.nan,
            mu=math.nan,
            alpha=0.0,
            success=False,
        )

    def _iterate(
        self, objective: Objective, params: list[torch.Tensor], accepted: list[torch.Tensor], tally: EvaluationTally
    ) -> None:
        """Steps 2–9. State is committed only once every closure call of the iteration has returned. ``tally`` is
        told when step 2 forms Møller's finite difference (a curvature evaluation the objective cannot tell apart).

        Parameter-sized buffers held besides w and the closure's gradients: the accepted copy of w, r and p
        throughout, and one more — s = E''p until δ = pᵀs is formed (step 2), then r₊ from the trial on. The new
        direction p₊ = r₊ + βp is formed in p's storage, after the last closure call: 4 buffers at the peak.
        """
        group = self.param_groups[0]
        scalars = self._scalars
        storage = self._storage
        residual, stored_direction = storage.residual_and_direction(self.state, params)
        residual_sq, mu, stored_direction_sq = storage.products(residual, stored_direction)
        direction, direction_sq = stored_direction, stored_direction_sq
        success = scalars.success
        lambd, lambd_bar = scalars.lambd, scalars.lambd_bar
        # μ < 0, or a p = H r that is not finite (μ or |p|² NaN or inf), is no descent direction either.
        lost_descent = self._secant_pairs is not None and not (mu >= 0.0 and math.isfinite(stored_direction_sq))
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
            self._trace = make_trace(
                scalars,
                tally.totals(scalars),
                residual_sq,
                stored_direction_sq,
                comparison=math.nan,
                mu=mu,
                alpha=0.0,
                success=False,
            )
            return

        # Step 2: the second-order information along p, only after a success.
        first_step_length = (
            step_arithmetic.first_step_length(vec.l1_norm(residual))
            if scalars.k == 0 and group["hvp"] == "secant"
            else None
        )
        if success and group["hvp"] == "secant" and self._secant_pairs:
            delta = mu  # p = H r, so the quasi-Newton model B = H⁻¹ has Bp = r and δ = pᵀBp = pᵀr = μ
        elif success and first_step_length is not None:
            delta = mu / first_step_length  # the very first step, p = r: α = α₀ while λ is negligible
        elif success:
            delta = curvature_along(
                storage.per_parameter(direction),
                direction_sq,
                storage.per_parameter(residual),
                objective,
                params,
                accepted,
                group,
                tally,
            )
        else:
            delta = scalars.delta
        # Steps 3 and 4: scale δ by λ, and make the Hessian positive definite along p.
        delta, lambd, lambd_bar = step_arithmetic.scaled_curvature(delta, lambd, lambd_bar, direction_sq)
        # Step 5: the step length.
        alpha = mu / delta
        # Step 6: the comparison ratio Δ, from one evaluation at the trial point w + αp.
        trial = trial_at(
            objective,
            params,
            storage,
            direction,
            residual,
            alpha,
            mu,
            delta,
            scalars.loss,
            residual_sq,
            self._secant_pairs,
        )
        trial_loss, _, new_residual_sq, _, finite, comparison = trial
        # That was the last closure call of the iteration: from here on, state may be committed and p overwritten.

        # Step 7: accept or reject the trial point.
        accept = finite and comparison >= 0.0
        restart = accept and (scalars.k + 1) % restart_period(group["restart"], params, storage) == 0
        if accept and not restart and self._secant_pairs is not None:
            # Kronecker factors at w₊, when due: before anything is committed, so that a refresh that raises leaves
            # the state as it was (and the weights are put back)
            self._secant_pairs.refresh_factors_when_due()
        scalars.k += 1
        if direction is not stored_direction:
            vec.copy_(stored_direction, direction)  # the steepest-descent fallback searched along p = r
        if accept:
            new_direction_sq, new_mu = next_direction(
                stored_direction, residual, trial, restart, self._secant_pairs, storage, alpha, mu
            )
            storage.keep_residual(self.state, params, trial.accepted_residual())  # r ← r₊
            held = (new_residual_sq, new_mu, new_direction_sq)  # (|r|², pᵀr, |p|²) of the r and p now held
            scalars.loss = trial_loss
            lambd_bar = 0.0
            success = True
            if comparison >= GOOD_COMPARISON:
                secant = group["hvp"] == "secant"
                lambd = lambd / (SECANT_LAMBDA_DECREASE_FACTOR if secant else LAMBDA_DECREASE_FACTOR)
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
        storage.remember_products(self.state, params, held)
        held_residual_sq, _, held_direction_sq = held
        self._trace = make_trace(
            scalars,
            tally.totals(scalars),
            held_residual_sq,
            held_direction_sq,
            comparison=comparison,
            mu=mu,
            alpha=alpha,
            success=success,
        )
        if scalars.non_finite_trials >= MAX_NON_FINITE_TRIALS:
            raise step_arithmetic.non_finite_trials_error(scalars.non_finite_trials, trial_loss)

    # ----------------------------------------------------------------------------------------------------------
    # Helpers, each one idea

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def _diagonal_scaling(self) -> bool:
        """Whether H₀ is diagonal (``False`` for a state saved before the option existed)."""
        return bool(self.param_groups[0].get("diagonal_scaling", False))

    def _held_products(self) -> tuple[float, float, float] | None:
        """(|r|², μ, |p|²) of the r and p in the state as the last step formed them (``None`` before a step, or if the
        state's r or p were replaced or written to since)."""
        if not self._scalars.started:
            return None
        return self._storage.held_products(self.state, self._params())

    def _remember_held_products(self, held_products: tuple[float, float, float] | None) -> None:
        """Give a loaded or unpickled state's r and p the products they were saved with, so that the next step does
        not form them again (in other last bits: :meth:`_StateVectors.products
        <moller_scg.scg_storage._StateVectors.products>`)."""
        if held_products is None or not self._scalars.started:
            return
        params = self._params()
        if all("residual" in self.state.get(p, {}) and "direction" in self.state.get(p, {}) for p in params):
            self._storage.remember_products(self.state, params, held_products)

    def _weights_changed_outside(self, params: list[torch.Tensor]) -> bool:
        """Whether the parameters were written to since the last step (then r and E are stale): an in-place write
        (``p.copy_``, ``model.load_state_dict``) or new storage (``p.data = …``, ``vector_to_parameters``)."""
        return self._param_versions is not None and self._param_versions != vec.write_marks(params)

    def _reset_transient(self) -> None:
        """Forget what cannot outlive this object: the objective of the last step (with the graph of its last
        evaluation), the weights' versions, and the flat buffers of r and p and their inner products."""
        self._step_objective = _StepObjective()
        self._storage = _StateVectors()
        self._param_versions = None
        self._warned_stalled = False


def _check_kronecker_factors(kronecker_factors: Any, memory: Any, diagonal_scaling: Any) -> None:
    """Refuse, by name, a ``kronecker_factors`` argument SCG cannot use."""
    if not isinstance(kronecker_factors, KroneckerFactors):
        raise TypeError(
            f"kronecker_factors must be a moller_scg.KroneckerFactors, got {type(kronecker_factors).__name__}"
        )
    if memory == 0:
        raise ValueError("kronecker_factors is the initial inverse H₀ of the quasi-Newton mode: pass memory=m ≥ 1 too")
    if diagonal_scaling:
        raise ValueError("an H₀ is either diagonal (diagonal_scaling=True) or Kronecker-factored, not both")


def _saved_setting(state_dict: Any, key: str, default: Any = None) -> Any:
    """``key`` of a saved state's first parameter group (``default`` if the state has no such group or entry)."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    first = groups[0] if isinstance(groups, list) and groups else None
    return first.get(key, default) if isinstance(first, dict) else default
