"""Levers 2 and 4 of issue #14, measured: Hessian-free inner CG with Martens's craft, and Gauss–Newton products.

Levers 28 and 29 of ``docs/performance.md``. The HF rows are research variants, not in the library; the
Gauss–Newton rows run the library's SCG on its ``GradientAccumulator(..., hvp_method="gauss-newton")``. Every row
runs one after the other (not interleaved) on a problem of ``benchmarks/peers.py``, with the same budget in
gradient-pass equivalents, and the table gives passes to the 90 / 99 / 99.9 % targets as ratios to torch
LBFGS(100)'s (``levers.py --table passes``'s table):

* ``HF …``: :class:`HessianFreeSCG`. Per full gradient pass, CG on the damped quadratic model
  (G_S + λI) d = −E'(w), G_S the Gauss–Newton matrix over a rotating fraction S of the samples, with Martens
  (2010)'s craft: CG warm-started from 0.95 × the previous step, his relative-progress stop, the iterates at
  ⌈1.3ʲ⌉ kept for backtracking, λ₀ from the curvature along the gradient. Then one trial at w + d, judged by
  Møller's comparison ratio Δ = (E(w) − E(w + d)) / (−φ(d)) (φ the damped model) with Møller's λ update, or by
  Martens's ρ (the undamped model) with his λ × 3/2 / × 2/3 rule; a trial whose loss rose backtracks to the kept
  iterates, each for the forward of a pass.
* ``SCG, 10 % GN``: Møller's SCG whose curvature E''p is the Gauss–Newton product over a rotating 10 % of the
  samples (positive semi-definite: no δ ≤ 0 repair), beside ``SCG, 10 % exact`` (the library's
  ``curvature_fraction=0.1``).

The Gauss–Newton products are the library's (``GradientAccumulator(..., hvp_method="gauss-newton",
curvature_fraction=f)``: J v by forward mode through the model, H_L (J v) by double backward on the loss as a
function of the outputs, Jᵀ(·) by one reverse pass). Their cost is measured against a gradient pass before each
problem's run (interleaved rounds, medians) and printed; a product is charged that ratio. The loss must be a function
of the model's outputs alone (no weight penalty inside it), so the logistic problem (a penalty in its loss; linear,
so its Gauss–Newton matrix is its Hessian) and the physics-informed net (its model differentiates itself, which
forward mode does not run through) are not run.

Usage:
    python benchmarks/hessian_free.py --seeds 0 1 2       # autoencoder, mnist, regression, 3 seeds (~35 min)
    python benchmarks/hessian_free.py --problems autoencoder --seeds 0 1 2 --rows "torch LBFGS" "torch LBFGS h=20" \
        "SCG m=20 (library)" "SCG m=20, diagonal (library)" "HF Møller Δ, 10 %, ≤10 CG" "HF Møller Δ, 10 %, ≤5 CG" \
        "HF Møller Δ, 10 %, ≤20 CG" "HF Møller Δ, 10 %, ≤10 CG, no backtracking" "HF Martens ρ, 10 %, ≤10 CG" \
        "HF Møller Δ, 10 %, ≤10 CG, cold start" --stem hessian_free_autoencoder_variants   # the craft's parts (~6 min)
    python benchmarks/hessian_free.py --quick                           # small versions, about half a minute
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from typing import Any

import torch
from levers import parse_run_arguments, passes_header, passes_table
from peers import race
from peers_adapters import SCG_FAMILY, Row, lbfgs, run_scg, scg
from peers_metering import Run, calibrate
from peers_problems import PROBLEMS, Problem, make_accumulator
from peers_report import analyse
from torch import nn

from moller_scg.accumulate import GradientAccumulator

GAUSS_NEWTON_PROBLEMS = ("autoencoder", "mnist", "regression")
FRACTIONS = (0.1, 0.3, 1.0)
"""The shares of the samples a Gauss–Newton product is calibrated over (those the rows use)."""


def gauss_newton_accumulator(problem: Problem, model: nn.Module, fraction: float) -> GradientAccumulator:
    """The library's Gauss–Newton products (``hvp_method="gauss-newton"``) over a rotating ``fraction`` of the
    problem's training samples."""
    return make_accumulator(problem, model, hvp_method="gauss-newton", curvature_fraction=fraction)


def product_cost(
    problem: Problem,
    initial: dict[str, torch.Tensor],
    fraction: float,
    rounds: int = 5,
    hvp_method: str = "gauss-newton",
) -> float:
    """Seconds of a product (Gauss–Newton by default; ``hvp_method`` of the accumulator) over ``fraction`` of the
    samples ÷ a gradient pass (median of per-round ratios, the two interleaved)."""
    model = problem.make_model()
    model.load_state_dict(initial)
    accumulator = make_accumulator(problem, model)
    products = make_accumulator(problem, model, hvp_method=hvp_method, curvature_fraction=fraction)
    generator = torch.Generator().manual_seed(problem.seed + 2)
    vectors = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in products.params]
    accumulator(), products.hvp(vectors)  # warm-up
    ratios = []
    for _ in range(rounds):
        start = time.perf_counter()
        accumulator()
        middle = time.perf_counter()
        products.hvp(vectors)
        ratios.append((time.perf_counter() - middle) / (middle - start))
    return statistics.median(ratios)


class HessianFreeSCG:
    """Hessian-free Newton-CG on the Gauss–Newton model with Møller's (or Martens's) trust scaling; one outer
    iteration per :meth:`step`. Symbols: w the weights, r = −E'(w), G_S the subsampled Gauss–Newton matrix,
    λ the damping, d the CG solution of (G_S + λI) d = r, φ(d) = ½dᵀ(G_S + λI)d − rᵀd the damped model,
    q(d) = φ(d) − ½λ|d|² the undamped one, Δ = (E(w) − E(w + d)) / (−φ(d)) Møller's comparison ratio,
    ρ = (E(w) − E(w + d)) / (−q(d)) Martens's."""

    def __init__(
        self,
        run: Run,
        products: GradientAccumulator,
        product_cost: float,
        max_cg: int = 50,
        rule: str = "moller",
        warm_start: float = 0.95,
        backtrack: bool = True,
    ) -> None:
        self.run, self.products, self.cost = run, products, product_cost
        self.window = 0  # S: the curvature window of the current solve
        self.max_cg, self.rule, self.warm_start, self.backtrack = max_cg, rule, warm_start, backtrack
        self.lambd: float | None = None  # λ, set from the curvature along r at the first CG product
        self.previous: torch.Tensor | None = None  # the last accepted d
        self.loss, self.residual = self._gradient_pass()
        self.steps = self.rejected = self.cg_iterations = 0

    def _gradient_pass(self) -> tuple[float, torch.Tensor]:
        loss = float(self.run())
        return loss, -self.run.flat_grad().to(torch.float64)

    def _gauss_newton(self, v: torch.Tensor) -> torch.Tensor:
        self.run.charge("hvp", cost=self.cost)
        self.run.acc.passes.hvp += 1  # the run's accumulator's count, which the harness checks, sees every product
        self.products.curvature_window = self.window  # the same S for every product of one solve
        pieces = self.products.hvp(self.run.unflatten(v))
        return torch.cat([piece.reshape(-1) for piece in pieces]).to(torch.float64)

    def _solve(self) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """CG on (G_S + λI) d = r from the warm start; returns d, the kept iterates (oldest first) and φ(d)."""
        r_target = self.residual
        d = torch.zeros_like(r_target)
        if self.previous is not None and self.warm_start > 0 and self.lambd is not None:
            d = self.warm_start * self.previous
            cg_residual = r_target - (self._gauss_newton(d) + self.lambd * d)
        else:
            cg_residual = r_target.clone()
        direction = cg_residual.clone()
        kept: list[torch.Tensor] = []
        keep_at = {math.ceil(1.3**j) for j in range(40)}
        phis: list[float] = []
        residual_norm = float(cg_residual @ cg_residual)
        for i in range(1, self.max_cg + 1):
            g_direction = self._gauss_newton(direction)
            if self.lambd is None:  # λ₀: the Gauss–Newton curvature along r (Rayleigh quotient)
                self.lambd = max(float(direction @ g_direction) / float(direction @ direction), 1e-12)
            a_direction = g_direction + self.lambd * direction
            curvature = float(direction @ a_direction)
            if curvature <= 0:
                break
            alpha = residual_norm / curvature
            d = d + alpha * direction
            cg_residual = cg_residual - alpha * a_direction
            self.cg_iterations += 1
            phis.append(-0.5 * float(d @ (r_target + cg_residual)))  # φ(d) = −½ dᵀ(r + r_cg)
            if i in keep_at:
                kept.append(d.clone())
            window = max(10, int(0.1 * i))
            if i > window and phis[-1] < 0 and (phis[-1] - phis[-1 - window]) / phis[-1] < 5e-4 * window:
                break
            new_norm = float(cg_residual @ cg_residual)
            if new_norm == 0:
                break
            direction = cg_residual + (new_norm / residual_norm) * direction
            residual_norm = new_norm
        if not kept or not torch.equal(kept[-1], d):
            kept.append(d.clone())
        phi = -0.5 * float(d @ (r_target + cg_residual))
        return d, kept, phi

    def _model_decrease(self, d: torch.Tensor, phi_of_d: float) -> float:
        """The model's predicted decrease at d: −φ(d) for Møller's Δ, −q(d) for Martens's ρ."""
        assert self.lambd is not None
        return -phi_of_d if self.rule == "moller" else -(phi_of_d - 0.5 * self.lambd * float(d @ d))

    def step(self) -> None:
        self.window += 1  # a new S for each solve
        w = self.run.flat_params().to(torch.float64)
        d, kept, phi = self._solve()
        assert self.lambd is not None
        predicted = self._model_decrease(d, phi)
        candidates = list(reversed(kept)) if self.backtrack else [kept[-1]]
        accepted = False
        for index, candidate in enumerate(candidates):
            self.run.set_flat((w + candidate).to(self.run.dtype))
            loss, complete = self.run.value_then_grad()
            trial_loss = float(loss)
            if index == 0:
                ratio = (self.loss - trial_loss) / predicted if predicted > 0 else -math.inf
                self._update_lambda(ratio, d, phi)
            if math.isfinite(trial_loss) and trial_loss < self.loss:
                gradients = complete()
                self.loss = trial_loss
                self.residual = -torch.cat([g.reshape(-1) for g in gradients]).to(torch.float64)
                self.previous = candidate
                accepted = True
                break
            if index == 0 and not self.backtrack:
                break
        if not accepted:
            self.run.set_flat(w.to(self.run.dtype))
            self.previous = None
            self.rejected += 1
        self.steps += 1

    def _update_lambda(self, ratio: float, d: torch.Tensor, phi_of_d: float) -> None:
        assert self.lambd is not None
        if self.rule == "moller":
            # Møller: Δ < ¼ → λ ← λ + δ(1 − Δ)/|d|² with δ = dᵀ(G_S + λI)d = 2φ(d) + 2rᵀd; Δ > ¾ → λ ÷ 4
            if ratio < 0.25:
                delta = 2 * phi_of_d + 2 * float(self.residual @ d)
                self.lambd = self.lambd + max(delta, 0.0) * (1 - max(ratio, -10.0)) / float(d @ d)
            elif ratio > 0.75:
                self.lambd = self.lambd / 4
        else:  # Martens 2010: ρ < ¼ → λ × 3/2, ρ > ¾ → λ × 2/3
            if ratio < 0.25:
                self.lambd *= 1.5
            elif ratio > 0.75:
                self.lambd *= 2 / 3


def hessian_free(fraction: float = 0.1, **options: Any) -> Row:
    """A row running :class:`HessianFreeSCG` with its Gauss–Newton products over ``fraction`` of the samples."""

    def run_variant(run: Run) -> None:
        products = gauss_newton_accumulator(run.problem, run.model, fraction)
        cost = run.calibrated[f"gauss_newton_{fraction:g}"]
        run.extra["record_in_step"] = True
        optimizer = HessianFreeSCG(run, products, cost, **options)
        while True:
            optimizer.step()
            run.record(optimizer.loss, run.flat_params, at=run.evaluation_end)  # timed as run_scg's points (lever 61)
            run.extra["scg_steps"] = optimizer.steps
            run.extra["scg_rejected"] = optimizer.rejected
            run.extra["cg_iterations"] = optimizer.cg_iterations

    return Row(run_variant, SCG_FAMILY)


def scg_gauss_newton(fraction: float = 0.1, **scg_options: Any) -> Row:
    """Møller's SCG (exact-curvature path) on an accumulator with ``hvp_method="gauss-newton"``, each product over
    a rotating ``fraction`` of the samples."""

    def run_variant(run: Run) -> None:
        run.acc = gauss_newton_accumulator(run.problem, run.model, fraction)
        run.costs["hvp"] = run.calibrated[f"gauss_newton_{fraction:g}"]
        run_scg(run, "double-backward", **scg_options)

    return Row(run_variant, SCG_FAMILY, memory=scg_options.get("memory", 0))


def rows() -> dict[str, Row]:
    """Every row; :data:`DEFAULT_ROWS` are those the default command runs."""
    return {
        "torch LBFGS": lbfgs(100),
        "torch LBFGS h=20": lbfgs(20),
        "SCG m=20 (library)": scg(hvp="secant", memory=20),
        "SCG m=20, diagonal (library)": scg(hvp="secant", memory=20, diagonal_scaling=True),
        "SCG, exact": scg(),
        "SCG, GN": scg_gauss_newton(1.0),
        "SCG, 10 % exact": scg(curvature_fraction=0.1),
        "SCG, 10 % GN": scg_gauss_newton(0.1),
        "HF Møller Δ, 10 %": hessian_free(0.1, rule="moller"),
        "HF Martens ρ, 10 %": hessian_free(0.1, rule="martens"),
        "HF Møller Δ, 10 %, ≤5 CG": hessian_free(0.1, rule="moller", max_cg=5),
        "HF Møller Δ, 10 %, ≤10 CG": hessian_free(0.1, rule="moller", max_cg=10),
        "HF Møller Δ, 10 %, ≤20 CG": hessian_free(0.1, rule="moller", max_cg=20),
        "HF Møller Δ, 10 %, ≤10 CG, no backtracking": hessian_free(0.1, rule="moller", max_cg=10, backtrack=False),
        "HF Martens ρ, 10 %, ≤10 CG": hessian_free(0.1, rule="martens", max_cg=10),
        "HF Møller Δ, 10 %, ≤10 CG, cold start": hessian_free(0.1, rule="moller", max_cg=10, warm_start=0.0),
        "HF Møller Δ, 30 %": hessian_free(0.3, rule="moller"),
    }


DEFAULT_ROWS = (
    "torch LBFGS",
    "torch LBFGS h=20",
    "SCG m=20 (library)",
    "SCG m=20, diagonal (library)",
    "SCG, exact",
    "SCG, GN",
    "SCG, 10 % exact",
    "SCG, 10 % GN",
    "HF Martens ρ, 10 %",
    "HF Møller Δ, 10 %, ≤5 CG",
    "HF Møller Δ, 10 %, ≤10 CG",
)
"""The rows of the default command (``--rows`` picks any of :func:`rows`)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--problems", nargs="+", choices=GAUSS_NEWTON_PROBLEMS, default=list(GAUSS_NEWTON_PROBLEMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", choices=list(rows()), help="these rows (default: DEFAULT_ROWS)")
    args, argv, env = parse_run_arguments(
        parser, argv, "the result file's name without .txt (default: hessian_free[_quick])"
    )
    title = "Hessian-free inner CG (Martens's craft) and Gauss–Newton curvature against torch LBFGS (history 100)"
    lines = passes_header(title, "hessian_free.py", argv, env)
    every_row = rows()
    table = {row: every_row[row] for row in (args.rows or DEFAULT_ROWS)}
    for name in args.problems:
        per_seed = []
        costs_line = []
        extras: list[str] = []
        for seed in args.seeds:
            problem = PROBLEMS[name](args.quick, seed)
            initial = copy.deepcopy(problem.make_model().state_dict())
            costs = calibrate(problem, initial)
            for fraction in FRACTIONS:
                costs[f"gauss_newton_{fraction:g}"] = product_cost(problem, initial, fraction)
            costs_line.append(
                f"seed {seed}: a Gauss–Newton product over 10 % / 30 % / 100 % of the samples costs "
                + " / ".join(f"{costs[f'gauss_newton_{fraction:g}']:.3f}" for fraction in FRACTIONS)
                + f" gradient passes; an exact HVP over 10 % / 100 %: {costs['hvp_subsampled']:.3f} / "
                f"{costs['hvp']:.3f}"
            )
            results = race(problem, initial, costs, table, interleaved=False)
            for result in results:
                if "cg_iterations" in result:
                    extras.append(
                        f"seed {seed} {result['name']}: {result['scg_steps']} outer steps, "
                        f"{result['scg_rejected']} rejected, {result['cg_iterations']} CG iterations"
                    )
                elif "scg_rejected" in result and "scg_steps" in result:
                    extras.append(
                        f"seed {seed} {result['name']}: {result['scg_steps']} steps, {result['scg_rejected']} rejected"
                    )
            analyse(problem, results)
            per_seed.append(results)
        lines += passes_table(name, per_seed) + costs_line + extras + [""]
        print("\n".join(lines[-(len(table) + len(costs_line) + len(extras) + 3) :]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("hessian_free_quick" if args.quick else "hessian_free")
    (args.out / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {args.out / stem}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
