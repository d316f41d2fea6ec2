"""Lever 5 of issue #14, measured: a curvature fraction that grows as the gradient shrinks.

Lever 30 of ``docs/performance.md``. With 10 % of the samples in each Hessian-vector product, Møller's SCG with
exact curvature wins the early targets on the MNIST CNN and falls behind near the optimum, where the subsampled
curvature's error is large beside the step it scales. Byrd, Chin, Nocedal & Wu (2012) grow the sample as the
iterates converge. The rows here run the library's ``SCG(params, hvp="double-backward")`` (Møller's algorithm,
``memory=0``) whose s = E''(w)p is taken over a rotating share f of the samples, f chosen before each product:

* ``grow ∝ |r₀|/|r|`` and ``grow ∝ (|r₀|/|r|)^½``: f = f₀ (|r₀|/min |r|)^κ, r = −E'(w) at the product's w, r₀ at
  the first product, min |r| the smallest so far (so f never shrinks), f₀ = 10 %, rounded up to the next of
  :data:`FRACTIONS` (never below f₀, never above 1);
* ``grow on rejection``: f starts at f₀ and moves up one step of :data:`FRACTIONS` after every trial SCG rejects
  (Δ < 0: the curvature misjudged the step), and never back;

beside the fixed 10 % and 100 % rows, Møller's SCG on secant pairs (``SCG(memory=20)``, ``fit``'s default, which takes
no products) and torch LBFGS at history 100 and 20. A product over f is charged its measured cost (interleaved with
a gradient pass at the initial weights; the 10 % and 100 % costs are the race's own calibration). Rows run one after
the other, as in ``benchmarks/hessian_free.py``, with the budget in gradient-pass equivalents; the table gives passes
to the 90 / 99 / 99.9 % targets as ratios to LBFGS(100)'s.

Usage:
    python benchmarks/growing_curvature.py --seeds 0 1 2     # mnist, regression, pinn, logistic, 3 seeds
    python benchmarks/growing_curvature.py --quick           # small versions, about half a minute
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
from hessian_free import product_cost
from levers import parse_run_arguments, passes_header, passes_table
from peers import race
from peers_adapters import SCG_FAMILY, MeteredObjective, Row, lbfgs, scg
from peers_metering import Run, calibrate
from peers_problems import PROBLEMS, make_accumulator
from peers_report import analyse

from moller_scg import SCG
from moller_scg.accumulate import GradientAccumulator

PROBLEM_NAMES = ("mnist", "regression", "pinn", "logistic", "autoencoder")
FRACTIONS = (0.1, 0.2, 0.5, 1.0)
"""The shares f of the samples a product may take; f₀ = the first."""
FINITE_DIFFERENCE = "FD"
"""How :attr:`GrowingCurvatureObjective.used` names a finite-difference product."""
SIGMA = 5e-5
"""σ of Møller's finite difference: ``SCG``'s default."""


def rounded_up(target: float) -> float:
    """The smallest of :data:`FRACTIONS` at or above ``target`` (1 above the largest)."""
    return next((fraction for fraction in FRACTIONS if fraction >= target), FRACTIONS[-1])


class GrowingCurvatureObjective(MeteredObjective):
    """The run as SCG's objective, whose ``hvp`` takes s = E''(w)p over a share f of the samples that grows.

    Symbols: r = −E'(w) the gradient at the product's w (that of the objective's latest evaluation, the accepted
    trial: SCG asks for curvature only at a point it has just evaluated), r₀ the first such, κ the power of the
    schedule, f the share.

    Args:
        run: the race's run (its gradient passes and budget).
        costs: a product over f, in gradient passes, for every f of :data:`FRACTIONS`.
        power: κ: f = f₀ (|r₀|/min |r|)^κ, rounded up; ``None``: f moves only through :meth:`grow`.
        finite_difference: where f = 1, or a product over f costs a gradient pass or more, take Møller's finite
            difference over every sample instead (one gradient pass; :meth:`finite_difference_product`).
    """

    def __init__(
        self, run: Run, costs: dict[float, float], power: float | None, finite_difference: bool = False
    ) -> None:
        super().__init__(run, run.params)
        self.run, self.costs, self.power, self.finite_difference = run, costs, power, finite_difference
        self.products: dict[float, GradientAccumulator] = {
            fraction: make_accumulator(run.problem, run.model, curvature_fraction=fraction) for fraction in FRACTIONS
        }
        self.fraction = FRACTIONS[0]
        self.initial_gradient_norm: float | None = None  # |r₀|
        self.smallest_gradient_norm = math.inf  # the smallest |r| so far: f never shrinks
        self.used: list[float | str] = []  # f of every product, in order (FINITE_DIFFERENCE for one)

    def grow(self) -> None:
        """One step up :data:`FRACTIONS` (after a rejected trial)."""
        self.fraction = rounded_up(math.nextafter(self.fraction, math.inf))

    def fraction_at(self, gradient_norm: float) -> float:
        """f for a product where |r| = ``gradient_norm``: f₀ (|r₀|/min |r|)^κ rounded up (κ = ``power``), or the
        share :meth:`grow` left (``power=None``)."""
        if self.power is None:
            return self.fraction
        if self.initial_gradient_norm is None:
            self.initial_gradient_norm = gradient_norm
        self.smallest_gradient_norm = min(self.smallest_gradient_norm, gradient_norm)
        progress = self.initial_gradient_norm / max(self.smallest_gradient_norm, 1e-300)  # |r₀| / min |r|
        self.fraction = rounded_up(FRACTIONS[0] * max(progress, 1.0) ** self.power)
        return self.fraction

    def current_gradients(self) -> list[torch.Tensor]:
        """E'(w) at the weights the parameters hold: the latest evaluation's gradients, which must be at w."""
        if not self._last_evaluation_is_current():
            raise RuntimeError(
                "SCG asked for curvature at weights its objective has not just evaluated (a rejected trial's "
                "gradient, or weights changed since): this research row cannot form E''(w)p there"
            )
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.run.params, self._last_gradients or [])]

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        gradients = self.current_gradients()
        gradient_norm = float(torch.cat([g.reshape(-1) for g in gradients]).norm())  # |r|, as the run's flat_grad
        fraction = self.fraction_at(gradient_norm)
        self._counts.nhev += 1
        if self.finite_difference and (fraction == 1.0 or self.costs[fraction] >= 1.0):
            self.used.append(FINITE_DIFFERENCE)
            return self.finite_difference_product(vectors, gradients)
        self.run.charge("hvp", cost=self.costs[fraction])
        self.run.acc.passes.hvp += 1  # the run's accumulator's count, which the harness checks, sees every product
        self.used.append(fraction)
        return self.products[fraction].hvp(list(vectors))

    def finite_difference_product(
        self, vectors: Sequence[torch.Tensor], gradients: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Møller's s = (E'(w + σₖv) − E'(w)) / σₖ, σₖ = σ/|v| (σ = ``SCG``'s default), over every sample: one
        gradient pass at w + σₖv; ``gradients`` = E'(w). The pass is charged before w moves (a spent budget leaves w
        as it was), and w and each ``.grad`` are put back as they were."""
        self.run.charge("gradient")
        weights = [p.detach().clone() for p in self.run.params]
        held = [p.grad for p in self.run.params]
        sigma_k = SIGMA / float(torch.sqrt(sum(v.double().square().sum() for v in vectors)))
        try:
            with torch.no_grad():
                for p, v in zip(self.run.params, vectors):
                    p.add_(v, alpha=sigma_k)
            self.run.acc()
            shifted = [cast(torch.Tensor, p.grad) for p in self.run.params]
        finally:
            with torch.no_grad():
                for p, w, grad in zip(self.run.params, weights, held):
                    p.copy_(w)
                    p.grad = grad
            self._last_versions = [p._version for p in self.run.params]  # w is the latest evaluation's again
        return [(later - here) / sigma_k for later, here in zip(shifted, gradients)]


def growing(power: float | None, finite_difference: bool = False) -> Row:
    """A row: Møller's SCG with exact curvature over a growing share of the samples (``power``: κ, or ``None`` to
    grow after each rejected trial; ``finite_difference``: Møller's finite difference over every sample where a
    product would cost a gradient pass or more)."""

    def run_variant(run: Run) -> None:
        costs = {fraction: run.calibrated[f"hvp_{fraction:g}"] for fraction in FRACTIONS}
        objective = GrowingCurvatureObjective(run, costs, power, finite_difference)
        optimizer = SCG(run.params, hvp="double-backward")
        run.extra.update(record_in_step=True, scg_rejected=0)
        while True:
            optimizer.step(objective)
            trace = optimizer.trace
            if not trace.success:
                run.extra["scg_rejected"] += 1
                if power is None:
                    objective.grow()
            run.record(trace.loss, run.flat_params, at=run.evaluation_end)  # timed as run_scg's points (lever 61)
            run.extra["scg_steps"] = trace.k
            run.extra["fractions"] = _spans(objective.used)

    return Row(run_variant, SCG_FAMILY, memory=0)


def _spans(used: list[float | str]) -> str:
    """``0.1×12 → 0.2×30 …``: how many products took each share, in order."""
    spans: list[list[Any]] = []
    for fraction in used:
        if spans and spans[-1][0] == fraction:
            spans[-1][1] += 1
        else:
            spans.append([fraction, 1])
    return " → ".join(f"{share if isinstance(share, str) else f'{share:g}'}×{count}" for share, count in spans)


def rows() -> dict[str, Row]:
    return {
        "torch LBFGS": lbfgs(100),
        "torch LBFGS h=20": lbfgs(20),
        "SCG m=20 (library)": scg(hvp="secant", memory=20),
        "SCG, exact": scg(),
        "SCG, 10 % exact": scg(curvature_fraction=0.1),
        "SCG, grow ∝ |r₀|/|r|": growing(1.0),
        "SCG, grow ∝ (|r₀|/|r|)^½": growing(0.5),
        "SCG, grow on rejection": growing(None),
        "SCG, finite difference": scg(hvp="finite-difference"),
        "SCG, grow ∝ |r₀|/|r| → FD": growing(1.0, finite_difference=True),
        "SCG, grow ∝ (|r₀|/|r|)^½ → FD": growing(0.5, finite_difference=True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--problems", nargs="+", choices=PROBLEM_NAMES, default=list(PROBLEM_NAMES[:4]))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", choices=list(rows()), help="these rows (default: all)")
    args, argv, env = parse_run_arguments(
        parser, argv, "the result file's name without .txt (default: growing_curvature[_quick])"
    )
    title = "A growing curvature fraction (lever 5 of issue #14) against fixed ones and torch LBFGS (history 100)"
    lines = passes_header(title, "growing_curvature.py", argv, env)
    every_row = rows()
    table = {row: every_row[row] for row in (args.rows or every_row)}
    for name in args.problems:
        per_seed, notes = [], []
        for seed in args.seeds:
            problem = PROBLEMS[name](args.quick, seed)
            initial = copy.deepcopy(problem.make_model().state_dict())
            costs = calibrate(problem, initial)
            costs["hvp_0.1"], costs["hvp_1"] = costs["hvp_subsampled"], costs["hvp"]
            for fraction in FRACTIONS[1:-1]:
                costs[f"hvp_{fraction:g}"] = product_cost(problem, initial, fraction, hvp_method="double-backward")
            notes.append(
                f"seed {seed}: an exact product over "
                + " / ".join(f"{fraction:g}" for fraction in FRACTIONS)
                + " of the samples costs "
                + " / ".join(f"{costs[f'hvp_{fraction:g}']:.3f}" for fraction in FRACTIONS)
                + " gradient passes"
            )
            results = race(problem, initial, costs, table, interleaved=False)
            for result in results:
                if "scg_steps" in result:
                    shares = f"; shares {result['fractions']}" if "fractions" in result else ""
                    notes.append(
                        f"seed {seed} {result['name']}: {result['scg_steps']} steps, "
                        f"{result.get('scg_rejected', 0)} rejected{shares}"
                    )
            analyse(problem, results)
            per_seed.append(results)
        lines += passes_table(name, per_seed) + notes + [""]
        print("\n".join(lines[-(len(table) + len(notes) + 3) :]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("growing_curvature_quick" if args.quick else "growing_curvature")
    (args.out / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {args.out / stem}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
