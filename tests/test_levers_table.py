"""benchmarks/levers.py's passes table: ratios per seed, their geometric means, and the final loss."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    seed_0 = [result("SCG", [entry(0.5), entry(0.0, False), entry(None)], 0.9)]
    seed_1 = [result("SCG", [entry(2.0), entry(0.0, False), entry(None)], 0.4)]
    header, columns, row = levers.passes_table("autoencoder", [seed_0, seed_1])
    assert header.startswith("## autoencoder: passes to T1 / T2 / T3") and "2 seed(s)" in header
    assert "final" in columns
    assert row.split()[:7] == ["SCG", "1.00", "/", "≪1", "/", "—", "0.6"]  # √(0.9 · 0.4) = 0.6
    assert row.endswith("0.50/≪1/— ×0.9  2.00/≪1/— ×0.4")
