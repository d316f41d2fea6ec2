"""benchmarks/hessian_free.py: Hessian-free inner CG with Møller's or Martens's trust rule, and Gauss–Newton rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from problems import least_squares_optimum, linear_least_squares_benchmark_problem
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "hessian_free.py"


@pytest.fixture
def benchmark(monkeypatch):
    return load_script(BENCHMARK, monkeypatch)


@pytest.mark.parametrize("rule", ["moller", "martens"])
def test_on_a_quadratic_it_reaches_the_least_squares_solution_in_a_few_outer_steps(benchmark, rule):
    from peers_metering import Run

    problem, x, y = linear_least_squares_benchmark_problem()
    initial = problem.make_model().state_dict()
    costs = {"hvp": 2.0, "loss": 0.5, "forward": 0.5, "gauss_newton_1": 1.0}
    run = Run("HF", problem, initial, costs)
    products = benchmark.gauss_newton_accumulator(problem, run.model, 1.0)
    optimizer = benchmark.HessianFreeSCG(run, products, 1.0, rule=rule)
    losses = [optimizer.loss]
    for _ in range(8):
        optimizer.step()
        losses.append(optimizer.loss)
    optimum = least_squares_optimum(x, y)
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))  # a rejected trial is undone
    assert losses[-1] == pytest.approx(optimum, rel=1e-6)
    assert optimizer.cg_iterations > 0 and run.calls["hvp"] == run.acc.passes.hvp


def test_quick_run_writes_a_table_with_every_row_asked_for(benchmark, tmp_path, capsys):
    rows = ["torch LBFGS", "SCG, 10 % GN", "HF Møller Δ, 10 %, ≤10 CG"]
    status = benchmark.main(["--quick", "--problems", "regression", "--rows", *rows, "--out", str(tmp_path)])
    assert status == 0
    text = (tmp_path / "hessian_free_quick.txt").read_text(encoding="utf-8")
    assert "## regression: passes to T1 / T2 / T3" in text
    for row in rows:
        assert row in text
    assert "a Gauss–Newton product over 10 % / 30 % / 100 % of the samples costs" in text
    assert "HF Møller Δ, 10 %, ≤10 CG:" in text and "CG iterations" in text
