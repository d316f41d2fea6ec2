"""examples/compare_optimizers.py runs end to end in its --quick form and writes its table and figure."""

from __future__ import annotations

import re
from pathlib import Path

from scripts import load_script

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "compare_optimizers.py"


def load_example(monkeypatch):
    return load_script(EXAMPLE, monkeypatch)


def test_quick_comparison_writes_a_table_and_a_figure(tmp_path, monkeypatch, capsys):
    example = load_example(monkeypatch)
    assert example.main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "compare_optimizers.txt").read_text(encoding="utf-8")
    assert (tmp_path / "compare_optimizers.png").stat().st_size > 10_000
    assert "command: python examples/compare_optimizers.py --quick" in report
    assert "the same for every optimizer" in report
    budget = example.QUICK_BUDGET
    for name in ("Adam", "SCGAdam", "CoBA-HZ", "SCG (full batch)"):
        (row,) = [line for line in report.splitlines() if line.startswith(f"{name} ") and "%" in line]
        numbers = re.findall(r"[-\d.]+", row[len(name) :])
        loss_at_budget, passes, final_loss = float(numbers[-6]), int(numbers[-5]), float(numbers[-2])
        assert budget <= passes <= budget + 1  # SCG's last step may overshoot by one pass
        assert loss_at_budget == final_loss or passes > budget
        assert final_loss < 2.3  # below the initial ≈ ln 10 for every optimizer
