"""benchmarks/growing_curvature.py: Møller's SCG with exact curvature over a share of the samples that grows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from problems import least_squares_optimum, linear_least_squares_benchmark_problem
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "growing_curvature.py"


@pytest.fixture
def benchmark(monkeypatch):
    return load_script(BENCHMARK, monkeypatch)


def test_a_share_is_rounded_up_to_the_next_of_the_fractions(benchmark):
    assert benchmark.FRACTIONS == (0.1, 0.2, 0.5, 1.0)
    assert [benchmark.rounded_up(f) for f in (0.01, 0.1, 0.11, 0.2, 0.3, 0.5, 0.51, 1.0, 7.0)] == [
        0.1,
        0.1,
        0.2,
        0.2,
        0.5,
        0.5,
        1.0,
        1.0,
        1.0,
    ]


def least_squares_run(benchmark, power):
    from peers_metering import Run

    problem, x, y = linear_least_squares_benchmark_problem()
    costs = {"hvp": 2.0, "loss": 0.5, "forward": 0.5}
    run = Run("grow", problem, problem.make_model().state_dict(), costs)
    shares = {0.1: 1.1, 0.2: 1.2, 0.5: 1.5, 1.0: 2.5}  # 2.5: not the run's own price of a product (2.0)
    return run, benchmark.GrowingCurvatureObjective(run, shares, power), x, y


def test_a_product_over_every_sample_is_the_accumulators_exact_product(benchmark):
    run, objective, _, _ = least_squares_run(benchmark, power=None)
    for _ in range(3):
        objective.grow()
    assert objective.fraction == 1.0
    objective()  # the gradient at w, as SCG makes it before asking for curvature
    generator = torch.Generator().manual_seed(3)
    vectors = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in run.params]
    products = objective.hvp(vectors)
    reference = run.acc.hvp(vectors)
    assert all(torch.equal(a, b) for a, b in zip(products, reference))
    assert run.passes == pytest.approx(1.0 + 2.5)  # one gradient pass and one product charged its share's cost


@pytest.mark.parametrize(("power", "expected"), [(1.0, [0.1, 0.5, 0.5, 1.0, 1.0]), (0.5, [0.1, 0.2, 0.2, 0.5, 0.5])])
def test_the_share_follows_the_smallest_gradient_so_far(benchmark, power, expected):
    _, objective, _, _ = least_squares_run(benchmark, power)
    # |r₀|/min |r| = 1, 2.5, 2.5 (|r| rose: f stays), 10, 10; f₀ (·)^κ rounded up
    assert [objective.fraction_at(norm) for norm in (1.0, 0.4, 0.9, 0.1, 3.0)] == expected


def test_a_product_at_weights_not_just_evaluated_is_refused(benchmark):
    run, objective, _, _ = least_squares_run(benchmark, power=1.0)
    objective()
    with torch.no_grad():
        run.params[0].add_(1.0)  # as a rejected trial's restore would leave them
    vectors = [torch.ones_like(p) for p in run.params]
    with pytest.raises(RuntimeError, match="not just evaluated"):
        objective.hvp(vectors)
    assert run.calls["hvp"] == 0


def test_growing_on_rejection_moves_one_fraction_up_and_stops_at_one(benchmark):
    _, objective, _, _ = least_squares_run(benchmark, power=None)
    seen = [objective.fraction]
    for _ in range(5):
        objective.grow()
        seen.append(objective.fraction)
    assert seen == [0.1, 0.2, 0.5, 1.0, 1.0, 1.0]


@pytest.mark.filterwarnings("ignore::moller_scg.scg_state.SCGStalledWarning")  # at the optimum, as it should
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_scg_on_a_growing_share_reaches_the_least_squares_solution_and_the_share_never_shrinks(benchmark, power):
    from moller_scg import SCG

    run, objective, x, y = least_squares_run(benchmark, power)
    optimizer = SCG(run.params, hvp="double-backward")
    for _ in range(40):
        optimizer.step(objective)
        if optimizer.trace.stalled:  # at the optimum to the last bits
            break
    assert float(optimizer.trace.loss) == pytest.approx(least_squares_optimum(x, y), rel=1e-8)
    assert objective.used[0] == 0.1 and len(objective.used) == run.calls["hvp"] == run.acc.passes.hvp
    assert all(later >= earlier for earlier, later in zip(objective.used, objective.used[1:]))
    assert objective.used[-1] > 0.1  # |r| fell by orders of magnitude: the share grew
    charged = sum(objective.costs[fraction] for fraction in objective.used)
    assert run.passes == pytest.approx(charged + run.calls["gradient"] + 0.5 * run.calls["loss"], rel=1e-12)


def test_quick_run_writes_a_table_with_every_row_asked_for(benchmark, tmp_path):
    rows = ["torch LBFGS", "SCG, 10 % exact", "SCG, grow ∝ |r₀|/|r|", "SCG, grow on rejection"]
    status = benchmark.main(["--quick", "--problems", "regression", "--rows", *rows, "--out", str(tmp_path)])
    assert status == 0
    text = (tmp_path / "growing_curvature_quick.txt").read_text(encoding="utf-8")
    assert "## regression: passes to T1 / T2 / T3" in text
    for row in rows:
        assert row in text
    assert "an exact product over 0.1 / 0.2 / 0.5 / 1 of the samples costs" in text
    assert "SCG, grow ∝ |r₀|/|r|: " in text and "shares 0.1×" in text
    # growing on rejection: each rejected trial moved f one step up
    line = next(line for line in text.splitlines() if line.startswith("seed 0 SCG, grow on rejection:"))
    rejected = int(line.split(" rejected")[0].rsplit(" ", 1)[1])
    last_share = float(line.rsplit("→", 1)[-1].split("shares")[-1].strip().split("×")[0])
    grown = benchmark.FRACTIONS.index(last_share)
    # this quick run rejects a trial mid-run (at about its 9th of 21 steps), so a product follows every rejection
    assert rejected >= 1 and grown == min(rejected, 3)


def test_the_finite_difference_product_is_mollers_and_puts_w_and_grad_back(benchmark):
    from peers_problems import make_accumulator

    from moller_scg import GradientAccumulator

    class WeightsAtEachPass(GradientAccumulator):
        seen: list[list[torch.Tensor]] = []

        def __call__(self):
            self.seen.append([p.detach().clone() for p in self.params])
            return super().__call__()

    run, objective, _, _ = least_squares_run(benchmark, power=None)
    run.acc = make_accumulator(run.problem, run.model, accumulator_type=WeightsAtEachPass)
    objective()
    weights = [p.detach().clone() for p in run.params]
    gradients = [p.grad for p in run.params]
    generator = torch.Generator().manual_seed(4)
    vectors = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in run.params]
    products = objective.finite_difference_product(vectors, objective.current_gradients())
    sigma_k = benchmark.SIGMA / float(torch.sqrt(sum(v.square().sum() for v in vectors)))  # σₖ = σ/|v|
    for shifted, w, v in zip(run.acc.seen[-1], weights, vectors):
        torch.testing.assert_close(shifted, w + sigma_k * v, rtol=1e-15, atol=1e-15)
    reference = run.acc.hvp(vectors)
    for product, exact in zip(products, reference):  # a quadratic: only rounding separates them
        torch.testing.assert_close(product, exact, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(p, w) for p, w in zip(run.params, weights))
    assert all(p.grad is gradient for p, gradient in zip(run.params, gradients))
    assert objective.current_gradients() == gradients  # w is still the latest evaluation's
    assert run.calls["gradient"] == 2 and run.passes == pytest.approx(2.0)


@pytest.mark.filterwarnings("ignore::moller_scg.scg_state.SCGStalledWarning")
def test_with_finite_differences_a_share_that_costs_a_pass_is_replaced_by_one_gradient_pass(benchmark):
    from moller_scg import SCG

    run, _, x, y = least_squares_run(benchmark, power=1.0)
    shares = {0.1: 0.3, 0.2: 0.6, 0.5: 1.0, 1.0: 2.0}  # from f = 0.5 on a product costs a pass or more
    objective = benchmark.GrowingCurvatureObjective(run, shares, 1.0, finite_difference=True)
    optimizer = SCG(run.params, hvp="double-backward")
    for _ in range(40):
        optimizer.step(objective)
        if optimizer.trace.stalled:
            break
    assert float(optimizer.trace.loss) == pytest.approx(least_squares_optimum(x, y), rel=1e-8)
    assert set(objective.used) <= {0.1, 0.2, benchmark.FINITE_DIFFERENCE}
    assert objective.used[-1] == benchmark.FINITE_DIFFERENCE
    finite_differences = objective.used.count(benchmark.FINITE_DIFFERENCE)
    products = len(objective.used) - finite_differences
    assert run.calls["hvp"] == run.acc.passes.hvp == products
    # every closure call of SCG is a gradient or trial pass; the finite differences are the only others
    assert run.calls["gradient"] + run.calls["loss"] == optimizer.trace.closure_calls + finite_differences
