"""``moller_scg.step_wrapper``: SCG.step goes through torch.optim's step wrapper (profiler range, step hooks) exactly
when a profiler or a hook listens, and straight to the step otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from problems import mean_squared_error_closure
from torch import nn

from moller_scg import SCG


def _problem(memory=2):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    optimizer = SCG(model.parameters(), memory=memory)
    return model, optimizer, mean_squared_error_closure(optimizer, model, x, y)


@pytest.fixture
def profiler_ranges(monkeypatch):
    """The names of the profiler ranges opened (``torch.autograd.profiler.record_function``, which torch's step wrapper
    opens at every call)."""
    opened = []
    original = torch.autograd.profiler.record_function

    class CountingRecordFunction(original):
        def __init__(self, name, args=None):
            opened.append(name)
            super().__init__(name, args)

    monkeypatch.setattr(torch.autograd.profiler, "record_function", CountingRecordFunction)
    return opened


def test_without_a_profiler_or_a_hook_the_step_opens_no_profiler_range(profiler_ranges):
    _, optimizer, closure = _problem()
    for _ in range(3):
        optimizer.step(closure)
    assert "Optimizer.step#SCG.step" not in profiler_ranges
    assert optimizer.trace.k == 3


def test_a_hook_of_the_optimizer_puts_the_step_behind_torchs_wrapper(profiler_ranges):
    _, optimizer, closure = _problem()
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt, args)))
    handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt, args)))
    optimizer.step(closure)
    assert calls == [("pre", optimizer, (optimizer, closure)), ("post", optimizer, (optimizer, closure))]
    assert profiler_ranges.count("Optimizer.step#SCG.step") == 1
    handle.remove()
    optimizer.step(closure)
    assert len(calls) == 3 and calls[-1][0] == "pre"  # the pre-hook is still registered
    assert profiler_ranges.count("Optimizer.step#SCG.step") == 2


def test_a_pre_hook_may_replace_the_closure_as_torch_allows():
    _, optimizer, closure = _problem()
    seen = []

    def counting_closure():
        seen.append(1)
        return closure()

    optimizer.register_step_pre_hook(lambda opt, args, kwargs: ((opt, counting_closure), kwargs))
    optimizer.step(closure)
    assert seen  # the step evaluated the hook's closure


@pytest.mark.parametrize("when", ["pre", "post"])
def test_a_global_hook_puts_every_step_behind_torchs_wrapper(when, profiler_ranges):
    _, optimizer, closure = _problem()
    calls = []
    register = (
        torch_optimizer.register_optimizer_step_pre_hook
        if when == "pre"
        else torch_optimizer.register_optimizer_step_post_hook
    )
    handle = register(lambda opt, args, kwargs: calls.append(opt))
    try:
        optimizer.step(closure)
        optimizer.step(closure)
    finally:
        handle.remove()
    optimizer.step(closure)
    assert calls == [optimizer, optimizer]
    assert profiler_ranges.count("Optimizer.step#SCG.step") == 2


def test_under_the_profiler_the_step_is_a_named_range():
    _, optimizer, closure = _problem()
    optimizer.step(closure)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step(closure)
    assert "Optimizer.step#SCG.step" in {event.name for event in profile.events()}


def test_without_torchs_profiler_query_every_step_goes_through_torchs_wrapper(monkeypatch, profiler_ranges):
    monkeypatch.delattr(torch.autograd, "_profiler_enabled")
    _, optimizer, closure = _problem()
    optimizer.step(closure)
    optimizer.step(closure)
    assert profiler_ranges.count("Optimizer.step#SCG.step") == 2


def test_the_same_trajectory_behind_torchs_wrapper_and_without_it():
    model, optimizer, closure = _problem()
    hooked_model, hooked_optimizer, hooked_closure = _problem()
    hooked_optimizer.register_step_pre_hook(lambda *args: None)
    for _ in range(6):
        loss, hooked_loss = optimizer.step(closure), hooked_optimizer.step(hooked_closure)
        assert torch.equal(loss, hooked_loss)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), hooked_model.parameters()))
