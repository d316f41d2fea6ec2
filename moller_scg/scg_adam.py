"""Stochastic scaled-conjugate-gradient adaptive optimizers: SCGAdam, SCGAMSGrad and SCGRMSProp.

Sato, Izumi & Iiduka (2024) accelerate an adaptive method by feeding it, in place of the stochastic gradient gₙ,
the scaled conjugate-gradient direction. The paper writes it as a gradient-like vector,

    Gₙ = (1 + γₙ)gₙ − δₙGₙ₋₁,    stepping along −Gₙ;

in terms of the step direction d = −G that is dₙ = −(1 + γₙ)gₙ − δₙdₙ₋₁. The authors' public code instead
computes dₙ = −(1 + γₙ)gₙ + δₙdₙ₋₁: the previous direction enters with the opposite sign (the classical
conjugate-gradient sign, where the paper's is the sign of an anti-momentum). Both are offered through
``direction_form``: ``"paper"`` (the default) and ``"authors-code"``. d₁ = −g₁ in both. The second moment stays on
the raw gradient gₙ².
Everything is elementwise, per parameter tensor. The name is shared with Møller's SCG (``scg.py``), the idea is
not: Møller's method is full-batch, has no learning rate and scales a Hessian model; these are stochastic,
learning-rate driven, and "scaled" refers to the factor 1 + γₙ on the gradient.

The module also holds what :class:`~moller_scg.coba.CoBA` shares with them: the step loop over parameters
(:class:`ConjugateAdaptiveOptimizer`) and the Adam/AMSGrad moments (:func:`adaptive_moment_step`).

Schedules: γ and δ (and CoBA's M) accept a number or a callable n ↦ value, called with the parameter's step count
n = 1, 2, …. The paper's diminishing learning rate αₙ = α/√n is :func:`diminishing_lr`, a
``torch.optim.lr_scheduler.LambdaLR``. ``state_dict()`` saves a callable schedule as :data:`SCHEDULE_PLACEHOLDER`
(callables cannot be loaded with ``weights_only=True``); ``load_state_dict`` keeps the schedule the receiving
optimizer was constructed with, so schedules are re-supplied by constructing the optimizer as before.

Example:
    >>> import torch
    >>> from moller_scg.scg_adam import SCGAdam, diminishing_lr
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    >>> optimizer = SCGAdam([w], lr=0.3, gamma=lambda n: 0.5**n, delta=lambda n: 0.5**n)
    >>> scheduler = diminishing_lr(optimizer)  # αₙ = α/√n
    >>> for _ in range(200):
    ...     optimizer.zero_grad()
    ...     (w**2).sum().backward()
    ...     optimizer.step()
    ...     scheduler.step()
    >>> bool((w.detach() ** 2).sum() < 1e-6)
    True

References:
    Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
    neural networks. Journal of Machine Learning Research 25(395), 1–37. arXiv:2412.11400.

    Kingma, D. P. & Ba, J. (2015). Adam: a method for stochastic optimization. ICLR. arXiv:1412.6980.

    Reddi, S. J., Kale, S. & Kumar, S. (2018). On the convergence of Adam and beyond. ICLR. (AMSGrad)

    Tieleman, T. & Hinton, G. (2012). Lecture 6.5 — RMSProp. COURSERA: Neural Networks for Machine Learning.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch.optim.lr_scheduler import LambdaLR

from moller_scg._vectors import as_real

__all__ = ["SCGAdam", "SCGAMSGrad", "SCGRMSProp", "diminishing_lr", "SCHEDULE_PLACEHOLDER"]

Schedule = float | Callable[[int], float]
"""A hyperparameter that is a number, or a callable n ↦ value of the step count n = 1, 2, …."""

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]

SCHEDULE_PLACEHOLDER = "<schedule: pass it again when constructing the optimizer that loads this state>"
"""What ``state_dict()`` stores in a parameter group in place of a callable schedule."""

# Adam's defaults (Kingma & Ba 2015; torch.optim.Adam), which the authors' code keeps.
DEFAULT_LR = 1e-3
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8
DEFAULT_GAMMA = 0.1
"""γ: the value of the authors' code (its constant setting ``C1``); the paper's constant-rate experiments use γ = 1."""
DEFAULT_DELTA = 0.1
"""δ: the value of the authors' code (``C1``), one of the paper's δ ∈ {1e-1, 1e-2, 1e-3}."""

PREVIOUS_DIRECTION_SIGN = {"paper": -1.0, "authors-code": 1.0}
"""The sign s of the previous direction in dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁, by ``direction_form``:

* ``"paper"``: s = −1, Sato, Izumi & Iiduka (2024), Gₙ = (1 + γₙ)G(xₙ, ξₙ) − δₙGₙ₋₁ with the step along −Gₙ;
* ``"authors-code"``: s = +1, the authors' public SCGAdam code, dₙ = −(1 + γₙ)gₙ + δₙdₙ₋₁."""
DEFAULT_DIRECTION_FORM = "paper"
DEFAULT_RMSPROP_ALPHA = 0.99
"""RMSProp's smoothing constant, as in ``torch.optim.RMSprop`` and the authors' RMSProp code."""


# -------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


def diminishing_lr(optimizer: torch.optim.Optimizer) -> LambdaLR:
    """The diminishing learning rate αₙ = α/√n of the papers, as a ``LambdaLR``; call its ``step()`` after each
    ``optimizer.step()``.

    ``LambdaLR`` counts from 0 and sets the first learning rate when it is made, so the factor is 1/√(k + 1) after k
    scheduler steps: step n of the optimizer then uses α/√n. Its ``state_dict`` loads with ``weights_only=True``.
    """
    return LambdaLR(optimizer, _inverse_sqrt_factor)


def _inverse_sqrt_factor(scheduler_steps: int) -> float:
    return 1.0 / math.sqrt(scheduler_steps + 1)


# -------------------------------------------------------------------------------------------------------------------
# Validation at the boundary


def check_nonnegative(group: dict[str, Any], key: str, label: str) -> None:
    """``group[key]`` must be a finite real number ≥ 0; it is stored as a plain ``float``."""
    value = group[key]
    if not _is_real(value) or not 0.0 <= value < math.inf:
        raise ValueError(f"Invalid {label} value: {value!r}; it must be a finite number ≥ 0")
    group[key] = float(value)


def check_schedule(group: dict[str, Any], key: str, label: str) -> None:
    """``group[key]`` must be a finite number ≥ 0 or a callable n ↦ value."""
    value = group[key]
    if callable(value):
        return
    if not _is_real(value) or not 0.0 <= value < math.inf:
        raise ValueError(f"Invalid {label} value: {value!r}; it must be a finite number ≥ 0 or a callable n ↦ value")
    group[key] = float(value)


def check_smoothing(group: dict[str, Any], key: str, label: str) -> None:
    """``group[key]`` must be a number in [0, 1)."""
    value = group[key]
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {label} value: {value!r}; it must be a number in [0, 1)")
    group[key] = float(value)


def check_betas(group: dict[str, Any]) -> None:
    """``group["betas"]`` must be a pair (β₁, β₂) of numbers in [0, 1)."""
    betas = group["betas"]
    if not isinstance(betas, tuple | list) or len(betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas value: {betas!r}; it must be a pair (β₁, β₂) of numbers in [0, 1)")
    group["betas"] = (float(betas[0]), float(betas[1]))


def check_choice(group: dict[str, Any], key: str, choices: Iterable[str]) -> None:
    """``group[key]`` must be one of ``choices``."""
    choices = tuple(choices)
    if group[key] not in choices:
        raise ValueError(f"Invalid {key} value: {group[key]!r}; choose one of {', '.join(map(repr, choices))}")


def check_flag(group: dict[str, Any], key: str) -> None:
    value = group[key]
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {key} value: {value!r}; it must be True or False")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# -------------------------------------------------------------------------------------------------------------------
# What SCGAdam, SCGAMSGrad, SCGRMSProp and CoBA share


class ConjugateAdaptiveOptimizer(torch.optim.Optimizer):
    """An adaptive optimizer that moves along a conjugate-gradient-type direction: the part the variants share.

    ``step(closure=None)`` works as in ``torch.optim.Adam``: the closure, if given, is evaluated with gradients
    enabled and its loss returned; parameters whose ``.grad`` is ``None`` are skipped (their step count does not
    advance); ``weight_decay`` adds λx to the gradient (L2, not decoupled); complex parameters are updated as their
    real and imaginary parts (``torch.view_as_real``); sparse gradients raise ``TypeError`` before any parameter
    changes.

    State of a parameter (``self.state[p]``): ``"step"``, the number n of updates it has had (a Python ``int``, so
    it stays exact through ``state_dict``/``load_state_dict``), and the tensors named by :meth:`_state_names`, in
    the parameter's dtype, device and shape.

    A subclass sets ``_schedule_keys`` (hyperparameters that may be callables n ↦ value), validates a parameter
    group in :meth:`_prepare_group` and does one update in :meth:`_update`; one that needs the whole group at once
    (CoBA's global β) overrides :meth:`_update_group`.
    """

    _schedule_keys: tuple[str, ...] = ()
    _keys_added_later: dict[str, Any] = {}
    """Hyperparameters added after states were first saved, with the value that reproduces such a state's run
    (a state_dict saved without the key loads with this value)."""

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        # Check the defaults before the parameters, so a bad value is reported even for an empty parameter list;
        # the groups get their own checked copy in add_param_group.
        self._prepare_group(dict(defaults))
        super().__init__(params, defaults)

    # -- hooks for the variants ----------------------------------------------------------------------------------

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Validate a parameter group (defaults filled in) in place, raising ``ValueError`` naming the value."""
        raise NotImplementedError

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The per-parameter state tensors this group's update needs, all zeros before the first step."""
        raise NotImplementedError

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], n: int, group: dict[str, Any]
    ) -> None:
        """Step n of one real parameter tensor, in place; ``state`` holds real views of the state tensors."""
        raise NotImplementedError

    # -- torch.optim.Optimizer interface -------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated before it joins the optimizer."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = {**self.defaults, **param_group}
        self._prepare_group(group)
        super().add_param_group(group)

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state, with :data:`SCHEDULE_PLACEHOLDER` in place of each callable schedule."""
        state = super().state_dict()
        for group in state["param_groups"]:
            for key in self._schedule_keys:
                if callable(group.get(key)):
                    group[key] = SCHEDULE_PLACEHOLDER
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of the same class; saved schedules are taken from this optimizer.

        A state saved before a hyperparameter existed gets the value that reproduces its run
        (``_keys_added_later``), e.g. ``direction_form="authors-code"`` for an SCGAdam state saved before that
        option existed.

        Raises:
            ValueError: the state was saved by another optimizer (its groups lack this one's hyperparameters), or a
                group saved with a callable schedule is loaded into a group constructed without one.
        """
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(saved_groups, list) or not all(isinstance(g, dict) for g in saved_groups):
            raise ValueError(
                f"this is not an optimizer state_dict: it has no list of 'param_groups' ({state_dict!r:.80})"
            )
        saved_groups = [{**self._keys_added_later, **saved} for saved in saved_groups]
        state_dict = {**state_dict, "param_groups": saved_groups}
        schedules: list[dict[str, Any]] = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            missing = sorted(set(self.defaults) - set(saved))
            if missing:
                raise ValueError(
                    f"this is not a {type(self).__name__} state_dict: its parameter group {index} has no "
                    f"{', '.join(map(repr, missing))} (was it saved by another optimizer?)"
                )
            schedules.append({})
            for key in self._schedule_keys:
                if saved[key] != SCHEDULE_PLACEHOLDER:
                    continue
                if not callable(group[key]):
                    raise ValueError(
                        f"parameter group {index} was saved with a schedule for {key!r}, which a state_dict cannot "
                        f"hold; construct this optimizer with the same schedule (a callable n ↦ value) before "
                        f"loading (it has {key}={group[key]!r})"
                    )
                schedules[-1][key] = group[key]
        super().load_state_dict(state_dict)
        for group, restored in zip(self.param_groups, schedules):
            group.update(restored)

    # -- the step ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient.

        Args:
            closure: optional; re-evaluates the model, sets the gradients and returns the loss.

        Returns:
            The closure's loss, or ``None`` without a closure.

        Raises:
            TypeError: a gradient is sparse (nothing is updated then).
            ValueError: a schedule returned something other than a finite number ≥ 0 (parameters updated earlier in
                this step keep their update).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, params in self._groups_with_gradients():
            self._update_group(group, params)
        return loss

    def _update_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Update the parameters of one group that have a gradient, one after the other."""
        for param in params:
            self._update(*self._advance(group, param), group)

    def _gradient(self, group: dict[str, Any], param: torch.Tensor) -> torch.Tensor:
        """gₙ of a parameter: its ``.grad``, plus λx when ``weight_decay`` = λ is set."""
        grad = cast(torch.Tensor, param.grad)  # not None: _groups_with_gradients skips those
        if group["weight_decay"] != 0.0:
            grad = grad.add(param, alpha=group["weight_decay"])
        return grad

    def _advance(
        self, group: dict[str, Any], param: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int]:
        """Count step n of a parameter (creating its state at n = 1): real views of x and gₙ, its state, and n."""
        grad = self._gradient(group, param)
        state = self.state[param]
        names = self._state_names(group)
        if not state:
            state["step"] = 0
            for name in names:
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        real_state = {name: as_real(state[name]) for name in names}
        return as_real(param), as_real(grad), real_state, state["step"]

    def _groups_with_gradients(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        """(group, its parameters with a gradient) for every group; ``TypeError`` if any gradient is sparse."""
        found = []
        for group in self.param_groups:
            with_gradient = []
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    names = group.get("param_names", [])
                    name = repr(names[index]) if index < len(names) else f"#{index} of its group"
                    raise TypeError(
                        f"{type(self).__name__} does not support sparse gradients, but parameter {name} has one"
                    )
                with_gradient.append(param)
            found.append((group, with_gradient))
        return found


def schedule_value(group: dict[str, Any], key: str, n: int) -> float:
    """The value of a schedule hyperparameter at step n: the number itself, or the callable's value at n."""
    value = group[key]
    if not callable(value):
        return value
    result = value(n)
    if not _is_real(result) or not 0.0 <= result < math.inf:
        raise ValueError(
            f"the {key!r} schedule returned {result!r} at step n = {n}; it must return a finite number ≥ 0"
        )
    return float(result)


def scaled_conjugate_direction(
    direction: torch.Tensor, grad: torch.Tensor, n: int, group: dict[str, Any]
) -> torch.Tensor:
    """dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁, written over ``direction`` (which holds dₙ₋₁); d₁ = −g₁ (γ₁, δ₁ are not used).

    s = −1 for ``direction_form="paper"``, +1 for ``"authors-code"`` (:data:`PREVIOUS_DIRECTION_SIGN`).
    """
    if n == 1:
        return direction.copy_(grad).neg_()
    gamma, delta = schedule_value(group, "gamma", n), schedule_value(group, "delta", n)
    sign = PREVIOUS_DIRECTION_SIGN[group["direction_form"]]
    return direction.mul_(sign * delta).add_(grad, alpha=-(1.0 + gamma))


def adaptive_moment_step(
    param: torch.Tensor,
    direction: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    n: int,
    group: dict[str, Any],
    *,
    amsgrad: bool,
    bias_correction: bool,
) -> None:
    """The Adam/AMSGrad moments of a direction d and the step along their ratio, in place:

        mₙ = β₁mₙ₋₁ + (1 − β₁)dₙ,    vₙ = β₂vₙ₋₁ + (1 − β₂)gₙ²,    v̂ₙ = max(v̂ₙ₋₁, vₙ) (AMSGrad, else v̂ₙ = vₙ),
        x ← x + (α/(1 − β₁ⁿ)) mₙ / (√(v̂ₙ/(1 − β₂ⁿ)) + ε)    with bias correction,
        x ← x + α mₙ / (√v̂ₙ + ε)                            without.

    ``state`` holds ``exp_avg`` (m), ``exp_avg_sq`` (v) and, for AMSGrad, ``max_exp_avg_sq`` (v̂).
    """
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    # The operations of torch.optim.Adam (lerp_, mul_/addcmul_, ** 0.5, addcdiv_), so that d = −g reproduces
    # it bit for bit: each of them commutes exactly with negation.
    exp_avg.lerp_(direction, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    second_moment = exp_avg_sq
    if amsgrad:
        second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
    if bias_correction:
        step_size = group["lr"] / (1.0 - beta1**n)
        denominator = (second_moment.sqrt() / (1.0 - beta2**n) ** 0.5).add_(group["eps"])
    else:
        step_size = group["lr"]
        denominator = second_moment.sqrt().add_(group["eps"])
    param.addcdiv_(exp_avg, denominator, value=step_size)


def check_adam_hyperparameters(group: dict[str, Any]) -> None:
    check_nonnegative(group, "lr", "learning rate (lr)")
    check_betas(group)
    check_nonnegative(group, "eps", "epsilon (eps)")
    check_nonnegative(group, "weight_decay", "weight_decay")


def _check_scaled_conjugate_rule(group: dict[str, Any]) -> None:
    check_schedule(group, "gamma", "gamma (γ)")
    check_schedule(group, "delta", "delta (δ)")
    check_choice(group, "direction_form", PREVIOUS_DIRECTION_SIGN)


# -------------------------------------------------------------------------------------------------------------------
# The optimizers


class SCGAdam(ConjugateAdaptiveOptimizer):
    r"""Adam whose first moment averages the scaled conjugate-gradient direction (Sato, Izumi & Iiduka 2024).

    For each parameter tensor x with stochastic gradient gₙ at its n-th step (plus ``weight_decay``·x when set),
    elementwise:

        d₁ = −g₁,    dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁    (s = −1: the paper's form, the default; s = +1: the authors' code)
        mₙ = β₁mₙ₋₁ + (1 − β₁)dₙ
        vₙ = β₂vₙ₋₁ + (1 − β₂)gₙ²                       (the raw gradient, not d)
        xₙ₊₁ = xₙ + (αₙ/(1 − β₁ⁿ)) · mₙ / (√(vₙ/(1 − β₂ⁿ)) + ε)

    With γ = δ = 0, dₙ = −gₙ and this is ``torch.optim.Adam`` bit for bit. The paper states the direction as
    Gₙ = (1 + γₙ)gₙ − δₙGₙ₋₁ with the step along −Gₙ, which is s = −1 here; its authors' code uses s = +1
    (``direction_form="authors-code"``).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: α, the learning rate. For the paper's diminishing αₙ = α/√n use :func:`diminishing_lr`.
        betas: (β₁, β₂), the moments' smoothing constants.
        eps: ε, added to the denominator.
        weight_decay: L2 penalty λ; gₙ ← gₙ + λxₙ.
        gamma: γₙ ≥ 0, the scale of the current gradient: a number or a callable n ↦ γₙ. The paper's
            constant-rate experiments use γ = 1; its diminishing ones γₙ = 0.5ⁿ or 1/n.
        delta: δₙ ≥ 0, the weight of the previous direction: a number or a callable n ↦ δₙ (the paper uses
            δ ∈ {1e-1, 1e-2, 1e-3}, or δₙ = 0.5ⁿ or 1/n). The defaults γ = δ = 0.1 are the authors' code's.
        direction_form: ``"paper"`` (default; s = −1, the paper's Gₙ = (1 + γₙ)gₙ − δₙGₙ₋₁) or
            ``"authors-code"`` (s = +1, dₙ = −(1 + γₙ)gₙ + δₙdₙ₋₁, as the authors' public code, and this class
            before the option existed).

    State per parameter: ``step`` (n), ``direction`` (dₙ), ``exp_avg`` (mₙ), ``exp_avg_sq`` (vₙ).

    References:
        Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
        neural networks. JMLR 25(395), 1–37. arXiv:2412.11400.

        Kingma, D. P. & Ba, J. (2015). Adam: a method for stochastic optimization. ICLR. arXiv:1412.6980.
    """

    _schedule_keys = ("gamma", "delta")
    _keys_added_later = {"direction_form": "authors-code"}

    def __init__(
        self,
        params: Params,
        lr: float = DEFAULT_LR,
        betas: tuple[float, float] = DEFAULT_BETAS,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.0,
        gamma: Schedule = DEFAULT_GAMMA,
        delta: Schedule = DEFAULT_DELTA,
        direction_form: str = DEFAULT_DIRECTION_FORM,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "gamma": gamma,
            "delta": delta,
            "direction_form": direction_form,
        }
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)
        _check_scaled_conjugate_rule(group)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("direction", "exp_avg", "exp_avg_sq")

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], n: int, group: dict[str, Any]
    ) -> None:
        direction = scaled_conjugate_direction(state["direction"], grad, n, group)
        adaptive_moment_step(param, direction, grad, state, n, group, amsgrad=False, bias_correction=True)


class SCGAMSGrad(ConjugateAdaptiveOptimizer):
    r"""AMSGrad whose first moment averages the scaled conjugate-gradient direction (Sato, Izumi & Iiduka 2024).

    Elementwise, per parameter tensor, with gₙ the stochastic gradient (plus ``weight_decay``·x when set):

        d₁ = −g₁,    dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁    (s = −1: the paper's form, the default; s = +1: the authors' code)
        mₙ = β₁mₙ₋₁ + (1 − β₁)dₙ,    vₙ = β₂vₙ₋₁ + (1 − β₂)gₙ²,    v̂ₙ = max(v̂ₙ₋₁, vₙ)
        xₙ₊₁ = xₙ + αₙ · mₙ / (√v̂ₙ + ε)                                    (bias_correction=False, default)
        xₙ₊₁ = xₙ + (αₙ/(1 − β₁ⁿ)) · mₙ / (√(v̂ₙ/(1 − β₂ⁿ)) + ε)             (bias_correction=True)

    The default is AMSGrad as Reddi et al. and the authors' code state it, without bias correction.
    ``torch.optim.Adam(amsgrad=True)`` corrects the bias (dividing the running maximum v̂ₙ by 1 − β₂ⁿ), so with
    γ = δ = 0 it equals ``SCGAMSGrad(bias_correction=True)`` bit for bit, and the default only in the limit n → ∞.

    ``params``, ``lr``, ``betas``, ``eps``, ``weight_decay``, ``gamma``, ``delta`` and ``direction_form`` are as
    for :class:`SCGAdam`.

    Args:
        bias_correction: whether to divide by 1 − β₁ⁿ and 1 − β₂ⁿ as ``torch.optim.Adam(amsgrad=True)`` does.

    State per parameter: ``step``, ``direction``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (v̂ₙ).

    References:
        Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
        neural networks. JMLR 25(395), 1–37. arXiv:2412.11400.

        Reddi, S. J., Kale, S. & Kumar, S. (2018). On the convergence of Adam and beyond. ICLR.
    """

    _schedule_keys = ("gamma", "delta")
    _keys_added_later = {"direction_form": "authors-code"}

    def __init__(
        self,
        params: Params,
        lr: float = DEFAULT_LR,
        betas: tuple[float, float] = DEFAULT_BETAS,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.0,
        gamma: Schedule = DEFAULT_GAMMA,
        delta: Schedule = DEFAULT_DELTA,
        bias_correction: bool = False,
        direction_form: str = DEFAULT_DIRECTION_FORM,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "gamma": gamma,
            "delta": delta,
            "bias_correction": bias_correction,
            "direction_form": direction_form,
        }
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)
        _check_scaled_conjugate_rule(group)
        check_flag(group, "bias_correction")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("direction", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], n: int, group: dict[str, Any]
    ) -> None:
        direction = scaled_conjugate_direction(state["direction"], grad, n, group)
        adaptive_moment_step(
            param, direction, grad, state, n, group, amsgrad=True, bias_correction=group["bias_correction"]
        )


class SCGRMSProp(ConjugateAdaptiveOptimizer):
    r"""RMSProp stepping along the scaled conjugate-gradient direction (built here from Sato, Izumi & Iiduka 2024).

    Elementwise, per parameter tensor, with gₙ the stochastic gradient (plus ``weight_decay``·x when set):

        d₁ = −g₁,    dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁    (s = −1: the paper's form, the default; s = +1: the authors' code)
        vₙ = ρvₙ₋₁ + (1 − ρ)gₙ²
        xₙ₊₁ = xₙ + αₙ · dₙ / (√vₙ + ε)

    The paper names SCGRMSProp, but neither our sources for it nor the authors' code we could read give its update
    (that code has only plain RMSProp). This is the same construction as :class:`SCGAdam` applied to RMSProp,
    which has no first moment (β₁ = 0) and no bias correction: the direction replaces −gₙ in
    the numerator, and the denominator stays on the raw gradient. With γ = δ = 0 it is
    ``torch.optim.RMSprop(alpha=ρ)`` (no momentum, not centered) bit for bit.

    ``params``, ``lr``, ``eps``, ``weight_decay``, ``gamma``, ``delta`` and ``direction_form`` are as for
    :class:`SCGAdam`.

    Args:
        alpha: ρ, the smoothing constant of vₙ, named and defaulted as in ``torch.optim.RMSprop``.

    State per parameter: ``step``, ``direction`` (dₙ), ``square_avg`` (vₙ).

    References:
        Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
        neural networks. JMLR 25(395), 1–37. arXiv:2412.11400.

        Tieleman, T. & Hinton, G. (2012). Lecture 6.5 — RMSProp. COURSERA: Neural Networks for Machine Learning.
    """

    _schedule_keys = ("gamma", "delta")
    _keys_added_later = {"direction_form": "authors-code"}

    def __init__(
        self,
        params: Params,
        lr: float = DEFAULT_LR,
        alpha: float = DEFAULT_RMSPROP_ALPHA,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.0,
        gamma: Schedule = DEFAULT_GAMMA,
        delta: Schedule = DEFAULT_DELTA,
        direction_form: str = DEFAULT_DIRECTION_FORM,
    ) -> None:
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "gamma": gamma,
            "delta": delta,
            "direction_form": direction_form,
        }
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_nonnegative(group, "lr", "learning rate (lr)")
        check_smoothing(group, "alpha", "alpha (ρ)")
        check_nonnegative(group, "eps", "epsilon (eps)")
        check_nonnegative(group, "weight_decay", "weight_decay")
        _check_scaled_conjugate_rule(group)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("direction", "square_avg")

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], n: int, group: dict[str, Any]
    ) -> None:
        direction = scaled_conjugate_direction(state["direction"], grad, n, group)
        alpha = group["alpha"]
        # torch.optim.RMSprop's operations, so that γ = δ = 0 reproduces it bit for bit.
        square_avg = state["square_avg"].mul_(alpha).addcmul_(grad, grad, value=1.0 - alpha)
        param.addcdiv_(direction, square_avg.sqrt().add_(group["eps"]), value=group["lr"])
