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
from typing import Any

import torch
from common import environment
from own_work import TimedAccumulator
from peers import race
from peers_adapters import warm_up
from peers_metering import Run, calibrate
from peers_problems import PROBLEMS
from peers_report import analyse, best_adam, first_reaching

ROWS = ("torch LBFGS", "SCG m=20", "SCG m=20 diag", "SCG m=40", "SCG m=40 diag")
"""The rows reported (all rows of the problem race)."""


def timed_race(
    problem: Any, initial: dict[str, torch.Tensor], costs: dict[str, float], shuffle_seed: int | None
) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """One race of all the problem's rows (``peers.race``), each run's accumulator an ``own_work.TimedAccumulator``;
    also, per row, the seconds inside its evaluations after each evaluation."""
    totals: dict[str, list[float]] = {}
    original_init = Run.__init__

    def watched_init(self: Run, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.acc.__class__ = TimedAccumulator
        self.acc.evaluation_totals = totals[self.name] = []

    Run.__init__ = watched_init  # type: ignore[method-assign]
    try:
        return race(problem, initial, costs, shuffle_seed=shuffle_seed), totals
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
        results, totals = timed_race(problem, initial, costs, 1000 * problem.seed + number if shuffle else None)
        target = analyse(problem, best_adam(results))["targets"][target_index]  # the targets of peers.py
        by_name = {r["name"]: r for r in results}
        for name in ROWS:
            hit = first_reaching(by_name[name]["history"], target)
            if hit is None:
                lines.append(f"race {number + 1}  {name:16s} T{target_index + 1} not reached")
                continue
            evaluations = hit["evaluations"]
            inside = totals[name][evaluations - 1]
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
