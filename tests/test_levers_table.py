"""benchmarks/levers.py's passes table: ratios per seed, their geometric means, and the final loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripts import load_script

LEVERS = Path(__file__).resolve().parent.parent / "benchmarks" / "levers.py"


def entry(passes_ratio: float | None, reference_reached: bool = True) -> dict:
    """One target's entry as ``peers_report.analyse`` makes it (``None``: not reached)."""
    if passes_ratio is None:
        return {"reached": False, "reference_reached": reference_reached}
    return {"reached": True, "reference_reached": reference_reached, "passes_ratio": passes_ratio}


def result(name: str, targets: list[dict], final_loss_ratio: float) -> dict:
    return {"name": name, "targets": targets, "final_loss_ratio": final_loss_ratio}


@pytest.fixture
def levers(monkeypatch):
    return load_script(LEVERS, monkeypatch)


def test_the_mean_is_geometric_and_says_when_a_seed_did_not_reach_or_lbfgs_did_not(levers):
    assert levers._mean_cell([entry(0.5), entry(2.0)]) == "1.00"
    assert levers._mean_cell([entry(0.5), entry(None)]) == "—"
    assert levers._mean_cell([entry(0.0, reference_reached=False)] * 2) == "≪1"
    assert levers._mean_cell([entry(0.5), entry(0.0, reference_reached=False)]) == "mixed"


def test_each_row_gives_its_ratios_per_seed_and_its_final_loss_ratio(levers):
    # Where LBFGS missed a target, the ratio is a bound: the passes to it over LBFGS's whole run's (lever 61).
    seed_0 = [result("SCG", [entry(0.5), entry(0.3, False), entry(None)], 0.9)]
    seed_1 = [result("SCG", [entry(2.0), entry(0.25, False), entry(None)], 0.4)]
    header, columns, row = levers.passes_table("autoencoder", [seed_0, seed_1])
    assert header.startswith("## autoencoder: passes to T1 / T2 / T3") and "2 seed(s)" in header
    assert "final" in columns
    assert row.split()[:7] == ["SCG", "1.00", "/", "≪1", "/", "—", "0.6"]  # √(0.9 · 0.4) = 0.6
    assert row.endswith("0.50/≤0.30/— ×0.9  2.00/≤0.25/— ×0.4")


def _run_until_the_budget_is_spent(levers, name: str, budget: float):
    """Row ``name`` of ``--table passes`` on the quick regression (seed 0) until ``budget`` passes are spent; the
    problem, its initial weights and the run."""
    import peers_metering  # benchmarks/ is on sys.path while the levers script is loaded
    from peers_problems import PROBLEMS

    problem = PROBLEMS["regression"](True, 0)
    initial = problem.make_model().state_dict()
    run = peers_metering.Run(name, problem, initial, {"hvp": 2.0, "loss": 0.5})
    run.budget = budget
    with pytest.raises(peers_metering.BudgetSpent):
        levers.passes_rows()[name].run(run)
    return problem, initial, run


def test_the_no_line_search_rows_take_the_steps_of_torchs_default_lbfgs(levers):
    # One step of 20 iterations: its first evaluation and one after each of the first 19; the next step's first
    # evaluation exceeds the budget.
    problem, initial, run = _run_until_the_budget_is_spent(levers, "torch LBFGS, no line search", 20.0)
    assert (run.extra["lbfgs_iterations"], run.extra["lbfgs_evaluations"]) == (20, 20)

    model = problem.make_model()
    model.load_state_dict(initial)
    inputs, targets = problem.train
    loss_function = problem.make_loss(model)
    optimizer = torch.optim.LBFGS(model.parameters())  # torch's defaults: lr 1, no line search, history 100

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_function(model(inputs), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    for mine, torchs in zip(run.params, model.parameters()):
        torch.testing.assert_close(mine, torchs, rtol=1e-10, atol=1e-12)


def test_the_race_reference_keeps_its_strong_wolfe_line_search(levers):
    _, _, run = _run_until_the_budget_is_spent(levers, "torch LBFGS", 40.0)
    iterations, evaluations = run.extra["lbfgs_iterations"], run.extra["lbfgs_evaluations"]
    assert evaluations > iterations + 1, (iterations, evaluations)  # some line search tried more than one step


def test_a_long_row_name_keeps_the_columns_aligned(levers):
    targets = [entry(0.5), entry(0.5), entry(0.5)]
    per_seed = [[result("SCG", targets, 1.0), result("torch LBFGS h=20, no line search", targets, 1.0)]]
    _, columns, short, long = levers.passes_table("logistic", per_seed)
    assert columns.index("geo-mean") + len("geo-mean") == short.index("0.50 / 0.50 / 0.50") + len("0.50 / 0.50 / 0.50")
    assert short.index("0.50 / 0.50 / 0.50") == long.index("0.50 / 0.50 / 0.50")


def test_the_race_tables_long_row_name_keeps_the_columns_aligned(levers):
    targets = [dict(entry(0.5), time_ratio=0.6) for _ in range(3)]
    results = [
        dict(result("SCG", targets, 1.0), scg_rejected=1, scg_steps=9),
        dict(result("K-FAC H₀ global κ=3, 25 % every 5, rank 64", targets, 1.0), scg_rejected=2, scg_steps=9),
    ]
    _, columns, short, long = levers.table("mnist", results, {"targets": [1.0, 0.1, 0.01]})
    assert columns.index("rejected") + len("rejected") == short.index("1/9") + len("1/9") == long.index("2/9") + 3
    assert short.index("0.60") == long.index("0.60")


def test_a_row_named_in_both_tables_races_as_the_race_tables_row(levers, monkeypatch):
    """``--rows "SCG m=20"`` in the race table is the library's mode (a trial its loss rejects costs its forward),
    not ``--table passes``'s row of that name (every trial a gradient pass, the library before lever 12)."""
    made = []

    def recording_scg(**options):
        made.append(options)
        return options

    monkeypatch.setattr(levers, "scg", recording_scg)
    rows = levers.race_rows(["SCG m=20", "SCG m=20, loss first"])
    assert rows["SCG m=20"].get("loss_first", True) is True
    assert rows["SCG m=20, loss first"] == rows["SCG m=20"]
    assert levers.passes_rows()["SCG m=20"]["loss_first"] is False
    assert set(levers.race_rows()) == set(levers.levers())
