"""The vector operations of the secant pairs, in NumPy on small CPU blocks and in torch everywhere else.

A step of ``SCG(params, memory=m)`` updates the quasi-Newton pairs with a fixed handful of operations on vectors
of n numbers (:mod:`moller_scg.quasi_newton`): y = r − r₊, the products of [y, p, r₊] with the stored pairs, the
new pair written into its slot, H r₊ as γv plus a product with the stacks (with ``diagonal_scaling``, Λ from the
gradients' second moment, Λq and the products YᵀΛq and yᵢᵀΛyᵢ). On a model of a few hundred weights whose gradient
pass takes a millisecond, each of these costs what its dispatch costs: 3–7 µs as a torch operation on the CPU and
1–2 µs in NumPy, and the pair update was 60 % of SCG's own work per step on the regression of
``benchmarks/peers.py`` (``benchmarks/pair_update.py``, ``benchmarks/own_work.py``; docs/performance.md, lever 22).

So a block of pairs that lives on the CPU in float32 or float64 and holds at most :data:`HOST_ARITHMETIC_MAX`
numbers in all (:func:`on_host`) is worked on through NumPy views of its tensors, which share their memory: the
tensors stay what ``state_dict`` saves and what the rest of SCG sees, and nothing is copied. Every function here
takes either NumPy arrays (such a block) or torch tensors (a GPU block, a larger one, another dtype) and does the
same arithmetic on both; the two may differ in the last bits of their sums, as two BLAS libraries do. A given
block always takes the same path, so a run and its resume take the same bits.

Inner products come back in float64 whatever the vectors' dtype, as the m × m algebra of the compact form needs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moller_scg import _vectors as vec

Vector = Any
"""A vector or a matrix of rows of n numbers: a NumPy view of a small CPU block's tensor (``np.ndarray``), or the
tensor itself (``torch.Tensor``). Each function below takes either and branches on which it got, so the type
checker is not asked to follow the two."""

HOST_ARITHMETIC_MAX = 1 << 17
"""The most numbers a CPU block of pairs (its 2m stored vectors of n numbers) may hold for its arithmetic to run in
NumPy. ``benchmarks/results/pair_update_lever22.txt``: NumPy's pair update took half torch's time at n = 501
(m = 20 and 40: 40,000 numbers at most), about as long at n = 5,000 and 8,192 with m = 20 (up to 330,000), and 6–15
times as long at 655,000 numbers and more (m = 40 at n = 8,192, m = 20 at 16,384 and 32,768), where NumPy's BLAS
spreads a product over threads that the 2-core machine cannot give it; above this limit the block stays in torch."""

HOST_DTYPES = (torch.float32, torch.float64)
"""The dtypes NumPy has too (not bfloat16 or float16, whose products torch forms in float32)."""

PRODUCT_PIECE = 1 << 16
"""Columns per piece of :func:`row_products` on vectors longer than ``DOT_CHUNK`` and of :func:`scaled_squares` on
vectors longer than itself: a product of a few rows with 2m rows of 50 M numbers took 0.31 s whole and 0.19 s in
pieces of 2^16 columns on one CPU thread."""


def on_host(block: torch.Tensor) -> bool:
    """Whether a block's arithmetic runs in NumPy: on the CPU, float32 or float64, at most
    :data:`HOST_ARITHMETIC_MAX` numbers in all."""
    return block.device.type == "cpu" and block.dtype in HOST_DTYPES and block.numel() <= HOST_ARITHMETIC_MAX


def working(tensors: Sequence[torch.Tensor], host: bool) -> list[Vector]:
    """The tensors as the arithmetic takes them: NumPy views sharing their memory if ``host``, else themselves."""
    return [t.numpy() for t in tensors] if host else list(tensors)


def as_tensor(vector: Vector) -> torch.Tensor:
    """A result as a torch tensor (a NumPy array is wrapped, sharing its memory)."""
    return torch.from_numpy(vector) if isinstance(vector, np.ndarray) else vector


def row_products(a: Vector, b: Vector) -> Vector:
    """a bᵀ of two matrices of rows of n numbers, as float64: one product in their dtype, or, for a torch tensor of
    more than :data:`~moller_scg._vectors.DOT_CHUNK` numbers per row, one per piece of :data:`PRODUCT_PIECE` columns,
    the pieces added in float64."""
    if isinstance(a, np.ndarray):
        return _as_float64(a @ b.T)
    # float16's products overflow above 65504: half-precision pieces are multiplied in float32 (vec.widened), a
    # piece at a time, so that the float32 copies hold pieces, not the rows.
    whole = vec.DOT_CHUNK if a.element_size() >= 4 else PRODUCT_PIECE
    if a.shape[-1] <= whole:
        return _as_float64(vec.widened(a) @ vec.widened(b).T)
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for a_piece, b_piece in zip(a.split(PRODUCT_PIECE, dim=-1), b.split(PRODUCT_PIECE, dim=-1)):
        total += (vec.widened(a_piece) @ vec.widened(b_piece).T).to(torch.float64)
    return total


def scaled_squares(rows: Vector, diagonal: Vector) -> Vector:
    """Σⱼ rowsᵢⱼ² Λⱼ for each of k rows of n numbers (the diagonal of rows Λ rowsᵀ), as float64, for
    Λ = diag(``diagonal``): for a torch tensor, one product per piece of :data:`PRODUCT_PIECE` columns, so that the
    temporary holds k pieces, not k · n numbers."""
    if isinstance(rows, np.ndarray):
        return _as_float64((rows * rows) @ diagonal)
    # float16's squares overflow above 256: half-precision pieces are squared in float32 (vec.widened).
    if rows.shape[-1] <= PRODUCT_PIECE:
        rows, diagonal = vec.widened(rows), vec.widened(diagonal)
        return _as_float64((rows * rows) @ diagonal)
    total = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for rows_piece, diagonal_piece in zip(rows.split(PRODUCT_PIECE, dim=-1), diagonal.split(PRODUCT_PIECE)):
        rows_piece, diagonal_piece = vec.widened(rows_piece), vec.widened(diagonal_piece)
        total += ((rows_piece * rows_piece) @ diagonal_piece).to(torch.float64)
    return total


def add_product(
    vector: Vector, rows: Vector, coefficients: np.ndarray, scale: float = 1.0, out: Vector = None
) -> Vector:
    """scale · vector + rowsᵀ c for k rows of n numbers and k float64 coefficients c, into ``out`` (which may be
    ``vector`` itself) or a new vector. No temporary of n numbers: in NumPy, BLAS's gemv adds the product into
    ``out`` in place, as torch's ``addmv`` does."""
    if isinstance(vector, np.ndarray):
        if out is None:
            out = np.empty_like(vector)
        if out is not vector:
            np.copyto(out, vector)
        gemv = _gemv(rows.dtype)
        # rowsᵀ is the Fortran-ordered n × k matrix whose memory rows is: no copy on the way into BLAS.
        result = gemv(1.0, rows.T, coefficients.astype(rows.dtype, copy=False), beta=scale, y=out, overwrite_y=1)
        if result is not out:  # BLAS wrote into a contiguous copy of a strided out
            np.copyto(out, result)
        return out
    c = torch.from_numpy(coefficients)
    if vector.element_size() < 4:
        return _add_product_in_float32(vector, rows, c.to(device=vector.device, dtype=torch.float32), scale, out)
    if c.device != vector.device or c.dtype != vector.dtype:
        c = c.to(device=vector.device, dtype=vector.dtype)
    if out is vector:
        return vector.addmv_(rows.T, c, beta=scale)
    return torch.addmv(vector, rows.T, c, beta=scale, out=out)


def _add_product_in_float32(
    vector: torch.Tensor, rows: torch.Tensor, c: torch.Tensor, scale: float, out: torch.Tensor | None
) -> torch.Tensor:
    """:func:`add_product` for a float16 or bfloat16 vector: float16 would round coefficients beyond 65504 to inf, so
    each piece of :data:`PRODUCT_PIECE` numbers is summed in float32 and rounded into ``out``."""
    out = torch.empty_like(vector) if out is None else out
    for piece, rows_piece, out_piece in zip(
        vector.split(PRODUCT_PIECE), rows.split(PRODUCT_PIECE, dim=-1), out.split(PRODUCT_PIECE)
    ):
        out_piece.copy_(torch.addmv(piece.float(), rows_piece.float().T, c, beta=scale))
    return out


def multiply(a: Vector, b: Vector, out: Vector = None) -> Vector:
    """a ∘ b (or a times a number), into ``out`` or a new vector."""
    if isinstance(a, np.ndarray):
        return np.multiply(a, b, out=out)
    return torch.mul(a, b, out=out)


def subtract(a: Vector, b: Vector, out: Vector) -> Vector:
    """a − b into ``out``."""
    if isinstance(a, np.ndarray):
        return np.subtract(a, b, out=out)
    return torch.sub(a, b, out=out)


def assign(target: Vector, source: Vector) -> None:
    """Copy ``source`` into ``target``."""
    if isinstance(target, np.ndarray):
        np.copyto(target, source)
    else:
        target.copy_(source)


def joined(pieces: Sequence[Vector]) -> Vector:
    """Vectors of float64 one after the other."""
    if isinstance(pieces[0], np.ndarray):
        return np.concatenate(pieces)
    return torch.cat(list(pieces))


def no_columns(rows: Vector) -> Vector:
    """The float64 product of these rows with no rows at all: one empty row each (as :func:`row_products` with an
    empty matrix gives, without the product)."""
    if isinstance(rows, np.ndarray):
        return np.zeros((rows.shape[0], 0))
    return torch.zeros(rows.shape[0], 0, dtype=torch.float64, device=rows.device)


def joined_columns(left: Vector, right: Vector) -> Vector:
    """Two matrices of the same rows side by side (a product with S beside one with Y)."""
    if isinstance(left, np.ndarray):
        return np.concatenate([left, right], axis=1)
    return torch.cat([left, right], dim=1)


def summed_on_host(partial: Sequence[Vector]) -> np.ndarray:
    """Σ of equally long float64 vectors, one per block, as a NumPy array: a torch block's on its device first, then
    one synchronisation a device."""
    if isinstance(partial[0], np.ndarray):
        return partial[0] if len(partial) == 1 else np.sum(partial, axis=0)
    if len(partial) == 1:
        return partial[0].cpu().numpy()
    devices = list(dict.fromkeys(t.device for t in partial))
    per_device = [torch.stack([t for t in partial if t.device == device]).sum(0).cpu().numpy() for device in devices]
    return np.sum(per_device, axis=0)


def import_blas() -> None:
    """Import SciPy's BLAS wrappers now (:func:`moller_scg.quasi_newton.import_linear_algebra`)."""
    _gemv(np.dtype(np.float64))


@functools.cache
def _gemv(dtype: np.dtype) -> Any:
    """BLAS's y ← α A x + β y for this dtype (dgemv, sgemv), from SciPy's wrappers, which share NumPy's BLAS;
    imported on first use (SciPy takes about 60–85 ms to import on the 2-core machine; :func:`import_blas` at SCG's
    construction) and kept (an import statement at every call cost 2–3 µs)."""
    from scipy.linalg import blas

    return blas.dgemv if dtype == np.float64 else blas.sgemv


def _as_float64(t: Vector) -> Vector:
    """t in float64: itself when it already is (no operation dispatched, which costs what a small product does)."""
    if isinstance(t, np.ndarray):
        return t if t.dtype == np.float64 else t.astype(np.float64)
    return t if t.dtype == torch.float64 else t.to(torch.float64)
