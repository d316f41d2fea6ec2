"""What a pass over the data adds up, in float64: Σ_b scale_b · v_b per parameter, and the pass's totals.

A pass adds every batch's loss term and gradient (or Hessian-vector product) into float64 sums and divides once at
the end (:func:`divided_sums`), so the result does not drift with the number of batches B. Adding every batch
straight into float64 costs a read-modify-write of all of w per batch, the dominant per-batch cost on CPU;
:class:`WideSums` therefore sums a block of consecutive batches in float32 first (a float32 parameter's own dtype;
float16 and bfloat16 parameters' too, whose range a mean's n_b · E_b' can leave) and adds the block into float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class PassSums:
    """What one pass adds up, before the reduce step; with a process group the reduce step all-reduces it.

    Attributes:
        loss: Σ_b w̃_b E_b, a 0-dim float64 tensor (w̃_b = n_b for a mean, 1 otherwise).
        vectors: Σ_b w̃_b E_b' or Σ_b w̃_b E_b'' v per parameter, in float64 (complex128 for complex
            parameters), or ``None`` for a loss-only pass.
        denominator: Σ_b D_b (0-dim float64 tensor) for a class-weighted ratio, ``None`` otherwise.
        samples: Σ_b n_b, the number of samples seen.
        terms: this process's batch losses E_b (never reduced), to name a non-finite batch.
        metrics: for :meth:`moller_scg.GradientAccumulator.evaluate`, Σ_b scale_b M_b per metric M (float64, one
            entry per metric), ``None`` otherwise.
        metric_denominators: Σ_b D_b per metric, for metrics of the class-weighted ratio kind (0 for the others).
    """

    loss: torch.Tensor
    vectors: list[torch.Tensor] | None
    denominator: torch.Tensor | None
    samples: int
    terms: torch.Tensor
    metrics: torch.Tensor | None = None
    metric_denominators: torch.Tensor | None = None


class WideSums:
    """Σ_b scale_b · v_b per parameter, in float64 (complex128 for complex parameters).

    Parameters already in float64 (complex128) are added into the totals batch by batch. For narrower
    parameters, up to ``partial_sum_batches`` consecutive batches are first summed in float32 (complex64) and that
    partial sum is then added into the float64 total: the float64 read-modify-write of all of w, the dominant
    per-batch cost on CPU, is paid once per block instead of once per batch. The error this adds is at most
    2·partial_sum_batches float32 roundings, whatever the number of batches, so the result still does not drift
    with B (``tests/test_accumulate.py``, float32 over 4096 batches). A float16 or bfloat16 parameter's partial sums
    are float32 too: scale_b · v_b of a mean loss (scale_b = n_b) overflows float16 for |v_b| > 65504 / n_b.

    Args:
        params: the parameters w, whose shapes and dtypes the sums take.
        partial_sum_batches: the block size (:data:`moller_scg.accumulate.PARTIAL_SUM_BATCHES`; 1 adds every
            batch's scale_b · v_b, formed in float32, into float64).
    """

    def __init__(self, params: Sequence[torch.Tensor], partial_sum_batches: int) -> None:
        self.totals = [torch.zeros_like(p, dtype=wide_dtype(p.dtype)) for p in params]
        self._narrow = [p.dtype != total.dtype for p, total in zip(params, self.totals)]
        self._partial_dtypes = [torch.promote_types(p.dtype, torch.float32) for p in params]
        self._partials: list[torch.Tensor | None] = [None] * len(self.totals)
        self._pending = 0
        self._partial_sum_batches = partial_sum_batches

    def add(self, vectors: Sequence[torch.Tensor | None], scale: int) -> None:
        """Σ ← Σ + scale · v; a ``None`` vector (a parameter the batch loss does not reach) adds nothing."""
        for index, vector in enumerate(vectors):
            if vector is None:
                continue
            if not self._narrow[index]:
                self.totals[index].add_(vector, alpha=scale)
            elif (partial := self._partials[index]) is None:
                # A new tensor (autograd's result may be a shared view), in float32 at least.
                self._partials[index] = vector.to(self._partial_dtypes[index]) * scale
            else:
                partial.add_(vector, alpha=scale)
        self._pending += 1
        if self._pending == self._partial_sum_batches:
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


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64, or complex128 for complex parameters."""
    return torch.complex128 if dtype.is_complex else torch.float64


def divided_sums(
    sums: PassSums, kind: str, expected_samples: int, all_samples: int, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The end of a pass: the sums divided by their denominator and cast once, (E as a detached 0-dim float64
    tensor, one vector per parameter in its dtype, or none for a loss-only pass).

    Args:
        sums: the pass's sums, after the reduce step.
        kind: the batch loss's kind (:class:`moller_scg.loss_weighting.BatchLoss`): ``"mean"`` divides by the
            samples seen, ``"ratio"`` by Σ_b D_b, ``"sum"`` by nothing.
        expected_samples: m, the samples of the pass (N, or a curvature subset of m of them); ``all_samples``: N.
            A sum over m < N samples estimates the sum over N after scaling by N/m; a mean is the subset's own mean.
        params: the parameters, whose dtypes the vectors are cast to.
    """
    denominator: torch.Tensor | int | float = 1
    if kind == "mean":
        denominator = sums.samples
    elif kind == "ratio":
        denominator = sums.denominator  # type: ignore[assignment]
    elif expected_samples != all_samples:
        denominator = expected_samples / all_samples  # "sum" over a subset: Σ_S · N/m
    loss = sums.loss / denominator
    vectors = []
    if sums.vectors is not None:
        vectors = [(s / denominator).to(p.dtype) for s, p in zip(sums.vectors, params)]
    return loss.detach(), vectors
