"""benchmarks/race_attribution.py: a row's clocked time in the race of peers.py, inside its evaluations and outside."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "race_attribution.py"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torchmin, at import
@pytest.mark.filterwarnings("ignore::moller_scg.SCGStalledWarning")
def test_every_evaluation_of_a_row_is_timed_once_and_inside_its_clocked_time(monkeypatch):
    for module in ("torchmin", "paramz", "sklearn", "mlxtend"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    attribution = load_script(BENCHMARK, monkeypatch)
    problem = attribution.PROBLEMS["regression"](True, 0)
    initial = problem.make_model().state_dict()
    costs = attribution.calibrate(problem, initial)
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
