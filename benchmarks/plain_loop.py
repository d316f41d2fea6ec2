"""A user's training loop, timed: SCG against torch LBFGS with nothing of the benchmark between them.

``benchmarks/peers.py`` and ``benchmarks/one_at_a_time.py`` hand every optimizer a metered run as its closure: it
counts passes, clocks only the optimizer holding the baton and records the weights, work no training loop does.
Here each optimizer gets what a user gives it — the problem's :class:`~moller_scg.GradientAccumulator`, and
``optimizer.step(accumulator)`` in a loop — and the only addition is the clock: a subclass of the accumulator notes
(seconds since the first step, E) at each evaluation, once its gradient is formed (a trial that SCG rejects on its
loss alone, whose gradient is never formed, is noted at its forward). The rows run one after the other, in an order
that alternates between forwards and backwards, ``--repetitions`` times; each time ratio is the median over the
repetitions of the ratio to the same repetition's torch LBFGS(100). The targets are those of
``benchmarks/results/peers.json`` (the README's run), as in ``one_at_a_time.py``.

Usage:
    python benchmarks/plain_loop.py       # regression, logistic, physics-informed; 7 repetitions, ~1 minute
    python benchmarks/plain_loop.py --problems mnist --repetitions 3              # ~4 minutes a repetition
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from one_at_a_time import race_targets, run_command
from peers_adapters import USER_LOOP_MAX_ITER, torch_lbfgs
from peers_problems import PROBLEMS, Problem, make_accumulator
from peers_report import lowest_loss, seconds_to_targets, targets_of

from moller_scg import SCG
from moller_scg.accumulate import GradientAccumulator

ROWS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch LBFGS": lambda params: torch_lbfgs(params, 100, max_iter=USER_LOOP_MAX_ITER),
    "torch LBFGS h=20": lambda params: torch_lbfgs(params, 20, max_iter=USER_LOOP_MAX_ITER),
    "LBFGS no LS": lambda params: torch_lbfgs(params, 100, line_search_fn=None, max_iter=USER_LOOP_MAX_ITER),
    "LBFGS h=20 no LS": lambda params: torch_lbfgs(params, 20, line_search_fn=None, max_iter=USER_LOOP_MAX_ITER),
    "SCG m=20": lambda params: SCG(params, memory=20),
    "SCG m=40": lambda params: SCG(params, memory=40),
    "SCG m=20 diag": lambda params: SCG(params, memory=20, diagonal_scaling=True),
    "SCG m=40 diag": lambda params: SCG(params, memory=40, diagonal_scaling=True),
}
"""The rows, as a user constructs them: the reference torch LBFGS (history 100, strong Wolfe, the race's settings but
for torch's default ``max_iter=20``, which a loop of ``step`` calls takes),
LBFGS at ``SCG(memory=20)``'s memory, the same two without a line search ("no LS": torch's default
``line_search_fn=None``, steps of length 1; docs/performance.md, lever 39), and the SCG modes of
``one_at_a_time.py``."""


class TimedAccumulator(GradientAccumulator):
    """The accumulator a user hands the optimizer, noting (seconds since :meth:`start_clock`, E) at each evaluation
    of the loss: at the end of a gradient pass (``acc()``), and for ``value_then_gradient`` when its gradient is
    formed, or at its forward if it never is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[dict[str, float]] = []
        self._start = time.perf_counter()

    def start_clock(self) -> None:
        self.history.clear()
        self._start = time.perf_counter()

    def _note(self, loss: torch.Tensor) -> None:
        self.history.append({"seconds": time.perf_counter() - self._start, "loss": float(loss)})

    def __call__(self) -> torch.Tensor:
        loss = super().__call__()
        self._note(loss)
        return loss

    def value_then_gradient(self) -> tuple[torch.Tensor, Callable[[], list[torch.Tensor]]]:
        if not self.defers_gradient:  # over several batches this is one gradient pass, which __call__ notes
            return super().value_then_gradient()
        loss, gradient = super().value_then_gradient()
        entry = len(self.history)
        self._note(loss)  # a trial rejected on its loss: its forward is its evaluation
        formed: list[bool] = []

        def gradient_noted() -> list[torch.Tensor]:
            gradients = list(gradient())
            if not formed:  # noted again when its gradient is formed, as a gradient pass is
                formed.append(True)
                self.history[entry]["seconds"] = time.perf_counter() - self._start
            return gradients

        return loss, gradient_noted


def timed_accumulator(problem: Problem, model: torch.nn.Module) -> TimedAccumulator:
    """The accumulator of ``peers_problems.make_accumulator``, timed."""
    accumulator = make_accumulator(problem, model, accumulator_type=TimedAccumulator)
    assert isinstance(accumulator, TimedAccumulator)
    return accumulator


def run_row(problem: Problem, initial: dict[str, torch.Tensor], name: str, last_target: float | None) -> list[dict]:
    """One row from the problem's initial weights, ``optimizer.step(accumulator)`` until the loss is at or below
    ``last_target`` or the problem's budget of evaluations is spent; its noted history."""
    model = problem.make_model()
    model.load_state_dict(initial)
    accumulator = timed_accumulator(problem, model)
    optimizer = ROWS[name]([p for p in model.parameters() if p.requires_grad])
    accumulator.start_clock()
    while len(accumulator.history) < problem.budget:
        optimizer.step(accumulator)
        if last_target is not None and min(h["loss"] for h in accumulator.history) <= last_target:
            break
    return accumulator.history


def plain_loop(problem_name: str, repetitions: int, quick: bool) -> tuple[list[float], dict[str, list[list]]]:
    """The targets, and per row and repetition its seconds to each target."""
    problem = PROBLEMS[problem_name](quick, 0)
    initial = problem.make_model().state_dict()
    targets = None if quick else race_targets(problem_name)
    histories: dict[str, list[list[dict]]] = {name: [] for name in ROWS}
    for repetition in range(repetitions):
        for name in ROWS if repetition % 2 == 0 else reversed(list(ROWS)):
            histories[name].append(run_row(problem, initial, name, None if targets is None else targets[-1]))
    if targets is None:  # the report's rule, over this run's rows
        every_run = [{"history": history} for runs in histories.values() for history in runs]
        targets = targets_of(every_run[0]["history"][0]["loss"], lowest_loss(every_run))
    seconds = {name: [seconds_to_targets({"history": h}, targets) for h in runs] for name, runs in histories.items()}
    return targets, seconds


def main(argv: list[str] | None = None) -> int:
    return run_command(
        argv,
        description=__doc__.split("\n")[0],
        script="plain_loop",
        rows_are="A user's loop, optimizer.step(accumulator), each row alone",
        measure=plain_loop,
        default_repetitions=7,
    )


if __name__ == "__main__":
    sys.exit(main())
