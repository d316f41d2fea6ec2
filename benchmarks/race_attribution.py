"""Where an optimizer's clocked time goes in the race of ``benchmarks/peers.py``: inside its evaluations, or outside.

The race charges each optimizer the time it holds the baton. This script runs the same race (all the rows of a
problem, interleaved) and splits each row's clocked time, up to a target, into the time spent inside the
``GradientAccumulator``'s evaluations (gradient passes, trial forwards and their deferred backwards) and the rest:
the optimizer's own work and the race's bookkeeping around an evaluation. Measured alone, SCG's own work per step
is about LBFGS's per evaluation on the millisecond problems (``benchmarks/own_work.py``); here the crowd of other
rows runs between any two of its evaluations, and what its code finds in the processor's caches depends on which
row ran just before it. ``--shuffle-order`` passes the baton in a new random order every lap (docs/performance.md,
lever 16).

``--per-evaluation K`` splits it finer, evaluation by evaluation: for each of a row's first K evaluations, the
clocked time outside the evaluations since the previous one (read from the row's clock when it asks for the
evaluation) and the time inside it, medians over the races. ``--with-lean`` races the four rows of
``benchmarks/lean_step.py --race`` instead of the problem's table: LBFGS(100), LBFGS history 20, ``SCG(memory=20)``
and the lean research variant of the same algorithm (docs/performance.md, lever 38).

Usage:
    python benchmarks/race_attribution.py                         # regression, 3 races, the table's order
    python benchmarks/race_attribution.py --shuffle-order
    python benchmarks/race_attribution.py --problem logistic --races 1
    python benchmarks/race_attribution.py --problem logistic --races 9 --shuffle-order --per-evaluation 10 --with-lean
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator
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


@contextlib.contextmanager
def clock_at_each_evaluation() -> Iterator[dict[str, list[float]]]:
    """While open, each run's clock reading (seconds) whenever it asks for an evaluation that it is granted — read
    before the baton is handed on, so the reading is the row's own — by row name; a trial's deferred backward, the
    second half of its evaluation, is not a new one."""
    readings: dict[str, list[float]] = {}
    original_charge = Run.charge

    def watched_charge(self: Run, kind: str, cost: float | None = None, completes_evaluation: bool = False) -> None:
        reading = self.clock.now()
        original_charge(self, kind, cost, completes_evaluation)  # raises BudgetSpent for a pass it refuses
        if not completes_evaluation:
            readings.setdefault(self.name, []).append(reading)

    Run.charge = watched_charge  # type: ignore[method-assign]
    try:
        yield readings
    finally:
        Run.charge = original_charge  # type: ignore[method-assign]


def per_evaluation(
    problem_name: str, races: int, shuffle: bool, evaluations: int, quick: bool = False, with_lean: bool = False
) -> dict[str, dict[str, list[float]]]:
    """Per row: ``outside``, the clocked ms outside the evaluations before each of its first ``evaluations``
    evaluations (since the previous one; before the first: since the row started), and ``inside``, the ms inside
    each, medians over ``races`` races, in the table's order. ``with_lean``: the four rows of
    ``lean_step.py --race``. A row whose run makes its own accumulator (``SCG exact, 10% curv.``) is left out: its
    evaluations are not timed."""
    problem = PROBLEMS[problem_name](quick, 0)
    initial = problem.make_model().state_dict()
    costs = calibrate(problem, initial)
    outside: dict[str, list[list[float]]] = {}
    inside: dict[str, list[list[float]]] = {}
    with contextlib.ExitStack() as stack:
        if with_lean:
            import lean_step
            import peers

            stack.enter_context(lean_step._replaced(peers, {"optimizers": lean_step.race_optimizers(False)}))
        for number in range(races):
            with clock_at_each_evaluation() as readings:
                results, totals = timed_race(problem, initial, costs, 1000 * problem.seed + number if shuffle else None)
            # In the table's order; a row that replaced its accumulator (the subsampled one) has no timed evaluation.
            for name in (r["name"] for r in results if r["name"] in readings and totals.get(r["name"])):
                clock = readings[name]
                count = min(evaluations, len(clock), len(totals[name]))
                inside_before = [0.0, *totals[name][: count - 1]]  # seconds inside the evaluations before each
                outside_before = [c - i for c, i in zip(clock[:count], inside_before)]
                outside.setdefault(name, []).append(
                    [1e3 * (b - a) for a, b in zip([0.0, *outside_before], outside_before)]
                )
                inside.setdefault(name, []).append([1e3 * (b - a) for a, b in zip(inside_before, totals[name][:count])])
    return {name: {"outside": _medians(outside[name]), "inside": _medians(inside[name])} for name in outside}


def _medians(per_race: list[list[float]]) -> list[float]:
    """Position by position, the median over the races (as far as every race goes)."""
    length = min(len(values) for values in per_race)
    return [statistics.median(values[i] for values in per_race) for i in range(length)]


def per_evaluation_lines(split: dict[str, dict[str, list[float]]]) -> list[str]:
    """:func:`per_evaluation`'s medians, two lines per row, with running totals."""
    lines = []
    for name, parts in split.items():
        for part in ("outside", "inside"):
            values = parts[part]
            running = [sum(values[: i + 1]) for i in range(len(values))]
            lines.append(
                f"{name:26s} {part:7s} ms before/of evaluation 1..{len(values)}: "
                + " ".join(f"{v:.3f}" for v in values)
                + "  (running total: "
                + " ".join(f"{t:.2f}" for t in running)
                + ")"
            )
    return lines


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
    parser.add_argument(
        "--per-evaluation", type=int, default=0, metavar="K", help="instead: each of the first K evaluations' split"
    )
    parser.add_argument("--with-lean", action="store_true", help="with --per-evaluation: lean_step.py --race's rows")
    args = parser.parse_args(argv)
    if args.with_lean and not args.per_evaluation:
        parser.error("--with-lean goes with --per-evaluation")
    torch.set_num_threads(1)
    warm_up()
    command = " ".join(["python benchmarks/race_attribution.py", *(sys.argv[1:] if argv is None else argv)])
    print("; ".join(f"{key} {value}" for key, value in environment(command).items()))
    if args.per_evaluation:
        split = per_evaluation(
            args.problem, args.races, args.shuffle_order, args.per_evaluation, args.quick, args.with_lean
        )
        for line in per_evaluation_lines(split):
            print(line, flush=True)
        return 0
    for line in attribution(args.problem, args.races, args.shuffle_order, args.quick):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
