"""The race's rows run one at a time, as a user's training loop runs an optimizer: does the race's verdict hold?

``benchmarks/peers.py`` runs every optimizer of a problem at once, in threads that hand one baton round-robin, so
that the shared machine's slow stretches fall on every row alike. The price: between two evaluations of one
optimizer the other 17 rows run, and evict its code and data from the processor's caches, which no training loop
does (``benchmarks/race_attribution.py``: the crowd nearly doubles everyone's evaluations). Here each row runs
alone, without threads or baton, to the budget; the rows take turns in an order that alternates between forwards
and backwards, ``--repetitions`` times, and each time ratio is the median over the repetitions of the ratio to the
same repetition's torch LBFGS(100). The targets are those of ``benchmarks/results/peers.json`` (the README's run),
so that the two verdicts are about the same losses; a problem that file lacks (or ``--quick``) takes them from its
own rows by the report's rule.

Usage:
    python benchmarks/one_at_a_time.py        # regression, logistic, physics-informed; 5 repetitions, ~2 minutes
    python benchmarks/one_at_a_time.py --problems mnist --repetitions 3          # ~6 minutes a repetition
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import environment
from peers import race
from peers_adapters import optimizers, warm_up
from peers_metering import calibrate
from peers_problems import PROBLEMS
from peers_report import REFERENCE, TARGET_GAPS, TIME_GOAL, lowest_loss, seconds_to_targets, targets_of

ROWS = ("torch LBFGS", "torch LBFGS h=20", "SCG m=20", "SCG m=40", "SCG m=20 diag", "SCG m=40 diag")
"""The rows run (of ``peers_adapters.optimizers``): the reference, LBFGS at SCG(memory=20)'s memory, the SCG modes."""
RESULTS = Path(__file__).resolve().parent / "results"
RACE_RESULTS = RESULTS / "peers.json"


def race_targets(problem_name: str, path: Path = RACE_RESULTS) -> list[float] | None:
    """T1 / T2 / T3 of ``problem_name`` in the race's results, or ``None`` if it has none — or if that race was not of
    the same problem: a ``--quick`` run, or one with a ``--seed`` other than 0 (another data split and start)."""
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    command = results.get("environment", {}).get("command", "").split()
    seed = command[command.index("--seed") + 1] if "--seed" in command[:-1] else "0"
    if results.get("quick") or seed != "0":
        return None
    return next((b["analysis"]["targets"] for b in results["problems"] if b["problem"]["name"] == problem_name), None)


def one_at_a_time(problem_name: str, repetitions: int, quick: bool) -> tuple[list[float], dict[str, list[list]]]:
    """The targets, and per row and repetition its seconds to each target, every row run alone."""
    problem = PROBLEMS[problem_name](quick, 0)
    initial = problem.make_model().state_dict()
    costs = calibrate(problem, initial)
    table = optimizers(problem)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ROWS}
    for repetition in range(repetitions):
        for name in ROWS if repetition % 2 == 0 else reversed(ROWS):
            runs[name].append(race(problem, initial, costs, {name: table[name]}, interleaved=False)[0])
    targets = None if quick else race_targets(problem_name)
    if targets is None:
        every_run = [result for results in runs.values() for result in results]
        targets = targets_of(every_run[0]["history"][0]["loss"], lowest_loss(every_run))  # the report's rule
    return targets, {name: [seconds_to_targets(r, targets) for r in results] for name, results in runs.items()}


def ratio_cells(seconds: list[list], reference: list[list]) -> list[str]:
    """Per target: the median over repetitions of the ratio to the same repetition's reference, and its range."""
    cells = []
    for index in range(len(TARGET_GAPS)):
        ratios = [s[index] / r[index] for s, r in zip(seconds, reference) if s[index] is not None and r[index]]
        cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else "—")
    return cells


def report(problem_name: str, targets: list[float], seconds: dict[str, list[list]]) -> list[str]:
    reference = seconds[REFERENCE]
    reached = [[s for s in (rep[i] for rep in reference) if s is not None] for i in range(len(TARGET_GAPS))]
    lines = [
        f"## {problem_name}: targets T1 / T2 / T3 = " + " / ".join(f"{t:.4g}" for t in targets),
        "torch LBFGS reaches them in "
        + " / ".join(f"{statistics.median(r) * 1e3:.1f}" if r else "—" for r in reached)
        + " ms (medians over the repetitions)",
        f"{'optimizer':18s}  {'time→T1':17s}  {'T2':17s}  {'T3':17s}",
    ]
    for name, row in seconds.items():
        lines.append(f"{name:18s}  " + "  ".join(f"{cell:17s}" for cell in ratio_cells(row, reference)))
    return lines


def run_command(
    argv: list[str] | None,
    *,
    description: str,
    script: str,
    rows_are: str,
    measure: Callable[[str, int, bool], tuple[list[float], dict[str, list[list]]]],
    default_repetitions: int,
) -> int:
    """The command line shared with ``plain_loop.py``: parse, time each problem with ``measure(problem, repetitions,
    quick)`` and write the report to ``results/<script>[_quick].txt`` (or ``--out``). ``rows_are`` says how the rows
    were run, the start of the report's first line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=["regression", "logistic", "pinn"])
    parser.add_argument("--repetitions", type=int, default=default_repetitions)
    parser.add_argument("--quick", action="store_true", help="the problems' --quick sizes, targets of their own")
    parser.add_argument("--out", type=Path, default=None, help=f"the report's path (default results/{script}.txt)")
    args = parser.parse_args(argv)
    if args.repetitions < 1:
        parser.error(f"--repetitions must be at least 1, got {args.repetitions}")
    torch.set_num_threads(1)
    warm_up()
    command = f"python benchmarks/{script}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"{rows_are}: time to T1 / T2 / T3 as the ratio to torch LBFGS(100) of the same repetition, median (range) "
        f"over {args.repetitions} repetitions; time goal ≤ {TIME_GOAL}",
        "; ".join(f"{key} {value}" for key, value in environment(command.strip()).items()),
        "",
    ]
    for problem_name in args.problems:
        targets, seconds = measure(problem_name, args.repetitions, args.quick)
        block = report(problem_name, targets, seconds)
        print("\n".join(block) + "\n", flush=True)
        lines += block + [""]
    out = args.out or RESULTS / (f"{script}_quick.txt" if args.quick else f"{script}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(
        argv,
        description=__doc__.split("\n")[0],
        script="one_at_a_time",
        rows_are="The race's rows one at a time (no threads, no baton), as a training loop runs them",
        measure=one_at_a_time,
        default_repetitions=5,
    )


if __name__ == "__main__":
    sys.exit(main())
