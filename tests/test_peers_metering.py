"""The metering of ``benchmarks/peers.py`` (``peers_metering.Run``): one baton hand-off and one memory sample per
evaluation, also when SCG's trial splits a gradient pass into its forward and, later, its backward; and memory
counted once per buffer, also where NumPy arrays view a tensor's memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scripts import load_script

METERING = Path(__file__).resolve().parent.parent / "benchmarks" / "peers_metering.py"


def test_a_trial_completed_by_its_backward_is_one_hand_off_and_one_memory_sample(monkeypatch):
    metering = load_script(METERING, monkeypatch)
    problem = load_script(METERING.parent / "peers_problems.py", monkeypatch).PROBLEMS["regression"](True, 0)
    initial = problem.make_model().state_dict()
    run = metering.Run("SCG m=20", problem, initial, {"hvp": 2.0, "loss": 0.5, "forward": 0.4})
    assert run.acc.defers_gradient  # the quick regression is one batch: SCG's trial defers its backward
    events: list[str] = []
    monkeypatch.setattr(run, "switch", lambda: events.append("hand-off"))
    monkeypatch.setattr(run, "sample_memory", lambda frame: events.append("memory sample"))

    loss, completed = run.value_then_grad()
    assert events == ["hand-off", "memory sample"]
    gradients = completed()
    # The backward is the evaluation's second half: no hand-off, and no walk through the optimizer's frames between
    # a forward and its backward (which would evict what the backward is about to use).
    assert events == ["hand-off", "memory sample"]
    assert len(gradients) == len(run.params)
    assert run.passes == 1.0  # the forward's 0.4 and the backward's 0.6: one gradient pass
    assert run.calls == {"gradient": 1, "hvp": 0, "loss": 0}

    run()  # a plain gradient pass: one hand-off and one sample of its own
    assert events == ["hand-off", "memory sample"] * 2


def test_arrays_that_view_a_tensors_memory_count_as_that_tensor_once(monkeypatch):
    """SCG's pairs on small CPU blocks are worked on through ``tensor.numpy()`` views, some of them at an offset into
    the tensor (r is the last row of the (4, n) buffer): they add nothing to the tensor's numbers. An array of its
    own counts once, however many views of it are held."""
    metering = load_script(METERING, monkeypatch)
    rows = torch.zeros(4, 10, dtype=torch.float64)
    views = [rows.numpy(), rows[3].numpy(), rows[1:3].numpy()[1]]
    assert metering.reachable_numbers([rows, *views], set()) == 40
    assert metering.reachable_numbers(views[1:], set()) == 40
    assert metering.reachable_numbers(views, {rows.untyped_storage().data_ptr()}) == 0  # the parameters' own storage
    own = np.zeros((3, 10))
    assert metering.reachable_numbers([rows, own, own[1], own[2:]], set()) == 70


def test_scgs_accepted_point_is_timed_at_its_evaluation_not_after_its_own_work(monkeypatch):
    """LBFGS's points are recorded as its evaluations return; SCG's after its step, whose work after the trial (the
    pair update, the next direction) belongs to the next point (docs/performance.md, lever 61)."""
    import time

    metering = load_script(METERING, monkeypatch)
    adapters = load_script(METERING.parent / "peers_adapters.py", monkeypatch)
    problem = load_script(METERING.parent / "peers_problems.py", monkeypatch).PROBLEMS["regression"](True, 0)
    run = metering.Run(
        "SCG m=20", problem, problem.make_model().state_dict(), {"hvp": 2.0, "loss": 0.5, "forward": 0.4}
    )
    run.budget = 4.0
    # Own work much longer than a step's evaluations (milliseconds, a quarter of a second on a loaded machine), so
    # that "timed before its own work" (under one step's sleep) and "after it" (two) stay apart on any machine.
    after_each_step = 1.0
    adapters.SCG([torch.zeros(2, requires_grad=True)], memory=20)  # SciPy's import, once per process, off the clock

    class SlowAfterItsEvaluations(adapters.SCG):
        def step(self, closure):
            loss = super().step(closure)
            time.sleep(after_each_step)  # own work after the step's last evaluation, on the run's clock
            return loss

    monkeypatch.setattr(adapters, "SCG", SlowAfterItsEvaluations)
    run.clock.start()
    try:
        adapters.run_scg(run, "secant", memory=20)
    except metering.BudgetSpent:
        pass
    start, first_step, second_step = run.history[:3]
    assert first_step.loss < start.loss  # the first step was accepted
    assert first_step.seconds < after_each_step <= second_step.seconds < 2 * after_each_step
    assert run.clock.seconds >= 3 * after_each_step


def test_a_point_recorded_at_a_given_time_keeps_it(monkeypatch):
    metering = load_script(METERING, monkeypatch)
    problem = load_script(METERING.parent / "peers_problems.py", monkeypatch).PROBLEMS["regression"](True, 0)
    run = metering.Run(
        "SCG m=20", problem, problem.make_model().state_dict(), {"hvp": 2.0, "loss": 0.5, "forward": 0.4}
    )
    run.clock.start()
    run()
    assert 0.0 < run.evaluation_end <= run.clock.now()
    run.record(0.125, run.flat_params, at=run.evaluation_end)
    assert run.history[-1].seconds == run.evaluation_end and run.history[-1].loss == 0.125


def test_the_reference_lbfgs_never_evaluates_the_same_point_twice_in_a_row(monkeypatch):
    """With torch's max_iter=20, every step() began by evaluating again the point the last one ended at: 14 of 300
    evaluations on the logistic problem. The race runs one unbounded step (lever 61)."""
    metering = load_script(METERING, monkeypatch)
    adapters = load_script(METERING.parent / "peers_adapters.py", monkeypatch)
    problem = load_script(METERING.parent / "peers_problems.py", monkeypatch).PROBLEMS["logistic"](True, 0)
    run = metering.Run("torch LBFGS", problem, problem.make_model().state_dict(), {"hvp": 2.0, "loss": 0.5})
    run.budget = 60.0
    points = []
    record = run.record

    def noted(loss, weights, at=None):
        points.append(weights().clone())
        record(loss, weights, at)

    monkeypatch.setattr(run, "record", noted)
    try:
        adapters.run_torch_lbfgs(run)
    except metering.BudgetSpent:
        pass
    assert len(points) == 60 and run.extra["lbfgs_iterations"] > 20
    assert not any(torch.equal(a, b) for a, b in zip(points, points[1:]))
