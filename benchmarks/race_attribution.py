"""Where an optimizer's clocked time goes in the race of ``benchmarks/peers.py``: inside its evaluations, or outside.

The race charges each optimizer the time it holds the baton. This script runs the same race (all the rows of a
problem, interleaved) and splits each row's clocked time, up to a target, into the time spent inside the
``GradientAccumulator``'s evaluations (gradient passes, trial forwards and their deferred backwards) and the rest:
the optimizer's own work and the race's bookkeeping around an evaluation. Measured alone, SCG's own work per step
is about LBFGS's per evaluation on the millisecond problems (``benchmarks/own_work.py``); here the crowd of other
rows runs between any two of its evaluations, and what its code finds in the processor's caches depends on which
row ran just before it. ``--shuffle-order`` passes the baton in a new random order every lap (docs/performance.md,
lever 16).

Usage:
    python benchmarks/race_attribution.py                         # regression, 3 races, the table's order
    python benchmarks/race_attribution.py --shuffle-order
    python benchmarks/race_attribution.py --problem logistic --races 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from common import environment
from peers import race
from peers_adapters import warm_up
from peers_metering import Run, calibrate
from peers_problems import PROBLEMS
from peers_report import analyse, best_adam, first_reaching

from moller_scg import GradientAccumulator

ROWS = ("torch LBFGS", "SCG m=20", "SCG m=20 diag", "SCG m=40", "SCG m=40 diag")
"""The rows reported (all rows of the problem race)."""


class EvaluationClock:
    """Seconds each run spends inside its accumulator's evaluations, and the running total after each evaluation."""

    def __init__(self) -> None:
        self.inside: dict[str, float] = defaultdict(float)
        self.after_evaluation: dict[str, list[float]] = defaultdict(list)

    def timed(self, name: str, evaluation: Callable, ends_evaluation: bool) -> Callable:
        """``evaluation`` timed for run ``name``; ``ends_evaluation=False`` for a trial's deferred backward, which
        completes the evaluation its forward began (its time goes to that evaluation)."""

        def wrapper(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return evaluation(*args)
            finally:
                self.inside[name] += time.perf_counter() - started
                if ends_evaluation:
                    self.after_evaluation[name].append(self.inside[name])
                else:
                    self.after_evaluation[name][-1] = self.inside[name]

        return wrapper


class TimedEvaluations(GradientAccumulator):
    """A run's accumulator whose evaluations its :class:`EvaluationClock` times (set ``clock`` and ``run_name``)."""

    clock: EvaluationClock
    run_name: str

    def __call__(self) -> torch.Tensor:
        return self.clock.timed(self.run_name, super().__call__, True)()

    def value_then_gradient(self) -> tuple[torch.Tensor, Callable]:
        loss, gradient = self.clock.timed(self.run_name, super().value_then_gradient, True)()
        return loss, self.clock.timed(self.run_name, gradient, False)


def timed_race(
    problem: Any, initial: dict[str, torch.Tensor], costs: dict[str, float], shuffle_seed: int | None
) -> tuple[list[dict[str, Any]], EvaluationClock]:
    """One race of all the problem's rows (``peers.race``) with every run's evaluations timed."""
    clock = EvaluationClock()
    original_init = Run.__init__

    def watched_init(self: Run, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.acc.__class__ = TimedEvaluations
        self.acc.clock, self.acc.run_name = clock, self.name

    Run.__init__ = watched_init  # type: ignore[method-assign]
    try:
        return race(problem, initial, costs, shuffle_seed=shuffle_seed), clock
    finally:
        Run.__init__ = original_init  # type: ignore[method-assign]


def attribution(problem_name: str, races: int, shuffle: bool, quick: bool = False, target_index: int = 1) -> list[str]:
    """Per race and row: evaluations to the target (T2 by default), clocked ms per evaluation, and its part inside
    the evaluations and outside them (``quick``: the problem's ``--quick`` size)."""
    problem = PROBLEMS[problem_name](quick, 0)
    initial = problem.make_model().state_dict()
    costs = calibrate(problem, initial)
    lines = []
    for number in range(races):
        results, clock = timed_race(problem, initial, costs, 1000 * problem.seed + number if shuffle else None)
        target = analyse(problem, best_adam(results))["targets"][target_index]  # the targets of peers.py
        by_name = {r["name"]: r for r in results}
        for name in ROWS:
            hit = first_reaching(by_name[name]["history"], target)
            if hit is None:
                lines.append(f"race {number + 1}  {name:16s} T{target_index + 1} not reached")
                continue
            evaluations = hit["evaluations"]
            inside = clock.after_evaluation[name][evaluations - 1]
            lines.append(
                f"race {number + 1}  {name:16s} {evaluations:4d} evaluations to T{target_index + 1}: "
                f"{hit['seconds'] / evaluations * 1e3:.3f} ms each clocked = {inside / evaluations * 1e3:.3f} inside "
                f"the evaluations + {(hit['seconds'] - inside) / evaluations * 1e3:.3f} outside"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=["regression", "logistic", "pinn"], default="regression")
    parser.add_argument("--races", type=int, default=3)
    parser.add_argument("--shuffle-order", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the problem at its --quick size (for the tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warm_up()
    command = " ".join(["python benchmarks/race_attribution.py", *(sys.argv[1:] if argv is None else argv)])
    print("; ".join(f"{key} {value}" for key, value in environment(command).items()))
    for line in attribution(args.problem, args.races, args.shuffle_order, args.quick):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
