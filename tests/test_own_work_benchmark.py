"""benchmarks/own_work.py: SCG's own work per step on the real trajectories, or with a closure that only sets
``.grad``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "own_work.py"


def test_the_fake_closure_sets_every_grad_and_returns_a_falling_loss(monkeypatch):
    own_work = load_script(BENCHMARK, monkeypatch)
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    closure = own_work.fake_closure(params)
    first, second = closure(), closure()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    assert second < first


@pytest.mark.parametrize("batch_size", [16, 4])  # one batch (the trial's backward deferred), or four
def test_the_timed_accumulator_times_each_evaluation_once_and_changes_no_step(monkeypatch, batch_size):
    own_work = load_script(BENCHMARK, monkeypatch)
    from moller_scg import SCG, GradientAccumulator

    def run(accumulator_class):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
        data = (torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
        objective = accumulator_class(model, torch.nn.MSELoss(), data, batch_size=batch_size)
        optimizer = SCG(model.parameters(), memory=3, diagonal_scaling=True)
        started = time.perf_counter()
        for _ in range(6):
            optimizer.step(objective)
        return objective, time.perf_counter() - started, [p.detach().clone() for p in model.parameters()]

    timed, wall, timed_weights = run(own_work.TimedAccumulator)
    _, _, plain_weights = run(GradientAccumulator)
    assert 0.0 < timed.seconds < wall and timed.depth == 0
    assert all(torch.equal(a, b) for a, b in zip(timed_weights, plain_weights))


def test_it_prints_the_own_work_of_each_problem(monkeypatch, capsys):
    own_work = load_script(BENCHMARK, monkeypatch)
    own, evaluation = own_work.real_own_work("autoencoder", memory=3, steps=2, repeats=1)  # several batches
    assert own > 0.0 and evaluation > 0.0
    assert own_work.main(["--problems", "regression", "logistic", "--steps", "3", "--repeats", "1"]) == 0
    assert own_work.main(["--problems", "regression", "--steps", "3", "--repeats", "1", "--fake-closure"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("SCG(memory=20) own work per step")
    assert [line.split()[0] for line in lines[1:3]] == ["regression", "logistic"]
    assert all("own work" in line and "evaluation" in line and "(3 steps)" in line for line in lines[1:3])
    assert "fake closure" in lines[4]


def test_it_times_torch_lbfgs_and_counts_scgs_tensor_operations(monkeypatch, capsys):
    own_work = load_script(BENCHMARK, monkeypatch)
    assert own_work.lbfgs_own_work("regression", evaluations=4, repeats=1) > 0.0
    plain = own_work.tensor_operations_per_step("regression", memory=3, steps=4)
    diagonal = own_work.tensor_operations_per_step("regression", memory=3, steps=4, diagonal_scaling=True)
    assert 0 < plain < diagonal  # v, Λ and YᵀΛY are tensor operations of their own
    args = ["--problems", "logistic", "--steps", "2", "--repeats", "1", "--with-lbfgs", "--count-operations"]
    assert own_work.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "torch LBFGS(100): own work" in lines[2] and "tensor operations per step" in lines[3]


def test_it_times_the_memory_bound_model_at_its_full_size(monkeypatch, capsys):
    # The memory-bound case's MLP at its full size (50 M weights) is what --problems memory-bound times; here its
    # hidden width is shrunk so that the test stays small.
    own_work = load_script(BENCHMARK, monkeypatch)
    import peers_memory_bound

    monkeypatch.setattr(peers_memory_bound, "HIDDEN_FULL", 7)
    model = own_work.make_model("memory-bound")
    assert sum(p.numel() for p in model.parameters()) == 1_000 * 7 + 7 + 7 * 1_000 + 1_000
    args = ["--problems", "memory-bound", "--memory", "5", "--steps", "2", "--repeats", "1", "--warm-up", "3"]
    assert own_work.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("SCG(memory=5) own work per step")
    assert lines[1].split()[0] == "memory-bound" and "own work" in lines[1]


@pytest.mark.parametrize("batch_size", [16, 4])  # one batch (the trial's backward deferred), or four
def test_evaluation_totals_take_one_entry_per_evaluation_the_deferred_backward_in_its_forwards(monkeypatch, batch_size):
    own_work = load_script(BENCHMARK, monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    data = (torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
    objective = own_work.TimedAccumulator(model, torch.nn.MSELoss(), data, batch_size=batch_size)
    objective.evaluation_totals = []
    objective()  # a gradient pass
    loss, gradient = objective.value_then_gradient()  # a trial's forward …
    after_forward = list(objective.evaluation_totals)
    gradient()  # … and its backward
    assert len(after_forward) == len(objective.evaluation_totals) == 2
    assert objective.evaluation_totals[-1] == objective.seconds >= after_forward[-1]
    assert objective.evaluation_totals == sorted(objective.evaluation_totals)


def test_the_own_work_before_each_evaluation_leaves_out_the_evaluations_and_the_deferred_backward(monkeypatch):
    # A fake clock that only the fake evaluations (100 s; a deferred backward 50 s more) and the fake optimizer's own
    # work (11 s to construct, 7 s before each evaluation, 3 s between a trial's forward and its backward) advance.
    own_work = load_script(BENCHMARK, monkeypatch)
    from moller_scg import GradientAccumulator

    clock = [0.0]
    monkeypatch.setattr(own_work.time, "perf_counter", lambda: clock[0])

    def evaluation(self):
        clock[0] += 100.0
        return torch.tensor(1.0)

    def deferred(self):
        clock[0] += 100.0
        return torch.tensor(1.0), lambda: clock.__setitem__(0, clock[0] + 50.0)

    monkeypatch.setattr(GradientAccumulator, "__call__", evaluation)
    monkeypatch.setattr(GradientAccumulator, "value_then_gradient", deferred)
    model = torch.nn.Linear(2, 1)
    data = (torch.zeros(4, 2), torch.zeros(4, 1))
    objective = own_work.TimedAccumulator(model, torch.nn.MSELoss(), data)
    monkeypatch.setattr(own_work, "timed_objective", lambda name: (model, model.state_dict(), objective))

    class Alternating:
        """A gradient pass, then a trial whose backward is deferred, then a gradient pass, …"""

        def __init__(self, params):
            clock[0] += 11.0
            self.steps = 0

        def step(self, closure):
            clock[0] += 7.0
            if self.steps % 2 == 0:
                closure()
            else:
                _, gradient = closure.value_then_gradient()
                clock[0] += 3.0
                gradient()
            self.steps += 1

    runs = own_work.own_work_before_evaluations("any", Alternating, evaluations=4, repeats=2)
    # Before the 1st: construction and a step's 7 s; then 7 s a step, and 3 s more after a deferred trial.
    assert runs == [[18.0, 7.0, 10.0, 7.0]] * 2

    # With cold caches, the eviction (1000 s here) comes before each evaluation that starts, not before a deferred
    # backward (the race hands its baton on at the same points), and is left out of the own work.
    evictions = []

    def evict(self):
        evictions.append(self.thrash.nbytes)
        clock[0] += 1000.0

    monkeypatch.setattr(own_work._EvaluationStarts, "_evict_caches", evict)
    objective.__class__ = own_work.TimedAccumulator
    runs = own_work.own_work_before_evaluations("any", Alternating, evaluations=4, repeats=2, cold_caches_mib=3)
    assert runs == [[18.0, 7.0, 10.0, 7.0]] * 2
    assert evictions == [3 * 2**20] * 8


def test_it_times_the_own_work_before_each_evaluation_of_scg_and_lbfgs(monkeypatch, capsys):
    own_work = load_script(BENCHMARK, monkeypatch)
    from moller_scg import SCG

    made = []

    def make(params):
        made.append(len(params))
        return SCG(params, memory=3)

    runs = own_work.own_work_before_evaluations("regression", make, evaluations=4, repeats=2)
    assert made == [6, 6]  # a fresh optimizer per run, over the MLP's three weights and three biases
    assert len(runs) == 2 and all(len(run) == 4 and all(seconds > 0.0 for seconds in run) for run in runs)
    assert own_work.main(["--problems", "logistic", "--before-each-evaluation", "3", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "logistic: own work before each of the first 3 evaluations, µs (median of 1 runs)"
    for line, label in zip(lines[2:4], ("SCG(memory=20)", "torch LBFGS(h=20)")):
        cells, totals = line.split("(total to evaluation ")
        assert cells.strip().startswith(label)
        assert len([cell for cell in cells.split() if cell.isdigit()]) == 3
        assert totals.startswith("2: ") and ", 3: " in totals
    with pytest.raises(SystemExit):
        own_work.main(["--problems", "logistic", "--before-each-evaluation", "0"])
    with pytest.raises(SystemExit):
        own_work.main(["--problems", "logistic", "--cold-caches", "4"])  # only with --before-each-evaluation
    args = ["--problems", "logistic", "--before-each-evaluation", "2", "--repeats", "1", "--cold-caches", "1"]
    assert own_work.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("(median of 1 runs, 1 MiB read and written before each evaluation)")
    assert lines[2].startswith("  SCG(memory=20)") and lines[3].startswith("  torch LBFGS(h=20)")


def test_the_lbfgs_row_can_be_torchs_default_without_a_line_search(monkeypatch, capsys):
    own_work = load_script(BENCHMARK, monkeypatch)
    line_searches = []
    real = own_work.torch_lbfgs

    def recording(params, history_size, line_search_fn="strong_wolfe"):
        line_searches.append((history_size, line_search_fn))
        return real(params, history_size, line_search_fn)

    monkeypatch.setattr(own_work, "torch_lbfgs", recording)
    args = ["--problems", "logistic", "--before-each-evaluation", "2", "--repeats", "1"]
    assert own_work.main([*args, "--lbfgs-no-line-search"]) == 0
    assert capsys.readouterr().out.splitlines()[3].startswith("  torch LBFGS(h=20, no LS)")
    assert own_work.main(args) == 0
    assert line_searches == [(20, None), (20, "strong_wolfe")]


def test_the_rows_runs_alternate_and_each_takes_the_cold_caches(monkeypatch, capsys):
    own_work = load_script(BENCHMARK, monkeypatch)
    calls = []

    def record(name, make, evaluations, repeats, cold_caches_mib=0):
        calls.append((make, repeats, cold_caches_mib))
        return [[1e-6 * (len(calls) + i) for i in range(evaluations)]]

    monkeypatch.setattr(own_work, "own_work_before_evaluations", record)
    own_work.print_before_each_evaluation("logistic", 20, False, 20, 3, repeats=3, cold_caches_mib=5)
    assert len(calls) == 6 and all(repeats == 1 and cold == 5 for _, repeats, cold in calls)
    makers = [make for make, _, _ in calls]
    assert all(m is makers[0] for m in makers[0::2]) and all(m is makers[1] for m in makers[1::2])
    assert makers[0] is not makers[1]  # SCG, then LBFGS, then SCG, …
    with pytest.raises(SystemExit):
        own_work.main(["--problems", "logistic", "--before-each-evaluation", "2", "--cold-caches", "-1"])


def test_evicting_the_caches_reads_and_writes_the_whole_buffer(monkeypatch):
    own_work = load_script(BENCHMARK, monkeypatch)
    model = torch.nn.Linear(2, 1)
    objective = own_work.TimedAccumulator(model, torch.nn.MSELoss(), (torch.zeros(4, 2), torch.zeros(4, 1)))
    objective.__class__ = own_work._EvaluationStarts
    objective.thrash = np.zeros(1000)
    objective._evict_caches()
    objective._evict_caches()
    assert np.array_equal(objective.thrash, np.full(1000, 2.0))
