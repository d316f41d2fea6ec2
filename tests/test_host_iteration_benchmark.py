"""benchmarks/host_iteration.py: SCG's secant iteration written out in one function over its own storage (lever 60)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from problems import softmax_problem
from scripts import load_script
from torch import nn

from moller_scg import SCG, GradientAccumulator

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "host_iteration.py"


def _run(kind: type, model: nn.Module, objective, steps: int, **options) -> tuple[list, list[torch.Tensor], SCG]:
    optimizer = kind(model.parameters(), **options)
    traces = []
    for _ in range(steps):
        optimizer.step(objective)
        traces.append(dataclasses.astuple(optimizer.trace))
    return traces, [p.detach().clone() for p in model.parameters()], optimizer


def _same(a: list[tuple], b: list[tuple]) -> bool:
    """Whether two runs' traces hold the same numbers, NaN equal to NaN."""
    return len(a) == len(b) and all(x == y or (x != x and y != y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))


SUCCESS, COMPARISON = 2, 5  # the fields of SCGTrace, as dataclasses.astuple gives them


@pytest.mark.parametrize("diagonal_scaling", [False, True])
def test_it_takes_the_library_secant_modes_steps_bit_for_bit(monkeypatch, diagonal_scaling):
    # 60 steps that fill and recycle m = 3 slots, reject some trials and restart twice (N = 25): every trace and the
    # weights equal SCG's exactly, and the written-out iteration took the steps it is for.
    script = load_script(BENCHMARK, monkeypatch)
    model, accumulator = softmax_problem()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"memory": 3, "diagonal_scaling": diagonal_scaling, "restart": 25}
    library_traces, library_weights, _ = _run(SCG, model, accumulator, 60, **options)
    model.load_state_dict(initial)
    taken = []
    original = script.HostIterationSCG._iterate_on_host_rows
    monkeypatch.setattr(
        script.HostIterationSCG,
        "_iterate_on_host_rows",
        lambda self, *args: taken.append(original(self, *args)) or taken[-1],
    )
    host_traces, host_weights, _ = _run(script.HostIterationSCG, model, accumulator, 60, **options)
    assert _same(host_traces, library_traces)
    assert all(torch.equal(a, b) for a, b in zip(host_weights, library_weights))
    assert sum(not trace[SUCCESS] for trace in library_traces) > 0  # rejected trials among them
    assert sum(taken) >= 50  # all but the first step and the finite difference after each restart


def _not_finite_at(objective: GradientAccumulator, evaluations: tuple[int, ...]):
    """A closure that evaluates ``objective`` and makes its loss NaN at the given evaluations (counted from 1)."""
    calls = []

    def closure() -> torch.Tensor:
        calls.append(None)
        loss = objective()
        return loss * math.nan if len(calls) in evaluations else loss

    return closure


def test_a_non_finite_trial_goes_as_in_the_library(monkeypatch):
    # The 6th and 7th evaluations (trials with pairs held, the variant's steps) give a loss that is not finite: both
    # are rejected and λ raised as SCG does it, and the run goes on to the same weights.
    script = load_script(BENCHMARK, monkeypatch)
    model, accumulator = softmax_problem(seed=1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    for kind in (SCG, script.HostIterationSCG):
        model.load_state_dict(initial)
        runs.append(_run(kind, model, _not_finite_at(accumulator, (6, 7)), 20, memory=3)[:2])
    assert _same(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert sum(math.isnan(trace[COMPARISON]) for trace in runs[0][0]) == 2  # the two non-finite trials' Δ


def test_its_state_resumes_in_the_library_bit_for_bit(monkeypatch):
    # The variant keeps the library's storage: a state saved after 20 of its steps, loaded into SCG, continues as the
    # variant itself continues.
    script = load_script(BENCHMARK, monkeypatch)
    model, accumulator = softmax_problem(seed=2)
    _, _, host = _run(script.HostIterationSCG, model, accumulator, 20, memory=3)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_state = host.state_dict()
    continued = []
    for _ in range(10):
        host.step(accumulator)
        continued.append(dataclasses.astuple(host.trace))
    model.load_state_dict(saved_weights)
    library = SCG(model.parameters(), memory=3)
    library.load_state_dict(saved_state)
    resumed = []
    for _ in range(10):
        library.step(accumulator)
        resumed.append(dataclasses.astuple(library.trace))
    assert _same(resumed, continued)


def test_it_prints_the_bit_check_and_the_own_work_of_each_row(monkeypatch, capsys):
    for module in ("sklearn", "torchmin"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    script = load_script(BENCHMARK, monkeypatch)
    assert script.main(["--repeats", "1", "--evaluations", "3", "--cold-caches", "1", "--check-steps", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(
        "python benchmarks/host_iteration.py --repeats 1 --evaluations 3 --cold-caches 1 --check-steps 30"
    )
    assert all(line.endswith("bit for bit SCG's") and "NOT" not in line for line in lines[1:5])
    assert lines[5].startswith("logistic: own work before each of the first 3 evaluations")
    assert [line.split("  ")[1].strip() for line in lines[6:10]] == list(script.rows(False))
