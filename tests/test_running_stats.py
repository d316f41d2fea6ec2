"""Batch norm in training mode: a pass that fails leaves its running statistics as they were before it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from moller_scg.accumulate import GradientAccumulator, StochasticObjectiveWarning
from moller_scg.running_stats import RunningStatistics

SAMPLES, FEATURES = 24, 3


def batch_norm_problem(bad_batch: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A train-mode batch-norm model; with ``bad_batch`` the last batch of 8 holds an infinite input."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randn(SAMPLES, 1, generator=generator, dtype=torch.float64)
    if bad_batch:
        inputs[-1, 0] = math.inf
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    return model.train(), (inputs, targets)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def accumulator(model: nn.Module, data, **options) -> GradientAccumulator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StochasticObjectiveWarning)
        return GradientAccumulator(model, nn.MSELoss(), data, batch_size=8, **options)


@pytest.mark.parametrize("call", ["gradient", "hvp", "loss", "evaluate"])
def test_a_pass_that_raises_on_a_non_finite_batch_restores_the_running_statistics(call):
    model, data = batch_norm_problem(bad_batch=True)
    acc = accumulator(model, data)
    before = buffers(model)
    passes = {
        "gradient": acc,
        "hvp": lambda: acc.hvp([torch.ones_like(p) for p in acc.params]),
        "loss": acc.loss,
        "evaluate": lambda: acc.evaluate({}),
    }
    with pytest.warns(StochasticObjectiveWarning), pytest.raises(FloatingPointError, match="batch 2"):
        passes[call]()
    assert_same(before, buffers(model))


def test_a_pass_that_returns_a_non_finite_loss_restores_the_running_statistics():
    model, data = batch_norm_problem(bad_batch=True)
    acc = accumulator(model, data, on_non_finite="return")
    before = buffers(model)
    with pytest.warns(StochasticObjectiveWarning):
        assert not math.isfinite(float(acc()))
    assert_same(before, buffers(model))
    assert all(torch.isfinite(buffer).all() for buffer in model.buffers())


def test_a_pass_interrupted_by_an_exception_restores_the_running_statistics():
    model, data = batch_norm_problem(bad_batch=False)
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory on batch 2")
        return nn.functional.mse_loss(outputs, targets)

    loss_fn.reduction = "mean"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StochasticObjectiveWarning)
        acc = GradientAccumulator(model, loss_fn, data, batch_size=8)
        before = buffers(model)
        with pytest.raises(RuntimeError, match="out of memory"):
            acc()
    assert_same(before, buffers(model))


def test_a_pass_that_succeeds_keeps_its_updates_as_a_training_loop_would():
    model, data = batch_norm_problem(bad_batch=False)
    acc = accumulator(model, data)
    before = buffers(model)
    with pytest.warns(StochasticObjectiveWarning):
        acc()
    after = buffers(model)
    assert int(after["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 3
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])


def test_a_model_in_eval_mode_takes_no_snapshot():
    model, _ = batch_norm_problem(bad_batch=False)
    assert RunningStatistics(model.eval())._saved == []
    assert len(RunningStatistics(model.train())._saved) == 3  # running mean, variance, batches tracked


def test_instance_norm_running_statistics_are_restored_after_a_failed_pass():
    torch.manual_seed(0)
    inputs, targets = torch.randn(16, 2, 5, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    inputs[-1, 0, 0] = math.inf  # one bad sample, in the last batch
    norm = nn.InstanceNorm1d(2, track_running_stats=True)
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(10, 10)).double().train()
    accumulator = GradientAccumulator(model, nn.MSELoss(), (inputs, targets), batch_size=8)
    with pytest.raises(FloatingPointError):
        accumulator()
    assert norm.running_mean.tolist() == [0.0, 0.0] and int(norm.num_batches_tracked) == 0
