"""The levers of issue #14, raced against torch.optim.LBFGS(history 100) on the problems of ``benchmarks/peers.py``.

Each row is one change to SCG, measured side by side in one interleaved run per problem (the same harness, budget
and targets as ``peers.py``: times and gradient-pass equivalents to the 90 / 99 / 99.9 % targets as ratios to
LBFGS, — not reached, ≤x reached where LBFGS did not: at most x, its passes over LBFGS's whole run's). Rows:

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
    python benchmarks/levers.py --table passes --seeds 0 1 2 3 4 # rule variants, passes only (about 8 minutes)
    python benchmarks/levers.py --table passes --problems mnist   # the library's mode and the winners on mnist
    python benchmarks/levers.py --table passes --rows "torch LBFGS" "γ × 2" --stem NAME  # some rows, into NAME.txt

``--table passes`` runs the rows of ``passes_rows`` (λ, γ, first-step and pair rules of ``levers_variants.py``)
one after the other, not interleaved: every row takes one gradient pass per step, passes do not depend on the
machine's load, and the table gives passes to the targets only, per seed and their geometric mean
(``benchmarks/results/levers_passes.txt``). ``flat m=20 (library)`` is the library's secant mode (λ ÷ 2 after a
good step); the rows measured before that rule was adopted keep Møller's ``decrease=4.0``, so that their published
tables reproduce, and ``flat m=20, λ ÷ 4`` is the library's mode of that time. The ``… loss first`` rows (lever 12)
charge a trial that its loss rejects the forward of a gradient pass, c_F, measured before each problem's run: their
passes move with that measurement by about ±0.01 from run to run.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, environment
from levers_kfac import FlatKFAC
from levers_sr1 import FlatSR1
from levers_variants import FlatSCG
from peers import race
from peers_adapters import KRONECKER_OPTIONS, SCG_FAMILY, Row, lbfgs, scg, warm_up
from peers_metering import Run, calibrate
from peers_problems import PROBLEMS
from peers_report import analyse, ratio_cell

MEMORY = 20


def flat_variant(variant: type[FlatSCG] = FlatSCG, **options: Any) -> Row:
    """A row running :class:`levers_variants.FlatSCG` (or the subclass ``variant``) with ``options``."""

    def run_variant(run: Run) -> None:
        optimizer = variant(run.params, **options)
        run.extra["record_in_step"] = True
        while True:
            optimizer.step(run)
            # E at the weights held (the variant may minimise log E), timed as run_scg's points (lever 61)
            run.record(optimizer.reported_loss, run.flat_params, at=run.evaluation_end)
            run.extra["scg_steps"] = optimizer.steps
            run.extra["scg_rejected"] = optimizer.rejected

    return Row(run_variant, SCG_FAMILY, memory=options.get("memory", MEMORY))


def previous_mode_variant(**changes: Any) -> Row:
    """:func:`flat_variant` of the secant mode as it was when the first levers were measured — a finite-difference
    first step, γ of the newest pair and Møller's λ ÷ 4 — with ``changes`` on top (keyword arguments of FlatSCG)."""
    return flat_variant(**{"first_step": "finite-difference", "gamma_window": 1, "decrease": 4.0, **changes})


def moller_lambda_variant(**changes: Any) -> Row:
    """:func:`flat_variant` of the library's secant mode with Møller's λ ÷ 4 (the mode before λ ÷ 2 was adopted),
    with ``changes`` on top."""
    return flat_variant(**{"decrease": 4.0, **changes})


def kfac_variant(damping: float, **changes: Any) -> Row:
    """:func:`flat_variant` of :class:`levers_kfac.FlatKFAC` (lever 71) with damping κ = ``damping``, "global" unless
    ``changes`` say otherwise, loss first, and ``changes`` on top."""
    return flat_variant(FlatKFAC, **{"damping": damping, "damping_mode": "global", "loss_first": True, **changes})


PREVIOUS_MODE = {"first_step": "finite-difference", "gamma_window": 1}
"""The library's ``SCG(memory=m)`` before it adopted the scaled first step and γ = max (the baseline of the rule
rows below, so that their tables in benchmarks/results/ stay reproducible)."""


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
        "SCG m=20, K-FAC": scg(hvp="secant", memory=MEMORY, kronecker_factors=KRONECKER_OPTIONS),
        "PCG β, FD δ": previous_mode_variant(direction="pcg", curvature="finite-difference"),
        "cubic λ": previous_mode_variant(cubic=True),
        "rejected pairs": previous_mode_variant(reject_pairs=True),
        "λ ÷ 16": previous_mode_variant(decrease=16.0),
    }


def race_rows(names: list[str] | None = None) -> dict[str, Row]:
    """The rows of the race table: :func:`levers`, or the rows ``names`` of either table. A name in both (``SCG m=20``:
    the library's mode here, every trial a gradient pass in :func:`passes_rows`) is the race table's row."""
    rows = levers()
    if not names:
        return rows
    every_row = {**passes_rows(), **rows}
    return {name: every_row[name] for name in names}


def passes_rows() -> dict[str, Row]:
    """The rows of ``--table passes``: the library's mode, its flat copy, and one rule change (or a combination of
    the ones that won) per row; all of them one gradient pass per step, so passes are all that differ."""
    return {
        "torch LBFGS": lbfgs(100),
        "torch LBFGS h=20": lbfgs(20),
        # torch's default LBFGS (no line search: steps of length 1 after the first), at the same two histories.
        "torch LBFGS, no line search": lbfgs(100, line_search_fn=None),
        "torch LBFGS h=20, no line search": lbfgs(20, line_search_fn=None),
        # Every trial a gradient pass, as when the tables in benchmarks/results/ were measured (before lever 12);
        # the rows "… loss first" below charge a trial that its loss rejects its forward only.
        "SCG m=20": scg(hvp="secant", memory=MEMORY, loss_first=False),
        "SCG m=40": scg(hvp="secant", memory=40, loss_first=False),
        "flat m=20, previous mode": previous_mode_variant(),
        "cubic λ": previous_mode_variant(retry="cubic-lambda"),
        "interpolate": previous_mode_variant(retry="interpolate"),
        "interpolate + raise": previous_mode_variant(retry="interpolate-raise"),
        "rejected pairs": previous_mode_variant(reject_pairs=True),
        "λ ÷ 16": previous_mode_variant(decrease=16.0),
        "λ₁ = 1e-3": previous_mode_variant(lambd=1e-3),
        "restart 50": previous_mode_variant(restart=50),
        "angle 1e-2": previous_mode_variant(angle=1e-2),
        "|αp| ≤ 10|s|": previous_mode_variant(growth=10.0),
        "γ min of 3": previous_mode_variant(gamma_window=3, gamma_pick="min"),
        "γ BB1 newest": previous_mode_variant(gamma_pick="bb1"),
        "γ max of 5": previous_mode_variant(gamma_window=5),
        "γ max": previous_mode_variant(gamma_window=MEMORY),
        "scaled first": moller_lambda_variant(first_step="scaled", gamma_window=1),
        "scaled + γ max": moller_lambda_variant(first_step="scaled", gamma_window=MEMORY),
        "scaled+γmax+interp": moller_lambda_variant(
            first_step="scaled", gamma_window=MEMORY, retry="interpolate-raise"
        ),
        "m=40 flat": previous_mode_variant(memory=40),
        "m=40 γ max": previous_mode_variant(memory=40, gamma_window=40),
        "m=40 scaled + γ max": moller_lambda_variant(memory=40, first_step="scaled", gamma_window=40),
        "flat m=20 (library)": flat_variant(),
        "flat m=20, λ ÷ 4": moller_lambda_variant(),
        "non-monotone 3": moller_lambda_variant(nonmonotone=3),
        "non-monotone 10": moller_lambda_variant(nonmonotone=10),
        "γ × 1.5": moller_lambda_variant(gamma_scale=1.5),
        "γ × 2": moller_lambda_variant(gamma_scale=2.0),
        "γ × 0.75": moller_lambda_variant(gamma_scale=0.75),
        "γ × 3": moller_lambda_variant(gamma_scale=3.0),
        "layer-wise γ": moller_lambda_variant(layerwise=True),
        "hold λ after a rejection": moller_lambda_variant(hold_after_rejection=True),
        "λ ÷ 2": flat_variant(decrease=2.0),
        "λ ÷ 1.5": flat_variant(decrease=1.5),
        "λ ÷ 16 (library mode)": flat_variant(decrease=16.0),
        "Nyström H₀ k=5 / 50": flat_variant(nystrom_rank=5, nystrom_every=50),
        "Nyström H₀ k=10 / 100": flat_variant(nystrom_rank=10, nystrom_every=100),
        "Nyström H₀ k=20 / 200": flat_variant(nystrom_rank=20, nystrom_every=200),
        "stretch τ ≤ 2": flat_variant(stretch_max=2.0),
        "stretch τ ≤ 4": flat_variant(stretch_max=4.0),
        "stretch τ ≤ 2, Δ > 1.25": flat_variant(stretch_max=2.0, stretch_above=1.25),
        "SCG m=20, loss first": scg(hvp="secant", memory=MEMORY),
        "SCG m=40, loss first": scg(hvp="secant", memory=40),
        "flat m=20, loss first": flat_variant(loss_first=True),
        "γ of the newest pair, loss first": flat_variant(gamma_window=1, loss_first=True),
        "first step 1/|r|₂, loss first": flat_variant(first_step="scaled-l2", loss_first=True),
        "secant diagonal H₀ c=10, loss first": flat_variant(secant_diagonal=10.0, loss_first=True),
        "secant diagonal H₀ c=100, loss first": flat_variant(secant_diagonal=100.0, loss_first=True),
        "first step probed, loss first": flat_variant(first_step="probe", loss_first=True),
        "γ × 1.5, loss first": flat_variant(gamma_scale=1.5, loss_first=True),
        "γ × 2, loss first": flat_variant(gamma_scale=2.0, loss_first=True),
        "γ × 3, loss first": flat_variant(gamma_scale=3.0, loss_first=True),
        "λ ÷ 4, loss first": flat_variant(decrease=4.0, loss_first=True),
        "no raise when accepted": flat_variant(raise_accepted=False, loss_first=True),
        "no raise when accepted, m=40": flat_variant(memory=40, raise_accepted=False, loss_first=True),
        "λ by Δ (Nielsen)": flat_variant(decrease_by_fit=True, loss_first=True),
        "λ by Δ (Nielsen), m=40": flat_variant(memory=40, decrease_by_fit=True, loss_first=True),
        "diagonal H₀ β=0.99, v^¼, λ by Δ": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, decrease_by_fit=True, loss_first=True
        ),
        "flat m=40, loss first": flat_variant(memory=40, loss_first=True),
        "λ to the observed curvature, loss first": flat_variant(decrease_to_fit=True, loss_first=True),
        "λ to the observed curvature, m=40, loss first": flat_variant(memory=40, decrease_to_fit=True, loss_first=True),
        "diagonal H₀ β=0.99, v^¼, λ to the observed curvature": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, decrease_to_fit=True, loss_first=True
        ),
        "diagonal H₀ β=0.99, v^¼, no raise when accepted": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, raise_accepted=False, loss_first=True
        ),
        "diagonal H₀ β=0.99, v^¼, λ ÷ 4": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, decrease=4.0, loss_first=True
        ),
        "function-value secant c=0.1, loss first": flat_variant(value_secant=0.1, loss_first=True),
        "function-value secant c=0.5, loss first": flat_variant(value_secant=0.5, loss_first=True),
        "function-value secant c=0.1, m=40, loss first": flat_variant(memory=40, value_secant=0.1, loss_first=True),
        "diagonal H₀ β=0.99, v^¼, function-value secant c=0.1": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, value_secant=0.1, loss_first=True
        ),
        "log E, loss first": flat_variant(log_loss=True, loss_first=True),
        "diagonal H₀ β=0.99, v^¼, log E": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, log_loss=True, loss_first=True
        ),
        "two-step pairs, loss first": flat_variant(multistep=True, loss_first=True),
        "two-step pairs, m=40, loss first": flat_variant(memory=40, multistep=True, loss_first=True),
        "diagonal H₀ β=0.99, v^¼, two-step pairs": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, multistep=True, loss_first=True
        ),
        "L-SR1 m=20, loss first": flat_variant(FlatSR1),
        "L-SR1 m=40, loss first": flat_variant(FlatSR1, memory=40),
        "L-SR1 m=20, b₀ below the pencil, loss first": flat_variant(FlatSR1, initial="pencil"),
        "L-SR1 m=40, b₀ below the pencil, loss first": flat_variant(FlatSR1, memory=40, initial="pencil"),
        **{
            f"K-FAC H₀ {mode} κ={damping:g}, free factors": kfac_variant(damping, damping_mode=mode, charge=False)
            for mode, dampings in (("layer", (1.0, 3.0)), ("global", (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)))
            for damping in dampings
        },
        "K-FAC H₀ global κ=10, every step, rank 64, free factors": kfac_variant(10.0, rank=64, charge=False),
        **{
            f"K-FAC H₀ global κ={damping:g}, {percent} % every {period}, rank 64"
            f"{', γ_K recomputed' if recompute else ''}": kfac_variant(
                damping, fraction=percent / 100, refresh=period, rank=64, recompute=recompute
            )
            for damping, percent, period, recompute in (
                (10.0, 25, 5, False),
                (10.0, 25, 5, True),
                (10.0, 25, 1, False),
                (10.0, 10, 5, False),
                (10.0, 10, 5, True),
                (10.0, 10, 10, True),
                (10.0, 5, 5, True),
                (10.0, 2, 5, True),
                (10.0, 5, 3, True),
                (3.0, 5, 5, True),
                (30.0, 5, 5, True),
            )
        },
        "SCG m=20, K-FAC": scg(hvp="secant", memory=MEMORY, kronecker_factors=KRONECKER_OPTIONS),
        **{
            f"K-FAC H₀ global κ=10, {percent} % every 5, Bernoulli": kfac_variant(
                10.0, fraction=percent / 100, refresh=5, distribution="bernoulli"
            )
            for percent in (5, 25)
        },
        "SCG m=20, diagonal": scg(hvp="secant", memory=MEMORY, diagonal_scaling=True),
        "SCG m=40, diagonal": scg(hvp="secant", memory=40, diagonal_scaling=True),
        "diagonal H₀ β=0.9": flat_variant(diagonal_beta=0.9, loss_first=True),
        "diagonal H₀ β=0.99": flat_variant(diagonal_beta=0.99, loss_first=True),
        "diagonal H₀ β=0.999": flat_variant(diagonal_beta=0.999, loss_first=True),
        "diagonal H₀ β=0.99, v^¼": flat_variant(diagonal_beta=0.99, diagonal_power=0.25, loss_first=True),
        "diagonal H₀ β=0.99, v^¼, first step 1/|r|₂": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, first_step="scaled-l2", loss_first=True
        ),
        "Powell-damped pairs c=0.2": flat_variant(powell_damping=0.2, loss_first=True),
        "Powell-damped pairs c=0.05": flat_variant(powell_damping=0.05, loss_first=True),
        "Powell-damped pairs c=0.2, diagonal": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, powell_damping=0.2, loss_first=True
        ),
        "diagonal H₀ β=0.99, v^¼, first step D r": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, first_step="diagonal", loss_first=True
        ),
        "diagonal H₀ β=0.99, v^¼, first step probed": flat_variant(
            diagonal_beta=0.99, diagonal_power=0.25, first_step="probe", loss_first=True
        ),
        "diagonal H₀ β=0.999, v^¼": flat_variant(diagonal_beta=0.999, diagonal_power=0.25, loss_first=True),
        "diagonal H₀ β=0.99, v^⅛": flat_variant(diagonal_beta=0.99, diagonal_power=0.125, loss_first=True),
        "diagonal H₀ β=0.99, v^⅜": flat_variant(diagonal_beta=0.99, diagonal_power=0.375, loss_first=True),
        **{
            f"diagonal H₀ β=0.99, v^¼, Λ every {period}": flat_variant(
                diagonal_beta=0.99, diagonal_power=0.25, diagonal_refresh=period, loss_first=True
            )
            for period in (5, 10, 20)
        },
        **{
            f"diagonal H₀ β=0.99, v^¼, γ_D of the newest {window}": flat_variant(
                diagonal_beta=0.99, diagonal_power=0.25, gamma_window=window, loss_first=True
            )
            for window in (1, 5)
        },
    }


MNIST_PASSES_ROWS = (
    "torch LBFGS",
    "SCG m=20",
    "flat m=20, previous mode",
    "γ max",
    "scaled + γ max",
    "m=40 scaled + γ max",
)
"""The rows of ``--table passes`` on mnist (0.35 s a pass): the library's mode and the winners."""


def parse_run_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None, stem_help: str
) -> tuple[argparse.Namespace, list[str], dict[str, Any]]:
    """Add ``--stem`` and ``--out`` to ``parser``, parse ``argv`` (the command line's when ``None``), and set up the
    run as every benchmark of rows does: one torch thread, the rows' code warmed up. Returns the arguments, the argv
    parsed and the environment (:func:`common.environment`)."""
    parser.add_argument("--stem", help=stem_help)
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warm_up()
    return args, argv, environment(" ".join(argv))


def passes_header(title: str, script: str, argv: list[str], env: dict[str, Any]) -> list[str]:
    """The first lines of a passes table's file: ``title``, the command that made it, the date, what a cell holds."""
    return [
        f"{title}: gradient passes to the targets",
        f"command: python benchmarks/{script} {' '.join(argv)}".rstrip(),
        f"date: {env['date']}; torch {env['torch']}, CPU, 1 thread",
        "cells: passes to the 90 / 99 / 99.9 % targets (E* = lowest loss of any row of that problem and seed) as "
        "ratios to torch LBFGS(100)'s; geometric mean over the seeds, then each seed (— not reached)",
        "",
    ]


def passes_table(problem_name: str, per_seed: list[list[dict[str, Any]]]) -> list[str]:
    """Passes to T1 / T2 / T3 as ratios to torch LBFGS, per seed and their geometric mean (— not reached, ≤x reached
    where LBFGS did not, x the bound of lever 61; the mean is ≪1 when every seed is such a bound and "mixed" when
    some are and the others a number), and the final loss at
    the budget as a ratio to torch LBFGS's: the geometric mean over the seeds, then each seed's after "×"."""
    seeds = len(per_seed)
    width = _name_width(per_seed[0], 26)
    lines = [
        f"## {problem_name}: passes to T1 / T2 / T3 ÷ LBFGS(100)'s, {seeds} seed(s); final loss ÷ LBFGS(100)'s",
        f"{'row':<{width}}{'geo-mean':>20}{'final':>9}   per seed",
    ]
    for index, result in enumerate(per_seed[0]):
        entries = [results[index]["targets"] for results in per_seed]
        means = [_mean_cell([targets[t] for targets in entries]) for t in range(3)]
        finals = [results[index]["final_loss_ratio"] for results in per_seed]
        final = math.exp(sum(math.log(x) for x in finals) / seeds)
        cells = "  ".join(
            "/".join(ratio_cell(entry, "passes_ratio") for entry in targets) + f" ×{x:.3g}"
            for targets, x in zip(entries, finals)
        )
        lines.append(f"{result['name']:<{width}}{' / '.join(means):>20}{final:>9.3g}   {cells}")
    return lines


def _name_width(results: list[dict[str, Any]], minimum: int) -> int:
    """The row-name column's width: ``minimum``, or wider so that a long row name keeps the columns after it."""
    return max(minimum, 2 + max(len(result["name"]) for result in results))


def _mean_cell(column: list[dict[str, Any]]) -> str:
    """The geometric mean over the seeds of one target's passes ratio, as :func:`passes_table` prints it."""
    if not all(entry["reached"] for entry in column):
        return "—"
    numbers = [entry["passes_ratio"] for entry in column if entry["reference_reached"]]
    if not numbers:
        return "≪1"
    if len(numbers) < len(column):
        return "mixed"
    return f"{math.exp(sum(math.log(x) for x in numbers) / len(numbers)):.2f}"


def table(problem_name: str, results: list[dict[str, Any]], analysis: dict[str, Any]) -> list[str]:
    width = _name_width(results, 22)
    lines = [
        f"## {problem_name}: targets {' / '.join(f'{t:.4g}' for t in analysis['targets'])}",
        f"{'row':<{width}}{'time→T1':>8}{'T2':>6}{'T3':>6}{'passes→T1':>11}{'T2':>6}{'T3':>6}{'final ×LBFGS':>13}"
        f"{'rejected':>10}",
    ]
    for result in results:
        cells = [ratio_cell(entry, "time_ratio") for entry in result["targets"]]
        cells += [ratio_cell(entry, "passes_ratio") for entry in result["targets"]]
        rejected = result.get("scg_rejected", "")
        steps = result.get("scg_steps", "")
        lines.append(
            f"{result['name']:<{width}}{cells[0]:>8}{cells[1]:>6}{cells[2]:>6}{cells[3]:>11}{cells[4]:>6}{cells[5]:>6}"
            f"{result['final_loss_ratio']:>13.3g}{f'{rejected}/{steps}' if steps != '' else '':>10}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=["regression", "logistic", "pinn"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--table",
        choices=["levers", "passes"],
        default="levers",
        help="passes: the λ/γ/first-step rule variants, one after the other (not interleaved), passes only",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="--table passes: the seeds (default: --seed)")
    parser.add_argument(
        "--rows", nargs="+", help="only these rows (default: all; --table levers takes those of --table passes too)"
    )
    stem_help = "the result file's name without .txt (default: levers_passes… or levers_…)"
    args, argv, env = parse_run_arguments(parser, argv, stem_help)
    if args.table == "passes":
        return main_passes(args, argv, env)
    lines = [
        "Levers of issue #14 against torch LBFGS (history 100), side by side in one interleaved run per problem",
        f"command: python benchmarks/levers.py {' '.join(argv)}".rstrip(),
        f"date: {env['date']}; torch {env['torch']}, CPU, 1 thread",
        "cells: time and gradient-pass equivalents to the 90 / 99 / 99.9 % targets as ratios to torch LBFGS "
        "(— not reached, ≤x reached where LBFGS did not: at most x); rejected = rejected/all SCG steps",
        "",
    ]
    for name in args.problems:
        problem = PROBLEMS[name](args.quick, args.seed)
        model = problem.make_model()
        initial = copy.deepcopy(model.state_dict())
        costs = calibrate(problem, initial)
        results = race(problem, initial, costs, race_rows(args.rows))
        analysis = analyse(problem, results)
        lines += table(name, results, analysis) + [""]
        print("\n".join(lines[-len(results) - 3 :]), flush=True)
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("levers_quick" if args.quick else "levers_" + "_".join(args.problems))
    (args.out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    print(f"written to {args.out / stem}.txt")
    return 0


def main_passes(args: argparse.Namespace, argv: list[str], env: dict[str, Any]) -> int:
    """``--table passes``: per problem and seed, every row of ``passes_rows`` run one after the other."""
    seeds = args.seeds or [args.seed]
    lines = passes_header("Rule variants of SCG(memory=m) against torch LBFGS (history 100)", "levers.py", argv, env)
    for name in args.problems:
        rows = passes_rows()
        if args.rows:
            rows = {row: rows[row] for row in args.rows}
        elif name == "mnist":
            rows = {row: rows[row] for row in MNIST_PASSES_ROWS}
        per_seed = []
        for seed in seeds:
            problem = PROBLEMS[name](args.quick, seed)
            initial = copy.deepcopy(problem.make_model().state_dict())
            results = race(problem, initial, calibrate(problem, initial), rows, interleaved=False)
            analyse(problem, results)
            per_seed.append(results)
        lines += passes_table(name, per_seed) + [""]
        print("\n".join(lines[-len(rows) - 3 :]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "levers_passes_quick" if args.quick else "levers_passes"
    if args.problems != ["regression", "logistic", "pinn"]:
        stem += "_" + "_".join(args.problems)
    stem = args.stem or stem
    (args.out / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {args.out / stem}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
