"""The diagonal Λ of ``SCG(params, memory=m, diagonal_scaling=True)``'s initial inverse H₀ = γ_D Λ.

L-BFGS's H₀ = γI scales every weight alike. Here H₀ takes its shape from the accepted gradients g = E'(w) SCG
evaluates anyway, as Adam's second moment does, at no extra evaluation:

    v ← β v + (1 − β) g²,        Λ = diag(1 / (v^κ + ε · mean(v^κ))),

with β = :data:`BETA`, κ = :data:`POWER` and ε = :data:`EPSILON`, every product elementwise. The secant pairs then
set its scale, γ_D = maxᵢ sᵢᵀyᵢ / yᵢᵀΛyᵢ (the pairs' boldest curvature estimate in Λ's metric; with Λ = I it is
γ = maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ of ``SCG(params, memory=m)``), in :class:`moller_scg.quasi_newton.SecantPairs`. Since γ_D
absorbs any constant factor of Λ, v needs no bias correction.

κ = ¼ is a fourth root where Adam takes a square root: on the problems of ``benchmarks/levers.py`` Adam's
√v (κ = ½) took fewer gradient passes on the regression and the physics-informed net but more on the MNIST CNN,
whose 99.9 % target it reached later than LBFGS; κ = ¼ took as many or fewer there (fewer on one of three seeds)
(docs/performance.md, lever 14). What it costs: the CNN it trains on the embedded MNIST digits tests lower on the
cross-entropy alone, so ``fit`` gives it only to models and losses K-FAC's factors do not take
(``preconditioner="auto"``, :mod:`moller_scg.default_optimizer`).

References:
    Kingma, D. P., Ba, J. (2015). Adam: a method for stochastic optimization. ICLR (the second moment v).
    Nocedal, J., Wright, S. J. (2006). Numerical Optimization, 2nd ed., §7.2 (the choice of H₀ in L-BFGS).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moller_scg import pair_arithmetic as arithmetic

_SMALLEST_NORMAL = {np.dtype(np.float32): np.finfo(np.float32).tiny, np.dtype(np.float64): np.finfo(np.float64).tiny}
"""The smallest normal number of each dtype a NumPy Λ may have (``np.finfo`` takes a microsecond to ask)."""

BETA = 0.99
"""β: the weight of the past in v ← βv + (1 − β)g² (0.99 and 0.999 took the same passes in the lever's tables)."""

POWER = 0.25
"""κ: Λ = diag(1 / (v^κ + ε · mean v^κ))."""

EPSILON = 1e-8
"""ε, relative to mean(v^κ): keeps Λ finite where a weight's gradients were all zero."""


class DiagonalScaling:
    """v and Λ's diagonal, one flat tensor each per block of parameters sharing a device and dtype (the blocks of
    :class:`~moller_scg.quasi_newton.SecantPairs`).

    Args:
        sizes: the number of real scalars in each block; ``dtypes``, ``devices``: each block's.
        on_host: whether the blocks are worked on in NumPy (:func:`moller_scg.pair_arithmetic.on_host`); then
            :meth:`start` and :meth:`observe` take the gradients as NumPy arrays.

    Attributes:
        second_moment: v, per block (uninitialised until :meth:`start`), in the block's dtype, or in float32 for a
            float16 or bfloat16 block: v holds squares of gradients, beyond float16's 65504 once |g| passes 256.
        diagonal: Λ's diagonal, per block, formed from v by every :meth:`start` and :meth:`observe`.
        working_diagonal: ``diagonal`` as the pairs' arithmetic takes it (NumPy views of it when ``on_host``).
    """

    def __init__(
        self, sizes: list[int], dtypes: list[torch.dtype], devices: list[torch.device], on_host: bool = False
    ) -> None:
        self.second_moment = [
            torch.empty(n, dtype=_second_moment_dtype(d), device=dev) for n, d, dev in zip(sizes, dtypes, devices)
        ]
        self.diagonal = [torch.empty(n, dtype=d, device=dev) for n, d, dev in zip(sizes, dtypes, devices)]
        self._on_host = on_host
        self._make_views()

    def _make_views(self) -> None:
        """v and Λ as the pairs' arithmetic takes them (NumPy views sharing their memory when on the host)."""
        self._moments = arithmetic.working(self.second_moment, self._on_host)
        self.working_diagonal = arithmetic.working(self.diagonal, self._on_host)

    def __getstate__(self) -> dict[str, Any]:
        """What a pickle or a deep copy keeps: v and Λ, not their NumPy views (made anew by :meth:`__setstate__`)."""
        return {"second_moment": self.second_moment, "diagonal": self.diagonal, "on_host": self._on_host}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.second_moment, self.diagonal = state["second_moment"], state["diagonal"]
        self._on_host = state.get("on_host", False)  # a pickle of a version before the NumPy path: torch throughout
        self._make_views()

    def start(self, gradients: list[arithmetic.Vector]) -> None:
        """v = (1 − β) g² from the first gradient (flat, one per block; −g serves as well), and Λ from it."""
        for v, g in zip(self._moments, gradients):
            if not isinstance(g, np.ndarray) and g.element_size() < 4:
                torch.square(g.float(), out=v).mul_(1.0 - BETA)  # g² overflows float16 above |g| = 256
                continue
            arithmetic.multiply(g, g, out=v)
            arithmetic.multiply(v, 1.0 - BETA, out=v)
        self._form_diagonal()

    def observe(self, gradients: list[arithmetic.Vector]) -> None:
        """v ← βv + (1 − β)g² with the gradient of an accepted step (flat, one per block), and Λ from it."""
        for v, g, d in zip(self._moments, gradients, self.working_diagonal):
            if isinstance(v, np.ndarray):  # (1 − β)g² in Λ's storage, which is formed anew from v below
                np.multiply(g, g, out=d)
                d *= 1.0 - BETA
                v *= BETA
                v += d
            else:
                v.mul_(BETA).addcmul_(g, g, value=1.0 - BETA)
        self._form_diagonal()

    def _form_diagonal(self) -> None:
        """Λ = diag(1 / (v^κ + ε · mean v^κ)), the denominator kept at least the dtype's smallest normal number, so that
        Λ stays finite (and ∝ I, which γ_D scales alike, while v is zero everywhere)."""
        for v, d in zip(self._moments, self.working_diagonal):
            power_into(v, d)
        if len(self.diagonal) == 1:  # the mean without a host synchronisation
            (d,) = self.working_diagonal
            _offset_floored_reciprocal(d, _mean(d), EPSILON)
            return
        total = sum(float(d.sum(dtype=torch.float64)) for d in self.diagonal)
        floor = EPSILON * total / sum(d.numel() for d in self.diagonal)
        for d in self.working_diagonal:
            _offset_floored_reciprocal(d, floor)

    def state_dict(self) -> dict[str, Any]:
        """v (copies): Λ follows from it."""
        return {"second_moment": [v.clone() for v in self.second_moment]}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`'s v and form Λ; ``ValueError`` if its blocks do not match these."""
        saved = state.get("second_moment") if isinstance(state, dict) else None
        if not (
            isinstance(saved, list)
            and len(saved) == len(self.second_moment)
            and all(isinstance(s, torch.Tensor) and s.shape == v.shape for s, v in zip(saved, self.second_moment))
        ):
            raise ValueError(
                "the 'diagonal_scaling' entry of this SCG state_dict does not match these parameters: build the "
                "optimizer with the parameters it was saved with"
            )
        for v, s in zip(self.second_moment, saved):
            v.copy_(s)
        self._form_diagonal()


def _second_moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """v's dtype for a block of this dtype: float32 for float16 and bfloat16, else the block's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def power_into(v: arithmetic.Vector, out: arithmetic.Vector) -> None:
    """v^κ into ``out`` (κ = :data:`POWER`): for κ = ¼ as two square roots, √√v, which is within an ulp of the power
    and 4–6× faster than it (a power with a fractional exponent is a ``pow`` call per number: 15.2 µs against 3.6 at
    n = 650 in NumPy, 2.8 ms against 0.44 at 437,664 float32 weights in torch, ``python benchmarks/fourth_root.py``;
    docs/performance.md, lever 51). Any other κ (``benchmarks/diagonal_accuracy.py`` sets others) takes the power."""
    if isinstance(v, np.ndarray):
        if POWER == 0.25:
            np.sqrt(v, out=out)
            np.sqrt(out, out=out)
        else:
            np.power(v, POWER, out=out)
    elif POWER == 0.25:
        torch.sqrt(v, out=out).sqrt_()
    else:
        torch.pow(v, POWER, out=out)


def _mean(d: arithmetic.Vector) -> Any:
    """d's mean: for a NumPy array its sum over its size, the bits of ``d.mean()`` without the Python layers of
    ``np.mean`` (7 µs of a step's own work on the race's small problems); a 0-dim tensor for a tensor. The quotient
    is rounded to d's dtype, as ``np.mean`` rounds it (NumPy 1's rules would leave a float32 sum over an int in
    float64)."""
    if isinstance(d, np.ndarray):
        return d.dtype.type(np.add.reduce(d) / d.size)
    return d.mean()


def _offset_floored_reciprocal(d: arithmetic.Vector, offset: Any, scale: float = 1.0) -> None:
    """d ← 1 / max(d + scale · offset, the dtype's smallest normal number), in place (``offset`` a number, or d's
    mean as its array type gives it: a 0-dim tensor on d's device keeps the mean from a host synchronisation)."""
    if isinstance(d, np.ndarray):
        d += scale * offset
        np.maximum(d, _SMALLEST_NORMAL[d.dtype], out=d)
        np.reciprocal(d, out=d)
    else:
        d.add_(offset, alpha=scale).clamp_(min=torch.finfo(d.dtype).tiny).reciprocal_()
