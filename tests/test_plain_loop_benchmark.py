"""benchmarks/plain_loop.py: a user's loop over the accumulator, each evaluation noted with its time and loss."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from scripts import load_script
from torch import nn

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "plain_loop.py"


def _script(monkeypatch):
    pytest.importorskip("torchmin", reason="benchmarks/peers.py needs torchmin: pip install 'moller-scg[benchmarks]'")
    return load_script(BENCHMARK, monkeypatch)


def _timed(script):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    data = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
    return script.TimedAccumulator(model, nn.MSELoss(), data), model, data


def test_each_evaluation_is_noted_once_with_its_loss_and_a_rising_clock(monkeypatch):
    script = _script(monkeypatch)
    accumulator, model, data = _timed(script)
    accumulator.start_clock()
    loss = accumulator()
    assert [h["loss"] for h in accumulator.history] == [float(loss)]
    with torch.no_grad():
        model.weight.add_(0.1)
    trial_loss, gradient = accumulator.value_then_gradient()
    assert len(accumulator.history) == 2 and accumulator.history[1]["loss"] == float(trial_loss)
    at_forward = accumulator.history[1]["seconds"]
    first = gradient()
    at_gradient = accumulator.history[1]["seconds"]
    assert at_gradient >= at_forward >= accumulator.history[0]["seconds"]
    assert gradient() == first and accumulator.history[1]["seconds"] == at_gradient  # noted once
    assert len(accumulator.history) == 2
    # The clock changes nothing the optimizer sees: the plain accumulator's loss and gradients, to the bit.
    plain = script.GradientAccumulator(model, nn.MSELoss(), data)
    plain_loss, plain_gradients = plain(), [p.grad.clone() for p in model.parameters()]
    assert torch.equal(accumulator(), plain_loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain_gradients))
    accumulator.start_clock()
    assert accumulator.history == []


def test_a_trial_rejected_on_its_loss_is_noted_at_its_forward(monkeypatch):
    script = _script(monkeypatch)
    accumulator, _, _ = _timed(script)
    accumulator.start_clock()
    loss, _gradient = accumulator.value_then_gradient()
    assert [h["loss"] for h in accumulator.history] == [float(loss)]
    accumulator()
    assert len(accumulator.history) == 2 and accumulator.history[1]["seconds"] >= accumulator.history[0]["seconds"]


def test_over_several_batches_a_trial_is_one_gradient_pass_noted_once(monkeypatch):
    script = _script(monkeypatch)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    data = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
    accumulator = script.TimedAccumulator(model, nn.MSELoss(), data, batch_size=4)
    assert not accumulator.defers_gradient
    accumulator.start_clock()
    loss, gradient = accumulator.value_then_gradient()
    gradient()
    assert [h["loss"] for h in accumulator.history] == [float(loss)]


def test_a_row_stops_at_the_last_target_or_at_the_budget(monkeypatch):
    for module in ("sklearn", "mlxtend"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    script = _script(monkeypatch)
    problem = script.PROBLEMS["regression"](True, 0)
    initial = problem.make_model().state_dict()
    history = script.run_row(problem, initial, "SCG m=20", None)
    assert problem.budget <= len(history) <= problem.budget + 1  # a step of SCG(memory=m) evaluates at most twice
    target = history[5]["loss"]
    stopped = script.run_row(problem, initial, "SCG m=20", target)
    assert min(h["loss"] for h in stopped) <= target and len(stopped) <= 6  # deterministic: the same trajectory
    assert [h["loss"] for h in stopped] == [h["loss"] for h in history[: len(stopped)]]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torchmin, at import
@pytest.mark.filterwarnings("ignore::moller_scg.SCGStalledWarning")
def test_every_row_runs_alone_once_a_repetition_in_alternating_order(tmp_path, monkeypatch):
    for module in ("torchmin", "paramz", "sklearn", "mlxtend"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    script = load_script(BENCHMARK, monkeypatch)
    calls = []
    run_row = script.run_row

    def recording_run_row(problem, initial, name, last_target):
        calls.append(name)
        return run_row(problem, initial, name, last_target)

    monkeypatch.setattr(script, "run_row", recording_run_row)
    out = tmp_path / "report.txt"
    assert script.main(["--quick", "--repetitions", "2", "--problems", "regression", "--out", str(out)]) == 0
    assert calls == list(script.ROWS) + list(reversed(script.ROWS))
    lines = out.read_text().splitlines()
    rows = {line[:18].strip(): line[18:] for line in lines if line[:18].strip() in script.ROWS}
    assert set(rows) == set(script.ROWS)
    cell = r"\s*(\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)|—)"
    assert all(re.fullmatch(cell * 3 + r"\s*", cells) for cells in rows.values()), rows
    assert rows["torch LBFGS"].split()[:2] == ["1.00", "(1.00–1.00)"]
