"""The weight vector w as one flat buffer whose per-parameter parts are views: the fast path of ``SCG(memory=m)``.

A step of ``SCG(params, memory=m)`` does a fixed handful of vector operations: w + αp, the inner products |r₊|²,
r₊ᵀr, r₊ᵀp, |p₊|² and p₊ᵀr₊, the secant pair (s, y) = (αp, r − r₊) and p₊ = H r₊. Over a list of per-parameter
tensors each of them is one small tensor operation *per parameter*, and on a model of a few hundred weights in six
tensors the optimizer's own dispatching then costs as much as a gradient pass (``benchmarks/bench_iteration_cost.py``).

When every parameter is real and all share one device and dtype — almost every model — SCG keeps r, p and the
accepted copy of w in flat buffers of n numbers instead, and what ``optimizer.state[param]`` holds under
``"residual"`` and ``"direction"`` are views of them. Every inner product and update is then one operation on n
numbers, whatever the number of parameter tensors. The views keep ``state_dict`` per parameter, as ``torch.optim``
expects; a loaded state is gathered into fresh flat buffers before the next step.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moller_scg import _vectors as vec


class FlatLayout:
    """How the parameters' tensors lie, one after the other, in a flat vector of n = Σ numel numbers.

    Args:
        params: real tensors that share one device and dtype (:meth:`fits`).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        if not self.fits(params):
            raise ValueError("FlatLayout needs real parameters that share one device and dtype")
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.size = sum(self.numels)
        self.dtype = params[0].dtype
        self.device = params[0].device
        # Each parameter's (shape, contiguous strides, offset in the flat vector), for views (:meth:`views`).
        self._pieces = [
            (tuple(shape), _contiguous_strides(shape), offset)
            for shape, offset in zip(self.shapes, itertools.accumulate([0, *self.numels[:-1]]))
        ]

    @staticmethod
    def fits(params: Sequence[torch.Tensor]) -> bool:
        """Whether the parameters can share one flat buffer: at least one, all real, one device and one dtype."""
        if not params:
            return False
        first = params[0]
        return all(not p.is_complex() and p.dtype == first.dtype and p.device == first.device for p in params)

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether these parameters have this layout (the same shapes, dtype and device, in this order; a complex
        parameter never has the layout's real dtype). One pass, no list: asked at every step."""
        dtype, device = self.dtype, self.device
        return len(params) == len(self.shapes) and all(
            p.shape == shape and p.dtype == dtype and p.device == device for p, shape in zip(params, self.shapes)
        )

    def empty(self) -> torch.Tensor:
        """A new, uninitialised flat buffer of n numbers."""
        return torch.empty(self.size, dtype=self.dtype, device=self.device)

    def gather(self, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """The per-parameter tensors laid out in one flat vector (into ``out`` if given)."""
        pieces = [t.reshape(-1) for t in tensors]
        return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The per-parameter parts of a flat vector, as views of it in the parameters' shapes.

        One ``as_strided`` per parameter where ``flat`` is contiguous (SCG's buffers always are): a third of the time
        of ``split`` and ``view`` (9 against 29 µs for two parameters, warm). (SCG's first step makes the views of r, p
        and r₊ with :meth:`row_views`, and those of the accepted w with this.)
        """
        if flat.dim() != 1 or flat.stride() != (1,):
            return [piece.view(shape) for piece, shape in zip(flat.split(self.numels), self.shapes)]
        base = flat.storage_offset()
        return [flat.as_strided(shape, strides, base + offset) for shape, strides, offset in self._pieces]

    def row_views(self, block: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """For each parameter, its views in every row of a ``(rows, n)`` block, one per row: the same tensors as
        :meth:`views` of each row, made with one ``as_strided`` and one ``unbind`` per parameter when the block is
        contiguous (SCG's rows are), with :meth:`views` row by row otherwise."""
        rows, size = block.shape
        if block.stride() != (size, 1):
            return list(zip(*(self.views(row) for row in block.unbind(0))))
        base = block.storage_offset()
        return [
            block.as_strided((rows, *shape), (size, *strides), base + offset).unbind(0)
            for shape, strides, offset in self._pieces
        ]


FUSED_PRODUCTS_MAX = 1 << 15
"""Vectors of at most this many numbers on the CPU take a step's inner products with r₊ (|r₊|², r₊ᵀr, r₊ᵀp) and
with p₊ (|p₊|², p₊ᵀr₊) as one product of rows each, three tensor operations instead of eight and six. On the models of a
few hundred weights whose gradient pass takes a millisecond, an operation's dispatch is what a step's own work is
made of. Up to torch's grain size of 2^15 numbers no row's sum is split among threads, and each row's float64 sum
has the bits of :func:`moller_scg._vectors.dots` (tested on the CPU). In float64 they are NumPy products of the rows
instead (:attr:`FlatBuffers.host_rows`)."""


class FlatBuffers:
    """SCG's r, p and accepted copy of w as flat buffers, with the per-parameter views that ``optimizer.state``
    holds, and the buffers of the step's secant pair.

    p and r share one ``(4, n)`` tensor, :attr:`rows`, with the trial's residual r₊ = −E'(w + αp) and the gradient
    change y = r − r₊. Its first three rows, :attr:`pair_rows`, are the vectors the quasi-Newton update multiplies
    with the stored pairs, as the rows of one matrix (:meth:`SecantPairs.advance_flat
    <moller_scg.quasi_newton.SecantPairs.advance_flat>`), and the inner products of a step are products of rows
    (:meth:`products_with_new_residual`, :meth:`products_with_direction`). They are kept between steps, so a step
    allocates no weight-sized tensor: on a model of 50 M weights a fresh 3 × n tensor per step cost more in page
    faults than the products with it (``benchmarks/own_work.py --problems memory-bound``).

    Attributes:
        layout: the parameters' :class:`FlatLayout`.
        residual, direction, accepted: the flat r = −E'(w), p and the copy of w taken before each trial.
        new_residual: r₊ of the last trial; ``rows[2]``.
        rows: the ``(4, n)`` tensor whose rows are y (scratch of step 7), p, r₊ and r.
        pair_rows: ``rows[:3]``: y, p and r₊.
        fuses_products: whether the step's inner products are products of rows (:meth:`products_with_new_residual`,
            :meth:`products_with_direction`): on the CPU, n ≤ :data:`FUSED_PRODUCTS_MAX`.
        host_rows: with ``fuses_products`` in float64, a NumPy view of :attr:`rows`, through which those products
            are taken (and, when the secant pairs are worked on in NumPy too, the trial's products and the pair's in
            one: :meth:`SecantPairs.prepare_advance <moller_scg.quasi_newton.SecantPairs.prepare_advance>`); else
            ``None``.
        residual_views, direction_views, new_residual_views, accepted_views: their per-parameter views.
    """

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self.rows = torch.empty(4, layout.size, dtype=layout.dtype, device=layout.device)
        self.pair_rows = self.rows[:3]
        self.change, self.direction, self.new_residual, self.residual = self.rows.unbind(0)
        # Each parameter's views of the rows come from one view of its columns (two operations a parameter instead
        # of three for the views of r, p and r₊, at SCG's first step; y's views come with them, unused).
        _, self.direction_views, self.new_residual_views, self.residual_views = (
            list(views) for views in zip(*layout.row_views(self.rows))
        )
        # The accepted w has a buffer of its own: views share their base's version counter, and the copy of w taken
        # before each trial would otherwise mark r and p as written, and their remembered products as stale.
        self.accepted = layout.empty()
        self.accepted_views = layout.views(self.accepted)
        # Whether the step's inner products are taken as products of rows: on the CPU, n ≤ FUSED_PRODUCTS_MAX. (A
        # GPU's reductions of one row and of several may add in other orders: there the products stay one at a time,
        # as a resumed run forms them, so that a resume stays bit for bit.) Asked twice a step: kept, not recomputed.
        self.fuses_products = self.rows.device.type == "cpu" and self.rows.shape[-1] <= FUSED_PRODUCTS_MAX
        # In float64 the products of rows are NumPy's, through a view that shares the rows' memory: one BLAS call
        # where torch's product, float64 sum and list take three operations (3 rows of 650 numbers, warm: 1.9 µs
        # against 7.7). Their bits are
        # BLAS's, not dots()'s, so SCG saves the products a step ends with in its state_dict, and a resume reads
        # them instead of forming them again. (In float32, torch's products keep their float64 sums.)
        self.host_rows = self.rows.numpy() if self.fuses_products and self.rows.dtype == torch.float64 else None

    def per_parameter(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The views of r or p (whichever ``flat`` is), for operations that pair them with the parameters."""
        if flat is self.residual:
            return self.residual_views
        if flat is self.direction:
            return self.direction_views
        return self.layout.views(flat)

    def products_with_new_residual(self) -> list[float]:
        """[r₊ᵀp, |r₊|², r₊ᵀr] (step 6; in the order of the rows p, r₊, r), each summed in float64, in one product
        (``fuses_products``)."""
        if self.host_rows is not None:
            return (self.host_rows[1:] @ self.host_rows[2]).tolist()
        return _row_dots(self.rows[1:], self.new_residual)

    def products_with_direction(self) -> list[float]:
        """[|p|², pᵀr₊] (the next step's |p|² and μ after step 7 wrote p₊ = H r₊ into p), in one product."""
        if self.host_rows is not None:
            return (self.host_rows[1:3] @ self.host_rows[1]).tolist()
        return _row_dots(self.rows[1:3], self.direction)

    def is_held_by(self, state: Mapping[torch.Tensor, Any], params: Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` have this layout (:meth:`FlatLayout.matches`) and ``optimizer.state`` holds this object's
        views as their r and p, not tensors put there by a load or by hand."""
        if not self.layout.matches(params):
            return False
        for p, residual, direction in zip(params, self.residual_views, self.direction_views):
            entries = state.get(p)
            if entries is None or entries.get("residual") is not residual or entries.get("direction") is not direction:
                return False
        return True


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of this shape (row-major, in elements)."""
    strides = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * max(shape[axis + 1], 1)
    return tuple(strides)


def _row_dots(rows: torch.Tensor, vector: torch.Tensor) -> list[float]:
    """rowsᵢᵀ vector for each row: the elementwise products in the rows' dtype (float32 for float16 and bfloat16,
    :func:`~moller_scg._vectors.widened`), each row's sum in float64."""
    return (vec.widened(rows) * vec.widened(vector)).sum(dim=1, dtype=torch.float64).tolist()
