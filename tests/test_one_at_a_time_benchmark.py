"""benchmarks/one_at_a_time.py: the race's rows run one at a time, in alternating order, ratios per repetition."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "one_at_a_time.py"


def test_targets_come_from_the_race_results_when_they_have_the_problem(tmp_path, monkeypatch):
    pytest.importorskip("torchmin", reason="benchmarks/peers.py needs torchmin: pip install 'moller-scg[benchmarks]'")
    script = load_script(BENCHMARK, monkeypatch)
    path = tmp_path / "peers.json"
    blocks = [{"problem": {"name": "regression"}, "analysis": {"targets": [3, 2, 1]}}]
    for command, quick, expected in [
        ("python benchmarks/peers.py", False, [3, 2, 1]),
        ("python benchmarks/peers.py --seed 0 --races 2", False, [3, 2, 1]),
        ("python benchmarks/peers.py --seed 1", False, None),  # another split and start: another problem
        ("python benchmarks/peers.py --quick", True, None),
    ]:
        path.write_text(json.dumps({"environment": {"command": command}, "quick": quick, "problems": blocks}))
        assert script.race_targets("regression", path) == expected, command
    path.write_text(json.dumps({"environment": {"command": "peers.py"}, "quick": False, "problems": blocks}))
    assert script.race_targets("logistic", path) is None
    assert script.race_targets("regression", tmp_path / "missing.json") is None
    history = [{"loss": 5.0, "seconds": 0.0}, {"loss": 1.5, "seconds": 1.0}, {"loss": 0.5, "seconds": 2.0}]
    assert script.targets_of(5.0, script.lowest_loss([{"history": history}])) == pytest.approx([0.95, 0.545, 0.5045])
    assert script.seconds_to_targets({"history": history}, [2.0, 1.0, 0.1]) == [1.0, 2.0, None]


def test_ratios_are_medians_of_each_repetitions_ratio_to_its_own_reference(monkeypatch):
    pytest.importorskip("torchmin", reason="benchmarks/peers.py needs torchmin: pip install 'moller-scg[benchmarks]'")
    script = load_script(BENCHMARK, monkeypatch)
    reference = [[1.0, 2.0, None], [2.0, 4.0, None], [1.0, 1.0, 1.0]]
    row = [[0.5, 1.0, 1.0], [1.8, 2.0, None], [0.8, 1.2, 2.0]]
    # T1: 0.5, 0.9, 0.8; T2: 0.5, 0.5, 1.2; T3: only the third repetition reached it in both
    assert script.ratio_cells(row, reference) == ["0.80 (0.50–0.90)", "0.50 (0.50–1.20)", "2.00 (2.00–2.00)"]
    assert script.ratio_cells([[None, None, None]], [[1.0, 1.0, 1.0]]) == ["—", "—", "—"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torchmin, at import
@pytest.mark.filterwarnings("ignore::moller_scg.SCGStalledWarning")
def test_every_row_runs_alone_once_a_repetition_in_alternating_order(tmp_path, monkeypatch):
    for module in ("torchmin", "paramz", "sklearn", "mlxtend"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    script = load_script(BENCHMARK, monkeypatch)
    calls = []
    race = script.race

    def recording_race(problem, initial, costs, table, interleaved):
        calls.append((list(table), interleaved))
        return race(problem, initial, costs, table, interleaved=interleaved)

    monkeypatch.setattr(script, "race", recording_race)
    out = tmp_path / "report.txt"
    assert script.main(["--quick", "--repetitions", "2", "--problems", "regression", "--out", str(out)]) == 0
    assert calls == [([name], False) for name in script.ROWS + tuple(reversed(script.ROWS))]
    lines = out.read_text().splitlines()
    rows = {line[:18].strip(): line[18:] for line in lines if line[:18].strip() in script.ROWS}
    assert set(rows) == set(script.ROWS)
    cell = r"\s*(\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)|—)"
    assert all(re.fullmatch(cell * 3 + r"\s*", cells) for cells in rows.values()), rows
    assert rows["torch LBFGS"].split()[:2] == ["1.00", "(1.00–1.00)"]
