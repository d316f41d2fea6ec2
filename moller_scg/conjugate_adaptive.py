"""The engine of the stochastic conjugate-gradient variants: one direction rule and one moment rule make an optimizer.

SCGAdam, SCGAMSGrad, SCGRMSProp (``scg_adam.py``) and CoBA (``coba.py``) all do, for each parameter tensor x with
stochastic gradient gₙ at its n-th step,

    dₙ = direction rule(gₙ, its memory)            (a conjugate-gradient-type direction, d₁ = −g₁)
    x ← moment rule(x, dₙ, gₙ, its memory)         (Adam, AMSGrad or RMSProp, with dₙ in place of −gₙ)

and differ only in the two rules (optax's composition of gradient transformations, here inside one
``torch.optim.Optimizer``). A variant is a subclass that validates its hyperparameters (:meth:`_prepare_group`)
and names its rules for a parameter group (:meth:`_rules`); the step, the state and ``state_dict`` are this
engine's.

What each rule remembers is a typed ``NamedTuple`` of tensors (the rule's ``State``); the engine stores the fields of
both rules' states in ``self.state[p]`` under the fields' names, with ``"step"`` (n), so ``state_dict`` has the
layout of ``torch.optim.Adam``.

Schedules: a hyperparameter listed in a variant's ``_schedule_keys`` accepts a number or a callable n ↦ value, called
with the parameter's step count n = 1, 2, …. ``state_dict()`` saves a callable schedule as
:data:`SCHEDULE_PLACEHOLDER` (callables cannot be loaded with ``weights_only=True``); ``load_state_dict`` keeps the
schedule the receiving optimizer was constructed with.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import torch
from torch.optim.lr_scheduler import LambdaLR

from moller_scg._vectors import as_real

__all__ = ["ConjugateAdaptiveOptimizer", "DirectionRule", "MomentRule", "diminishing_lr", "SCHEDULE_PLACEHOLDER"]

Schedule = float | Callable[[int], float]
"""A hyperparameter that is a number, or a callable n ↦ value of the step count n = 1, 2, …."""

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]

SCHEDULE_PLACEHOLDER = "<schedule: pass it again when constructing the optimizer that loads this state>"
"""What ``state_dict()`` stores in a parameter group in place of a callable schedule."""


# -------------------------------------------------------------------------------------------------------------------
# The two kinds of rule


class DirectionRule(Protocol):
    """Computes dₙ from gₙ and its own memory, for one parameter tensor.

    ``State`` is the rule's memory (a ``NamedTuple`` type of tensors, zeros before the first step).
    ``group_wide`` says whether the direction of one tensor depends on the whole group (CoBA's global β); then
    :meth:`group_context` is called once per step with every parameter's gradient and memory before any update, and
    its result is passed to :meth:`direction`.
    """

    @property
    def State(self) -> type[Any]: ...  # noqa: N802 - a NamedTuple type, named as one

    @property
    def group_wide(self) -> bool: ...

    def group_context(self, group: dict[str, Any], inputs: list[tuple[torch.Tensor, Any]]) -> Any:
        """What the group's directions share this step, from (gₙ, memory or ``None`` at n = 1) of each parameter."""
        ...

    def direction(self, grad: torch.Tensor, state: Any, n: int, group: dict[str, Any], context: Any) -> torch.Tensor:
        """dₙ, written over the rule's memory (which it updates for step n + 1)."""
        ...


class MomentRule(Protocol):
    """Moves a parameter tensor along the direction dₙ, scaled by moments of gₙ (or dₙ); ``State`` as above."""

    @property
    def State(self) -> type[Any]: ...  # noqa: N802 - a NamedTuple type, named as one

    def step(
        self,
        param: torch.Tensor,
        direction: torch.Tensor,
        grad: torch.Tensor,
        state: Any,
        n: int,
        group: dict[str, Any],
    ) -> None:
        """Step n of x, in place."""
        ...


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


def check_adam_hyperparameters(group: dict[str, Any]) -> None:
    check_nonnegative(group, "lr", "learning rate (lr)")
    check_betas(group)
    check_nonnegative(group, "eps", "epsilon (eps)")
    check_nonnegative(group, "weight_decay", "weight_decay")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# -------------------------------------------------------------------------------------------------------------------
# The engine


class ConjugateAdaptiveOptimizer(torch.optim.Optimizer):
    """An adaptive optimizer that moves along a conjugate-gradient-type direction: a direction rule and a moment rule.

    ``step(closure=None)`` works as in ``torch.optim.Adam``: the closure, if given, is evaluated with gradients
    enabled and its loss returned; parameters whose ``.grad`` is ``None`` are skipped (their step count does not
    advance); ``weight_decay`` adds λx to the gradient (L2, not decoupled); complex parameters are updated as their
    real and imaginary parts (``torch.view_as_real``); sparse gradients raise ``TypeError`` before any parameter
    changes.

    State of a parameter (``self.state[p]``): ``"step"``, the number n of updates it has had (a Python ``int``, so
    it stays exact through ``state_dict``/``load_state_dict``), and the fields of the two rules' ``State`` types, in
    the parameter's dtype, device and shape.

    A variant sets ``_schedule_keys`` (hyperparameters that may be callables n ↦ value) and ``_keys_added_later``,
    validates a parameter group in :meth:`_prepare_group` and names its rules in :meth:`_rules`.
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

    # -- what a variant says -------------------------------------------------------------------------------------

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Validate a parameter group (defaults filled in) in place, raising ``ValueError`` naming the value."""
        raise NotImplementedError

    def _rules(self, group: dict[str, Any]) -> tuple[DirectionRule, MomentRule]:
        """The direction rule and the moment rule of a (validated) parameter group."""
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
            ValueError: the state was saved by another optimizer (its groups lack this one's hyperparameters, or its
                parameters' state holds memory this one does not keep), or a group saved with a callable schedule is
                loaded into a group constructed without one.
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
            self._check_saved_fields(index, group, saved, state_dict.get("state"))
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

    def _check_saved_fields(self, index: int, group: dict[str, Any], saved: dict[str, Any], saved_state: Any) -> None:
        """The saved state of group ``index``'s parameters must hold only what this optimizer's rules keep.

        Another variant's state can carry every hyperparameter of this one (SCGAMSGrad's groups have all of
        SCGAdam's keys), but not its memory: SCGAMSGrad keeps ``max_exp_avg_sq``, which SCGAdam would ignore.
        """
        if not isinstance(saved_state, dict):
            return
        # The rules the saved settings choose (they replace this group's on loading: a CoBA saved with
        # amsgrad=True keeps max_exp_avg_sq, and continues as AMSGrad, in an optimizer built with amsgrad=False).
        try:
            direction_rule, moment_rule = self._rules({**group, **saved})
        except (KeyError, TypeError, ValueError):  # a saved setting these rules cannot read: judge by this group's
            direction_rule, moment_rule = self._rules(group)
        kept = {"step", *direction_rule.State._fields, *moment_rule.State._fields}
        for param_id in saved.get("params", []):
            foreign = sorted(set(saved_state.get(param_id, {})) - kept)
            if foreign:
                raise ValueError(
                    f"this is not a {type(self).__name__} state_dict: the state of parameter {param_id!r} in "
                    f"parameter group {index} holds {', '.join(map(repr, foreign))}, which "
                    f"{type(self).__name__} does not keep (was it saved by another optimizer?)"
                )

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
            direction_rule, moment_rule = self._rules(group)
            context = None
            if direction_rule.group_wide:
                inputs = [(as_real(self._gradient(group, p)), self._memory(direction_rule, p)) for p in params]
                context = direction_rule.group_context(group, inputs)
            for param in params:
                grad, n = as_real(self._gradient(group, param)), self._next_step(param, direction_rule, moment_rule)
                direction_state = _view(direction_rule.State, self.state[param])
                direction = direction_rule.direction(grad, direction_state, n, group, context)
                moment_state = _view(moment_rule.State, self.state[param])
                moment_rule.step(as_real(param), direction, grad, moment_state, n, group)
                self.state[param]["step"] = n
        return loss

    def _gradient(self, group: dict[str, Any], param: torch.Tensor) -> torch.Tensor:
        """gₙ of a parameter: its ``.grad``, plus λx when ``weight_decay`` = λ is set."""
        grad = cast(torch.Tensor, param.grad)  # not None: _groups_with_gradients skips those
        if group["weight_decay"] != 0.0:
            grad = grad.add(param, alpha=group["weight_decay"])
        return grad

    def _memory(self, rule: DirectionRule, param: torch.Tensor) -> Any:
        """The direction rule's memory of a parameter before this step; ``None`` before its first step."""
        state = self.state[param]
        return _view(rule.State, state) if state else None

    def _next_step(self, param: torch.Tensor, direction_rule: DirectionRule, moment_rule: MomentRule) -> int:
        """The number n of the step a parameter is about to take, creating its state (zeros) before n = 1.

        ``step`` counts n only once the update is made, so a schedule that raises leaves the count where it was."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            for name in direction_rule.State._fields + moment_rule.State._fields:
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["step"] + 1

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


def _view(state_type: type[Any], state: dict[str, Any]) -> Any:
    """The rule's typed state over a parameter's state dict: real views of the tensors its fields name."""
    return state_type(*(as_real(state[name]) for name in state_type._fields))
