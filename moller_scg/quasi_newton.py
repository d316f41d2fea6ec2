"""The limited-memory quasi-Newton inverse H that preconditions SCG's direction when ``SCG(memory=m)``, m ≥ 1.

Every accepted SCG step gives a secant pair at no extra evaluation: the step sᵢ = αp and the change of the gradient
yᵢ = E'(w₊) − E'(w) = r − r₊. The last m pairs define the L-BFGS approximation H of the inverse Hessian
(Nocedal 1980), applied here in the compact form of Byrd, Nocedal & Schnabel (1994, eq. 3.1 of the inverse):

    H v = γv + [S  γY] [ R⁻ᵀ(D + γYᵀY)R⁻¹   −R⁻ᵀ ] [ Sᵀv  ]
                       [ −R⁻¹                 0   ] [ γYᵀv ]

with S = [s₁ … sₘ], Y = [y₁ … yₘ] (oldest first), R the upper triangle of SᵀY, D its diagonal and γ the initial
scaling H₀ = γI. L-BFGS's usual γ is the newest pair's sₘᵀyₘ / yₘᵀyₘ; here γ = maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ over the pairs held,
the boldest of their curvature estimates along the directions the pairs do not see — it took fewer gradient passes
to every target on the regression, logistic and physics-informed problems of ``benchmarks/levers.py`` and the same
on MNIST (``benchmarks/results/levers_passes.txt``, docs/performance.md).

With ``diagonal_scaling`` (:mod:`moller_scg.diagonal_scaling`), H₀ = γ_D Λ, Λ a positive diagonal matrix from the
gradients' second moments and γ_D = maxᵢ sᵢᵀyᵢ / yᵢᵀΛyᵢ, and the same form holds with ΛY in place of Y where Y
meets H₀ (Byrd, Nocedal & Schnabel's eq. 3.1 for any H₀):

    H v = γ_D Λv + [S  γ_D ΛY] [ R⁻ᵀ(D + γ_D YᵀΛY)R⁻¹   −R⁻ᵀ ] [ Sᵀv     ]
                               [ −R⁻¹                   0   ] [ γ_D YᵀΛv ]

Λ changes with every accepted gradient, so YᵀΛY would have to be formed afresh at every step (k² n products, k the
pairs held). It is never formed: with z = Y R⁻¹u and q = v − z, the two terms of the compact form that hold YᵀΛY and
YᵀΛv combine into one, γ_D(YᵀΛY R⁻¹u − YᵀΛv) = −γ_D YᵀΛq, so that

    H v = γ_D Λq + S R⁻ᵀ(D R⁻¹u − γ_D YᵀΛq),        q = v − Y R⁻¹u,

which takes Sᵀv (from the pair update's products), the diagonal of YᵀΛY (for γ_D) and YᵀΛq: kn products each, in
one more host synchronisation, with q formed in the storage of the result and Λq in the scratch row of y.

One matrix-vector product with the 2m × n block [S Y]ᵀ, an m × m triangular solve and one product back replace the
4m vector operations of the two-loop recursion: the same H v (tested against the two-loop recursion), with a number
of operations that does not grow with m — what keeps a step cheap when a gradient pass is cheap. While the first m
pairs fill the stacks, the products read only the rows of the pairs held, as the two-loop recursion does (on the
MNIST CNN, m = 20, the first 24 steps took 5 ms each instead of 14).

The pairs are stored flat: all parameters that share a device and dtype form one block, whose m steps and m
changes are the rows of one ``(2, m, n_block)`` tensor (complex parameters as their real and imaginary parts).
Blocks of at most 2^17 numbers (2mn) on the CPU are worked on through NumPy views of their tensors, larger or GPU
ones in torch (:mod:`moller_scg.pair_arithmetic`).
The m × m inner products SᵀY and YᵀY and the order of the slots are small and kept in float64 NumPy arrays on
the CPU, where a handful of m × m operations cost microseconds, not a tensor operation's dispatch each: once by
slot (what ``state_dict`` saves) and once in the pairs' order, oldest first, as the compact form uses them (4m²
numbers in all, kept up to date as pairs come and go so that no step reorders them).

References:
    Nocedal, J. (1980). Updating quasi-Newton matrices with limited storage. Math. Comp. 35(151), 773–782.
    Byrd, R. H., Nocedal, J., Schnabel, R. B. (1994). Representations of quasi-Newton matrices and their use in
    limited memory methods. Math. Programming 63, 129–156.
    Morales, J. L., Nocedal, J. (2000). Automatic preconditioning by limited memory quasi-Newton updating.
    SIAM J. Optim. 10(4), 1079–1096.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moller_scg import _vectors as vec
from moller_scg import pair_arithmetic as arithmetic
from moller_scg.diagonal_scaling import DiagonalScaling
from moller_scg.kronecker import KroneckerFactors

CURVATURE_CONDITION = 1e-10
"""A pair is kept only if sᵀy > CURVATURE_CONDITION · yᵀy (a scale-free form of L-BFGS's sᵀy > 0): H then stays
positive definite, so p = H r is a descent direction (pᵀr > 0)."""


class SecantPairs:
    """The last m secant pairs (sᵢ, yᵢ) and the inner products the compact form of H needs.

    Args:
        params: the parameters (their shapes, dtypes and devices); the pairs' storage, 2m · n numbers, is made
            here, uninitialised.
        memory: m ≥ 1, the number of pairs kept.
        diagonal_scaling: H₀ = γ_D Λ with Λ from the accepted gradients' second moments
            (:mod:`moller_scg.diagonal_scaling`; 2n more numbers) instead of γI. The gradients reach Λ through
            :meth:`start_scaling` (at SCG's start), :meth:`advance` / :meth:`advance_flat` (an accepted step) and
            :meth:`observe` (an accepted step that restarts).
        kronecker_factors: H₀ = γ_K K⁻¹ with K K-FAC's Kronecker-factored curvature of the network
            (:mod:`moller_scg.kronecker`; parameters of one dtype and device, so one block), γ_K = maxᵢ sᵢᵀyᵢ /
            yᵢᵀK⁻¹yᵢ. The caller refreshes the factors (:meth:`refresh_factors_when_due`, before :meth:`advance`:
            SCG calls it before it commits an accepted step). Not with ``diagonal_scaling``.

    Attributes:
        memory: m.
        slots: the filled rows of the stacks, oldest pair first.
        blocks: one ``(2, m, n_block)`` tensor per group of parameters sharing a device and dtype: ``[0]`` holds
            the steps sᵢ, ``[1]`` the changes yᵢ.
        sy, yy: float64 m × m NumPy arrays, sy[i, j] = sᵢᵀyⱼ and yy[i, j] = yᵢᵀyⱼ over the slots (indexed by slot).
        scaling: the :class:`~moller_scg.diagonal_scaling.DiagonalScaling` (v and Λ), or ``None`` (H₀ = γI).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        memory: int,
        diagonal_scaling: bool = False,
        kronecker_factors: KroneckerFactors | None = None,
    ) -> None:
        if kronecker_factors is not None and diagonal_scaling:
            raise ValueError("an H₀ is either diagonal (diagonal_scaling=True) or Kronecker-factored, not both")
        self.memory = memory
        self.kronecker = kronecker_factors
        self._kronecker_metric: dict[int, float] = {}  # slot i → yᵢᵀK⁻¹yᵢ with the factors of refresh _kronecker_seen
        self._kronecker_seen = -1
        self.slots: list[int] = []
        self.sy = np.zeros((memory, memory))
        self.yy = np.zeros((memory, memory))
        # The same inner products in the order of the pairs, oldest first, as the compact form uses them: R (the
        # upper triangle of SᵀY) and YᵀY, their leading len(slots) × len(slots) blocks filled; and the slots of
        # that order as an index array. Kept up to date as pairs come and go, so that applying H needs no
        # reordering: the same numbers as taking them from sy and yy at every step.
        self._ordered_r = np.zeros((memory, memory))
        self._ordered_yy = np.zeros((memory, memory))
        self._order = np.zeros(0, dtype=np.intp)
        self._ratios: list[float] = []  # sᵢᵀyᵢ / yᵢᵀyᵢ of the pairs, oldest first (γ is their largest)
        # Whether the pairs held fill slots 0, 1, …, in order (true until the stacks are full): then the products
        # with the stacks read only those rows, as the two-loop recursion reads only the pairs it holds.
        self._filled_in_order = True
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, p in enumerate(params):
            real = vec.as_real(p)
            groups.setdefault((real.device, real.dtype), []).append(index)
        self._members = list(groups.values())
        self._layout = _layout(params)
        self._shapes = [p.shape for p in params]
        self._complex = [p.is_complex() for p in params]
        # Uninitialised: a row is read only once a pair was written into it (the products read the k rows in use
        # while the slots fill in order, and a loaded state writes every row). On a model of 50 M weights zeroing
        # all 2m rows at once took 1.7 s of SCG's first step; now each row's pages are touched as its pair comes.
        self.blocks = [
            torch.empty(2, memory, sum(vec.as_real(params[i]).numel() for i in members), dtype=dtype, device=device)
            for (device, dtype), members in groups.items()
        ]
        # Small CPU blocks are worked on in NumPy through views that share the tensors' memory (every block, or
        # none, so that the products of all blocks add up alike); the tensors stay what state_dict saves.
        self.on_host = all(arithmetic.on_host(block) for block in self.blocks)
        self._stacks = arithmetic.working(self.blocks, self.on_host)
        self._flat_views: tuple[torch.Tensor, torch.Tensor, Any, Any] | None = None  # _working_flat's
        self.scaling = (
            DiagonalScaling(
                [block.shape[-1] for block in self.blocks],
                [block.dtype for block in self.blocks],
                [block.device for block in self.blocks],
                on_host=self.on_host,
            )
            if diagonal_scaling
            else None
        )

    def __len__(self) -> int:
        return len(self.slots)

    def __getstate__(self) -> dict[str, Any]:
        """What a pickle or a deep copy keeps: everything but the NumPy views of the blocks, which would be saved as
        copies that no longer share the blocks' memory (:meth:`__setstate__` makes them anew), and the views of SCG's
        flat buffers that :meth:`advance_flat` keeps (SCG's buffers are not the pairs' to copy)."""
        state = self.__dict__.copy()
        del state["_stacks"], state["_flat_views"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.on_host = state.get("on_host", False)  # a pickle of a version before the NumPy path: torch throughout
        self._stacks = arithmetic.working(self.blocks, self.on_host)
        self._flat_views = None

    def fits(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether these pairs were made for parameters of these shapes, dtypes and devices, in this order."""
        return self._layout == _layout(params)

    def clear(self) -> None:
        """Forget every pair: H = I until the next one (at SCG's start and restarts)."""
        self.slots = []
        self._order = np.zeros(0, dtype=np.intp)
        self._ratios = []
        self._filled_in_order = True
        self._kronecker_metric = {}

    def start_scaling(self, gradient: Sequence[torch.Tensor]) -> None:
        """With diagonal scaling, v and Λ from the first gradient (at SCG's start; −E' serves as well)."""
        if self.scaling is not None:
            self.scaling.start(self._working(self._flatten(gradient)))

    def observe(self, gradient: Sequence[torch.Tensor]) -> None:
        """With diagonal scaling, add an accepted step's gradient to v (:meth:`advance` does it by itself)."""
        if self.scaling is not None:
            self.scaling.observe(self._working(self._flatten(gradient)))

    def observe_flat(self, gradient: torch.Tensor) -> None:
        """:meth:`observe` for real parameters of one device and dtype, the gradient a flat vector of n numbers
        (as :meth:`advance_flat` takes it)."""
        if self.scaling is not None:
            self.scaling.observe(self._working([gradient]))

    def push(self, step: Sequence[torch.Tensor], change: Sequence[torch.Tensor]) -> bool:
        """Keep the pair (s, y) in place of the oldest, if sᵀy > CURVATURE_CONDITION · yᵀy; return whether kept.

        One host synchronisation: sᵀy, yᵀy and the products of s and y with every stored pair are reduced together.
        """
        rows = [torch.stack([y, s, y]) for s, y in zip(self._flatten(step), self._flatten(change))]
        return self._push_flat(self._working(rows), step_scale=1.0)[0]

    def inverse_product(self, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v as new tensors, one per parameter (a copy of v when no pair is kept: H = I)."""
        if not self.slots:
            return vec.clone(vector)
        flat = self._working(self._flatten(vector))
        # [Sᵀv, Yᵀv] over the rows in use, one product per block.
        products = arithmetic.summed_on_host(
            [self._against_pairs(stack, v[None]).reshape(-1) for stack, v in zip(self._stacks, flat)]
        )
        return self._unflatten(self._apply_flat(flat, *self._split_by_slot(products)))

    def advance(
        self,
        direction: Sequence[torch.Tensor],
        alpha: float,
        residual: Sequence[torch.Tensor],
        new_residual: Sequence[torch.Tensor],
    ) -> list[torch.Tensor]:
        """SCG's step 7 with memory: keep the pair (s, y) = (αp, r − r₊) if it passes the curvature condition, then
        return p₊ = H r₊ with the pairs now held, as new tensors, one per parameter.

        The same numbers as :meth:`push` then :meth:`inverse_product`, in one host synchronisation instead of two:
        the products the pair needs and Sᵀr₊, Yᵀr₊ come from one matrix product.
        """
        # Per block, one 3 × n buffer holds y = r − r₊, p and r₊: the pair's and H r₊'s only temporaries (s = αp).
        columns = []
        for members, block in zip(self._members, self.blocks):
            rows = torch.empty(3, block.shape[-1], dtype=block.dtype, device=block.device)
            torch.cat([vec.as_real(new_residual[i]).reshape(-1) for i in members], out=rows[2])
            torch.cat([vec.as_real(direction[i]).reshape(-1) for i in members], out=rows[1])
            torch.cat([vec.as_real(residual[i]).reshape(-1) for i in members], out=rows[0]).sub_(rows[2])
            columns.append(rows)
        columns = self._working(columns)
        flat_new_residual = [c[2] for c in columns]
        if self.scaling is not None:
            self.scaling.observe(flat_new_residual)
        _, s_dot_v, y_dot_v = self._push_flat(columns, step_scale=alpha)
        if not self.slots:
            return vec.clone(new_residual)
        free_rows = [c[0] for c in columns]  # y's row is free: y is stored
        return self._unflatten(self._apply_flat(flat_new_residual, s_dot_v, y_dot_v, scratch=free_rows))

    def prepare_advance(self, rows: np.ndarray) -> PreparedAdvance:
        """Step 6's inner products and those :meth:`advance_flat` needs, in two NumPy products, for pairs worked on in
        NumPy (``on_host``; SCG's flat buffers exist only for parameters of one device and dtype, so these pairs then
        have one block of the rows' length): SCG's flat float64 rows y, p, r₊, r
        (:attr:`FlatBuffers.host_rows <moller_scg.flat_vector.FlatBuffers.host_rows>`), y = r − r₊ written first.

        The trial needs |r₊|², r₊ᵀr and r₊ᵀp, the pair yᵀy, pᵀy, Sᵀy, sᵀY and H r₊'s Sᵀr₊ and Yᵀr₊: all are products
        of [y, p, r₊] with [y, p, r₊, r] and with [S Y], formed here before Δ says whether the step is accepted (a
        rejected or restarting step wastes two products of 3 rows, a few µs). Pass the result to :meth:`advance_flat`
        if step 7 accepts, before any pair changes.
        """
        np.subtract(rows[3], rows[2], out=rows[0])  # y = r − r₊
        gram = rows[:3] @ rows.T
        return PreparedAdvance(gram, self._against_pairs(self._stacks[0], rows[:3]), self._rows_in_use())

    def advance_flat(
        self, rows: torch.Tensor, alpha: float, residual: torch.Tensor, prepared: PreparedAdvance | None = None
    ) -> None:
        """:meth:`advance` for real parameters of one device and dtype, on flat vectors of n numbers
        (:mod:`moller_scg.flat_vector`), bit for bit :meth:`advance`'s numbers, with no weight-sized temporary (but K⁻¹q
        and its pieces with Kronecker factors).

        Args:
            rows: a ``(3, n)`` tensor holding p in ``rows[1]`` and r₊ in ``rows[2]``; ``rows[0]`` is scratch and
                takes y = r − r₊, and p is overwritten with p₊ = H r₊.
            alpha: α, the accepted step length (s = αp).
            residual: r.
            prepared: :meth:`prepare_advance`'s products of these rows (y already in ``rows[0]``), or ``None`` to
                form y and the products here.
        """
        rows, residual = self._working_flat(rows, residual)
        totals = None
        if prepared is None:
            arithmetic.subtract(residual, rows[2], out=rows[0])
        else:
            if prepared.rows_in_use != self._rows_in_use():
                raise RuntimeError("the prepared products of this step are stale: the pairs changed since")
            totals = np.concatenate([prepared.gram[:, :3].reshape(-1), prepared.against.reshape(-1)])
        if self.scaling is not None:
            self.scaling.observe([rows[2]])
        _, s_dot_v, y_dot_v = self._push_flat([rows], step_scale=alpha, totals=totals)
        if not self.slots:
            arithmetic.assign(rows[1], rows[2])
            return
        # y's row is free once the pair is stored
        self._apply_flat([rows[2]], s_dot_v, y_dot_v, out=[rows[1]], scratch=[rows[0]])

    def _working_flat(self, rows: torch.Tensor, residual: torch.Tensor) -> tuple[Any, Any]:
        """:meth:`advance_flat`'s rows and r as the arithmetic takes them, the NumPy views kept while SCG passes the
        same flat buffers (every step: making two views cost 5–8 µs of a step's own work)."""
        kept = self._flat_views
        if kept is None or kept[0] is not rows or kept[1] is not residual:
            kept = self._flat_views = (rows, residual, *self._working([rows, residual]))
        return kept[2], kept[3]

    def _rows_in_use(self) -> int:
        """k: the products with the stacks use slots 0 … k − 1 of S and of Y — the pairs held while they fill the
        slots in order, all m slots once they are full (or after loading pairs in another order)."""
        return len(self.slots) if self._filled_in_order else self.memory

    def _against_pairs(self, stack: arithmetic.Vector, rows: arithmetic.Vector) -> arithmetic.Vector:
        """rows [S Y] over the rows in use, in float64: one row per row of ``rows``, its products with S's k rows
        then with Y's k (one product when k = m, else two)."""
        m, k = self.memory, self._rows_in_use()
        if k == 0:  # no pair yet (SCG's first step, a restart): no product to form
            return arithmetic.no_columns(rows)
        if k == m:
            return arithmetic.row_products(rows, stack.reshape(2 * m, -1))
        return arithmetic.joined_columns(
            arithmetic.row_products(rows, stack[0, :k]), arithmetic.row_products(rows, stack[1, :k])
        )

    def _split_by_slot(self, products: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Sᵀv, Yᵀv) as m numbers each, indexed by slot, from the 2k products over the rows in use (zero beyond)."""
        m, k = self.memory, len(products) // 2
        s_dot_v, y_dot_v = np.zeros(m), np.zeros(m)
        s_dot_v[:k], y_dot_v[:k] = products[:k], products[k:]
        return s_dot_v, y_dot_v

    @property
    def gamma(self) -> float:
        """γ = maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ over the pairs held: H's scale along directions the pairs do not see."""
        return max(self._ratios)

    def _push_flat(
        self, rows: list[torch.Tensor], step_scale: float, totals: np.ndarray | None = None
    ) -> tuple[bool, np.ndarray, np.ndarray]:
        """:meth:`push` on flat blocks, given per block the rows [y, d, v] of a 3 × n tensor with the step
        s = ``step_scale`` · d; also returns Sᵀv and Yᵀv over all slots, with the new pair's entry in place if it was
        kept (one host synchronisation for all). ``totals``: the products below, if already formed
        (:meth:`prepare_advance`)."""
        m, k = self.memory, self._rows_in_use()
        if totals is None:
            partial = []
            for stack, stacked in zip(self._stacks, rows):
                # Two matrix products give every inner product the pair and v need: the 3 × 3 Gram matrix of
                # [y, d, v] (dᵀy, yᵀy, dᵀv, yᵀv among its entries) and [y, d, v]ᵀ[S Y] over the k rows in use.
                gram = arithmetic.row_products(stacked, stacked)
                against = self._against_pairs(stack, stacked)
                partial.append(arithmetic.joined([gram.reshape(-1), against.reshape(-1)]))
            totals = arithmetic.summed_on_host(partial)
        # The Gram matrix row by row: (yᵀy, yᵀd, yᵀv, dᵀy, dᵀd, dᵀv, vᵀy, vᵀd, vᵀv); s = step_scale · d.
        change_sq, change_dot_vector = totals[0], totals[2]
        step_dot_change, step_dot_vector = step_scale * totals[3], step_scale * totals[5]
        # Rows of [y, d, v]ᵀ[S Y]: y's, then d's, then v's, each 2k long (the k slots of S, then of Y).
        against_change, against_step, against_vector = (
            totals[9 : 9 + 2 * k],
            step_scale * totals[9 + 2 * k : 9 + 4 * k],
            totals[9 + 4 * k :],
        )
        s_dot_vector, y_dot_vector = self._split_by_slot(against_vector)
        if not (step_dot_change > CURVATURE_CONDITION * change_sq > 0.0):
            return False, s_dot_vector, y_dot_vector
        full = len(self.slots) == m
        older = self._order[1:] if full else self._order  # the slots of the pairs that stay, oldest first
        slot = self.slots.pop(0) if full else len(self.slots)
        for stack, stacked in zip(self._stacks, rows):
            arithmetic.multiply(stacked[1], step_scale, out=stack[0, slot])  # s = step_scale · d
            arithmetic.assign(stack[1, slot], stacked[0])  # y
        self._append_in_order(full, against_change[:k][older], against_change[k:][older], step_dot_change, change_sq)
        self.slots.append(slot)
        self._kronecker_metric.pop(slot, None)
        self._order = _appended(older, slot)
        # The entries for the k slots in use (slots beyond k are empty and get theirs when they are filled).
        self.sy[:k, slot] = against_change[:k]  # Sᵀy
        self.sy[slot, :k] = against_step[k:]  # sᵀY
        self.yy[:k, slot] = against_change[k:]  # Yᵀy
        self.yy[slot, :k] = against_change[k:]
        self.sy[slot, slot] = step_dot_change
        self.yy[slot, slot] = change_sq
        s_dot_vector[slot], y_dot_vector[slot] = step_dot_vector, change_dot_vector
        return True, s_dot_vector, y_dot_vector

    def _apply_flat(
        self,
        flat: list[arithmetic.Vector],
        s_dot_v: np.ndarray,
        y_dot_v: np.ndarray,
        out: list[arithmetic.Vector] | None = None,
        scratch: list[arithmetic.Vector] | None = None,
    ) -> list[arithmetic.Vector]:
        """H v per block from Sᵀv and Yᵀv over all slots (the compact form's m × m algebra in NumPy), as new
        vectors or into ``out`` (one flat vector per block, not one of ``flat``), as :meth:`_working` gives them.

        With diagonal scaling, :meth:`_apply_scaled`, which also uses ``scratch`` (one flat vector per block, not one
        of ``flat`` or ``out``; new vectors if ``None``).
        """
        m = self.memory
        held, order = len(self.slots), self._order
        upper = self._ordered_r[:held, :held]  # R, upper triangular with the positive diagonal D
        r_inv_u = _solve_upper(upper, s_dot_v[order])
        targets: list[arithmetic.Vector | None] = list(out) if out is not None else [None] * len(flat)
        if self.scaling is not None:
            return self._apply_scaled(flat, upper, r_inv_u, targets, scratch)
        if self.kronecker is not None:
            return self._apply_kronecker(flat, upper, r_inv_u, targets)
        gamma = self.gamma
        k = self._rows_in_use()
        w = gamma * y_dot_v[order]
        inner = upper.diagonal() * r_inv_u + gamma * (self._ordered_yy[:held, :held] @ r_inv_u) - w
        coefficients = np.zeros(2 * m)
        coefficients[order] = _solve_upper(upper, inner, transposed=True)
        coefficients[m + order] = -gamma * r_inv_u
        results = []
        for stack, v, target in zip(self._stacks, flat, targets):
            if k == m:  # every slot in use: γv + [S Y] c in one product (c over [S Y], 2m numbers)
                results.append(arithmetic.add_product(v, stack.reshape(2 * m, -1), coefficients, gamma, target))
            else:  # γv + S c_S + Y c_Y over the k slots in use
                result = arithmetic.add_product(v, stack[0, :k], coefficients[:k], gamma, target)
                results.append(arithmetic.add_product(result, stack[1, :k], coefficients[m : m + k], out=result))
        return results

    def _apply_scaled(
        self,
        flat: list[arithmetic.Vector],
        upper: np.ndarray,
        r_inv_u: np.ndarray,
        targets: list[arithmetic.Vector | None],
        scratch: list[arithmetic.Vector] | None,
    ) -> list[arithmetic.Vector]:
        """The diagonal mode's H v = γ_D Λq + S R⁻ᵀ(D R⁻¹u − γ_D YᵀΛq) with q = v − Y R⁻¹u (the module's docstring),
        given R and R⁻¹u (u = Sᵀv, oldest first): q in ``targets``, Λq in ``scratch``, then YᵀΛq and the diagonal
        yᵢᵀΛyᵢ of YᵀΛY (for γ_D = maxᵢ sᵢᵀyᵢ / yᵢᵀΛyᵢ) in one host synchronisation, and H v = γ_D Λq + S c_S in
        ``targets``. YᵀΛY itself, k²n products, is never formed."""
        assert self.scaling is not None
        k, order = self._rows_in_use(), self._order
        c_q = self._by_slot(-r_inv_u)
        scaled_rows, partial = [], []
        diagonals = self.scaling.working_diagonal
        for index, (stack, v, target, diagonal) in enumerate(zip(self._stacks, flat, targets, diagonals)):
            changes = stack[1, :k]
            q = arithmetic.add_product(v, changes, c_q, out=target)  # q = v − Y R⁻¹u
            scaled = arithmetic.multiply(diagonal, q, out=scratch[index] if scratch is not None else None)  # Λq
            scaled_rows.append(scaled)
            products = arithmetic.row_products(scaled[None], changes).reshape(-1)  # YᵀΛq
            partial.append(arithmetic.joined([products, arithmetic.scaled_squares(changes, diagonal)]))
        totals = arithmetic.summed_on_host(partial)
        changes_dot_scaled, gram_diagonal = totals[:k][order], totals[k:][order]  # YᵀΛq, yᵢᵀΛyᵢ, oldest first
        gamma, c_s = self._scaled_step(upper, r_inv_u, changes_dot_scaled, gram_diagonal)  # γ_D
        return [
            arithmetic.add_product(scaled, stack[0, :k], c_s, gamma, target)  # γ_D Λq + S c_S
            for stack, scaled, target in zip(self._stacks, scaled_rows, targets)
        ]

    def refresh_factors_when_due(self) -> None:
        """With Kronecker factors, count an accepted step and form the factors anew if they are due (at the first
        accepted step, then every T), at the weights the parameters hold: the accepted ones. SCG calls it before it
        commits the step (before :meth:`advance`), so that a refresh that raises leaves its state and the pairs as
        they were; without factors it does nothing."""
        if self.kronecker is not None and self.kronecker.count_accepted_step():
            self.kronecker.refresh()

    def _apply_kronecker(
        self,
        flat: list[arithmetic.Vector],
        upper: np.ndarray,
        r_inv_u: np.ndarray,
        targets: list[arithmetic.Vector | None],
    ) -> list[arithmetic.Vector]:
        """H v = γ_K K⁻¹q + S R⁻ᵀ(D R⁻¹u − γ_K YᵀK⁻¹q) with q = v − Y R⁻¹u: :meth:`_apply_scaled`'s form with K⁻¹ in
        place of Λ (the form holds for any symmetric positive definite H₀). q goes into ``targets``, K⁻¹q is a new
        vector; yᵢᵀK⁻¹yᵢ (for γ_K = maxᵢ sᵢᵀyᵢ / yᵢᵀK⁻¹yᵢ) is formed once per pair and factors
        (:meth:`_kronecker_curvatures`)."""
        assert self.kronecker is not None
        k, order = self._rows_in_use(), self._order
        (stack,), (v,), (target,) = self._stacks, flat, targets  # one block: KroneckerFactors.bind checked it
        changes = stack[1, :k]
        q = arithmetic.add_product(v, changes, self._by_slot(-r_inv_u), out=target)  # q = v − Y R⁻¹u
        (scaled,) = self._working([self.kronecker.inverse_product(arithmetic.as_tensor(q))])  # K⁻¹q
        changes_dot_scaled = arithmetic.summed_on_host([arithmetic.row_products(scaled[None], changes).reshape(-1)])
        changes_dot_scaled = changes_dot_scaled[order]  # YᵀK⁻¹q, oldest first
        gamma, c_s = self._scaled_step(upper, r_inv_u, changes_dot_scaled, self._kronecker_curvatures())  # γ_K
        return [arithmetic.add_product(scaled, stack[0, :k], c_s, gamma, target)]  # γ_K K⁻¹q + S c_S

    def _by_slot(self, ordered: np.ndarray) -> np.ndarray:
        """Numbers given per pair, oldest first, placed by slot over the k rows in use (zero in the others)."""
        by_slot = np.zeros(self.memory)
        by_slot[self._order] = ordered
        return by_slot[: self._rows_in_use()]

    def _scaled_step(
        self, upper: np.ndarray, r_inv_u: np.ndarray, changes_dot_scaled: np.ndarray, metric: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """For an H₀ = γ M (M = Λ or K⁻¹), given R, R⁻¹u, YᵀMq and yᵢᵀMyᵢ (oldest first): γ = maxᵢ sᵢᵀyᵢ / yᵢᵀMyᵢ and
        c_S = R⁻ᵀ(D R⁻¹u − γ YᵀMq) by slot over the rows in use, so that H v = γ Mq + S c_S."""
        diagonal_of_r = upper.diagonal()  # D: sᵢᵀyᵢ
        gamma = float((diagonal_of_r / metric).max())
        return gamma, self._by_slot(_solve_upper(upper, diagonal_of_r * r_inv_u - gamma * changes_dot_scaled, True))

    def _kronecker_curvatures(self) -> np.ndarray:
        """yᵢᵀK⁻¹yᵢ of the pairs held, oldest first, each formed once per pair and factors (one K⁻¹ product for a new
        pair, one per pair held after a refresh)."""
        assert self.kronecker is not None
        if self._kronecker_seen != self.kronecker.refreshes:
            self._kronecker_metric, self._kronecker_seen = {}, self.kronecker.refreshes
        (block,) = self.blocks
        for slot in self.slots:
            if slot not in self._kronecker_metric:
                change = block[1, slot]
                product = self.kronecker.inverse_product(change)
                self._kronecker_metric[slot] = float(torch.dot(change.double(), product.double()))
        return np.array([self._kronecker_metric[slot] for slot in self.slots])

    def _append_in_order(
        self, drop_oldest: bool, steps_dot_change: np.ndarray, changes_dot_change: np.ndarray, sy: float, yy: float
    ) -> None:
        """Add the newest pair (s, y) to the ordered R and YᵀY, after the pairs that stay (the oldest leaves first
        if ``drop_oldest``): its column of R is Sᵀy over those pairs (``steps_dot_change``, oldest first), its row
        and column of YᵀY are Yᵀy (``changes_dot_change``), and sᵀy, yᵀy its diagonal entries."""
        kept = len(steps_dot_change)
        if drop_oldest:  # the others move up by one
            self._ratios.pop(0)
            self._ordered_r[:kept, :kept] = self._ordered_r[1 : kept + 1, 1 : kept + 1]
            self._ordered_yy[:kept, :kept] = self._ordered_yy[1 : kept + 1, 1 : kept + 1]
        self._ordered_r[:kept, kept] = steps_dot_change
        self._ordered_r[kept, : kept + 1] = 0.0
        self._ordered_r[kept, kept] = sy
        self._ordered_yy[:kept, kept] = changes_dot_change
        self._ordered_yy[kept, :kept] = changes_dot_change
        self._ordered_yy[kept, kept] = yy
        self._ratios.append(float(sy) / float(yy))

    def _reorder(self) -> None:
        """Make the ordered R, YᵀY and slot indices from sy, yy and the slots (after loading them)."""
        self._order = np.array(self.slots, dtype=np.intp)
        held = len(self.slots)
        in_order = np.ix_(self._order, self._order)
        self._ordered_r[:held, :held] = np.triu(self.sy[in_order])
        self._ordered_yy[:held, :held] = self.yy[in_order]
        self._ratios = [float(self.sy[i, i]) / float(self.yy[i, i]) for i in self.slots]

    def state_dict(self) -> dict[str, Any]:
        """Everything the pairs need to go on: m, the slots (oldest first), SᵀY, YᵀY and the blocks of pairs (and,
        with diagonal scaling, ``"diagonal_scaling"``: the gradients' second moment v)."""
        state = {
            "memory": self.memory,
            "slots": list(self.slots),
            "sy": torch.from_numpy(self.sy.copy()),
            "yy": torch.from_numpy(self.yy.copy()),
            "blocks": [self._saved(block) for block in self.blocks],
        }
        if self.scaling is not None:
            state["diagonal_scaling"] = self.scaling.state_dict()
        if self.kronecker is not None:
            state["kronecker_factors"] = self.kronecker.state_dict()
        return state

    def _saved(self, block: torch.Tensor) -> torch.Tensor:
        """A copy of a block for :meth:`state_dict`, the rows no pair was written into zeroed (not their
        uninitialised numbers)."""
        copy = block.clone()
        if self._filled_in_order:
            copy[:, len(self.slots) :].zero_()
        return copy

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (blocks moved to these parameters' devices and dtypes).

        Raises ``ValueError`` if it does not belong to pairs of this memory m and these parameters' sizes.
        """
        square = (self.memory, self.memory)
        blocks: Any = state.get("blocks") if isinstance(state, dict) else None
        valid = (
            isinstance(state, dict)
            and state.get("memory") == self.memory
            and isinstance(state.get("slots"), list)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.memory for i in state["slots"])
            and len(set(state["slots"])) == len(state["slots"])
            and all(isinstance(state.get(k), torch.Tensor) and tuple(state[k].shape) == square for k in ("sy", "yy"))
            and isinstance(blocks, list)
            and len(blocks) == len(self.blocks)
            and all(isinstance(b, torch.Tensor) and b.shape == own.shape for b, own in zip(blocks, self.blocks))
        )
        if not valid:
            raise ValueError(
                f"the 'secant_pairs' entry of this SCG state_dict does not belong to an SCG with memory={self.memory} "
                f"over these parameters: build the optimizer with the memory and parameters it was saved with"
            )
        if ("diagonal_scaling" in state) != (self.scaling is not None):
            saved_with = "diagonal_scaling=True" if "diagonal_scaling" in state else "diagonal_scaling=False"
            raise ValueError(
                f"this SCG state_dict was saved by an SCG with {saved_with}: build the optimizer with the "
                f"diagonal_scaling it was saved with"
            )
        if ("kronecker_factors" in state) != (self.kronecker is not None):
            saved_with = "with" if "kronecker_factors" in state else "without"
            raise ValueError(
                f"this SCG state_dict was saved by an SCG {saved_with} kronecker_factors: build the optimizer as it "
                f"was saved (with fit: the same preconditioner)"
            )
        if self.scaling is not None:
            self.scaling.load_state_dict(state["diagonal_scaling"])
        if self.kronecker is not None:
            self.kronecker.load_state_dict(state["kronecker_factors"])
            self._kronecker_metric = {}
        self.slots = list(state["slots"])
        self._filled_in_order = self.slots == list(range(len(self.slots)))
        self.sy = state["sy"].to(torch.float64).numpy().copy()
        self.yy = state["yy"].to(torch.float64).numpy().copy()
        self._reorder()
        for own, saved in zip(self.blocks, blocks):
            own.copy_(saved)

    def _working(self, tensors: Sequence[torch.Tensor]) -> list[arithmetic.Vector]:
        """Flat tensors as the arithmetic takes them (:func:`~moller_scg.pair_arithmetic.working`): NumPy views of
        them when the blocks are worked on in NumPy, else themselves."""
        return arithmetic.working(tensors, self.on_host)

    def _flatten(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One flat real vector per block."""
        return [torch.cat([vec.as_real(tensors[i]).reshape(-1) for i in members]) for members in self._members]

    def _unflatten(self, flats: list[arithmetic.Vector]) -> list[torch.Tensor]:
        """The inverse of :meth:`_flatten` (of :meth:`_working` too): one tensor per parameter, of its shape (complex
        again if it was)."""
        result: list[torch.Tensor | None] = [None] * len(self._shapes)
        for members, flat in zip(self._members, map(arithmetic.as_tensor, flats)):
            sizes = [self._shapes[i].numel() * (2 if self._complex[i] else 1) for i in members]
            for i, piece in zip(members, torch.split(flat, sizes)):
                shape = (*self._shapes[i], 2) if self._complex[i] else self._shapes[i]
                piece = piece.view(shape)
                result[i] = vec.as_complex(piece) if self._complex[i] else piece
        return [t for t in result if t is not None]


@dataclasses.dataclass(frozen=True)
class PreparedAdvance:
    """:meth:`SecantPairs.prepare_advance`'s products, for :meth:`SecantPairs.advance_flat`.

    Attributes:
        gram: 3 × 4, the products of y, p, r₊ (rows) with y, p, r₊, r (columns).
        against: 3 × 2k, the products of y, p, r₊ with S's then Y's k rows in use.
        rows_in_use: k when they were formed (the pairs may not change before they are used).
    """

    gram: np.ndarray
    against: np.ndarray
    rows_in_use: int


def _appended(order: np.ndarray, slot: int) -> np.ndarray:
    """The slots ``order`` followed by ``slot``, as a new index array (``np.append``'s result, in a third of its
    time)."""
    appended = np.empty(len(order) + 1, dtype=np.intp)
    appended[:-1] = order
    appended[-1] = slot
    return appended


def _layout(params: Sequence[torch.Tensor]) -> list[tuple[torch.Size, torch.dtype, torch.device]]:
    return [(p.shape, p.dtype, p.device) for p in params]


def import_linear_algebra() -> None:
    """Import SciPy's LAPACK and BLAS wrappers, which the pairs' NumPy arithmetic uses (the triangular solve,
    gemv), now rather than at their first use: ``SCG(params, memory=m)`` calls this when it is built, so that the
    import (about 60–85 ms once per process on the 2-core machine, where nothing imported SciPy before) is not paid
    inside its first step, in a loop a user times. ``import moller_scg`` itself still does not import SciPy."""
    _triangular_solver()
    arithmetic.import_blas()


@functools.cache
def _triangular_solver() -> Any:
    """LAPACK's ``dtrtrs``, imported on first use (SciPy takes about 60–85 ms to import and only this and
    :func:`moller_scg.pair_arithmetic.add_product` use it; :func:`import_linear_algebra` makes SCG's construction that
    first use) and kept: an import statement run at every call cost 2–3 µs of a step's own work."""
    from scipy.linalg import lapack

    return lapack.dtrtrs


def _solve_upper(upper: np.ndarray, b: np.ndarray, transposed: bool = False) -> np.ndarray:
    """R⁻¹b (or R⁻ᵀb) for R upper triangular with a positive diagonal, by LAPACK's triangular solve (``trtrs``), at a
    fifth of ``np.linalg.solve``'s call overhead — which is what an m × m solve costs. R⁻¹b has the bits of
    ``np.linalg.solve(R, b)``, whose LU of such an R pivots nowhere; R⁻ᵀb may differ from
    ``np.linalg.solve(R.T, b)`` in the last place (its LU of the lower triangle Rᵀ may pivot)."""
    solution, info = _triangular_solver()(upper, b, lower=0, trans=1 if transposed else 0)
    if info != 0:
        raise np.linalg.LinAlgError(f"the triangular factor R of the secant pairs is singular (LAPACK info {info})")
    return solution
