"""Arithmetic on vectors stored as lists of tensors, one tensor per parameter.

SCG works on the weight vector w ∈ ℝⁿ of all parameters together, but the parameters live on their own devices
and dtypes. These helpers treat a list of tensors as one vector without flattening it: each tensor stays where
its parameter is, and inner products are reduced to one Python ``float`` (IEEE float64) per call. Complex
tensors are seen as their real and imaginary parts (``torch.view_as_real``), so ℂᵐ counts as ℝ²ᵐ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TensorList = list[torch.Tensor]


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as real numbers: complex tensors become a view with a trailing (real, imaginary) axis."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _sum_to_float(scalars: Sequence[torch.Tensor]) -> float:
    """Σ of 0-dim float64 tensors that may sit on several devices, with one host synchronisation per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for scalar in scalars:
        by_device.setdefault(scalar.device, []).append(scalar)
    return sum(float(torch.stack(group).sum()) for group in by_device.values())


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    """Real inner product xᵀy of two tensor-list vectors, summed in float64."""
    # The elementwise product stays in the parameters' dtype; its sum is taken in float64.
    return _sum_to_float([torch.sum(as_real(x) * as_real(y), dtype=torch.float64) for x, y in zip(xs, ys)])


def squared_norm(xs: Sequence[torch.Tensor]) -> float:
    """|x|², summed in float64."""
    return dot(xs, xs)


def all_finite(xs: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host synchronisation per device)."""
    non_finite_counts = [torch.sum(~torch.isfinite(as_real(x)), dtype=torch.float64) for x in xs]
    return _sum_to_float(non_finite_counts) == 0


def add_(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], alpha: float) -> None:
    """x ← x + α y, in place."""
    for x, y in zip(xs, ys):
        x.add_(y, alpha=alpha)


def copy_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """target ← source, in place (bit-exact)."""
    for target, source in zip(targets, sources):
        target.copy_(source)


def clone(xs: Sequence[torch.Tensor]) -> TensorList:
    """A detached copy of each tensor, with the same device, dtype and layout."""
    return [x.detach().clone() for x in xs]


def negated(xs: Sequence[torch.Tensor]) -> TensorList:
    """−x as new tensors."""
    return [torch.neg(x) for x in xs]
