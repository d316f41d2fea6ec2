"""Exact full-batch loss, gradient and Hessian-vector products, streamed over minibatches.

A dataset of N samples is cut into batches b = 1, …, B of n_b samples (:mod:`moller_scg.batches`). For a loss that
is a sum or a mean of per-sample terms the full-batch objective is a weighted sum of the batch losses E_b,

    E(w) = Σ_b w_b E_b(w),   E'(w) = Σ_b w_b E_b'(w),   s = E''(w) v = Σ_b w_b E_b''(w) v,

with w_b = 1 for ``reduction="sum"`` and w_b = n_b / N for ``reduction="mean"``, or a ratio Σ_b S_b / Σ_b D_b for
class-weighted losses (:mod:`moller_scg.loss_weighting`).

Each pass streams the batches, adds S_b (or n_b E_b) and the gradients or products into float64 sums (for float32
parameters, blocks of ``PARTIAL_SUM_BATCHES`` batches are summed in float32 first), and only at the end divides by
the denominator and casts once to the parameters' dtype, so the result does not drift with the number of batches
(:mod:`moller_scg.float64_sums`). Only one batch is alive at a time: memory is bounded by one batch plus the float64
sums. This module is the pass engine — stream, sum, reduce over ranks (:mod:`moller_scg.distributed`), divide
(:func:`moller_scg.float64_sums.divided_sums`) — and each batch's derivatives come from
:mod:`moller_scg.batch_derivatives`. :class:`GradientAccumulator` knows nothing of the optimizer; it is a closure
with an ``hvp`` method, which :class:`moller_scg.SCG` uses for its exact curvature.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. Neural Computation 6(1), 147–160.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from moller_scg import distributed as _dist
from moller_scg._vectors import TensorList
from moller_scg.batch_derivatives import BatchDerivatives
from moller_scg.batches import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEVICE_CACHE_BYTES,
    Batches,
    CurvatureBatches,
    Data,
    TensorBatches,
    batch_samples,
    make_batches,
    progress_bar,
)
from moller_scg.curvature import functional_hvp_and_loss
from moller_scg.float64_sums import PassSums, WideSums, divided_sums
from moller_scg.input_checks import (
    as_tensor_pair,
    check_cache_bytes,
    check_input_dtype,
    check_model_loss_and_progress,
    hvp_vectors,
    model_dtype,
    resolve_device,
    trainable_params,
)
from moller_scg.loss_checks import ADDITIVITY_CHECK_SAMPLES, FirstPassChecks, StochasticObjectiveWarning, pass_problem
from moller_scg.loss_weighting import REDUCTIONS, BatchLoss, MetricSums, resolve_reduction
from moller_scg.running_stats import restored_on_failure
from moller_scg.subsampling import (
    CurvatureCursor,
    curvature_samples,
    curvature_subsets,
    validate_fraction,
    validate_subset,
)
from moller_scg.weight_decay import WeightDecay, validate_weight_decay

__all__ = [
    "GradientAccumulator",
    "PassCounts",
    "StochasticObjectiveWarning",
    "Data",
    "REDUCTIONS",
    "HVP_METHODS",
    "NON_FINITE_POLICIES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DEVICE_CACHE_BYTES",
    "PARTIAL_SUM_BATCHES",
    "REDUCTION_CHECK_SAMPLES",
]

logger = logging.getLogger(__name__)

HVP_METHODS = ("double-backward", "forward-over-reverse", "gauss-newton")
"""How :meth:`GradientAccumulator.hvp` differentiates each batch (see the class docstring)."""
NON_FINITE_POLICIES = ("raise", "return")
"""What a pass does when a batch loss is not finite: raise ``FloatingPointError``, or return the non-finite sums."""

PARTIAL_SUM_BATCHES = 8
"""Batches summed in float32 (the dtype of a float32 parameter, and of a float16 or bfloat16 one's partial sums)
before the sum is added into float64.

The pass engine reads this module attribute at the start of every pass, so setting
``moller_scg.accumulate.PARTIAL_SUM_BATCHES`` takes effect at once (:class:`moller_scg.float64_sums.WideSums`).
1 adds every batch's scaled vector, formed in float32, into float64. 8 removes most of the per-batch cost of
float64 accumulation (about 0.5 ms per batch for the 0.46 M parameters of the MNIST CNN on one CPU thread) and adds
at most 16 float32 roundings, however many batches there are. Float64 parameters are always added directly."""
REDUCTION_CHECK_SAMPLES = ADDITIVITY_CHECK_SAMPLES
"""Samples on which the loss's additivity is checked once (:func:`moller_scg.loss_checks.check_additivity`)."""


@dataclasses.dataclass
class PassCounts:
    """Passes over the data made so far, by kind.

    Attributes:
        gradient: calls of the accumulator itself (loss and gradient), and of
            :meth:`GradientAccumulator.value_then_gradient` whose gradient was formed.
        hvp: calls of :meth:`GradientAccumulator.hvp`.
        loss: calls of :meth:`GradientAccumulator.loss`, and forwards of
            :meth:`GradientAccumulator.value_then_gradient` whose gradient was not (yet) asked for.
    """

    gradient: int = 0
    hvp: int = 0
    loss: int = 0


# ------------------------------------------------------------------------------------------------------------------
# The accumulator


class GradientAccumulator:
    r"""A closure that evaluates the exact full-batch loss, gradient and Hessian-vector product over minibatches.

    With N samples in batches of n_b samples and E_b the loss of batch b (Møller's E(w) is the full-batch loss):

    * ``acc()`` returns E(w) = Σ_b w_b E_b(w) and **sets** each parameter's ``.grad`` to E'(w) = Σ_b w_b E_b'(w);
    * ``acc.hvp(v)`` returns s = E''(w) v = Σ_b w_b E_b''(w) v;
    * ``acc.loss()`` returns E(w) only, without autograd;
    * ``acc.value_then_gradient()`` returns E(w) and forms E'(w) only when asked (with one batch, a trial point
      rejected on its loss then costs a forward pass: :attr:`defers_gradient`),

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
            ``"gauss-newton"``: not E''(w)v but the Gauss–Newton product G v = Jᵀ H_L J v (J the Jacobian of the
            model's outputs, H_L the loss's Hessian in them; + ν v with ``weight_decay``), positive semi-definite
            for a loss convex in the outputs (MSE, cross-entropy on logits, BCE with logits), so SCG never meets
            δ ≤ 0: J v and y from one forward with forward-mode dual weights, H_L (J v) by double-backward on
            the outputs, Jᵀ(·) by one backward (so a batch norm or dropout in training mode runs once per batch, as
            in the other methods). It drops the second derivatives of the model itself, so it is an approximation
            of E''(w) except for a linear model. The loss must hold the curvature: a model that ends in
            ``log_softmax`` with ``nn.NLLLoss`` has G = 0 (a warning after the first product says so). The model
            must return one tensor; real parameters only; no fallback if an operation of the model has no
            forward-mode derivative (a ``RuntimeError`` names ``"double-backward"``).
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
            The next rotating window is :attr:`curvature_cursor`'s (``fit`` checkpoints its ``state_dict``).
        curvature_seed: seeds the permutation the subsets are taken from.
        weight_decay: ν ≥ 0: the objective becomes E(w) = L(w) + (ν/2)|w|² over ``params``, L the loss above,
            in every pass — loss, gradient (+ νw) and Hessian-vector product (+ νv), by either method — added once
            per pass whatever the batch size (:mod:`moller_scg.weight_decay`). Needs a loss that is a mean over
            samples; with ``reduction="sum"`` it is a ``ValueError``. Default 0: the loss alone.

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
        weight_decay: float = 0.0,
    ) -> None:
        check_model_loss_and_progress(model, loss_fn, progress)
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"Invalid hvp_method {hvp_method!r}; choose one of {', '.join(map(repr, HVP_METHODS))}")
        if on_non_finite not in NON_FINITE_POLICIES:
            raise ValueError(
                f"Invalid on_non_finite {on_non_finite!r}; choose one of {', '.join(map(repr, NON_FINITE_POLICIES))}"
            )
        check_cache_bytes(device_cache_bytes)
        validate_subset(curvature_subset, curvature_seed)  # also when f = 1, so a typo never waits for f < 1
        self.distributed = _dist.resolve_distributed(distributed, data)
        self.model = model
        self.loss_fn = loss_fn
        self.params: list[torch.Tensor] = trainable_params(model, params)
        self.reduction = resolve_reduction(loss_fn, reduction)
        self.device = resolve_device(device, self.params)
        self.progress = progress and _dist.is_main_process()
        self.on_non_finite = on_non_finite
        self.passes = PassCounts()
        self.weight_decay = validate_weight_decay(weight_decay)
        penalty = WeightDecay(self.weight_decay, self.params) if self.weight_decay > 0 else None
        self._batch_loss = BatchLoss(loss_fn, self.reduction, penalty)
        shard = (_dist.rank(), _dist.world_size()) if self.distributed else None
        self._model_dtype = model_dtype(self.params)
        data = as_tensor_pair(data, self._model_dtype)  # NumPy arrays become tensors of the model's dtype
        self._batches: Batches
        self._batches, self._samples = make_batches(data, batch_size, self.device, device_cache_bytes, shard)
        if isinstance(self._batches, TensorBatches):
            check_input_dtype(self._batches.inputs, self._model_dtype, "the inputs")
        self.curvature_fraction = validate_fraction(curvature_fraction)
        self.curvature_cursor = CurvatureCursor()
        subsets = curvature_subsets(
            data, self._batches.samples, self.curvature_fraction, curvature_subset, curvature_seed
        )
        self._curvature_samples = curvature_samples(self._samples, self.curvature_fraction, shard)  # N when f = 1
        self._curvature_batches = CurvatureBatches(self._batches, subsets, self.curvature_cursor, device_cache_bytes)
        if self.distributed:
            _dist.check_ranks_agree(self._samples, self.params, self.weight_decay)
        self._derivatives = BatchDerivatives(model, self._batch_loss, self.params, hvp_method)
        reduction_explicit = reduction is not None and getattr(loss_fn, "reduction", None) is None
        self._first_pass_checks = FirstPassChecks(model, self._batch_loss, reduction_explicit)

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
    def defers_gradient(self) -> bool:
        """Whether :meth:`value_then_gradient` stops after the forward and forms E'(w) only when asked: with one batch
        on one process, where the forward's graph is what a gradient pass holds anyway."""
        return not self.distributed and self.num_batches == 1

    @property
    def data_cached_on_device(self) -> bool:
        """Whether the data sits on ``device`` (already there or copied once), so batches are never copied."""
        return self._batches.cached

    @property
    def hvp_method(self) -> str:
        """How :meth:`hvp` differentiates each batch: the ``hvp_method`` given, or ``"double-backward"`` for good
        once ``"forward-over-reverse"`` has failed on the first batch (:mod:`moller_scg.batch_derivatives`).
        With ``"gauss-newton"``, :meth:`hvp` returns the Gauss–Newton product G v instead of E''(w) v."""
        return self._derivatives.method

    @property
    def curvature_window(self) -> int:
        """c, the index of the next rotating curvature window (:attr:`curvature_cursor`'s ``window``)."""
        return self.curvature_cursor.window

    @curvature_window.setter
    def curvature_window(self, window: int) -> None:
        self.curvature_cursor.load_state_dict({"window": window})

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

    def value_then_gradient(self) -> tuple[torch.Tensor, Callable[[], TensorList]]:
        """E(w) now, and E'(w) only when asked: for a trial point that may be rejected on its loss alone.

        With one batch on one process, the pass stops after the forward and keeps that batch's graph (the memory of
        a gradient pass); the returned function runs the backward, **sets** ``.grad`` as the accumulator's call
        does, and returns the gradients — the same bits as ``acc()``. Until it is called the evaluation counts as a
        loss pass (:attr:`passes`), and as a gradient pass from then on; one never completed cost a forward only.
        With more batches, or distributed, keeping every batch's graph would break the one-batch memory bound:
        this is then one gradient pass, and the function returns its gradients.

        Returns:
            E(w), a detached 0-dim float64 tensor, and a function that returns E'(w) at the weights of the forward
            (one tensor per parameter; calling it again returns the same tensors).

        Raises:
            FloatingPointError: as the accumulator's call, from the forward.
        """
        if not self.defers_gradient:
            loss = self()
            gradients = [cast(torch.Tensor, p.grad) for p in self.params]
            return loss, lambda: gradients
        graphs: list[tuple[torch.Tensor, int]] = []
        with restored_on_failure(self.model) as running_statistics:
            sums = self._stream("forward", kept_graphs=graphs)
            loss, _ = self._finish(sums)
            running_statistics.restore_unless_finite(loss)
        self.passes.loss += 1
        formed: list[TensorList] = []

        def gradient() -> TensorList:
            if not formed:
                formed.append(self._backward_of(graphs, sums))
                graphs.clear()
                self.passes.loss -= 1
                self.passes.gradient += 1
            return formed[0]

        return loss, gradient

    def hvp(self, vectors: Sequence[torch.Tensor]) -> TensorList:
        """One pass: s = E''(w) v = Σ_b w_b E_b''(w) v, exactly (with ``hvp_method="gauss-newton"``: the
        Gauss–Newton product G v = Σ_b w_b G_b v instead).

        Args:
            vectors: v, one tensor per parameter of :attr:`params`, in that order and with the same shapes.

        Returns:
            s, one detached tensor per parameter, in the parameter's dtype.
        """
        prepared = hvp_vectors(vectors, self.params)
        batches = self._curvature_batches.next()
        with restored_on_failure(self.model) as running_statistics:
            sums = self._stream("hvp", prepared, batches)
            self._derivatives.end_product_pass()
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
        metric_sums = MetricSums(metrics, self.device)  # checks that metrics maps names to callables
        if "loss" in metrics:
            raise ValueError("'loss' names the loss itself in what evaluate returns: give the metric another name")
        with restored_on_failure(self.model) as running_statistics:
            sums = self._reduce(self._stream("loss", metric_sums=metric_sums))
            loss, _ = self._finish(sums)
            running_statistics.restore_unless_finite(loss)
        means = metric_sums.means(
            cast(torch.Tensor, sums.metrics), cast(torch.Tensor, sums.metric_denominators), sums.samples
        )
        self.passes.loss += 1
        return {"loss": float(loss), **means}

    def __repr__(self) -> str:
        subsets = self._curvature_batches.subsets
        subsampled = "" if subsets is None else f", curvature={subsets!r}"
        return (
            f"{type(self).__name__}(samples={self.samples}, batches={self.num_batches}, "
            f"reduction={self.reduction!r}, device={str(self.device)!r}, hvp_method={self.hvp_method!r}{subsampled})"
        )

    # ----------------------------------------------------------------------------------------------------------
    # One pass: stream → float64 sums → reduce → finish

    def _stream(
        self,
        kind: str,
        vectors: list[torch.Tensor] | None = None,
        batches_to_stream: Batches | None = None,
        metric_sums: MetricSums | None = None,
        kept_graphs: list[tuple[torch.Tensor, int]] | None = None,
    ) -> PassSums:
        """Run every batch once and add up its loss and, for ``kind`` "gradient" or "hvp", its vectors.

        ``batches_to_stream`` defaults to all the data (this process's shard). With ``metric_sums`` (kind
        "loss" only) each metric is added up from the same forward pass as the loss. Kind "forward" adds up the loss
        from a forward with autograd on, and appends each batch's (E_b with its graph, scale) to ``kept_graphs``
        for :meth:`_backward_of`. No host synchronisation happens in the loop: batch losses are written to a device
        buffer and checked once at the end.
        """
        source = self._batches if batches_to_stream is None else batches_to_stream
        self._first_pass_checks.before_pass(source, stacklevel=3)  # the warning points at the user's call
        objective, derivatives = self._batch_loss, self._derivatives
        sums = None if kind in ("loss", "forward") else WideSums(self.params, PARTIAL_SUM_BATCHES)
        # Typed as the loop's "gradient" and "hvp" branches use them: sums is None only for "loss", vectors only
        # for kinds other than "hvp".
        wide_sums, hvp_vectors = cast(WideSums, sums), cast(list[torch.Tensor], vectors)
        expected = source.expected_batches()
        terms = torch.empty(max(expected or 16, 1), dtype=torch.float64, device=self.device)
        scales: list[int] = []
        denominator = torch.zeros((), dtype=torch.float64, device=self.device) if objective.kind == "ratio" else None
        samples = 0
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = source
        if self.progress:
            batches = progress_bar(batches, expected, kind)
        for index, (inputs, targets) in enumerate(batches):
            count = batch_samples(inputs, targets, source, index)
            if index == 0:  # a Dataset or DataLoader shows its dtype only in its batches (tensors: checked up front)
                check_input_dtype(inputs, self._model_dtype, f"the inputs of {source.describe(0)}")
            self._first_pass_checks.on_batch(inputs, targets, count)
            scale = objective.scale(count)
            if kind == "loss":
                with torch.no_grad():
                    outputs = self.model(inputs)
                    term = objective.term(outputs, targets)
                    if metric_sums is not None:
                        metric_sums.add(outputs, targets, count)
            elif kind == "forward":
                with torch.enable_grad():
                    term = objective.term(self.model(inputs), targets)
                cast(list, kept_graphs).append((term, scale))
            else:
                if kind == "gradient":
                    term, batch_vectors = derivatives.gradient(inputs, targets)
                else:  # functional_hvp_and_loss is read from this module at each batch, where tests replace it
                    term, batch_vectors = derivatives.hvp(inputs, targets, hvp_vectors, functional_hvp_and_loss)
                if batch_vectors is not None:  # None: no parameter reaches this batch's loss, so it adds 0
                    wide_sums.add(batch_vectors, scale)
            if index >= terms.numel():
                terms = torch.cat([terms, torch.empty_like(terms)])  # the loader yielded more than len(loader)
            terms[index] = term.detach().reshape(())
            # The batch's graph ends with it: an HVP pass's E_b still holds the forward graph its double backward
            # kept (create_graph), which would otherwise live on through the next batch's forward pass.
            del term
            scales.append(scale)
            if denominator is not None:
                denominator += objective.denominator(targets)
            samples += count
        seen = len(scales)  # 0 is possible (an empty shard, a DataLoader that yields nothing); _finish checks N
        scale_tensor = torch.tensor(scales, dtype=torch.float64).to(self.device)
        loss = torch.dot(terms[:seen], scale_tensor)
        vector_sums = None if sums is None else sums.result()
        return PassSums(
            loss=loss,
            vectors=vector_sums,
            denominator=denominator,
            samples=samples,
            terms=terms[:seen],
            metrics=None if metric_sums is None else metric_sums.sums,
            metric_denominators=None if metric_sums is None else metric_sums.denominators,
        )

    def _backward_of(self, graphs: list[tuple[torch.Tensor, int]], forward_sums: PassSums) -> TensorList:
        """The second half of a gradient pass whose forward kept its graphs (:meth:`value_then_gradient`): each
        batch's ∂E_b/∂w added into float64 sums in the order the forward streamed them, divided as the accumulator's
        call divides them; ``.grad`` is set to the result."""
        wide_sums = WideSums(self.params, PARTIAL_SUM_BATCHES)
        for term, scale in graphs:
            if term.requires_grad:  # otherwise no parameter reaches this batch's loss, and it adds 0
                wide_sums.add(torch.autograd.grad(term, self.params, allow_unused=True), scale)
        sums = dataclasses.replace(forward_sums, vectors=wide_sums.result())
        _, gradients = divided_sums(sums, self._batch_loss.kind, self.samples, self.samples, self.params)
        for p, gradient in zip(self.params, gradients):
            p.grad = gradient
        return gradients

    def _reduce(self, sums: PassSums) -> PassSums:
        """Combine the sums of every process; everything after this step sees the global sums.

        One process holds all the data: the identity. Distributed, the shards are disjoint (a rank may have 0
        samples), so the global loss, vector sums, denominator, metric sums and sample count are the sums over
        ranks: one ``all_reduce`` of a flat float64 buffer (:func:`moller_scg.distributed.all_reduce_sum`). The
        batch losses ``terms`` stay local; they only name a non-finite batch.
        """
        if not self.distributed:
            return sums
        return _dist.reduce_pass_sums(sums, self.device)

    def _finish(
        self, sums: PassSums, streamed: Batches | None = None, expected_samples: int | None = None
    ) -> tuple[torch.Tensor, TensorList]:
        """Check the pass, then divide by the denominator and cast once (:func:`~moller_scg.float64_sums.divided_sums`).

        ``streamed`` and ``expected_samples`` describe a pass over a curvature subset of m of the N samples
        (default: the whole data).
        """
        expected = self.samples if expected_samples is None else expected_samples
        if sums.samples != expected:
            raise ValueError(
                f"the DataLoader yielded {sums.samples} samples in one pass, but its dataset holds {expected}: "
                f"the result would not be the full-batch loss and gradient (check its sampler and batch_sampler)"
            )
        self._check_pass(sums, self._batches if streamed is None else streamed)
        return divided_sums(sums, self._batch_loss.kind, expected, self.samples, self.params)

    # ----------------------------------------------------------------------------------------------------------
    # Checks

    def _check_pass(self, sums: PassSums, streamed: Batches) -> None:
        """Raise ``FloatingPointError`` (or log, with ``on_non_finite="return"``) if a batch loss is not finite."""
        problem = pass_problem(sums, streamed, self.loss_fn, self.distributed, subset=streamed is not self._batches)
        if problem is None:
            return
        if self.on_non_finite == "raise":
            raise FloatingPointError(problem)
        logger.warning("%s; returning the non-finite loss (on_non_finite='return')", problem)
