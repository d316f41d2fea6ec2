"""benchmarks/fresh_process.py: a user's first run in a new interpreter, construction and first steps timed apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fresh_process.py"


def test_a_first_run_times_the_construction_and_the_steps_apart(monkeypatch):
    script = load_script(BENCHMARK, monkeypatch)
    for row in script.ROWS:
        run = script.first_run(row)
        assert run["row"] == row
        assert run["construction_ms"] > 0.0 and run["steps_ms"] > 0.0
        assert isinstance(run["scipy_before_construction"], bool) and isinstance(run["scipy_after_construction"], bool)
    with pytest.raises(ValueError, match="unknown row"):
        script.make_optimizer("Adam", [])


def test_the_report_gives_each_rows_medians_and_ranges(monkeypatch):
    script = load_script(BENCHMARK, monkeypatch)
    runs = [
        {"row": row, "construction_ms": c, "steps_ms": s}
        for row, values in zip(script.ROWS, [[(1.0, 4.0), (3.0, 6.0), (2.0, 5.0)], [(10.0, 1.0)] * 3])
        for c, s in values
    ]
    first, second = script.report(runs)[1:]
    assert first.startswith(script.ROWS[0]) and "2.0 (1.0–3.0)" in first and "5.0 (4.0–6.0)" in first
    assert second.startswith(script.ROWS[1]) and "10.0 (10.0–10.0)" in second and "1.0 (1.0–1.0)" in second


def test_repetitions_below_one_are_refused(monkeypatch):
    script = load_script(BENCHMARK, monkeypatch)
    with pytest.raises(SystemExit):
        script.main(["--repetitions", "0"])


def test_in_fresh_processes_scg_imports_scipy_at_its_construction_and_lbfgs_not_at_all(monkeypatch, capsys):
    script = load_script(BENCHMARK, monkeypatch)
    assert script.main(["--repetitions", "1"]) == 0
    output = capsys.readouterr().out
    assert all(row in output for row in script.ROWS)
    assert f"{script.ROWS[0]}: (False, True)" in output  # not imported before SCG(memory=20) is built, but by it
    assert f"{script.ROWS[1]}: (False, False)" in output
