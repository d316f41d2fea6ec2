"""How far apart rows that compute the same come out in one race of ``benchmarks/peers.py`` on the MNIST CNN.

The race's time ratios were over one row, the reference torch LBFGS(100), and its twin with history 40 (which
computes the same on the MNIST CNN) came out at 0.91–0.94 of its time over the races of 2026-12-07. This script asks
whether the reference row is slow where it stands (first in the table: made first, its thread started first, first
in the first lap) or whether one row's time is simply that noisy. It races the whole MNIST table with one more copy
of the reference at the end of it, at a budget of 30 gradient passes, and prints for each race the time of the five
torch LBFGS rows to their 16th, 25th and 30th evaluation (the reference's evaluations to T1 and T2 in the full race,
and the last of this budget) over the five rows' median. Every evaluation of these rows is one gradient pass of the
same model, so their times are comparable evaluation by evaluation; history 40 and the added copy compute exactly
what the reference computes, history 20 up to its 20th iteration.

Usage:
    python benchmarks/reference_copies.py          # about 20 min on 2 CPU cores (AVX-512): results/reference_copies.txt
    python benchmarks/reference_copies.py --quick  # the small MNIST problem, one race to evaluation 2 / 4 / 6 (a test)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
from common import environment
from peers import race
from peers_adapters import REFERENCE, lbfgs, optimizers, warm_up
from peers_metering import calibrate
from peers_problems import PROBLEMS

RACES, BUDGET, EVALUATIONS = 3, 30.0, (16, 25, 30)
QUICK_RACES, QUICK_BUDGET, QUICK_EVALUATIONS = 1, 6.0, (2, 4, 6)
ADDED_COPY = f"{REFERENCE} (a copy, last row)"
LBFGS_ROWS = (REFERENCE, ADDED_COPY, "torch LBFGS h=40", "torch LBFGS h=20", "torch LBFGS h=5")
RESULTS = Path(__file__).resolve().parent / "results" / "reference_copies.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small MNIST problem, one short race")
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    races, budget, evaluations_shown = (
        (QUICK_RACES, QUICK_BUDGET, QUICK_EVALUATIONS) if args.quick else (RACES, BUDGET, EVALUATIONS)
    )
    torch.set_num_threads(1)
    warm_up()
    command = " ".join(["python benchmarks/reference_copies.py", *argv])
    lines = [
        "The torch LBFGS rows' time to their " + " / ".join(map(str, evaluations_shown)) + " evaluation, each over "
        f"the five rows' median in the same race (the full MNIST table plus {ADDED_COPY!r}, budget {budget:g} passes, "
        "a new random baton order every lap)",
        f"command: {command}",
        "; ".join(f"{key} {value}" for key, value in environment(command).items()),
        "",
    ]
    print("\n".join(lines), flush=True)
    problem = dataclasses.replace(PROBLEMS["mnist"](args.quick, 0), budget=budget)
    initial = problem.make_model().state_dict()
    costs = calibrate(problem, initial)
    table = optimizers(problem) | {ADDED_COPY: lbfgs(100)}
    for number in range(races):
        results = {r["name"]: r for r in race(problem, initial, costs, table, shuffle_seed=1000 + number)}
        for name in (ADDED_COPY, "torch LBFGS h=40"):  # the exact copies: the same losses at every evaluation
            if [p["loss"] for p in results[name]["history"]] != [p["loss"] for p in results[REFERENCE]["history"]]:
                raise RuntimeError(f"{name} did not compute what {REFERENCE} computed")
        seconds = {
            name: {point["evaluations"]: point["seconds"] for point in results[name]["history"]} for name in LBFGS_ROWS
        }
        for evaluations in evaluations_shown:
            unit = statistics.median(seconds[name][evaluations] for name in LBFGS_ROWS)
            line = f"race {number + 1}, evaluation {evaluations}: " + "  ".join(
                f"{name} {seconds[name][evaluations] / unit:.3f}" for name in LBFGS_ROWS
            )
            lines.append(line)
            print(line, flush=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
