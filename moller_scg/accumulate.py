"""Exact full-batch loss, gradient and Hessian-vector products, streamed over minibatches.

A dataset of N samples is cut into batches b = 1, …, B of n_b samples. For a loss that is a sum or a mean of
per-sample terms the full-batch objective is a weighted sum of the batch losses E_b,

    E(w) = Σ_b w_b E_b(w),   E'(w) = Σ_b w_b E_b'(w),   s = E''(w) v = Σ_b w_b E_b''(w) v,

with w_b = 1 for ``reduction="sum"`` and w_b = n_b / N for ``reduction="mean"`` — not 1/B: averaging the
batch means is wrong as soon as the last batch is smaller. ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` with
class indices divide by the total weight of the targets instead of their count (class weights, targets equal
to ``ignore_index``), so for them E = Σ_b S_b / Σ_b D_b, with S_b the batch's summed loss and D_b the sum of its
targets' class weights (its number of non-ignored targets without weights).

Each pass streams the batches, adds S_b (or n_b E_b) and the gradients or products into float64 sums (for
float32 parameters, blocks of ``PARTIAL_SUM_BATCHES`` batches are summed in float32 first), and only at the end
divides by the denominator and casts once to the parameters' dtype, so the result does not drift with the
number of batches. Only one batch is alive at a time: memory is bounded by one batch plus the
float64 sums. :class:`GradientAccumulator` knows nothing of the optimizer; it is a closure with an ``hvp``
method, which :class:`moller_scg.SCG` uses for its exact curvature.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. Neural Computation 6(1), 147–160.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
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
from moller_scg._vectors import TensorList, as_real
from moller_scg.curvature import functional_hvp_and_loss, graph_hvp
from moller_scg.input_checks import as_tensor_pair, check_input_dtype, model_dtype
from moller_scg.loss_checks import ADDITIVITY_CHECK_SAMPLES, check_additivity, check_same_shape, is_elementwise_loss
from moller_scg.running_stats import restored_on_failure
from moller_scg.subsampling import CurvatureSubsets, subset_size, validate_fraction, validate_subset

logger = logging.getLogger(__name__)

Data = tuple[torch.Tensor, torch.Tensor] | Dataset | DataLoader
"""What :class:`GradientAccumulator` streams: an ``(inputs, targets)`` pair (of tensors, or of NumPy arrays converted
to the model's dtype), a map-style Dataset, a DataLoader."""

REDUCTIONS = ("mean", "sum", "batchmean")
"""Reductions the accumulator can weight exactly ("batchmean", as in ``nn.KLDivLoss``, is a mean over samples)."""
HVP_METHODS = ("double-backward", "forward-over-reverse")
"""How :meth:`GradientAccumulator.hvp` differentiates each batch (see the class docstring)."""
NON_FINITE_POLICIES = ("raise", "return")
"""What a pass does when a batch loss is not finite: raise ``FloatingPointError``, or return the non-finite sums."""

DEFAULT_BATCH_SIZE = 256
"""Samples per batch for tensors and Datasets when ``batch_size`` is not given. Any batch size gives the same
E, E' and E''v; this one bounds memory for models like the blog's CNN while keeping per-batch overhead small."""
DEFAULT_DEVICE_CACHE_BYTES = 1 << 30
"""Tensor data up to this many bytes (1 GiB) is copied once to ``device`` and kept there."""
PARTIAL_SUM_BATCHES = 8
"""Batches summed in a float32 (or narrower) parameter's own dtype before the sum is added into float64.

1 adds every batch straight into float64. 8 removes most of the per-batch cost of float64 accumulation (about
0.5 ms per batch for the 0.46 M parameters of the MNIST CNN on one CPU thread) and adds at most 16 roundings of
the parameter's dtype, however many batches there are. Float64 parameters are always added directly."""
REDUCTION_CHECK_SAMPLES = ADDITIVITY_CHECK_SAMPLES
"""Samples on which the loss's additivity is checked once (:func:`moller_scg.loss_checks.check_additivity`)."""


class StochasticObjectiveWarning(UserWarning):
    """The model is in training mode with dropout or batch norm, so there is no fixed full-batch objective."""


@dataclasses.dataclass
class PassCounts:
    """Passes over the data made so far, by kind.

    Attributes:
        gradient: calls of the accumulator itself (loss and gradient).
        hvp: calls of :meth:`GradientAccumulator.hvp`.
        loss: calls of :meth:`GradientAccumulator.loss`.
    """

    gradient: int = 0
    hvp: int = 0
    loss: int = 0


@dataclasses.dataclass
class _PassSums:
    """What one pass adds up, before the reduce step; with a process group the reduce step all-reduces it.

    Attributes:
        loss: Σ_b w̃_b E_b, a 0-dim float64 tensor (w̃_b = n_b for a mean, 1 otherwise).
        vectors: Σ_b w̃_b E_b' or Σ_b w̃_b E_b'' v per parameter, in float64 (complex128 for complex
            parameters), or ``None`` for a loss-only pass.
        denominator: Σ_b D_b (0-dim float64 tensor) for a class-weighted ratio, ``None`` otherwise.
        samples: Σ_b n_b, the number of samples seen.
        terms: this process's batch losses E_b (never reduced), to name a non-finite batch.
        metrics: for :meth:`GradientAccumulator.evaluate`, Σ_b scale_b M_b per metric M (float64, one entry per
            metric), ``None`` otherwise.
        metric_denominators: Σ_b D_b per metric, for metrics of the class-weighted ratio kind (0 for the others).
    """

    loss: torch.Tensor
    vectors: list[torch.Tensor] | None
    denominator: torch.Tensor | None
    samples: int
    terms: torch.Tensor
    metrics: torch.Tensor | None = None
    metric_denominators: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------------------------
# How one batch's loss enters the sums


class _Objective:
    """The loss as E = Σ_b scale_b · term_b / denominator; one of three kinds.

    * ``"sum"``: term_b = loss_fn(outputs, targets), scale_b = 1, denominator 1.
    * ``"mean"``: term_b = loss_fn(outputs, targets), scale_b = n_b, denominator N.
    * ``"ratio"`` (``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with ``reduction="mean"``): term_b is the batch's
      summed loss S_b, scale_b = 1, denominator Σ_b D_b (the targets' class weights, ignored targets excluded).
    """

    def __init__(self, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], reduction: str) -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.elementwise = is_elementwise_loss(loss_fn)
        if reduction == "sum":
            self.kind = "sum"
        elif _is_class_index_loss(loss_fn):
            self.kind = "ratio"
        else:
            self.kind = "mean"

    def term(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind != "ratio":
            if self.elementwise and outputs.shape != targets.shape:
                check_same_shape(self.loss_fn, outputs, targets)
            term = self.loss_fn(outputs, targets)
            if not isinstance(term, torch.Tensor) or term.numel() != 1:
                shape = tuple(term.shape) if isinstance(term, torch.Tensor) else type(term).__name__
                raise ValueError(
                    f"loss_fn must return a scalar tensor per batch, got {shape} (does it reduce with 'none'?)"
                )
            return term
        loss_fn = cast("nn.CrossEntropyLoss | nn.NLLLoss", self.loss_fn)  # the ratio kind's losses
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            return nn.functional.cross_entropy(
                outputs,
                targets,
                weight=loss_fn.weight,
                ignore_index=loss_fn.ignore_index,
                reduction="sum",
                label_smoothing=loss_fn.label_smoothing,
            )
        return nn.functional.nll_loss(
            outputs, targets, weight=loss_fn.weight, ignore_index=loss_fn.ignore_index, reduction="sum"
        )

    def scale(self, samples: int) -> int:
        return samples if self.kind == "mean" else 1

    def denominator(self, targets: torch.Tensor) -> torch.Tensor | int:
        """D_b: what ``reduction="mean"`` divides the batch's summed loss by (ratio kind only)."""
        if targets.is_floating_point():
            # Class probabilities: the mean divides by the number of (sample, position) pairs, not by weights.
            return targets.numel() // targets.shape[1] if targets.dim() > 1 else 1
        loss_fn = cast("nn.CrossEntropyLoss | nn.NLLLoss", self.loss_fn)  # the ratio kind's losses
        kept = targets != loss_fn.ignore_index
        weight = loss_fn.weight
        if weight is None:
            return kept.sum()
        return (weight[torch.where(kept, targets, 0)] * kept).sum(dtype=torch.float64)


def _is_class_index_loss(loss_fn: Any) -> bool:
    """Whether the mean is normalised by class weights: CrossEntropyLoss/NLLLoss with their own ``forward``."""
    return any(
        isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward for cls in (nn.CrossEntropyLoss, nn.NLLLoss)
    )


def _resolve_reduction(loss_fn: Any, reduction: str | None) -> str:
    """The loss's reduction: its ``reduction`` attribute, or the explicit argument; never a guess."""
    declared = getattr(loss_fn, "reduction", None)
    if declared is not None and not isinstance(declared, str):
        declared = None
    if declared is not None and reduction is not None and declared != reduction:
        raise ValueError(
            f"reduction={reduction!r} contradicts loss_fn.reduction={declared!r}; "
            f"drop the reduction argument or make them agree"
        )
    chosen = declared if declared is not None else reduction
    if chosen is None:
        raise ValueError(
            f"cannot tell how loss_fn {_describe(loss_fn)} reduces over samples (it has no 'reduction' "
            f"attribute): pass reduction='mean' or reduction='sum' to GradientAccumulator"
        )
    if chosen == "none":
        raise ValueError(
            "reduction='none' gives per-sample losses, but the accumulator needs a scalar loss per batch: "
            "use reduction='mean' or reduction='sum'"
        )
    if chosen not in REDUCTIONS:
        raise ValueError(f"Invalid reduction {chosen!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")
    return chosen


# ------------------------------------------------------------------------------------------------------------------
# Where the batches come from


class _TensorBatches:
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


class _LoaderBatches:
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
                    f"the DataLoader must yield (inputs, targets) pairs, but batch {index} is {_describe(batch)}"
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


_Batches = _TensorBatches | _LoaderBatches


# ------------------------------------------------------------------------------------------------------------------
# The accumulator


class GradientAccumulator:
    r"""A closure that evaluates the exact full-batch loss, gradient and Hessian-vector product over minibatches.

    With N samples in batches of n_b samples and E_b the loss of batch b (Møller's E(w) is the full-batch loss):

    * ``acc()`` returns E(w) = Σ_b w_b E_b(w) and **sets** each parameter's ``.grad`` to E'(w) = Σ_b w_b E_b'(w);
    * ``acc.hvp(v)`` returns s = E''(w) v = Σ_b w_b E_b''(w) v;
    * ``acc.loss()`` returns E(w) only, without autograd,

    with w_b = 1 (``reduction="sum"``) or w_b = n_b / N (``"mean"``); ``nn.CrossEntropyLoss`` and ``nn.NLLLoss``
    with a mean over class indices are divided by the total class weight of the targets, exactly as on the whole
    dataset at once (class weights, ``ignore_index``, ``label_smoothing``). Each call is one pass over the data;
    sums are kept in float64 (see :data:`PARTIAL_SUM_BATCHES` for float32 parameters) and cast to the parameters'
    dtype once at the end. A pass holds one batch at a time.

    The object is a closure for ``optimizer.step(acc)`` — :class:`moller_scg.SCG` in either curvature mode (in
    ``hvp="double-backward"`` mode SCG calls :meth:`hvp`), ``torch.optim.LBFGS``, or any optimizer that takes a
    closure.

    Args:
        model: the network; called as ``model(inputs)`` on each batch.
        loss_fn: ``loss_fn(outputs, targets)`` → scalar, a sum or a mean over the samples of the batch (any
            ``torch.nn`` loss, or any callable).
        data: an ``(inputs, targets)`` pair of tensors with the samples along the first axis (sliced, never
            collated sample by sample; NumPy arrays are converted once, floating ones to the model's dtype), a
            map-style ``Dataset`` of ``(input, target)`` items, or a
            ``DataLoader`` yielding ``(inputs, targets)`` batches over every sample exactly once.
        batch_size: samples per batch for tensors and Datasets (the last batch may be smaller); default
            :data:`DEFAULT_BATCH_SIZE`. It changes memory and speed, never the result. A DataLoader brings its
            own; passing a different one is an error.
        device: where batches are evaluated; default: the device of the first parameter. Tensor data on another
            device is copied there once when it fits ``device_cache_bytes``, otherwise batch by batch (from
            pinned memory, asynchronously, when the device is a GPU).
        progress: show a tqdm bar over the batches of each pass.
        reduction: ``"mean"``, ``"sum"`` or ``"batchmean"``. Read from ``loss_fn.reduction`` when it exists;
            required otherwise. An explicit value is checked once, on the first samples, against the loss itself.
        params: the parameters w to differentiate, in the order :meth:`hvp` takes and returns vectors; default:
            the model's parameters that require grad, in ``model.parameters()`` order. Pass the same list as to
            the optimizer when it holds a subset.
        hvp_method: ``"double-backward"`` (default): per batch, g = ∂E_b/∂w with ``create_graph=True``, then
            ∂(gᵀv)/∂w. ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` through
            ``torch.func.functional_call``. If ``torch.func`` fails on the first batch (an operator it does not
            support), a warning is logged and :attr:`hvp_method` becomes ``"double-backward"``.
        device_cache_bytes: the byte budget for copying tensor data to ``device`` once.
        on_non_finite: ``"raise"`` (default): a pass in which some batch loss is not finite raises
            ``FloatingPointError`` naming the first such batch, and leaves ``.grad`` untouched. ``"return"``:
            log a warning and return the non-finite loss (and set the gradients), for optimizers that handle a
            non-finite trial themselves (SCG rejects such a trial and shrinks its step).
        distributed: data-parallel over the ranks of a ``torch.distributed`` process group
            (:mod:`moller_scg.distributed`). Every rank passes the **same** full ``data``; rank r streams only
            its shard, samples [r·N // W, (r+1)·N // W) (disjoint, none padded or dropped, possibly empty), and one
            ``all_reduce`` per pass adds the ranks' float64 sums, so every rank gets the same bits of the exact
            full-batch E, E' or E''v. ``None`` (default): on when a process group is initialised. ``True``
            requires one. Data must be tensors or a map-style Dataset; a DataLoader is refused (its sampler
            cannot be sharded without changing it: pass its dataset and batch size instead). Constructing the
            accumulator is itself a collective (it checks that all ranks have the same N, parameter count and
            initial weights), so every rank must construct it, in the same order as its other collectives.
        curvature_fraction: f ∈ (0, 1]. Below 1, :meth:`hvp` streams only m = ⌈f·N⌉ of the samples (⌈f·n_r⌉ of
            each rank's shard) and returns their mean (or, for ``reduction="sum"``, their sum scaled by N/m): a
            subsampled estimate of E''(w)v at f of the cost (Byrd et al. 2011; :mod:`moller_scg.subsampling`).
            The loss and the gradient stay exact. Default 1: the exact full-batch product. Needs tensors or a
            map-style Dataset (a DataLoader fixes its own sampler).
        curvature_subset: ``"rotating"`` (default): each product takes the next m samples of a seeded
            permutation, so consecutive products see different samples; ``"fixed"``: always the same m samples.
            The index of the next rotating window is :attr:`curvature_window` (``fit`` checkpoints it).
        curvature_seed: seeds the permutation the subsets are taken from.

    Raises:
        TypeError: an argument has the wrong type (the message names it and what is accepted).
        ValueError: empty data, inputs and targets of different lengths, an unknown or ``"none"`` reduction,
            a model without trainable parameters, a DataLoader that drops samples or samples with replacement.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from moller_scg.accumulate import GradientAccumulator
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1).double()
        >>> acc = GradientAccumulator(model, nn.MSELoss(), (x, y), batch_size=4)  # batches of 4, 4, 2
        >>> loss = acc()                       # sets p.grad for every parameter
        >>> full = nn.MSELoss()(model(x), y)   # the same loss on the whole dataset at once
        >>> bool(torch.isclose(loss, full.detach(), rtol=1e-14))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        data: Data,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        *,
        reduction: str | None = None,
        params: Iterable[torch.Tensor] | None = None,
        hvp_method: str = "double-backward",
        device_cache_bytes: int = DEFAULT_DEVICE_CACHE_BYTES,
        on_non_finite: str = "raise",
        distributed: bool | None = None,
        curvature_fraction: float = 1.0,
        curvature_subset: str = "rotating",
        curvature_seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {_describe(model)}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {_describe(loss_fn)}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"Invalid hvp_method {hvp_method!r}; choose one of {', '.join(map(repr, HVP_METHODS))}")
        if on_non_finite not in NON_FINITE_POLICIES:
            raise ValueError(
                f"Invalid on_non_finite {on_non_finite!r}; choose one of {', '.join(map(repr, NON_FINITE_POLICIES))}"
            )
        if isinstance(device_cache_bytes, bool) or not isinstance(device_cache_bytes, int) or device_cache_bytes < 0:
            raise ValueError(f"Invalid device_cache_bytes {device_cache_bytes!r}; it must be an int ≥ 0")
        validate_subset(curvature_subset, curvature_seed)  # also when f = 1, so a typo never waits for f < 1
        self.distributed = _resolve_distributed(distributed, data)
        self.model = model
        self.loss_fn = loss_fn
        self.params: list[torch.Tensor] = _trainable_params(model, params)
        self.reduction = _resolve_reduction(loss_fn, reduction)
        self.device = _resolve_device(device, self.params)
        self.progress = progress and _dist.is_main_process()
        self.hvp_method = hvp_method
        self.on_non_finite = on_non_finite
        self.passes = PassCounts()
        self._objective = _Objective(loss_fn, self.reduction)
        shard = (_dist.rank(), _dist.world_size()) if self.distributed else None
        self._model_dtype = model_dtype(self.params)
        data = as_tensor_pair(data, self._model_dtype)  # NumPy arrays become tensors of the model's dtype
        self._batches: _Batches
        self._batches, self._samples = _make_batches(data, batch_size, self.device, device_cache_bytes, shard)
        if isinstance(self._batches, _TensorBatches):
            check_input_dtype(self._batches.inputs, self._model_dtype, "the inputs")
        self._device_cache_bytes = device_cache_bytes
        self.curvature_fraction = validate_fraction(curvature_fraction)
        self.curvature_window = 0
        self._curvature_subsets: CurvatureSubsets | None = None
        self._fixed_curvature_batches: _Batches | None = None
        self._curvature_samples = self._samples
        if self.curvature_fraction < 1.0:
            if isinstance(data, DataLoader):
                raise TypeError(
                    "curvature_fraction < 1 chooses its own samples, but a DataLoader fixes its sampler: pass its "
                    "dataset and batch_size instead (GradientAccumulator(model, loss_fn, loader.dataset, "
                    "batch_size=loader.batch_size, curvature_fraction=...))"
                )
            self._curvature_subsets = CurvatureSubsets(
                self._batches.samples, self.curvature_fraction, curvature_subset, curvature_seed
            )
            self._curvature_samples = _curvature_samples(self._samples, self.curvature_fraction, shard)
        if self.distributed:
            _check_ranks_agree(self._samples, self.params)
        self._param_names = _param_names(model, self.params) if hvp_method == "forward-over-reverse" else None
        # Every loss must be additive over samples, or the batch size changes the objective: checked once, on the
        # first pass. An explicit reduction is a claim about an opaque callable; a declared one can be wrong too.
        # The ratio kind's S_b is the accumulator's own F.cross_entropy / F.nll_loss sum: additive by construction.
        self._reduction_unchecked = self._objective.kind != "ratio"
        self._reduction_explicit = reduction is not None and getattr(loss_fn, "reduction", None) is None
        self._warned_stochastic = False
        self._functional_works = False  # whether torch.func has evaluated one batch (then its errors are real)

    # ----------------------------------------------------------------------------------------------------------
    # Public interface

    @property
    def samples(self) -> int:
        """N, the number of samples in the data (all ranks' shards together when distributed)."""
        return self._samples

    @property
    def shard_samples(self) -> int:
        """The number of samples this process streams: its shard when distributed, N otherwise."""
        return self._batches.samples

    @property
    def num_batches(self) -> int | None:
        """B, the number of batches of one pass (``None`` for a DataLoader whose sampler has no length)."""
        return self._batches.expected_batches()

    @property
    def data_cached_on_device(self) -> bool:
        """Whether the data sits on ``device`` (already there or copied once), so batches are never copied."""
        return self._batches.cached

    def __call__(self) -> torch.Tensor:
        """One pass: E(w), and each parameter's ``.grad`` **set** (replaced, not added to) to E'(w).

        Returns:
            E(w), a detached 0-dim float64 tensor on ``device``.

        Raises:
            FloatingPointError: a batch loss is not finite (``on_non_finite="raise"``); ``.grad`` is left as it was,
                and so are the running statistics of batch norm in training mode.
        """
        with restored_on_failure(self.model) as running_statistics:  # batch norm's, in training mode
            sums = self._stream("gradient")
            loss, gradients = self._finish(self._reduce(sums))
            running_statistics.restore_unless_finite(loss)
        for p, gradient in zip(self.params, gradients):
            p.grad = gradient
        self.passes.gradient += 1
        return loss

    def hvp(self, vectors: Sequence[torch.Tensor]) -> TensorList:
        """One pass: s = E''(w) v = Σ_b w_b E_b''(w) v, exactly.

        Args:
            vectors: v, one tensor per parameter of :attr:`params`, in that order and with the same shapes.

        Returns:
            s, one detached tensor per parameter, in the parameter's dtype.
        """
        if isinstance(vectors, torch.Tensor) or not isinstance(vectors, Sequence):
            raise TypeError(f"vectors must be a sequence of tensors, one per parameter, got {_describe(vectors)}")
        if len(vectors) != len(self.params):
            raise ValueError(f"hvp got {len(vectors)} vectors for {len(self.params)} parameters")
        prepared = []
        for index, (p, v) in enumerate(zip(self.params, vectors)):
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"hvp vector {index} has shape {shape}, but parameter {index} has {tuple(p.shape)}")
            prepared.append(v.detach().to(device=p.device, dtype=p.dtype))
        batches = self._curvature_batches()
        with restored_on_failure(self.model) as running_statistics:
            sums = self._stream("hvp", prepared, batches)
            loss, products = self._finish(self._reduce(sums), batches, self._curvature_samples)
            running_statistics.restore_unless_finite(loss)
        self.passes.hvp += 1
        return products

    def loss(self) -> torch.Tensor:
        """One pass without autograd: E(w) as a detached 0-dim float64 tensor; ``.grad`` is not touched."""
        with restored_on_failure(self.model) as running_statistics:
            sums = self._stream("loss")
            loss, _ = self._finish(self._reduce(sums))
            running_statistics.restore_unless_finite(loss)
        self.passes.loss += 1
        return loss

    def evaluate(self, metrics: Mapping[str, Callable[[Any, torch.Tensor], torch.Tensor]]) -> dict[str, float]:
        """One pass without autograd: E(w) and the mean of each metric over all samples, one forward per batch.

        Args:
            metrics: name → ``metric(outputs, targets)``, each returning the batch mean of a per-sample score (for
                example :func:`moller_scg.accuracy`); weighted by batch size like a ``reduction="mean"`` loss
                (``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` by their class weights). Not checked to be a mean.

        Returns:
            ``{"loss": E(w), name: mean of the metric, …}`` as Python floats; ``.grad`` is not touched.
        """
        if not isinstance(metrics, Mapping) or not all(
            isinstance(name, str) and callable(metric) for name, metric in metrics.items()
        ):
            raise TypeError(f"metrics must map names to callables metric(outputs, targets), got {_describe(metrics)}")
        if "loss" in metrics:
            raise ValueError("'loss' names the loss itself in what evaluate returns: give the metric another name")
        objectives = [_Objective(metric, "mean") for metric in metrics.values()]
        with restored_on_failure(self.model) as running_statistics:
            sums = self._reduce(self._stream("loss", metric_objectives=objectives))
            loss, _ = self._finish(sums)
            running_statistics.restore_unless_finite(loss)
        values = {"loss": float(loss)}
        metric_sums = cast(torch.Tensor, sums.metrics).tolist()
        metric_denominators = cast(torch.Tensor, sums.metric_denominators).tolist()
        for index, (name, objective) in enumerate(zip(metrics, objectives)):
            denominator = metric_denominators[index] if objective.kind == "ratio" else sums.samples
            values[name] = metric_sums[index] / denominator
        self.passes.loss += 1
        return values

    def __repr__(self) -> str:
        subsampled = "" if self._curvature_subsets is None else f", curvature={self._curvature_subsets!r}"
        return (
            f"{type(self).__name__}(samples={self.samples}, batches={self.num_batches}, "
            f"reduction={self.reduction!r}, device={str(self.device)!r}, hvp_method={self.hvp_method!r}{subsampled})"
        )

    # ----------------------------------------------------------------------------------------------------------
    # Subsampled curvature

    def _curvature_batches(self) -> _Batches:
        """The batches of the next Hessian-vector product: all the data, or the next curvature subset."""
        subsets = self._curvature_subsets
        if subsets is None:
            return self._batches
        if subsets.mode == "fixed" and self._fixed_curvature_batches is not None:
            return self._fixed_curvature_batches
        batches = _subset_batches(self._batches, subsets.indices(self.curvature_window), self._device_cache_bytes)
        self.curvature_window += 1
        if subsets.mode == "fixed":
            self._fixed_curvature_batches = batches
        return batches

    # ----------------------------------------------------------------------------------------------------------
    # One pass: stream → float64 sums → reduce → finish

    def _stream(
        self,
        kind: str,
        vectors: list[torch.Tensor] | None = None,
        batches_to_stream: _Batches | None = None,
        metric_objectives: Sequence[_Objective] = (),
    ) -> _PassSums:
        """Run every batch once and add up its loss and, for ``kind`` "gradient" or "hvp", its vectors.

        ``batches_to_stream`` defaults to all the data (this process's shard). With ``metric_objectives`` (kind
        "loss" only) each metric is added up from the same forward pass as the loss. No host synchronisation happens
        in the loop: batch losses are written to a device buffer and checked once at the end.
        """
        self._warn_if_stochastic()
        source = self._batches if batches_to_stream is None else batches_to_stream
        head = source.head(REDUCTION_CHECK_SAMPLES) if self._reduction_unchecked else None
        if head is not None:
            self._check_reduction(*head)
        objective, params = self._objective, self.params
        sums = None if kind == "loss" else _WideSums(params)
        # Typed as the loop's "gradient" and "hvp" branches use them: sums is None only for "loss", vectors only
        # for kinds other than "hvp".
        wide_sums, hvp_vectors = cast(_WideSums, sums), cast(list[torch.Tensor], vectors)
        expected = source.expected_batches()
        terms = torch.empty(max(expected or 16, 1), dtype=torch.float64, device=self.device)
        scales: list[int] = []
        denominator = torch.zeros((), dtype=torch.float64, device=self.device) if objective.kind == "ratio" else None
        samples = 0
        metric_sums = metric_denominators = None
        if metric_objectives:
            metric_sums = torch.zeros(len(metric_objectives), dtype=torch.float64, device=self.device)
            metric_denominators = torch.zeros_like(metric_sums)
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = source
        if self.progress:
            batches = _progress_bar(batches, expected, kind)
        for index, (inputs, targets) in enumerate(batches):
            count = _batch_samples(inputs, targets, source, index)
            if index == 0:  # a Dataset or DataLoader shows its dtype only in its batches (tensors: checked up front)
                check_input_dtype(inputs, self._model_dtype, f"the inputs of {source.describe(0)}")
            if self._reduction_unchecked and count >= 2:
                self._check_reduction(inputs[:REDUCTION_CHECK_SAMPLES], targets[:REDUCTION_CHECK_SAMPLES])
            scale = objective.scale(count)
            if kind == "loss":
                with torch.no_grad():
                    outputs = self.model(inputs)
                    term = objective.term(outputs, targets)
                    for index_m, metric in enumerate(metric_objectives):
                        metric_term = metric.term(outputs, targets).detach().reshape(()).to(torch.float64)
                        cast(torch.Tensor, metric_sums)[index_m] += metric_term * metric.scale(count)
                        if metric.kind == "ratio":
                            cast(torch.Tensor, metric_denominators)[index_m] += metric.denominator(targets)
            elif kind == "gradient":
                term = self._add_batch_gradient(inputs, targets, wide_sums, scale)
            elif self.hvp_method == "double-backward":
                term = self._add_batch_hvp_double_backward(inputs, targets, hvp_vectors, wide_sums, scale)
            else:
                term = self._add_batch_hvp_forward_over_reverse(inputs, targets, hvp_vectors, wide_sums, scale)
            if index >= terms.numel():
                terms = torch.cat([terms, torch.empty_like(terms)])  # the loader yielded more than len(loader)
            terms[index] = term.detach().reshape(())
            scales.append(scale)
            if denominator is not None:
                denominator += objective.denominator(targets)
            samples += count
        seen = len(scales)  # 0 is possible (an empty shard, a DataLoader that yields nothing); _finish checks N
        scale_tensor = torch.tensor(scales, dtype=torch.float64).to(self.device)
        loss = torch.dot(terms[:seen], scale_tensor)
        vector_sums = None if sums is None else sums.result()
        return _PassSums(
            loss=loss,
            vectors=vector_sums,
            denominator=denominator,
            samples=samples,
            terms=terms[:seen],
            metrics=metric_sums,
            metric_denominators=metric_denominators,
        )

    def _add_batch_gradient(
        self, inputs: torch.Tensor, targets: torch.Tensor, sums: _WideSums, scale: int
    ) -> torch.Tensor:
        """Σ ← Σ + scale · ∂E_b/∂w for one batch; returns E_b (the term)."""
        with torch.enable_grad():
            term = self._objective.term(self.model(inputs), targets)
            if not term.requires_grad:
                return term  # no parameter reaches this batch's loss: its gradient is 0
            gradients = torch.autograd.grad(term, self.params, allow_unused=True)
        sums.add(gradients, scale)
        return term

    def _add_batch_hvp_double_backward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        vectors: list[torch.Tensor],
        sums: _WideSums,
        scale: int,
    ) -> torch.Tensor:
        """Σ ← Σ + scale · E_b''v as ∂(gᵀv)/∂w, g = ∂E_b/∂w kept differentiable (Pearlmutter 1994)."""
        with torch.enable_grad():
            term = self._objective.term(self.model(inputs), targets)
            if not term.requires_grad:
                return term
            gradients = torch.autograd.grad(term, self.params, create_graph=True, allow_unused=True)
        sums.add(graph_hvp(gradients, self.params, vectors, require_graph=False), scale)
        return term

    def _add_batch_hvp_forward_over_reverse(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        vectors: list[torch.Tensor],
        sums: _WideSums,
        scale: int,
    ) -> torch.Tensor:
        """Σ ← Σ + scale · E_b''v, as the forward-mode derivative of ∂E_b/∂w along v (``torch.func``)."""
        names = cast(list[str], self._param_names)  # set when hvp_method is "forward-over-reverse"
        objective, model = self._objective, self.model

        def batch_loss(weights: dict[str, torch.Tensor]) -> torch.Tensor:
            return objective.term(torch.func.functional_call(model, weights, (inputs,)), targets)

        weights = {name: p.detach() for name, p in zip(names, self.params)}
        directions = dict(zip(names, vectors))
        try:
            with torch.enable_grad():
                term, products = functional_hvp_and_loss(batch_loss, weights, directions)
        except RuntimeError as error:
            if self._functional_works:
                raise
            # torch.func does not support every operator (e.g. F.mse_loss with reduction="mean" under jvp of grad,
            # pytorch/pytorch#123996). Nothing was added yet, so this batch can be redone by double-backward.
            logger.warning(
                "hvp_method='forward-over-reverse' failed on the first batch (%s: %s); using 'double-backward' "
                "from now on",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            self.hvp_method = "double-backward"
            return self._add_batch_hvp_double_backward(inputs, targets, vectors, sums, scale)
        self._functional_works = True
        sums.add([products[name] for name in names], scale)
        return term

    def _reduce(self, sums: _PassSums) -> _PassSums:
        """Combine the sums of every process; everything after this step sees the global sums.

        One process holds all the data: the identity. Distributed, the shards are disjoint (a rank may have 0
        samples), so the global loss, vector sums, denominator, metric sums and sample count are the sums over
        ranks: one ``all_reduce`` of a flat float64 buffer (:func:`moller_scg.distributed.all_reduce_sum`). The
        batch losses ``terms`` stay local; they only name a non-finite batch.
        """
        if not self.distributed:
            return sums
        samples = torch.tensor(sums.samples, dtype=torch.float64, device=self.device)
        # all_reduce_sum gives None back only for a None: here at most the denominator and the metric sums, which
        # _PassSums allows.
        loss, denominator, samples, metrics, metric_denominators, *vectors = cast(
            list[torch.Tensor],
            _dist.all_reduce_sum(
                [sums.loss, sums.denominator, samples, sums.metrics, sums.metric_denominators, *(sums.vectors or [])]
            ),
        )
        return _PassSums(
            loss=loss,
            vectors=vectors if sums.vectors is not None else None,
            denominator=denominator,
            samples=int(samples.item()),
            terms=sums.terms,
            metrics=metrics,
            metric_denominators=metric_denominators,
        )

    def _finish(
        self, sums: _PassSums, streamed: _Batches | None = None, expected_samples: int | None = None
    ) -> tuple[torch.Tensor, TensorList]:
        """Divide by the denominator and cast once: (E as 0-dim float64, vectors in the parameters' dtypes).

        ``streamed`` and ``expected_samples`` describe a pass over a curvature subset of m of the N samples
        (default: the whole data). A sum over m samples estimates the sum over N after scaling by N/m; a mean
        is the subset's own mean.
        """
        expected = self.samples if expected_samples is None else expected_samples
        if sums.samples != expected:
            raise ValueError(
                f"the DataLoader yielded {sums.samples} samples in one pass, but its dataset holds {expected}: "
                f"the result would not be the full-batch loss and gradient (check its sampler and batch_sampler)"
            )
        self._check_pass(sums, self._batches if streamed is None else streamed)
        kind = self._objective.kind
        denominator: torch.Tensor | int | float = 1
        if kind == "mean":
            denominator = sums.samples
        elif kind == "ratio":
            denominator = sums.denominator  # type: ignore[assignment]
        elif expected != self.samples:
            denominator = expected / self.samples  # "sum" over a subset: Σ_S · N/m
        loss = sums.loss / denominator
        vectors = []
        if sums.vectors is not None:
            vectors = [(s / denominator).to(p.dtype) for s, p in zip(sums.vectors, self.params)]
        return loss.detach(), vectors

    # ----------------------------------------------------------------------------------------------------------
    # Checks

    def _check_pass(self, sums: _PassSums, streamed: _Batches) -> None:
        """The one host synchronisation of a pass: are all batch losses finite (and the class weights > 0)?

        Distributed, the global loss decides (every rank sees the same one, so all ranks raise or none does); the
        rank whose batch is not finite names it, the others say it is on another rank.
        """
        terms, denominator = sums.terms, sums.denominator
        healthy = torch.isfinite(sums.loss if self.distributed else terms).all()
        if denominator is not None:
            healthy = healthy & (denominator > 0)
        if bool(healthy):
            return
        if denominator is not None and not bool(denominator > 0):
            raise ValueError(
                f"the targets' total class weight is {float(denominator)} (every target equals ignore_index or has "
                f"weight 0), so the mean {type(self.loss_fn).__name__} over the dataset is 0/0"
            )
        if bool(torch.isfinite(terms).all()):
            message = (
                f"the full-batch loss is not finite ({float(sums.loss)}): a batch of another rank's shard has a "
                f"non-finite loss (rank {_dist.rank()} of {_dist.world_size()} has only finite ones)"
            )
        else:
            index = int(torch.nonzero(~torch.isfinite(terms))[0, 0])
            where = f" of rank {_dist.rank()}'s shard" if self.distributed else ""
            if streamed is not self._batches:
                where += " (positions within this Hessian-vector product's curvature subset)"
            message = (
                f"the loss of {streamed.describe(index)}{where} is not finite ({float(terms[index])}); "
                f"{int((~torch.isfinite(terms)).sum())} of {terms.numel()} batches have a non-finite loss"
            )
        if self.on_non_finite == "raise":
            raise FloatingPointError(message)
        logger.warning("%s; returning the non-finite loss (on_non_finite='return')", message)

    def _check_reduction(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Check once that the loss is additive over samples (:func:`moller_scg.loss_checks.check_additivity`)."""
        if targets.shape[0] < 2:
            return
        self._reduction_unchecked = False
        if _stochastic_modules(self.model):
            logger.debug("additivity not checked: the model is stochastic in training mode")
            return
        check_additivity(
            self._objective.term, self.model, inputs, targets, self._objective.kind, self._reduction_explicit
        )

    def _warn_if_stochastic(self) -> None:
        if self._warned_stochastic:
            return
        names = _stochastic_modules(self.model)
        if not names:
            return
        self._warned_stochastic = True
        warnings.warn(
            f"the model is in training mode with dropout or batch norm ({', '.join(names[:5])}"
            f"{', …' if len(names) > 5 else ''}): the full-batch objective is not defined — every pass sees other "
            f"dropout masks, batch norm uses per-batch statistics (so the result depends on the batch size) and "
            f"updates its running statistics. Call model.eval() for the deterministic full-batch objective, or "
            f"accept the stochastic objective and silence this StochasticObjectiveWarning",
            StochasticObjectiveWarning,
            stacklevel=4,
        )


# ------------------------------------------------------------------------------------------------------------------
# Helpers, each one idea


def _trainable_params(model: nn.Module, params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    if params is None:
        chosen: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    else:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, not a single tensor (wrap it in a list)")
        chosen = list(params)
        for index, p in enumerate(chosen):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError(f"params[{index}] must be a tensor that requires grad, got {_describe(p)}")
    if not chosen:
        raise ValueError(
            f"the model ({type(model).__name__}) has no trainable parameters (none requires grad): "
            f"there is nothing to differentiate"
        )
    return chosen


def _param_names(model: nn.Module, params: list[torch.Tensor]) -> list[str]:
    """The names ``torch.func.functional_call`` knows the parameters by."""
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    missing = [index for index, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(
            f"hvp_method='forward-over-reverse' needs parameters of the model itself, but params{missing} are not "
            f"among model.named_parameters(); use hvp_method='double-backward'"
        )
    return [by_id[id(p)] for p in params]


def _resolve_device(device: torch.device | str | None, params: list[torch.Tensor]) -> torch.device:
    if device is None:
        return params[0].device
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Invalid device {device!r}: {error}") from None
    if resolved.type == "cuda" and resolved.index is None and torch.cuda.is_available():
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _make_batches(
    data: Any, batch_size: int | None, device: torch.device, cache_bytes: int, shard: tuple[int, int] | None = None
) -> tuple[_Batches, int]:
    """Validate the data at the boundary and choose how to stream it: (the batches, N).

    With ``shard`` = (rank, world size) the batches cover only that rank's contiguous shard of the N samples.
    """
    if isinstance(data, DataLoader):
        _validate_loader(data, batch_size)
        batches = _LoaderBatches(data, device)
        return batches, batches.samples
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = data.tensors
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise TypeError(
                f"data as a tuple must be an (inputs, targets) pair of tensors, got "
                f"({', '.join(_describe(t) for t in data)})"
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
        return _TensorBatches(inputs, targets, _validate_batch_size(batch_size), device, cache_bytes), samples
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
            batch_size=_validate_batch_size(batch_size),
            shuffle=False,
            drop_last=False,
            pin_memory=torch.cuda.is_available() and device.type == "cuda",
        )
        return _LoaderBatches(loader, device), length
    raise TypeError(
        f"data must be an (inputs, targets) pair of tensors, a map-style Dataset or a DataLoader, got {_describe(data)}"
    )


def _subset_batches(batches: _Batches, indices: torch.Tensor, cache_bytes: int) -> _Batches:
    """Batches over the samples ``indices`` of ``batches`` (a copy of those samples for tensor data)."""
    if isinstance(batches, _TensorBatches):
        inputs = batches.inputs.index_select(0, indices.to(batches.inputs.device))
        targets = batches.targets.index_select(0, indices.to(batches.targets.device))
        return _TensorBatches(inputs, targets, batches.batch_size, batches.device, cache_bytes)
    loader = batches.loader
    subset_loader = DataLoader(
        Subset(loader.dataset, indices.tolist()),
        batch_size=loader.batch_size,
        shuffle=False,
        drop_last=False,
        pin_memory=loader.pin_memory,
    )
    return _LoaderBatches(subset_loader, batches.device)


def _curvature_samples(samples: int, fraction: float, shard: tuple[int, int] | None) -> int:
    """m, the samples of one subsampled curvature pass over all ranks: Σ_r ⌈f·n_r⌉ over the shards n_r."""
    if shard is None:
        return subset_size(samples, fraction)
    world_size = shard[1]
    return sum(subset_size(len(_dist.shard_range(samples, rank, world_size)), fraction) for rank in range(world_size))


def _resolve_distributed(distributed: bool | None, data: Any) -> bool:
    """Whether passes all-reduce over a process group: detected when ``None``; a DataLoader cannot be sharded."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
    active = _dist.is_distributed() if distributed is None else distributed
    if active and not _dist.is_distributed():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group first (torchrun sets its environment), or leave distributed=None"
        )
    if active and isinstance(data, DataLoader):
        raise TypeError(
            "a distributed GradientAccumulator shards the data itself, but a DataLoader fixes its own sampler: pass "
            "its dataset and batch_size instead (GradientAccumulator(model, loss_fn, loader.dataset, "
            "batch_size=loader.batch_size)), or distributed=False to stream the whole DataLoader on every rank"
        )
    return active


def _check_ranks_agree(samples: int, params: list[torch.Tensor]) -> None:
    """Every rank must have the same N, the same parameters and the same initial weights (one all-reduce)."""
    with torch.no_grad():
        checksum = sum(float(as_real(p).double().sum()) for p in params)
    _dist.check_same_on_every_rank(
        {
            "the number of samples N": samples,
            "the number of parameters": sum(p.numel() for p in params),
            "the sum of the initial weights": checksum,
        }
    )


def _validate_batch_size(batch_size: int | None) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"Invalid batch_size {batch_size!r}; it must be an int ≥ 1")
    return int(batch_size)


def _validate_loader(loader: DataLoader, batch_size: int | None) -> None:
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


def _batch_samples(inputs: torch.Tensor, targets: torch.Tensor, batches: _Batches, index: int) -> int:
    """n_b, the samples in the batch (its first axis), after checking inputs and targets agree."""
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{batches.describe(index)} has inputs of shape {tuple(inputs.shape)} and targets of shape "
            f"{tuple(targets.shape)}; both need the same number of samples along their first axis"
        )
    return targets.shape[0]


class _WideSums:
    """Σ_b scale_b · v_b per parameter, in float64 (complex128 for complex parameters).

    Parameters already in float64 (complex128) are added into the totals batch by batch. For narrower
    parameters, up to ``PARTIAL_SUM_BATCHES`` consecutive batches are first summed in the parameter's own dtype
    and that partial sum is then added into the float64 total: the float64 read-modify-write of all of w, the
    dominant per-batch cost on CPU, is paid once per block instead of once per batch. The error this adds is at
    most 2·PARTIAL_SUM_BATCHES roundings of the parameter's dtype, whatever the number of batches, so the result
    still does not drift with B (``tests/test_accumulate.py``, float32 over 4096 batches).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.totals = [torch.zeros_like(p, dtype=_wide_dtype(p.dtype)) for p in params]
        self._narrow = [p.dtype != total.dtype for p, total in zip(params, self.totals)]
        self._partials: list[torch.Tensor | None] = [None] * len(self.totals)
        self._pending = 0

    def add(self, vectors: Sequence[torch.Tensor | None], scale: int) -> None:
        """Σ ← Σ + scale · v; a ``None`` vector (a parameter the batch loss does not reach) adds nothing."""
        for index, vector in enumerate(vectors):
            if vector is None:
                continue
            if not self._narrow[index]:
                self.totals[index].add_(vector, alpha=scale)
            elif (partial := self._partials[index]) is None:
                self._partials[index] = vector * scale  # a new tensor: autograd's result may be a shared view
            else:
                partial.add_(vector, alpha=scale)
        self._pending += 1
        if self._pending == PARTIAL_SUM_BATCHES:
            self._flush()

    def result(self) -> list[torch.Tensor]:
        """The float64 totals, every partial sum included."""
        self._flush()
        return self.totals

    def _flush(self) -> None:
        for index, partial in enumerate(self._partials):
            if partial is not None:
                self.totals[index].add_(partial)
                self._partials[index] = None
        self._pending = 0


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64, or complex128 for complex parameters."""
    return torch.complex128 if dtype.is_complex else torch.float64


def _stochastic_modules(model: nn.Module) -> list[str]:
    """Names of the submodules that make the forward pass random or batch-dependent in training mode."""
    names = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            names.append(name or type(module).__name__)
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            names.append(name or type(module).__name__)
        elif isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            names.append(name or type(module).__name__)
    return names


def _progress_bar(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int | None, kind: str
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc=f"{kind} pass", unit="batch", leave=False)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'…' if len(text) > 80 else ''}"
