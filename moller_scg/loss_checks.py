"""Checks that a loss defines one full-batch objective, whatever the batch size.

The accumulator computes E(w) = Σ_b w_b E_b(w) (w_b = 1 for a sum, n_b / N for a mean), which is the loss of the
whole dataset at once only if the loss is *additive* over samples: its value on a batch is the sum (or the
sample-weighted mean) of its values on any split of that batch. Two common ways to break this silently:

* a term added once per call — a penalty or regulariser inside a ``reduction="sum"`` loss — is counted once per
  batch, so the full-batch loss grows with the number of batches B = ⌈N / batch_size⌉;
* an element-wise loss (``nn.MSELoss``, …) given outputs of shape (n, 1) and targets of shape (n,) broadcasts
  them to (n, n) and averages over all pairs: another objective, with only a PyTorch warning.

:func:`check_additivity` tests the first on a few samples, once per accumulator (:class:`FirstPassChecks` says
when); :func:`check_same_shape` refuses the second on every batch (a comparison of two shapes).

:func:`pass_problem` is the one host synchronisation of a pass: it names a batch whose loss is not finite, and
refuses class weights that sum to 0.

A model in training mode with dropout or batch norm has no fixed full-batch objective at all:
:func:`warn_if_stochastic` says so once per accumulator (:class:`StochasticObjectiveWarning`), and additivity is
not checked on it (:func:`stochastic_modules`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moller_scg import distributed as _dist

if TYPE_CHECKING:
    from moller_scg.batches import Batches
    from moller_scg.float64_sums import PassSums
    from moller_scg.loss_weighting import BatchLoss

logger = logging.getLogger(__name__)

ADDITIVITY_CHECK_SAMPLES = 8
"""Samples on which additivity is checked once per accumulator (on the whole and on its two halves)."""

ELEMENTWISE_LOSSES: tuple[type[nn.Module], ...] = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.KLDivLoss,
    nn.PoissonNLLLoss,
    nn.SoftMarginLoss,
    nn.MultiLabelSoftMarginLoss,
    nn.HingeEmbeddingLoss,
)
"""``torch.nn`` losses that compare outputs and targets element by element, so both must have one shape."""


class StochasticObjectiveWarning(UserWarning):
    """The model is in training mode with dropout or batch norm, so there is no fixed full-batch objective."""


def is_elementwise_loss(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is one of :data:`ELEMENTWISE_LOSSES` with its own ``forward`` (a subclass that
    overrides ``forward`` may reshape its inputs, so it is trusted)."""
    return any(isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward for cls in ELEMENTWISE_LOSSES)


def check_same_shape(loss_fn: Any, outputs: Any, targets: torch.Tensor) -> None:
    """Refuse outputs and targets of different shapes for an element-wise loss (which would broadcast them)."""
    output_shape = tuple(getattr(outputs, "shape", ()))
    target_shape = tuple(targets.shape)
    if output_shape == target_shape:
        return
    try:
        broadcast = f"would broadcast them to {tuple(torch.broadcast_shapes(output_shape, target_shape))} and "
    except RuntimeError:
        broadcast = ""
    raise ValueError(
        f"the model's outputs have shape {output_shape} but the targets have shape {target_shape}: "
        f"{type(loss_fn).__name__} compares them element by element, so it {broadcast}train another objective. "
        f"Give the targets the outputs' shape (for example targets.reshape({_reshape_hint(output_shape)}) or "
        f"targets.unsqueeze(-1) for outputs of shape (N, 1)), or reshape the model's outputs"
    )


def check_additivity(
    term: Callable[[Any, torch.Tensor], torch.Tensor],
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    reduction: str,
    explicit: bool,
) -> None:
    """Check that E on a few samples is the sum (or the mean) of E on their two halves; ``ValueError`` if not.

    Args:
        term: the batch loss E_b as the accumulator computes it, ``term(outputs, targets)``.
        model: the network, evaluated under ``torch.no_grad()`` on the samples and on their halves.
        inputs: the inputs of the first samples of the data (at least 2; :data:`ADDITIVITY_CHECK_SAMPLES`).
        targets: their targets.
        reduction: ``"sum"`` or ``"mean"``, how the accumulator weights the batch losses.
        explicit: whether ``reduction`` was passed to the accumulator (a claim about an opaque callable) rather
            than read from ``loss_fn.reduction``; only the error message differs.
    """
    count = targets.shape[0]
    half = count // 2
    with torch.no_grad():
        values = [
            term(model(x), t)
            for x, t in ((inputs, targets), (inputs[:half], targets[:half]), (inputs[half:], targets[half:]))
        ]
    whole, first, second = (float(v.double()) for v in values)
    if not all(math.isfinite(value) for value in (whole, first, second)):
        return  # a non-finite loss is the pass's to report, with the batch it comes from
    # The rounding is that of the least precise dtype involved: a float32 model's loss carries float32's even when
    # the loss is returned in float64 (a float64 penalty added, a .double() at the end).
    dtypes = [values[0].dtype, *(p.dtype for p in model.parameters() if p.is_floating_point())]
    if inputs.is_floating_point():
        dtypes.append(inputs.dtype)
    tolerance = math.sqrt(max(torch.finfo(dtype).eps for dtype in dtypes if dtype.is_floating_point))
    as_sum = first + second
    as_mean = (half * first + (count - half) * second) / count
    matches = {
        "sum": abs(whole - as_sum) <= tolerance * (abs(first) + abs(second)),
        "mean": abs(whole - as_mean) <= tolerance * (half * abs(first) + (count - half) * abs(second)) / count,
    }
    if matches[reduction]:
        return
    observed = (
        f"on the first {count} samples it gives {whole:.6g}, and {first:.6g} and {second:.6g} on their two halves"
    )
    other = "mean" if reduction == "sum" else "sum"
    if matches[other]:
        fix = f"pass reduction={other!r}" if explicit else f"make its reduction attribute say {other!r}"
        claim = f"reduction={reduction!r} was given" if explicit else f"loss_fn.reduction is {reduction!r}"
        raise ValueError(f"{claim}, but loss_fn behaves like reduction={other!r}: {observed}; {fix}")
    raise ValueError(
        f"loss_fn is neither a sum nor a mean of per-sample losses: {observed} (as a {reduction} they would give "
        f"{as_sum if reduction == 'sum' else as_mean:.6g}). The full-batch loss would then depend on batch_size "
        f"(so would it if the model's output for one sample depended on the other samples of its batch). "
        f"A term added once per call (a penalty or regulariser) is counted once per batch: scale it by the "
        f"batch's share of the samples, n_b / N, or add it to the loss outside the accumulator; normalisation by "
        f"class weights needs nn.CrossEntropyLoss(weight=...) or nn.NLLLoss(weight=...) (the accumulator divides "
        f"by the total class weight itself)"
    )


def pass_problem(sums: PassSums, streamed: Batches, loss_fn: Any, distributed: bool, subset: bool) -> str | None:
    """What is wrong with a pass's result: ``None`` when every batch loss is finite, else a message naming the batch.

    Distributed, the global loss decides (every rank sees the same one, so all ranks report or none does); the rank
    whose batch is not finite names it, the others say it is on another rank.

    Args:
        sums: the pass's sums, reduced over ranks.
        streamed: the batches the pass streamed (to name a batch by its samples).
        loss_fn: the loss, named in the error for class weights that sum to 0.
        distributed: whether ``sums`` were reduced over a process group.
        subset: whether ``streamed`` is a curvature subset (batch positions are then within it).

    Raises:
        ValueError: the targets' total class weight is 0, so the mean loss is 0/0.
    """
    terms, denominator = sums.terms, sums.denominator
    healthy = torch.isfinite(sums.loss if distributed else terms).all()
    if denominator is not None:
        healthy = healthy & (denominator > 0)
    if bool(healthy):
        return None
    if denominator is not None and not bool(denominator > 0):
        if subset:
            raise ValueError(
                f"the targets' total class weight in this Hessian-vector product's curvature subset is "
                f"{float(denominator)} (every target in it equals ignore_index or has weight 0), so the subset's mean "
                f"{type(loss_fn).__name__} is 0/0: raise curvature_fraction, so that every subset holds targets "
                f"that count (the dataset's own total weight is positive)"
            )
        raise ValueError(
            f"the targets' total class weight is {float(denominator)} (every target equals ignore_index or has "
            f"weight 0), so the mean {type(loss_fn).__name__} over the dataset is 0/0"
        )
    if bool(torch.isfinite(terms).all()):
        return (
            f"the full-batch loss is not finite ({float(sums.loss)}): a batch of another rank's shard has a "
            f"non-finite loss (rank {_dist.rank()} of {_dist.world_size()} has only finite ones)"
        )
    index = int(torch.nonzero(~torch.isfinite(terms))[0, 0])
    where = f" of rank {_dist.rank()}'s shard" if distributed else ""
    if subset:
        where += " (positions within this Hessian-vector product's curvature subset)"
    return (
        f"the loss of {streamed.describe(index)}{where} is not finite ({float(terms[index])}); "
        f"{int((~torch.isfinite(terms)).sum())} of {terms.numel()} batches have a non-finite loss"
    )


def stochastic_modules(model: nn.Module) -> list[str]:
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
        elif isinstance(module, nn.RNNBase) and module.dropout > 0 and module.num_layers > 1:
            names.append(name or type(module).__name__)  # dropout between the recurrent layers
        elif isinstance(module, nn.RReLU):  # a random slope per element in training mode
            names.append(name or type(module).__name__)
    return names


def warn_if_stochastic(model: nn.Module, stacklevel: int) -> bool:
    """Issue a :class:`StochasticObjectiveWarning` if ``model`` is stochastic in training mode; whether it did.

    ``stacklevel`` counts from this function, so that the warning points at the user's call of the accumulator.
    """
    names = stochastic_modules(model)
    if not names:
        return False
    warnings.warn(
        f"the model is in training mode with dropout or batch norm ({', '.join(names[:5])}"
        f"{', …' if len(names) > 5 else ''}): the full-batch objective is not defined — every pass sees other "
        f"dropout masks, batch norm uses per-batch statistics (so the result depends on the batch size) and "
        f"updates its running statistics. Call model.eval() for the deterministic full-batch objective, or "
        f"accept the stochastic objective and silence this StochasticObjectiveWarning",
        StochasticObjectiveWarning,
        stacklevel=stacklevel,
    )
    return True


class FirstPassChecks:
    """The checks an accumulator's passes make until they have been made once, and what they remember.

    Every loss must be additive over samples, or the batch size changes the objective: :func:`check_additivity`
    runs once, on the first :data:`ADDITIVITY_CHECK_SAMPLES` samples of the data (the batch source's head, or for
    a DataLoader, which has none, its first batch of at least 2 samples). An explicit reduction is a claim about an
    opaque callable; a declared one can be wrong too. The ratio kind's S_b is the accumulator's own
    ``F.cross_entropy`` / ``F.nll_loss`` sum, additive by construction, so it is not checked. A stochastic model
    (:func:`stochastic_modules`) is warned about once, on the first pass that finds it so, and its additivity is
    not checked.

    Args:
        model: the network.
        batch_loss: the accumulator's batch loss E_b (its ``term`` and ``kind``).
        reduction_explicit: whether the reduction was passed to the accumulator rather than read from
            ``loss_fn.reduction`` (only the error message differs).
    """

    def __init__(self, model: nn.Module, batch_loss: BatchLoss, reduction_explicit: bool) -> None:
        self.model = model
        self.batch_loss = batch_loss
        self.reduction_explicit = reduction_explicit
        self.additivity_unchecked = batch_loss.kind != "ratio"
        self.warned_stochastic = False

    def before_pass(self, source: Batches, stacklevel: int) -> None:
        """Warn about a stochastic model (once), and check additivity on ``source``'s head if not done yet.

        ``stacklevel`` is as for ``warnings.warn`` called by the caller of this method (1: that caller), so that
        the warning points at the user's call of the accumulator.
        """
        if not self.warned_stochastic:  # + 2: this method's frame and warn_if_stochastic's
            self.warned_stochastic = warn_if_stochastic(self.model, stacklevel=stacklevel + 2)
        head = source.head(ADDITIVITY_CHECK_SAMPLES) if self.additivity_unchecked else None
        if head is not None:
            self._check_additivity(*head)

    def on_batch(self, inputs: torch.Tensor, targets: torch.Tensor, samples: int) -> None:
        """Check additivity on this batch of n_b = ``samples`` samples if it was not checked yet and n_b ≥ 2."""
        if self.additivity_unchecked and samples >= 2:
            self._check_additivity(inputs[:ADDITIVITY_CHECK_SAMPLES], targets[:ADDITIVITY_CHECK_SAMPLES])

    def _check_additivity(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if targets.shape[0] < 2:
            return
        self.additivity_unchecked = False
        if stochastic_modules(self.model):
            logger.debug("additivity not checked: the model is stochastic in training mode")
            return
        # The loss alone: a weight-decay penalty is additive by construction and would only widen the tolerance.
        check_additivity(
            self.batch_loss.data_term, self.model, inputs, targets, self.batch_loss.kind, self.reduction_explicit
        )


def _reshape_hint(shape: tuple[int, ...]) -> str:
    """The arguments of a ``reshape`` to ``shape`` that keep the sample axis free: ``-1, 1`` for (N, 1)."""
    return ", ".join(["-1", *map(str, shape[1:])])
