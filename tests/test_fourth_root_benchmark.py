"""benchmarks/fourth_root.py: the diagonal mode's v^¼ as two square roots, timed beside the plain power."""

from __future__ import annotations

from pathlib import Path

from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fourth_root.py"


def test_it_times_both_ways_on_each_path_and_they_agree_to_an_ulp(monkeypatch, capsys):
    fourth_root = load_script(BENCHMARK, monkeypatch)
    power, roots, difference = fourth_root.compare(300, fourth_root.torch.float32, calls=2, repeats=1)
    assert power > 0.0 and roots > 0.0 and difference <= 2e-7
    assert fourth_root.main(["--sizes", "40", "5000", "--calls", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("v^¼ of the diagonal H₀")
    assert "n =        40 float64 (NumPy)" in lines[1] and "n =     5,000 float64 (torch)" in lines[2]
    assert all("power" in line and "√√v" in line and "ratio" in line for line in lines[1:])
