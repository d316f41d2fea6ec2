"""When :func:`~moller_scg.fit` stops, and why: the stop rules, validation early stopping and signal handling.

Before each iteration :func:`budget_exhausted` checks the budgets (``max_iter``, ``max_time``) and a stop asked for by
a signal (:class:`StopRequests`), and :func:`agreed` makes every rank of a distributed run act on the same answer.
After each iteration :func:`converged` checks the goal, the gradient, validation early stopping
(:class:`EarlyStopping`) and stalls; with annealing restarts, :func:`restart_instead` lets a due restart replace a
stall. The reasons are those of :data:`moller_scg.history.STOP_REASONS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from moller_scg import distributed as _dist
from moller_scg.annealing import Annealer
from moller_scg.history import History
from moller_scg.scg import LAMBDA_MAX

logger = logging.getLogger(__name__)

BUDGET_REASONS = (None, "max_iter", "max_time", "interrupted")
"""The reasons to stop before an iteration, in the order ranks agree on them (the largest any rank has wins)."""


@dataclasses.dataclass
class EarlyStopping:
    """What validation early stopping remembers: the best validation loss, its weights, and the failures since."""

    best_loss: float = math.inf
    best_iteration: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    fails: int = 0

    def update(self, model: nn.Module, k: int, val_loss: float, moved: bool) -> None:
        """A new best is remembered; a successful step (the weights ``moved``) that is no better is one fail."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_iteration, self.fails = val_loss, k, 0
            self.best_weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
        elif moved:
            self.fails += 1

    def state_dict(self) -> dict[str, Any]:
        """The record as a plain dict (the best weights are the tensors held, not copies)."""
        # Not dataclasses.asdict: it would deep-copy the best weights, a model-sized copy at every checkpoint.
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> EarlyStopping:
        """The record saved by :meth:`state_dict`; an empty dict (a checkpoint without one) is a fresh record."""
        return cls(**state)


class StopRequests:
    """Turns the first Ctrl-C or SIGTERM into a request to stop after the current iteration.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once (SCG then restores the accepted weights). Handlers are
    installed only in the main thread and are put back as they were on exit. A signal the process ignores (a job
    started with ``nohup`` or in the background of a non-interactive shell ignores SIGINT) stays ignored.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: stopping after the current iteration", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequests]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


def agreed(reason: str | None) -> str | None:
    """The stop reason all ranks act on: time and signals are rank-local, and a rank that stops alone would leave
    the others waiting in their next all-reduce. Without a process group, ``reason`` itself."""
    if not _dist.is_distributed():
        return reason
    return BUDGET_REASONS[_dist.agree_on_max(BUDGET_REASONS.index(reason))]


def budget_exhausted(
    history: History, max_iter: int, max_time: float | None, started: float, stops: StopRequests
) -> str | None:
    """The reason to stop before the next iteration: iteration or time budget used, or a stop was requested."""
    if stops.requested:
        return "interrupted"
    if len(history) >= max_iter:
        return "max_iter"
    if max_time is not None and time.perf_counter() - started >= max_time:
        return "max_time"
    return None


def converged(
    history: History,
    goal: float | None,
    min_grad: float | None,
    max_fail: int | None,
    max_stall: int,
    early: EarlyStopping,
    stall_since: int = 0,
) -> str | None:
    """The reason to stop after the iteration just recorded, if any.

    The stall rule looks only at the rows from ``stall_since`` on (those after the latest annealing restart).
    """
    row = history.last
    if goal is not None and row["loss"] <= goal:
        return "goal"
    if row["residual_norm"] == 0.0 or (min_grad is not None and row["residual_norm"] <= min_grad):
        return "min_grad"
    if max_fail is not None and early.fails >= max_fail:
        return "max_fail"
    losses = history["loss"][stall_since:]
    if losses and (row["lambd"] >= LAMBDA_MAX or iterations_without_decrease(losses) >= max_stall):
        return "stalled"
    return None


def restart_instead(annealer: Annealer, history: History, min_grad: float | None) -> str | None:
    """The stop reason after the annealing had its say: a due restart replaces a stall (or a zero gradient)."""
    stop = history.stop_reason
    zero_gradient = stop == "min_grad" and min_grad is None
    if stop not in (None, "stalled") and not zero_gradient:
        annealer.pending = None
        return stop
    restart = annealer.decide(history, "zero_gradient" if zero_gradient else stop)
    return None if restart is not None else stop


def iterations_without_decrease(losses: list[float]) -> int:
    """How many of the latest iterations did not lower the loss below its value before them."""
    count, best = 0, losses[-1]
    for earlier in reversed(losses[:-1]):
        if earlier > best:
            break
        count += 1
    return count


def callback_says_stop(callback: Any, answer: Any) -> bool:
    """A callback's answer (``fit``'s callbacks, ``minimize``'s ``callback``) as a bool: any true value stops the
    run, NumPy and one-element tensor booleans included.

    Raises:
        TypeError: the answer is neither true nor false (a tensor of several elements, an object whose ``__bool__``
            raises).
    """
    try:
        return bool(answer)
    except Exception as error:
        raise TypeError(
            f"the callback {callback!r:.80} returned {answer!r:.80}, which is neither true nor false: return True to "
            f"stop the run, False or None to go on"
        ) from error
