"""Which samples a subsampled curvature s ≈ E''(w) v is taken over (Byrd, Chin, Neveitt & Nocedal 2011).

SCG needs the Hessian only through δ = pᵀE''(w)p, the curvature along its search direction. Byrd et al. show that
second-order information tolerates sampling far better than the gradient does: a Hessian-vector product over a
fraction f of the data, with the loss and the gradient still exact, keeps the step's quality and costs f of a full
HVP pass. :class:`CurvatureSubsets` only chooses the samples; :class:`moller_scg.GradientAccumulator` streams them.

Of the n samples, a fixed seeded permutation π is drawn once, and every curvature evaluation uses m = ⌈f·n⌉ of
them:

* ``"rotating"`` (default): call c takes the window π[c·m mod n, …] of m consecutive entries (wrapping around), so
  consecutive curvatures see different samples and every sample enters once every ⌈n/m⌉ calls;
* ``"fixed"``: always the first window π[0:m], so the curvature is that of one fixed subset.

:class:`CurvatureCursor` remembers c, the number of the next window; its ``state_dict`` is what a checkpoint saves,
so a resumed run takes the same subsets.

References:
    Byrd, R. H., Chin, G. M., Neveitt, W. & Nocedal, J. (2011). On the use of stochastic Hessian information in
    optimization methods for machine learning. SIAM Journal on Optimization 21(3), 977–995.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from moller_scg.distributed import shard_range

SUBSET_MODES = ("rotating", "fixed")


def validate_fraction(fraction: object) -> float:
    """f as a float in (0, 1], or ``ValueError`` naming the bad value.

    A NumPy float narrower than float64 is taken as the shortest decimal that is that float: ``np.float32(0.1)``
    gives 0.1, not the 0.10000000149011612 that ``float()`` makes of it (:func:`subset_size` takes ⌈f·n⌉ of the
    decimal, and ⌈0.10000000149011612 · 100⌉ is 11).
    """
    value = math.nan
    if isinstance(fraction, np.floating) and fraction.dtype.itemsize < 8:
        value = float(np.format_float_positional(fraction, unique=True))
    elif isinstance(fraction, numbers.Real) and not isinstance(fraction, bool):
        value = float(fraction)
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"Invalid curvature_fraction {fraction!r}; it must be a number in (0, 1]: the share of the samples each "
            f"Hessian-vector product is taken over (1 = the whole dataset, exact)"
        )
    return value


def validate_subset(mode: object, seed: object) -> None:
    """``ValueError`` for a mode other than :data:`SUBSET_MODES`, ``TypeError`` for a seed that is not an int."""
    if mode not in SUBSET_MODES:
        raise ValueError(f"Invalid curvature_subset {mode!r}; choose one of {', '.join(map(repr, SUBSET_MODES))}")
    # Tested apart from the if: typeshed does not make int a numbers.Integral, so inside it a type checker would
    # narrow the seed to nothing and take what follows for unreachable.
    seed_is_int = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    if not seed_is_int:
        raise TypeError(f"curvature_seed must be an int, got {seed!r}")


def subset_size(samples: int, fraction: float) -> int:
    """m = ⌈f·n⌉ samples (0 only when n = 0, for an empty shard), with f the decimal the user wrote: the float
    product 0.07 · 100 is 7.000000000000001, whose ceiling would be 8."""
    return min(samples, math.ceil(Fraction(repr(float(fraction))) * samples))


class CurvatureSubsets:
    """The sample indices of each subsampled curvature evaluation over n samples.

    Args:
        samples: n, the number of samples to choose from (this process's shard when distributed).
        fraction: f ∈ (0, 1], the share of the n samples per evaluation.
        mode: ``"rotating"`` or ``"fixed"`` (module docstring).
        seed: seeds the permutation π, so the subsets are the same in every run and on every machine.

    Attributes:
        size: m = ⌈f·n⌉, the samples per evaluation.
    """

    def __init__(self, samples: int, fraction: float, mode: str = "rotating", seed: int = 0) -> None:
        validate_subset(mode, seed)
        self.samples = samples
        self.fraction = validate_fraction(fraction)
        self.mode = mode
        self.size = subset_size(samples, self.fraction)
        generator = torch.Generator().manual_seed(int(seed))
        self._permutation = torch.randperm(samples, generator=generator)

    def indices(self, call: int) -> torch.Tensor:
        """The m sorted sample indices of curvature evaluation number ``call`` (0, 1, 2, …), as a CPU int64 tensor."""
        if self.size == 0:
            return self._permutation[:0]
        start = 0 if self.mode == "fixed" else (call * self.size) % self.samples
        window = self._permutation[start : start + self.size]
        if window.numel() < self.size:  # the window wraps around the end of π
            window = torch.cat([window, self._permutation[: self.size - window.numel()]])
        return torch.sort(window).values

    def __repr__(self) -> str:
        return f"{type(self).__name__}(samples={self.samples}, fraction={self.fraction}, mode={self.mode!r})"


def curvature_subsets(data: Any, shard_samples: int, fraction: float, mode: str, seed: int) -> CurvatureSubsets | None:
    """The subsets of a curvature pass for a fraction f < 1 of the samples, or ``None`` for f = 1 (all of them).

    ``data`` is what the accumulator was given: a ``DataLoader`` is refused for f < 1 (it fixes its own sampler);
    ``shard_samples``: the samples this process streams.
    """
    if fraction >= 1.0:
        return None
    if isinstance(data, DataLoader):
        raise TypeError(
            "curvature_fraction < 1 chooses its own samples, but a DataLoader fixes its sampler: pass its "
            "dataset and batch_size instead (GradientAccumulator(model, loss_fn, loader.dataset, "
            "batch_size=loader.batch_size, curvature_fraction=...))"
        )
    return CurvatureSubsets(shard_samples, fraction, mode, seed)


def curvature_samples(samples: int, fraction: float, shard: tuple[int, int] | None) -> int:
    """m, the samples of one subsampled curvature pass over all ranks: Σ_r ⌈f·n_r⌉ over the shards n_r."""
    if shard is None:
        return subset_size(samples, fraction)
    world_size = shard[1]
    return sum(subset_size(len(shard_range(samples, rank, world_size)), fraction) for rank in range(world_size))


class CurvatureCursor:
    """c, the number of the next curvature window: the rotating windows go on from where the cursor points.

    Args:
        window: c, an int ≥ 0 (0: start with the first window).
    """

    def __init__(self, window: int = 0) -> None:
        self.window = _checked_window(window)

    def take(self) -> int:
        """The window c for this curvature evaluation; the cursor moves on to c + 1."""
        window = self.window
        self.window += 1
        return window

    def state_dict(self) -> dict[str, int]:
        """``{"window": c}``."""
        return {"window": self.window}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Point at the window :meth:`state_dict` saved; ``ValueError`` for anything but ``{"window": c}``, c ≥ 0."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"window"}:
            raise ValueError(f"not a CurvatureCursor state_dict (expected the key 'window'): {state_dict!r:.120}")
        self.window = _checked_window(state_dict["window"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window})"


def upgraded_cursor_state(saved: Any) -> Any:
    """A saved :class:`CurvatureCursor` state in today's form ``{"window": c}``: checkpoints and state_dicts written
    before the cursor had a ``state_dict`` held the bare int c. Anything else is returned as it is, for
    :meth:`CurvatureCursor.load_state_dict` to accept or refuse."""
    if isinstance(saved, int) and not isinstance(saved, bool):
        return {"window": saved}
    return saved


def _checked_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or int(window) < 0:
        raise ValueError(f"Invalid curvature window {window!r}; it must be an int ≥ 0")
    return int(window)
