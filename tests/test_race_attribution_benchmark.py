"""benchmarks/race_attribution.py: a row's clocked time in the race of peers.py, inside its evaluations and outside."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "race_attribution.py"


def _script_and_quick_regression(monkeypatch):
    """The script as a module, and the regression problem at its ``--quick`` size with its start and costs."""
    for module in ("torchmin", "paramz", "sklearn", "mlxtend"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    attribution = load_script(BENCHMARK, monkeypatch)
    problem = attribution.PROBLEMS["regression"](True, 0)
    initial = problem.make_model().state_dict()
    return attribution, problem, initial, attribution.calibrate(problem, initial)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torchmin, at import
@pytest.mark.filterwarnings("ignore::moller_scg.SCGStalledWarning")
def test_every_evaluation_of_a_row_is_timed_once_and_inside_its_clocked_time(monkeypatch):
    attribution, problem, initial, costs = _script_and_quick_regression(monkeypatch)
    results, totals = attribution.timed_race(problem, initial, costs, shuffle_seed=None)
    by_name = {r["name"]: r for r in results}
    for name in attribution.ROWS:
        # One running total per call into the objective (a trial's backward adds to its forward's): the index the
        # report reads at a target's evaluation count; then one for the final loss Run.finish takes, unclocked.
        assert len(totals[name]) == by_name[name]["evaluations"] + 1, name
        assert totals[name] == sorted(totals[name])
        assert 0.0 < totals[name][-2] < by_name[name]["seconds"], name
    lines = attribution.attribution("regression", races=1, shuffle=False, quick=True, target_index=0)
    assert len(lines) == len(attribution.ROWS)
    assert all(line.startswith(f"race 1  {name:16s} ") for line, name in zip(lines, attribution.ROWS))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torchmin, at import
@pytest.mark.filterwarnings("ignore::moller_scg.SCGStalledWarning")
def test_each_evaluation_is_split_into_the_own_work_before_it_and_the_time_inside_it(monkeypatch):
    attribution, problem, initial, costs = _script_and_quick_regression(monkeypatch)
    with attribution.clock_at_each_evaluation() as readings:
        results, totals = attribution.timed_race(problem, initial, costs, shuffle_seed=None)
    by_name = {r["name"]: r for r in results}
    for name in attribution.ROWS:
        clock = readings[name]
        # One reading per evaluation (a trial's deferred backward is not one), rising, each before the evaluation it
        # asks for: so the row's clock then exceeds the time inside the evaluations before it.
        assert len(clock) == by_name[name]["evaluations"], name
        assert clock == sorted(clock)
        assert all(reading > inside for reading, inside in zip(clock[1:], totals[name])), name
        assert clock[-1] < by_name[name]["seconds"]

    split = attribution.per_evaluation("regression", races=1, shuffle=True, evaluations=4, quick=True, with_lean=True)
    assert set(split) == {"torch LBFGS", "torch LBFGS h=20", "SCG m=20", "lean SCG m=20 (research)"}
    for name, parts in split.items():
        assert len(parts["outside"]) == len(parts["inside"]) == 4, name
        assert all(ms >= 0.0 for ms in parts["outside"]) and all(ms > 0.0 for ms in parts["inside"]), name
    lines = attribution.per_evaluation_lines(split)
    assert len(lines) == 2 * len(split)
    assert lines[0].startswith("torch LBFGS") and "outside" in lines[0] and "inside" in lines[1]
