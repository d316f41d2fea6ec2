"""benchmarks/own_work_by_function.py: one gap of SCG's own work between two evaluations, split among its functions."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "own_work_by_function.py"


def test_a_function_is_charged_its_time_in_the_window_without_the_evaluations_inside_it(monkeypatch):
    by_function = load_script(BENCHMARK, monkeypatch)
    intervals = [("outer", 0.0, 10.0), ("inner", 2.0, 4.0), ("inner", 6.0, 12.0), ("before", -3.0, -1.0)]
    evaluations = [(3.0, 3.5), (7.0, 9.0)]
    seen = by_function._inside(intervals, evaluations, low=1.0, high=8.0)
    # outer: 1..8 is 7, less 0.5 and 1 of evaluations; inner: 2..4 less 0.5, then 6..8 less 1; "before" is outside.
    assert seen == pytest.approx({"outer": 5.5e6, "inner": 2.5e6})


def test_the_timers_put_every_function_back(monkeypatch):
    by_function = load_script(BENCHMARK, monkeypatch)
    import importlib

    def current():
        found = []
        for module_name, attribute in by_function.TIMED:
            owner = importlib.import_module(module_name)
            *classes, name = attribute.split(".")
            for class_name in classes:
                owner = getattr(owner, class_name)
            found.append(owner.__dict__[name])
        return found

    before = current()
    with by_function.Timers():
        assert all(now is not then for now, then in zip(current(), before))
    assert all(now is then for now, then in zip(current(), before))


@pytest.mark.parametrize("gap, expected", [(1, "SCG._start"), (3, "SecantPairs.advance_flat")])
def test_it_splits_the_first_step_and_a_later_one(monkeypatch, capsys, gap, expected):
    by_function = load_script(BENCHMARK, monkeypatch)
    totals, split = by_function.split_gap(
        "logistic", gap, repeats=2, memory=5, diagonal_scaling=True, cold_caches_mib=1
    )
    assert len(totals) == 2 and all(total > 0.0 for total in totals)
    assert expected in split and "SCG.step" in split
    assert all(0.0 <= value <= max(totals) for values in split.values() for value in values)
    assert by_function.main(["--gap", str(gap), "--repeats", "1", "--memory", "3", "--cold-caches", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"own work after evaluation {gap}, before evaluation {gap + 1}" in lines[1]
    assert any(line.split()[0] == expected for line in lines[3:])
