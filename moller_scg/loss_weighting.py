"""How each batch's loss enters the full-batch objective: E = Σ_b scale_b · term_b / denominator.

For a loss that is a sum or a mean of per-sample terms the full-batch objective is a weighted sum of the batch
losses E_b, E(w) = Σ_b w_b E_b(w), with w_b = 1 for ``reduction="sum"`` and w_b = n_b / N for ``reduction="mean"``
— not 1/B: averaging the batch means is wrong as soon as the last batch is smaller. ``nn.CrossEntropyLoss`` and
``nn.NLLLoss`` with class indices divide by the total weight of the targets instead of their count (class
weights, targets equal to ``ignore_index``), so for them E = Σ_b S_b / Σ_b D_b, with S_b the batch's summed loss
and D_b the sum of its targets' class weights. :class:`BatchLoss` computes term_b, scale_b and D_b;
:func:`resolve_reduction` reads which of these a loss is, never guessing. Metrics are weighted the same way, as
means over the samples (:class:`MetricSums`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from moller_scg.input_checks import describe_value
from moller_scg.loss_checks import check_same_shape, is_elementwise_loss
from moller_scg.weight_decay import WeightDecay

REDUCTIONS = ("mean", "sum", "batchmean")
"""Reductions the accumulator can weight exactly ("batchmean", as in ``nn.KLDivLoss``, is a mean over samples)."""


class BatchLoss:
    """The loss as E = Σ_b scale_b · term_b / denominator; one of three kinds.

    * ``"sum"``: term_b = loss_fn(outputs, targets), scale_b = 1, denominator 1.
    * ``"mean"``: term_b = loss_fn(outputs, targets), scale_b = n_b, denominator N.
    * ``"ratio"`` (``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with ``reduction="mean"``): term_b is the batch's
      summed loss S_b, scale_b = 1, denominator Σ_b D_b (the targets' class weights, ignored targets excluded).

    With ``weight_decay`` (:mod:`moller_scg.weight_decay`), term_b also carries the batch's share of the penalty
    (:meth:`term`); the ``"sum"`` kind refuses it with a ``ValueError``.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        reduction: str,
        weight_decay: WeightDecay | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.elementwise = is_elementwise_loss(loss_fn)
        if reduction == "sum":
            self.kind = "sum"
        elif is_class_index_loss(loss_fn):
            self.kind = "ratio"
        else:
            self.kind = "mean"
        if weight_decay is not None and self.kind == "sum":
            raise ValueError(
                "weight_decay adds (ν/2)|w|² once to a mean over samples, but loss_fn sums over them "
                "(reduction='sum'), so the penalty's share of a batch is undefined: use reduction='mean', or add "
                "the penalty to the loss yourself outside the accumulator"
            )
        self.weight_decay = weight_decay

    def term(
        self, outputs: torch.Tensor, targets: torch.Tensor, weights: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """term_b, with the batch's share of the weight-decay penalty P(w) when there is one: P itself for the mean
        kind (scaled by n_b / N outside), D_b · P for the ratio kind (divided by Σ_b D_b), so that the pass adds P
        once. ``weights`` are what ``torch.func`` evaluates P at instead of the parameters themselves."""
        term = self.data_term(outputs, targets)
        if self.weight_decay is None:
            return term
        return term + self.penalty_share(targets) * self.weight_decay.penalty(weights)

    def penalty_share(self, targets: torch.Tensor) -> torch.Tensor | int:
        """How many times the batch's term carries the penalty P: 1 for the mean kind, D_b for the ratio kind."""
        return 1 if self.kind == "mean" else self.denominator(targets)

    def data_term(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """term_b of the loss alone, without the weight-decay penalty (what the additivity check examines)."""
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
        # Class indices as int64: indexing with a uint8 (or bool) tensor would read it as a mask.
        return (weight[torch.where(kept, targets, 0).long()] * kept).sum(dtype=torch.float64)


def is_class_index_loss(loss_fn: Any) -> bool:
    """Whether the mean is normalised by class weights: CrossEntropyLoss/NLLLoss with their own ``forward``."""
    return any(
        isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward for cls in (nn.CrossEntropyLoss, nn.NLLLoss)
    )


def resolve_reduction(loss_fn: Any, reduction: str | None) -> str:
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
            f"cannot tell how loss_fn {describe_value(loss_fn)} reduces over samples (it has no 'reduction' "
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


class MetricSums:
    """Σ_b scale_b M_b and Σ_b D_b per metric M, in float64, from the forward pass the loss already made.

    Each metric is weighted as a ``reduction="mean"`` loss (:class:`BatchLoss`), so its full-batch value is
    Σ_b n_b M_b / N, or Σ_b S_b / Σ_b D_b for ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` used as metrics.

    Args:
        metrics: name → ``metric(outputs, targets)``, the batch mean of a per-sample score.
        device: where the sums are kept.

    Raises:
        TypeError: ``metrics`` is not a mapping of ``str`` names to callables.
    """

    def __init__(self, metrics: Mapping[str, Callable[[Any, torch.Tensor], torch.Tensor]], device: torch.device):
        if not isinstance(metrics, Mapping) or not all(
            isinstance(name, str) and callable(metric) for name, metric in metrics.items()
        ):
            raise TypeError(
                f"metrics must map names to callables metric(outputs, targets), got {describe_value(metrics)}"
            )
        self.names = list(metrics)
        self.weightings = [BatchLoss(metric, "mean") for metric in metrics.values()]
        self.sums = torch.zeros(len(self.weightings), dtype=torch.float64, device=device)
        self.denominators = torch.zeros_like(self.sums)

    def add(self, outputs: Any, targets: torch.Tensor, samples: int) -> None:
        """Add one batch of n_b = ``samples`` samples."""
        for index, metric in enumerate(self.weightings):
            term = metric.term(outputs, targets).detach().reshape(()).to(torch.float64)
            self.sums[index] += term * metric.scale(samples)
            if metric.kind == "ratio":
                self.denominators[index] += metric.denominator(targets)

    def means(self, sums: torch.Tensor, denominators: torch.Tensor, samples: int) -> dict[str, float]:
        """name → the metric's full-batch mean, from the (reduced) ``sums``, ``denominators`` and N = ``samples``."""
        sum_values, denominator_values = sums.tolist(), denominators.tolist()
        return {
            name: sum_values[index] / (denominator_values[index] if metric.kind == "ratio" else samples)
            for index, (name, metric) in enumerate(zip(self.names, self.weightings))
        }
