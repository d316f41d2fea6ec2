"""Where the batches of a pass come from, and the checks that they cover every sample exactly once.

A pass over N samples streams batches b = 1, …, B of n_b samples, one at a time:

* an ``(inputs, targets)`` pair of tensors is sliced (:class:`TensorBatches`), never collated sample by sample,
  and copied once to the device when it fits a byte budget;
* a map-style ``Dataset`` is wrapped in a sequential ``DataLoader``, and a ``DataLoader`` is streamed as it is
  (:class:`LoaderBatches`), after :func:`validate_loader` has checked that one pass sees every sample exactly once
  (no dropped last batch, no sampling with replacement): otherwise the sum would not be the full-batch sum.

:func:`make_batches` validates the data at the boundary and chooses the source; :func:`subset_batches` streams a
subset of the samples, and :class:`CurvatureBatches` the batches of each Hessian-vector product (all the data, or
the next window of a subsampled curvature).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
)

from moller_scg import distributed as _dist
from moller_scg.input_checks import describe_value
from moller_scg.rng_state import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from moller_scg.subsampling import CurvatureCursor, CurvatureSubsets

logger = logging.getLogger(__name__)

Data = tuple[torch.Tensor, torch.Tensor] | Dataset | DataLoader
"""What :class:`~moller_scg.GradientAccumulator` streams: an ``(inputs, targets)`` pair (of tensors, or of NumPy
arrays converted to the model's dtype), a map-style Dataset, a DataLoader."""

DEFAULT_BATCH_SIZE = 256
"""Samples per batch for tensors and Datasets when ``batch_size`` is not given. Any batch size gives the same
E, E' and E''v; this one bounds memory for models like the blog's CNN while keeping per-batch overhead small."""
DEFAULT_DEVICE_CACHE_BYTES = 1 << 30
"""Tensor data up to this many bytes (1 GiB) is copied once to ``device`` and kept there."""


class TensorBatches:
    """Batches sliced from an ``(inputs, targets)`` pair, cached on ``device`` when they fit the byte budget."""

    def __init__(
        self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, device: torch.device, cache_bytes: int
    ) -> None:
        self.samples = inputs.shape[0]
        self.batch_size = max(min(batch_size, self.samples), 1)  # a rank's shard may be empty
        self.device = device
        on_device = inputs.device == device and targets.device == device
        total_bytes = _nbytes(inputs) + _nbytes(targets)
        if not on_device and total_bytes <= cache_bytes:
            logger.info("caching %d bytes of tensor data on %s", total_bytes, device)
            inputs, targets = inputs.to(device), targets.to(device)
            on_device = True
        self.inputs, self.targets = inputs, targets
        self.cached = on_device
        # Pinned host memory lets the copies to an accelerator run asynchronously (non_blocking=True).
        self._pin = not on_device and torch.cuda.is_available() and device.type == "cuda"

    def expected_batches(self) -> int:
        return -(-self.samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        inputs, targets, size = self.inputs, self.targets, self.batch_size
        if self.cached:
            for start in range(0, self.samples, size):
                yield inputs[start : start + size], targets[start : start + size]
        else:
            for start in range(0, self.samples, size):
                yield self._move(inputs[start : start + size]), self._move(targets[start : start + size])

    def head(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` samples, on the device."""
        return self._move(self.inputs[:count]), self._move(self.targets[:count])

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            return tensor
        if self._pin and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=tensor.is_pinned())

    def describe(self, index: int) -> str:
        start = index * self.batch_size
        return f"batch {index} (samples {start}–{min(start + self.batch_size, self.samples) - 1})"


class LoaderBatches:
    """Batches from a DataLoader that yields ``(inputs, targets)`` pairs over all N samples of its dataset."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader = loader
        self.samples = len(loader.dataset)  # type: ignore[arg-type]
        self.device = device
        self.cached = False

    def expected_batches(self) -> int | None:
        """len(loader), or ``None`` when its sampler has no length (then only the pass can tell)."""
        try:
            return len(self.loader)
        except TypeError:
            return None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index, batch in enumerate(self.loader):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(
                    f"the DataLoader must yield (inputs, targets) pairs, but batch {index} is {describe_value(batch)}"
                )
            inputs, targets = batch
            for name, tensor in (("inputs", inputs), ("targets", targets)):
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"batch {index}: {name} must be a tensor, got {type(tensor).__name__}")
            yield self._move(inputs), self._move(targets)

    def head(self, count: int) -> None:
        return None  # the first batch of the pass serves instead (iterating the loader has side effects)

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            return tensor
        return tensor.to(self.device, non_blocking=tensor.is_pinned())

    def describe(self, index: int) -> str:
        return f"batch {index}"


Batches = TensorBatches | LoaderBatches


def make_batches(
    data: Any, batch_size: int | None, device: torch.device, cache_bytes: int, shard: tuple[int, int] | None = None
) -> tuple[Batches, int]:
    """Validate the data at the boundary and choose how to stream it: (the batches, N).

    With ``shard`` = (rank, world size) the batches cover only that rank's contiguous shard of the N samples.
    """
    if isinstance(data, DataLoader):
        validate_loader(data, batch_size)
        batches = LoaderBatches(data, device)
        return batches, batches.samples
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = data.tensors
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise TypeError(
                f"data as a tuple must be an (inputs, targets) pair of tensors, got "
                f"({', '.join(describe_value(t) for t in data)})"
            )
        inputs, targets = data
        if inputs.dim() == 0 or targets.dim() == 0:
            raise ValueError("inputs and targets need a sample axis first; got a 0-dim tensor")
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs and targets have different numbers of samples: {inputs.shape[0]} inputs "
                f"(shape {tuple(inputs.shape)}) and {targets.shape[0]} targets (shape {tuple(targets.shape)})"
            )
        if inputs.shape[0] == 0:
            raise ValueError("the dataset is empty: inputs and targets have 0 samples")
        samples = inputs.shape[0]
        if shard is not None:
            indices = _dist.shard_range(samples, *shard)
            inputs, targets = inputs[indices.start : indices.stop], targets[indices.start : indices.stop]
        return TensorBatches(inputs, targets, validate_batch_size(batch_size), device, cache_bytes), samples
    if isinstance(data, IterableDataset):
        raise TypeError(
            "an IterableDataset has no known length N, so its full-batch mean cannot be checked; "
            "pass a map-style Dataset, an (inputs, targets) pair of tensors or a DataLoader over one"
        )
    if isinstance(data, Dataset):
        try:
            length = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"the Dataset {type(data).__name__} has no len(); a map-style Dataset needs one") from None
        if length == 0:
            raise ValueError(f"the dataset is empty: len({type(data).__name__}) is 0")
        loader = DataLoader(
            data if shard is None else Subset(data, _dist.shard_range(length, *shard)),
            batch_size=validate_batch_size(batch_size),
            shuffle=False,
            drop_last=False,
            pin_memory=torch.cuda.is_available() and device.type == "cuda",
        )
        return LoaderBatches(loader, device), length
    raise TypeError(
        f"data must be an (inputs, targets) pair of tensors, a map-style Dataset or a DataLoader, "
        f"got {describe_value(data)}"
    )


def subset_batches(batches: Batches, indices: torch.Tensor, cache_bytes: int) -> Batches:
    """Batches over the samples ``indices`` of ``batches`` (a copy of those samples for tensor data)."""
    if isinstance(batches, TensorBatches):
        inputs = batches.inputs.index_select(0, indices.to(batches.inputs.device))
        targets = batches.targets.index_select(0, indices.to(batches.targets.device))
        return TensorBatches(inputs, targets, batches.batch_size, batches.device, cache_bytes)
    loader = batches.loader
    subset_loader = DataLoader(
        Subset(loader.dataset, indices.tolist()),
        batch_size=loader.batch_size,
        shuffle=False,
        drop_last=False,
        pin_memory=loader.pin_memory,
    )
    return LoaderBatches(subset_loader, batches.device)


class CurvatureBatches:
    """The batches of each Hessian-vector product: all the data, or the next window of a subsampled curvature.

    Args:
        batches: all the data (this process's shard).
        subsets: the windows to take (f < 1), or ``None`` for the exact product over all the data.
        cursor: c, the next window; each :meth:`next` of a rotating subset moves it on (a fixed subset moves it
            once, when its samples are first copied).
        cache_bytes: the byte budget of :class:`TensorBatches` for a window's copy of the samples.
    """

    def __init__(
        self, batches: Batches, subsets: CurvatureSubsets | None, cursor: CurvatureCursor, cache_bytes: int
    ) -> None:
        self.all = batches
        self.subsets = subsets
        self.cursor = cursor
        self._cache_bytes = cache_bytes
        self._fixed: Batches | None = None

    def next(self) -> Batches:
        """The batches of the next Hessian-vector product."""
        subsets = self.subsets
        if subsets is None:
            return self.all
        if subsets.mode == "fixed" and self._fixed is not None:
            return self._fixed
        batches = subset_batches(self.all, subsets.indices(self.cursor.take()), self._cache_bytes)
        if subsets.mode == "fixed":
            self._fixed = batches
        return batches


def validate_batch_size(batch_size: int | None) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"Invalid batch_size {batch_size!r}; it must be an int ≥ 1")
    return int(batch_size)


def validate_loader(loader: DataLoader, batch_size: int | None) -> None:
    """A DataLoader must yield every sample of its dataset exactly once per pass, in batches."""
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            "a DataLoader over an IterableDataset has no known length N, so its full-batch mean cannot be "
            "checked; use a map-style Dataset"
        )
    samples = len(dataset)  # type: ignore[arg-type]
    if samples == 0:
        raise ValueError("the dataset is empty: the DataLoader's dataset has 0 samples")
    if loader.batch_size is None and loader.batch_sampler is None:
        raise ValueError("DataLoader(batch_size=None) yields unbatched samples; give it a batch_size")
    if batch_size is not None and batch_size != loader.batch_size:
        raise ValueError(
            f"batch_size={batch_size!r} was given, but the DataLoader has its own batch_size={loader.batch_size!r}; "
            f"leave batch_size out with a DataLoader"
        )
    if loader.drop_last and loader.batch_size and samples % loader.batch_size:
        raise ValueError(
            f"the DataLoader drops its last batch (drop_last=True): {samples % loader.batch_size} of {samples} "
            f"samples would never be seen and the gradient would not be the full-batch gradient; "
            f"use drop_last=False"
        )
    if loader.batch_sampler is not None and not isinstance(loader.batch_sampler, BatchSampler):
        _check_indices_of_a_pass(loader.batch_sampler, samples)  # loader.sampler is then an unused default
        return
    sampler = loader.batch_sampler.sampler if isinstance(loader.batch_sampler, BatchSampler) else loader.sampler
    if isinstance(sampler, WeightedRandomSampler) or (isinstance(sampler, RandomSampler) and sampler.replacement):
        raise ValueError(
            f"the DataLoader's sampler ({type(sampler).__name__}) draws samples with replacement, so a pass is not "
            f"the full-batch sum over the dataset; use shuffle=False or shuffle=True without replacement"
        )
    if isinstance(sampler, (SequentialSampler, RandomSampler)) and len(sampler) == samples:
        return
    try:
        sampled = len(sampler)  # type: ignore[arg-type]
    except TypeError:
        return  # no length: the samples of each pass are counted instead
    if sampled != samples:
        raise ValueError(
            f"the DataLoader's sampler ({type(sampler).__name__}) yields {sampled} samples, but the dataset holds "
            f"{samples}: the gradient would not be the full-batch gradient; sample every index exactly once"
        )


def _check_indices_of_a_pass(batch_sampler: Iterable[Sequence[int]], samples: int) -> None:
    """A batch_sampler of the user's own must yield every index of the dataset once per pass: checked on one pass
    over its indices (numbers, not samples), with the random generators put back as they were, so that the passes
    that train draw what they would have drawn without it. Not checked, and left to each pass's count of samples
    (which misses an index repeated in place of another): a one-shot iterator, which this pass would use up, and
    indices that are not integers (the keys of a dataset of its own)."""
    generators = capture_rng_state()
    try:
        if iter(batch_sampler) is batch_sampler:  # (iter() runs the sampler's __iter__, which may draw already)
            return
        pass_of_indices = [index for batch in batch_sampler for index in batch]
    finally:
        restore_rng_state(generators)
    if not all(isinstance(index, numbers.Integral) for index in pass_of_indices):
        return
    indices = torch.tensor([int(index) for index in pass_of_indices], dtype=torch.int64)
    outside = indices[(indices < 0) | (indices >= samples)]
    if outside.numel():
        raise ValueError(
            f"the DataLoader's batch_sampler ({type(batch_sampler).__name__}) yields index {int(outside[0])}, "
            f"outside the dataset's {samples} samples"
        )
    counts = torch.bincount(indices, minlength=samples)
    repeated, missing = int((counts > 1).sum()), int((counts == 0).sum())
    if repeated or missing:
        raise ValueError(
            f"the DataLoader's batch_sampler ({type(batch_sampler).__name__}) yields {repeated} indices more than "
            f"once and misses {missing} of the dataset's {samples} in a pass: the gradient would not be the "
            f"full-batch gradient; yield every index exactly once"
        )


def batch_samples(inputs: torch.Tensor, targets: torch.Tensor, batches: Batches, index: int) -> int:
    """n_b, the samples in the batch (its first axis), after checking inputs and targets agree."""
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{batches.describe(index)} has inputs of shape {tuple(inputs.shape)} and targets of shape "
            f"{tuple(targets.shape)}; both need the same number of samples along their first axis"
        )
    return targets.shape[0]


def progress_bar(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int | None, kind: str
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The batches behind a tqdm bar (imported only when a bar is asked for)."""
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc=f"{kind} pass", unit="batch", leave=False)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
