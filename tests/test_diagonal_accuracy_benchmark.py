"""benchmarks/diagonal_accuracy.py: the main job's test accuracy with the diagonal H₀ at several powers κ."""

from __future__ import annotations

from pathlib import Path

from scripts import load_script

import moller_scg.diagonal_scaling as diagonal_scaling

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "diagonal_accuracy.py"


def test_each_row_trains_with_its_power_and_the_librarys_power_is_restored(monkeypatch, capsys):
    diagonal_accuracy = load_script(BENCHMARK, monkeypatch)
    powers_seen = []
    original = diagonal_scaling.DiagonalScaling._form_diagonal

    def recording(self):
        powers_seen.append(diagonal_scaling.POWER)
        original(self)

    monkeypatch.setattr(diagonal_scaling.DiagonalScaling, "_form_diagonal", recording)
    args = ["--powers", "0.125", "--seeds", "0", "--max-iter", "2", "--max-train", "64"]
    assert diagonal_accuracy.main(args) == 0
    assert powers_seen and set(powers_seen) == {0.125}
    assert diagonal_scaling.POWER == 0.25
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("diagonal H₀, κ = 0.125") and "seed 0:" in lines[1]
    assert lines[2].startswith("γI ") and "seed 0:" in lines[2]
