"""The levers of issue #14, raced against torch.optim.LBFGS(history 100) on the problems of ``benchmarks/peers.py``.

Each row is one change to SCG, measured side by side in one interleaved run per problem (the same harness, budget
and targets as ``peers.py``: times and gradient-pass equivalents to the 90 / 99 / 99.9 % targets as ratios to
LBFGS, — not reached, ≪1 reached where LBFGS did not). Rows:

* library modes: ``SCG`` (Møller, exact curvature), ``SCG finite-diff`` (Møller's σ), ``SCG m=M`` (the quasi-Newton
  preconditioned mode, δ from the secant model, for several M), ``SCG m=20 + FD δ`` and ``SCG m=20 + exact δ``
  (the same direction, curvature measured along it), ``SCG m=20 + 10% δ`` (exact, over a rotating 10 % of the
  samples);
* research variants from ``levers_variants.py`` (not in the library): ``PCG β`` (conjugate update in
  preconditioned form), ``cubic λ`` (λ from the cubic interpolant after a rejection), ``rejected pairs``,
  ``λ ÷ 16``.

Usage:
    python benchmarks/levers.py                                  # regression, logistic, pinn (about 6 minutes)
    python benchmarks/levers.py --problems mnist autoencoder     # the two large problems (about 25 minutes)
    python benchmarks/levers.py --quick                          # small versions, about a minute
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, environment
from levers_variants import FlatSCG
from peers import race
from peers_adapters import SCG_FAMILY, Row, lbfgs, scg, warm_up
from peers_metering import Run, calibrate
from peers_problems import PROBLEMS
from peers_report import analyse, ratio_cell

MEMORY = 20


def flat_variant(**options: Any) -> Row:
    """A row running :class:`levers_variants.FlatSCG` with ``options``."""

    def run_variant(run: Run) -> None:
        optimizer = FlatSCG(run.params, **options)
        run.extra["record_in_step"] = True
        while True:
            optimizer.step(run)
            run.record(optimizer.loss, run.flat_params)
            run.extra["scg_steps"] = optimizer.steps
            run.extra["scg_rejected"] = optimizer.rejected

    return Row(run_variant, SCG_FAMILY, memory=options.get("memory", MEMORY))


def levers() -> dict[str, Row]:
    return {
        "torch LBFGS": lbfgs(100),
        "torch LBFGS h=20": lbfgs(20),
        "SCG": scg(),
        "SCG finite-diff": scg(hvp="finite-difference"),
        "SCG m=5": scg(hvp="secant", memory=5),
        "SCG m=10": scg(hvp="secant", memory=10),
        "SCG m=20": scg(hvp="secant", memory=MEMORY),
        "SCG m=40": scg(hvp="secant", memory=40),
        "SCG m=20 + FD δ": scg(hvp="finite-difference", memory=MEMORY),
        "SCG m=20 + exact δ": scg(hvp="double-backward", memory=MEMORY),
        "SCG m=20 + 10% δ": scg(hvp="double-backward", curvature_fraction=0.1, memory=MEMORY),
        "PCG β, FD δ": flat_variant(direction="pcg", curvature="finite-difference"),
        "cubic λ": flat_variant(cubic=True),
        "rejected pairs": flat_variant(reject_pairs=True),
        "λ ÷ 16": flat_variant(decrease=16.0),
    }


def table(problem_name: str, results: list[dict[str, Any]], analysis: dict[str, Any]) -> list[str]:
    lines = [
        f"## {problem_name}: targets {' / '.join(f'{t:.4g}' for t in analysis['targets'])}",
        f"{'row':<22}{'time→T1':>8}{'T2':>6}{'T3':>6}{'passes→T1':>11}{'T2':>6}{'T3':>6}{'final ×LBFGS':>13}"
        f"{'rejected':>10}",
    ]
    for result in results:
        cells = [ratio_cell(entry, "time_ratio") for entry in result["targets"]]
        cells += [ratio_cell(entry, "passes_ratio") for entry in result["targets"]]
        rejected = result.get("scg_rejected", "")
        steps = result.get("scg_steps", "")
        lines.append(
            f"{result['name']:<22}{cells[0]:>8}{cells[1]:>6}{cells[2]:>6}{cells[3]:>11}{cells[4]:>6}{cells[5]:>6}"
            f"{result['final_loss_ratio']:>13.3g}{f'{rejected}/{steps}' if steps != '' else '':>10}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=["regression", "logistic", "pinn"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warm_up()
    env = environment(" ".join(argv))
    lines = [
        "Levers of issue #14 against torch LBFGS (history 100), side by side in one interleaved run per problem",
        f"command: python benchmarks/levers.py {' '.join(argv)}".rstrip(),
        f"date: {env['date']}; torch {env['torch']}, CPU, 1 thread",
        "cells: time and gradient-pass equivalents to the 90 / 99 / 99.9 % targets as ratios to torch LBFGS "
        "(— not reached, ≪1 reached where LBFGS did not); rejected = rejected/all SCG steps",
        "",
    ]
    for name in args.problems:
        problem = PROBLEMS[name](args.quick, args.seed)
        model = problem.make_model()
        initial = copy.deepcopy(model.state_dict())
        costs = calibrate(problem, initial)
        results = race(problem, initial, costs, levers())
        analysis = analyse(problem, results)
        lines += table(name, results, analysis) + [""]
        print("\n".join(lines[-len(results) - 3 :]), flush=True)
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "levers_quick" if args.quick else "levers_" + "_".join(args.problems)
    (args.out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    print(f"written to {args.out / stem}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
