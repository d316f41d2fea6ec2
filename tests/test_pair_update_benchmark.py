"""benchmarks/pair_update.py: the time of SecantPairs.advance_flat alone, every slot in use."""

from __future__ import annotations

from pathlib import Path

from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "pair_update.py"


def test_it_times_the_pair_update_of_both_modes_with_every_slot_in_use(monkeypatch, capsys):
    pair_update = load_script(BENCHMARK, monkeypatch)
    assert pair_update.pair_update_seconds(40, 3, diagonal_scaling=True, calls=4, repeats=2) > 0.0
    assert pair_update.main(["--sizes", "30", "40", "--memory", "2", "--calls", "3", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("SecantPairs.advance_flat, µs per call")
    assert len(lines) == 3
    assert all("m =   2" in line and "γI" in line and "diagonal H₀" in line for line in lines[1:])
    assert "n =        30" in lines[1] and "n =        40" in lines[2]
