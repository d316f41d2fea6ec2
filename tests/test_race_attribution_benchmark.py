"""benchmarks/race_attribution.py: a row's clocked time in the race of peers.py, inside its evaluations and outside."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "race_attribution.py"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torchmin, at import
@pytest.mark.filterwarnings("ignore::moller_scg.SCGStalledWarning")
def test_the_clocked_time_splits_into_inside_and_outside_the_evaluations(monkeypatch):
    for module in ("torchmin", "paramz", "sklearn", "mlxtend"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    attribution = load_script(BENCHMARK, monkeypatch)
    lines = attribution.attribution("regression", races=1, shuffle=False, quick=True, target_index=0)
    pattern = re.compile(
        r"race 1  (.+?) +(\d+) evaluations to T1: ([\d.]+) ms each clocked = ([\d.]+) inside .* \+ ([\d.]+)"
    )
    rows = {}
    for line in lines:
        match = pattern.match(line)
        assert match, line
        name, evaluations, clocked, inside, outside = match.groups()
        rows[name] = int(evaluations)
        assert float(clocked) == pytest.approx(float(inside) + float(outside), abs=2e-3)
        assert float(inside) > 0.0 and float(outside) > 0.0
    assert set(rows) == set(attribution.ROWS)


def test_a_trials_deferred_backward_counts_in_the_evaluation_its_forward_began(monkeypatch):
    attribution = load_script(BENCHMARK, monkeypatch)
    clock = attribution.EvaluationClock()
    clock.timed("x", lambda: None, True)()  # a gradient pass
    clock.timed("x", lambda: None, True)()  # a trial's forward
    clock.timed("x", lambda: None, False)()  # its backward
    assert len(clock.after_evaluation["x"]) == 2
    assert clock.after_evaluation["x"][-1] == clock.inside["x"]
