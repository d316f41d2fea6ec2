"""The :class:`Objective` protocol: what an optimizer may ask of the function E(w) it minimizes, and nothing more.

An objective owns *how* E(w), E'(w) and s = E''(w)v are evaluated and the only counters of those evaluations
(nfev, ngev, nhev), as ``ScalarFunction`` does in scipy and in torchmin; an optimizer asks it and never reaches
into a closure. Three faces implement it: :class:`~moller_scg.objective.ClosureObjective` (a ``torch.optim``
closure), :class:`~moller_scg.objective.AccumulatorObjective` (a :class:`~moller_scg.GradientAccumulator`) and
:class:`~moller_scg.objective.FunctionObjective` (a function of a tensor or of a pytree of tensors).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

HVP_MODES = ("double-backward", "finite-difference")
"""How an objective forms s = E''(w)v: exactly by double-backward, or by Møller's finite difference of gradients."""
DEFAULT_SIGMA = 5e-5
"""σ of the finite-difference product s ≈ (E'(w + σₖv) − E'(w))/σₖ with σₖ = σ/|v| (SCG's default σ)."""


@dataclasses.dataclass
class EvaluationCounts:
    """How many times an objective has evaluated E, E' and E''v (scipy's ``nfev``, ``ngev``, ``nhev``).

    Attributes:
        nfev: evaluations of the loss E(w) (a closure call computes E and E' together and counts in both).
        ngev: evaluations of the gradient E'(w).
        nhev: Hessian-vector products s = E''(w)v asked for.
    """

    nfev: int = 0
    ngev: int = 0
    nhev: int = 0


@runtime_checkable
class Objective(Protocol):
    """A scalar function E(w) of the tensors :attr:`params`, with its gradient and Hessian-vector products.

    The contract every face keeps:

    * :meth:`value_and_grad` evaluates E and g = E'(w) at the values the parameters hold now. The gradient
      tensors are new ones that the caller owns (they never share storage with a ``.grad`` that a later
      ``zero_grad`` or ``backward`` writes into), one per parameter, in :attr:`params` order; with
      ``copy=False`` they may be the ``.grad`` tensors themselves, for a caller that is done with them before
      the next evaluation (SCG: it negates them into r₊ at once) and so spares a parameter-sized copy.
    * :meth:`hvp` returns s = E''(w)v at the weights w of the last :meth:`value_and_grad`: the caller must leave
      the parameters at w (or put them back) in between. If they were written to since (their ``_version``
      changed, for instance moved to a trial point and copied back), the objective cannot tell that they hold w
      again and evaluates once more at the values they hold, which counts in :attr:`counts`.
    * :meth:`loss` evaluates E alone, as cheaply as the face allows.
    * :attr:`counts` are the only evaluation counters; :meth:`state_dict` saves them (and whatever else the
      objective owns), :meth:`load_state_dict` restores them.

    Optionally, an objective also has ``value_then_grad()`` → ``(E(w), gradient)``: E now, and a function that
    returns E'(w) at the same weights (``copy=False`` tensors) when called, paying for the backward pass only then
    (:data:`ValueThenGrad`). A trial point that its loss alone rejects never pays for its gradient
    (:func:`moller_scg.scg_objective.evaluate_loss_first`); an objective without the method is evaluated in full.
    """

    @property
    def params(self) -> list[torch.Tensor]:
        """w: the tensors E is differentiated with respect to, in the order gradients and products use."""
        ...

    @property
    def counts(self) -> EvaluationCounts:
        """The evaluations made so far (nfev, ngev, nhev)."""
        ...

    def value_and_grad(self, *, copy: bool = True) -> tuple[float | torch.Tensor, list[torch.Tensor]]:
        """E(w) (a float or a 0-dim tensor) and E'(w), one tensor per parameter: new ones, or with ``copy=False``
        possibly the ``.grad`` tensors, valid until the next evaluation."""
        ...

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """s = E''(w)v at the weights of the last :meth:`value_and_grad`, one detached tensor per parameter."""
        ...

    def loss(self) -> float | torch.Tensor:
        """E(w) at the values the parameters hold now."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the objective remembers (at least its counts), for a checkpoint."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        ...


ValueThenGrad = tuple[float | torch.Tensor, Callable[[], list[torch.Tensor]]]
"""What an objective's optional ``value_then_grad()`` returns: E(w), and a function that forms E'(w) when called."""


def validate_hvp_mode(hvp_mode: Any) -> str:
    if hvp_mode not in HVP_MODES:
        raise ValueError(f"Invalid hvp_mode value: {hvp_mode!r}; choose one of {', '.join(map(repr, HVP_MODES))}")
    return str(hvp_mode)


def validate_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (0.0 < float(sigma) < math.inf):
        raise ValueError(f"Invalid sigma (σ) value: {sigma!r}; it must be positive and finite (the paper uses ≤ 1e-4)")
    return float(sigma)


def validate_params(params: Any) -> list[torch.Tensor]:
    """The parameters as a list of tensors, or a ``TypeError``/``ValueError`` that names what is wrong."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be a list of tensors, got a single tensor: pass [tensor]")
    try:
        listed = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of tensors, got {type(params).__name__}") from None
    if not listed:
        raise ValueError("params is empty: an objective needs at least one tensor to differentiate with respect to")
    for index, p in enumerate(listed):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{index}] is a {type(p).__name__}, not a tensor")
    return listed


def read_gradients(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], *, copy: bool
) -> list[torch.Tensor]:
    """E'(w) from the parameters' ``.grad`` tensors ``grads``, detached (a missing one is zero); new tensors if
    ``copy``.

    A copy is what a caller may keep, because the ``.grad`` tensors are not the objective's: a closure that calls
    ``zero_grad(set_to_none=False)`` zeroes them in place at its next call. Without it, they are the ``.grad``
    tensors themselves.
    """
    gradients = []
    for index, (p, grad) in enumerate(zip(params, grads)):
        if grad is None:
            gradients.append(torch.zeros_like(p))
        elif grad.is_sparse:
            raise TypeError(
                f"sparse gradients are not supported, but parameter #{index} has one "
                f"(from nn.Embedding(sparse=True) or similar: use sparse=False)"
            )
        else:
            detached = grad.detach() if grad.requires_grad else grad  # (an alias, where there is no graph)
            gradients.append(detached.clone() if copy else detached)
    return gradients


def same_tensors(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> bool:
    """Whether two lists hold the very same tensor objects in the same order."""
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))


def check_vectors(vectors: Any, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """v as one detached tensor per parameter, each of its parameter's shape, or a clear error.

    Cheap on the common case, a list of tensors without a graph (what SCG passes at every step): no ``Sequence``
    ABC check and no new tensor objects for it.
    """
    if not isinstance(vectors, (list, tuple)) and (
        isinstance(vectors, torch.Tensor) or not isinstance(vectors, Sequence)
    ):
        raise TypeError(f"vectors must be a sequence of tensors, one per parameter, got {type(vectors).__name__}")
    if len(vectors) != len(params):
        raise ValueError(f"hvp got {len(vectors)} vectors for {len(params)} parameters")
    for index, (p, v) in enumerate(zip(params, vectors)):
        if not isinstance(v, torch.Tensor) or v.shape != p.shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"hvp vector {index} has shape {shape}, but parameter {index} has {tuple(p.shape)}")
    return [v.detach() if v.requires_grad else v for v in vectors]


def load_counts(counts: EvaluationCounts, saved: Any) -> None:
    """Set ``counts`` from a dict saved by ``dataclasses.asdict``, after checking its fields and types."""
    fields = {field.name for field in dataclasses.fields(EvaluationCounts)}
    if not isinstance(saved, dict) or set(saved) != fields:
        raise ValueError(f"expected evaluation counts with the fields {sorted(fields)}, got {saved!r:.120}")
    for name in sorted(fields):
        value = saved[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the saved count {name} = {value!r} is not an int ≥ 0")
        setattr(counts, name, value)


def scalar_loss(raw: Any, source: str) -> float | torch.Tensor:
    """A returned loss as a detached 0-dim tensor (no host synchronisation) or a float, or a ``TypeError``."""
    if isinstance(raw, torch.Tensor):
        if raw.numel() != 1:
            raise TypeError(
                f"{source} must return a scalar loss (a 0-dim or one-element tensor), got a tensor of shape "
                f"{tuple(raw.shape)}: reduce it (.sum() or .mean(), or the squared norm of a residual)"
            )
        if raw.dtype == torch.bool:
            raise TypeError(
                f"{source} must return a scalar loss, got a bool tensor ({raw!r:.40}): return the loss itself, a "
                f"floating-point tensor"
            )
        if raw.is_complex():
            raise TypeError(
                f"{source} must return a real loss, got a complex tensor of dtype {raw.dtype}: minimize a real "
                f"function of the complex values (for example the squared modulus of a residual, z.abs().pow(2).sum())"
            )
        return raw.detach() if raw.dim() == 0 else raw.detach().reshape(())
    if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        return float(raw)
    if raw is None:
        raise TypeError(f"{source} returned None instead of the scalar loss: end it with `return loss`")
    raise TypeError(f"{source} must return a scalar loss (a 0-dim tensor or a number), got {type(raw).__name__}")
