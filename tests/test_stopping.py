"""The stop rules of ``moller_scg.stopping`` one at a time, on hand-written histories: ``converged``,
``budget_exhausted``, ``iterations_without_decrease`` and the validation early-stopping record ``EarlyStopping``."""

from __future__ import annotations

import io
import math
import time

import pytest
import torch
from torch import nn

from moller_scg.history import History
from moller_scg.scg import LAMBDA_MAX
from moller_scg.stopping import EarlyStopping, StopRequests, budget_exhausted, converged, iterations_without_decrease


def history_of(losses: list[float], residual_norm: float = 1.0, lambd: float = 1.0) -> History:
    """A history with one row per loss; the last row has the given |r| and λ."""
    history = History()
    for k, loss in enumerate(losses, start=1):
        history.append(k=k, loss=loss, residual_norm=1.0, lambd=1.0)
    history.columns["residual_norm"][-1] = residual_norm
    history.columns["lambd"][-1] = lambd
    return history


def stop_reason(history: History, **rules) -> str | None:
    """``converged`` with every rule off unless given."""
    options = {"goal": None, "min_grad": None, "max_fail": None, "max_stall": 1000, "early": EarlyStopping()}
    return converged(history, **(options | rules))


# ---------------------------------------------------------------------------------------------------------------
# iterations_without_decrease


@pytest.mark.parametrize(
    "losses, count",
    [
        ([1.0], 0),
        ([3.0, 2.0, 1.0], 0),  # the last iteration lowered the loss
        ([1.0, 2.0, 3.0], 2),  # neither of the last two got below 1
        ([5.0, 1.0, 1.0, 1.0], 2),  # an equal loss is no decrease
        ([3.0, 1.0, 2.0], 1),
    ],
)
def test_iterations_without_decrease(losses, count):
    assert iterations_without_decrease(losses) == count


# ---------------------------------------------------------------------------------------------------------------
# converged


def test_no_rule_met_is_no_reason():
    assert stop_reason(history_of([3.0, 2.0]), goal=1.0, min_grad=0.5, max_fail=2, max_stall=2) is None


def test_goal_is_met_at_or_below_it():
    assert stop_reason(history_of([3.0, 1.0]), goal=1.0) == "goal"
    assert stop_reason(history_of([3.0, 1.0 + 1e-12]), goal=1.0) is None


def test_goal_is_checked_before_the_gradient():
    assert stop_reason(history_of([1.0], residual_norm=0.0), goal=2.0) == "goal"


def test_a_zero_gradient_stops_even_without_min_grad():
    assert stop_reason(history_of([1.0], residual_norm=0.0)) == "min_grad"


def test_min_grad_is_met_at_or_below_it():
    assert stop_reason(history_of([1.0], residual_norm=1e-6), min_grad=1e-6) == "min_grad"
    assert stop_reason(history_of([1.0], residual_norm=2e-6), min_grad=1e-6) is None


def test_max_fail_counts_the_early_stopping_fails():
    assert stop_reason(history_of([1.0]), max_fail=3, early=EarlyStopping(fails=3)) == "max_fail"
    assert stop_reason(history_of([1.0]), max_fail=3, early=EarlyStopping(fails=2)) is None
    assert stop_reason(history_of([1.0]), max_fail=None, early=EarlyStopping(fails=100)) is None


def test_stalled_after_max_stall_iterations_without_decrease():
    assert stop_reason(history_of([1.0, 1.0, 1.0]), max_stall=2) == "stalled"
    assert stop_reason(history_of([1.0, 1.0, 1.0]), max_stall=3) is None


def test_stalled_once_lambda_reaches_its_ceiling():
    assert stop_reason(history_of([2.0, 1.0], lambd=LAMBDA_MAX)) == "stalled"
    assert stop_reason(history_of([2.0, 1.0], lambd=LAMBDA_MAX / 2)) is None


def test_the_stall_rule_looks_only_at_rows_from_stall_since_on():
    history = history_of([1.0, 1.0, 1.0, 1.0])
    assert stop_reason(history, max_stall=2, stall_since=0) == "stalled"
    assert stop_reason(history, max_stall=2, stall_since=2) is None


# ---------------------------------------------------------------------------------------------------------------
# budget_exhausted


def test_budget_exhausted_by_iterations_time_or_a_stop_request():
    now = time.perf_counter()
    assert budget_exhausted(history_of([1.0, 1.0]), 3, None, now, StopRequests()) is None
    assert budget_exhausted(history_of([1.0, 1.0, 1.0]), 3, None, now, StopRequests()) == "max_iter"
    assert budget_exhausted(history_of([1.0]), 3, 60.0, now - 61.0, StopRequests()) == "max_time"
    assert budget_exhausted(history_of([1.0]), 3, 60.0, now, StopRequests()) is None
    requested = StopRequests()
    requested.requested = True
    assert budget_exhausted(history_of([1.0, 1.0, 1.0]), 3, 60.0, now - 61.0, requested) == "interrupted"


# ---------------------------------------------------------------------------------------------------------------
# EarlyStopping


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(2, 1).double()


def test_a_new_best_is_remembered_with_a_copy_of_its_weights_and_resets_the_fails():
    net, early = model(), EarlyStopping(fails=2)
    early.update(net, 4, 0.5, moved=True)
    assert (early.best_loss, early.best_iteration, early.fails) == (0.5, 4, 0)
    assert early.best_weights is not None
    saved = {name: value.clone() for name, value in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    assert all(torch.equal(early.best_weights[name], saved[name]) for name in saved)


def test_a_step_that_is_no_better_is_a_fail_only_if_the_weights_moved():
    net, early = model(), EarlyStopping()
    early.update(net, 1, 0.5, moved=True)
    early.update(net, 2, 0.5, moved=True)  # equal is no better
    early.update(net, 3, 0.7, moved=True)
    early.update(net, 4, 0.7, moved=False)
    assert (early.best_loss, early.best_iteration, early.fails) == (0.5, 1, 2)


def test_state_dict_round_trip_through_torch_save_with_weights_only():
    early = EarlyStopping()
    early.update(model(), 3, 0.25, moved=True)
    early.update(model(), 4, 0.5, moved=True)
    buffer = io.BytesIO()
    torch.save(early.state_dict(), buffer)
    buffer.seek(0)
    loaded = EarlyStopping.from_state_dict(torch.load(buffer, weights_only=True))
    assert (loaded.best_loss, loaded.best_iteration, loaded.fails) == (0.25, 3, 1)
    assert loaded.best_weights is not None and early.best_weights is not None
    assert loaded.best_weights.keys() == early.best_weights.keys()
    assert all(torch.equal(loaded.best_weights[name], value) for name, value in early.best_weights.items())


def test_state_dict_holds_the_best_weights_themselves_and_an_empty_state_is_a_fresh_record():
    early = EarlyStopping()
    early.update(model(), 1, 0.5, moved=True)
    assert early.best_weights is not None
    assert all(early.state_dict()["best_weights"][name] is value for name, value in early.best_weights.items())
    fresh = EarlyStopping.from_state_dict({})
    assert (fresh.best_loss, fresh.best_iteration, fresh.best_weights, fresh.fails) == (math.inf, None, None, 0)


def test_early_stopping_state_dict_holds_the_best_weights_without_copying_them():
    model = nn.Linear(3, 2)
    early = EarlyStopping()
    early.update(model, 1, 0.5, moved=True)
    copies = []
    original = torch.Tensor.__deepcopy__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "__deepcopy__", lambda self, memo: copies.append(self) or original(self, memo))
        state = early.state_dict()
    assert copies == []  # a model-sized copy at every checkpoint, thrown away
    assert state["best_weights"] is early.best_weights
    assert all(state["best_weights"][name] is value for name, value in early.best_weights.items())
    restored = EarlyStopping.from_state_dict(state)
    assert (restored.best_loss, restored.best_iteration, restored.fails) == (0.5, 1, 0)
