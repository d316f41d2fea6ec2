"""Arithmetic on vectors stored as lists of tensors, one tensor per parameter.

SCG works on the weight vector w ∈ ℝⁿ of all parameters together, but the parameters live on their own devices
and dtypes. These helpers treat a list of tensors as one vector without flattening it: each tensor stays where
its parameter is, and inner products are reduced to Python ``float`` s (IEEE float64). Complex tensors are seen as
their real and imaginary parts (``torch.view_as_real``), so ℂᵐ counts as ℝ²ᵐ.

Reductions cost a host synchronisation (on a GPU, the wait for the result), so :func:`dots` forms several inner
products with one synchronisation per device for all of them. An inner product never materialises the whole
elementwise product: a tensor of more than ``DOT_CHUNK`` numbers is multiplied and summed ``DOT_CHUNK`` numbers
at a time, so the temporary stays small enough to be reused from the allocator's cache instead of faulting in
fresh pages (on a 50 M-weight flat vector: 0.08 s instead of 0.25 s per inner product on one CPU thread).

Most in-place updates use ``torch._foreach_*`` ops, one call for all parameters; each gives the same bits as the
per-tensor op would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

TensorList = list[torch.Tensor]


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as real numbers: complex tensors become a view with a trailing (real, imaginary) axis."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def write_marks(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Each tensor's (version counter, address of its data): what changes when it is written to in place
    (``p.copy_``) or given new storage (``p.data = …``, ``torch.nn.utils.vector_to_parameters``). An in-place write
    through ``p.data`` changes neither: ``.data`` escapes autograd's version counter."""
    return [(t._version, t.data_ptr()) for t in tensors]


def as_complex(pairs: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`as_real` for a contiguous ``(..., 2)`` tensor of (real, imaginary) pairs: a complex view
    of it, or of a copy where it starts at an odd offset of its storage (a part of a flat real vector after a real
    tensor of odd size), which a complex view cannot take."""
    return torch.view_as_complex(pairs if pairs.storage_offset() % 2 == 0 else pairs.clone())


DOT_CHUNK = 1 << 20
"""Numbers per piece of an inner product of a larger tensor (4 MiB of float32 temporary); smaller tensors are
multiplied and summed whole, as before this limit existed (the same bits)."""


def _float64_sum_in_pieces(summand: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
    """Σ summand(x, …) as a 0-dim float64 tensor on the tensors' device: ``summand`` (elementwise, in the tensors'
    dtype) applied to the tensors of equal size ``xs`` and summed in float64, ``DOT_CHUNK`` numbers at a time when
    they are larger (the pieces' float64 sums then added), so that its temporary stays small."""
    xs = tuple(as_real(x) for x in xs)
    if xs[0].numel() <= DOT_CHUNK:
        return torch.sum(summand(*xs), dtype=torch.float64)
    pieces = zip(*(x.reshape(-1).split(DOT_CHUNK) for x in xs))
    return torch.stack([torch.sum(summand(*piece), dtype=torch.float64) for piece in pieces]).sum()


def widened(x: torch.Tensor) -> torch.Tensor:
    """x itself, or a float32 copy of a float16 or bfloat16 x: the dtype in which products of its elements are
    formed. float16's products overflow above 65504, i.e. for elements beyond 256, which a gradient easily has."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def _widened_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return widened(x) * widened(y)


def _float64_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """xᵀy as a 0-dim float64 tensor on the tensors' device: the elementwise product in their dtype (float32 for
    float16 and bfloat16: :func:`widened`), summed in float64 (in pieces above ``DOT_CHUNK`` numbers). The common
    case, a small vector, is written out: it runs several times in every step."""
    x, y = as_real(x), as_real(y)
    if x.element_size() < 4:
        return _float64_sum_in_pieces(_widened_product, x, y)
    if x.numel() <= DOT_CHUNK:
        return torch.sum(x * y, dtype=torch.float64)
    return _float64_sum_in_pieces(torch.mul, x, y)


def _partial_dots(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> TensorList:
    """xᵢᵀyᵢ of each pair of tensors, as 0-dim float64 tensors on the tensors' devices."""
    # The elementwise product stays in the parameters' dtype (at least float32); its sum is taken in float64.
    return [_float64_dot(x, y) for x, y in zip(xs, ys)]


def _totals(partial_sums: Sequence[Sequence[torch.Tensor]]) -> list[float]:
    """Σ of each list of 0-dim float64 tensors, as Python floats, with one host synchronisation per device.

    Each list holds one scalar per parameter, so all lists span the same devices. A list is summed per device
    (``torch.stack(...).sum()``) and the devices' sums are then added in Python, in the order in which the devices
    first appear.
    """
    if len(partial_sums) == 1 and len(partial_sums[0]) == 1:  # one sum of one tensor (|r|₁ of a flat buffer, say)
        return [partial_sums[0][0].item()]  # the same bits as the stack below, in one operation instead of two
    if partial_sums and all(len(scalars) == 1 for scalars in partial_sums):  # one tensor a vector (flat buffers)
        firsts = [scalars[0] for scalars in partial_sums]
        if all(first.device == firsts[0].device for first in firsts):
            return torch.stack(firsts).tolist()  # a sum of one number is that number: the same bits, fewer operations
    devices = list(dict.fromkeys(scalar.device for scalars in partial_sums for scalar in scalars))
    per_device = []
    for device in devices:
        sums = [torch.stack([s for s in scalars if s.device == device]).sum() for scalars in partial_sums]
        per_device.append(torch.stack(sums).tolist())
    return [sum(values[index] for values in per_device) for index in range(len(partial_sums))]


def dots(pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]) -> list[float]:
    """The real inner products xᵀy of several pairs of tensor-list vectors, summed in float64, in one go.

    ``dots([(x, y), (u, v)])`` equals ``[dot(x, y), dot(u, v)]`` bit for bit; it only waits for the results once
    per device instead of once per product.
    """
    return _totals([_partial_dots(xs, ys) for xs, ys in pairs])


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    """Real inner product xᵀy of two tensor-list vectors, summed in float64."""
    return dots([(xs, ys)])[0]


def squared_norm(xs: Sequence[torch.Tensor]) -> float:
    """|x|², summed in float64."""
    return dot(xs, xs)


def l1_norm(xs: Sequence[torch.Tensor]) -> float:
    """|x|₁ = Σ|xᵢ| over the real numbers of x, summed in float64."""
    return _totals([[_float64_sum_in_pieces(torch.abs, x) for x in xs]])[0]


def _is_not_finite(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x)


def all_finite(xs: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host synchronisation per device)."""
    non_finite_counts = [_float64_sum_in_pieces(_is_not_finite, x) for x in xs]
    return _totals([non_finite_counts])[0] == 0


_NARROWEST_RANGE = min(
    torch.finfo(getattr(torch, name)).max
    for name in ("float16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
"""The largest finite number of the floating dtype with the narrowest range (240, a float8's): an α below it every
dtype holds, and :func:`add_` then pays one comparison."""


def add_(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], alpha: float) -> None:
    """x ← x + α y, in place.

    torch refuses an ``alpha`` beyond the largest finite number of a tensor's dtype (65504 in float16) instead of
    forming α y; for such an α the product is formed first (in float16 it rounds to inf where it overflows, and the
    trial point is then not finite, which SCG rejects). An α within :data:`_NARROWEST_RANGE` costs one comparison.
    """
    xs, ys = list(xs), list(ys)
    if abs(alpha) > _NARROWEST_RANGE and any(abs(alpha) > _largest_finite(x.dtype) for x in xs):
        torch._foreach_add_(xs, [torch.mul(y, alpha) for y in ys])
        return
    torch._foreach_add_(xs, ys, alpha=alpha)


@functools.cache
def _largest_finite(dtype: torch.dtype) -> float:
    """The largest finite number of a floating-point or complex dtype (of its real part)."""
    return torch.finfo(dtype).max


def scale_add_(xs: Sequence[torch.Tensor], beta: float, ys: Sequence[torch.Tensor]) -> None:
    """x ← y + β x, in place: x ← β x, then x ← x + y.

    Bit for bit the same as the out-of-place ``y + beta * x``: the product β x is the same multiplication by the
    same scalar, and IEEE addition is commutative. (Not ``torch._foreach_mul_``: with a Python scalar it rounds β
    to float16 or bfloat16 for tensors of those dtypes, where ``x.mul_(beta)`` multiplies in float32.)
    """
    for x, y in zip(xs, ys):
        x.mul_(beta).add_(y)


def copy_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """target ← source, in place (bit-exact)."""
    torch._foreach_copy_(list(targets), list(sources))


def clone(xs: Sequence[torch.Tensor]) -> TensorList:
    """A detached copy of each tensor, with the same device, dtype and layout."""
    return [x.detach().clone() for x in xs]


def negated(xs: Sequence[torch.Tensor]) -> TensorList:
    """−x as new tensors."""
    return list(torch._foreach_neg(list(xs)))
