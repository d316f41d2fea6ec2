"""Batch norm's running statistics, put back when a pass over the data fails.

In training mode every forward pass of a batch-norm module updates its running mean μ̂ and variance σ̂² (and
``num_batches_tracked``). A pass that then fails — a non-finite batch loss, an exception in the middle — would
leave them holding statistics of weights the optimizer rejects, NaN after a non-finite batch, and evaluation mode
would use them. :func:`restored_on_failure` snapshots the buffers of the batch-norm modules in training mode
before a pass and copies them back if the pass raises or its loss E is not finite. A pass that succeeds keeps its
updates, as a plain training loop would (the accumulator warns that training-mode batch norm has no fixed
full-batch objective: :class:`moller_scg.StochasticObjectiveWarning`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy


class RunningStatistics:
    """A copy of the running-statistics buffers of every batch-norm (and instance-norm) module of ``model`` in
    training mode.

    Empty (and free) when there is none: a model in evaluation mode, or without batch norm.
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = [
            (buffer, buffer.detach().clone())
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.training  # batch and instance norm
            for buffer in module.buffers(recurse=False)
            if not is_lazy(buffer)
        ]

    def restore(self) -> None:
        """Copy the saved values back into the buffers, in place (so every reference to them sees it)."""
        with torch.no_grad():
            for buffer, saved in self._saved:
                buffer.copy_(saved)

    def restore_unless_finite(self, loss: torch.Tensor | float) -> None:
        """Restore when the pass's loss E is not finite (a host synchronisation only when there is a snapshot)."""
        if self._saved and not bool(torch.isfinite(torch.as_tensor(loss))):
            self.restore()


@contextlib.contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[RunningStatistics]:
    """Snapshot the training-mode batch-norm statistics; restore them if the block raises.

    The block calls :meth:`RunningStatistics.restore_unless_finite` with its loss for a pass that returns a
    non-finite loss instead of raising.
    """
    statistics = RunningStatistics(model)
    try:
        yield statistics
    except BaseException:
        statistics.restore()
        raise
