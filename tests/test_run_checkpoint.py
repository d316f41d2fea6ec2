"""The run state in fit's checkpoint: the layout fit writes, and checkpoints in that layout resuming bit-identically."""

from __future__ import annotations

import math

import pytest
import torch
from problems import regression_problem
from torch import nn

from moller_scg import fit
from moller_scg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moller_scg.run_checkpoint import RunState
from moller_scg.stopping import EarlyStopping

# The keys of a checkpoint's "extra" as fit writes them ("loss" since 2026-12-07; a checkpoint without it resumes).
TODAYS_KEYS = [
    "stop_reason",
    "best_iteration",
    "early_stopping",
    "elapsed",
    "world_size",
    "curvature_window",
    "data_fingerprint",
    "weight_decay",
    "optimizer_at_weights",
    "loss",
]
ANNEALING_KEYS = ["restarts", "annealing"]


def validated_fit(model, data, **options):
    x, y = data
    return fit(model, nn.MSELoss(), data, val_data=(x + 0.1, y), batch_size=16, progress=False, **options)


def test_fit_writes_the_run_state_in_todays_layout(tmp_path, regression):
    path = tmp_path / "run.pt"
    model, data = regression
    history = validated_fit(model, data, max_iter=4, checkpoint=path)
    extra = load_checkpoint(path)["extra"]
    assert list(extra) == TODAYS_KEYS
    assert extra["stop_reason"] == "max_iter" and extra["best_iteration"] == history.best_iteration
    assert set(extra["early_stopping"]) == {"best_loss", "best_iteration", "best_weights", "fails"}
    assert extra["early_stopping"]["best_loss"] == min(history["val_loss"])
    assert set(extra["early_stopping"]["best_weights"]) == set(model.state_dict())
    assert isinstance(extra["elapsed"], float) and extra["elapsed"] > 0
    assert extra["world_size"] == 1 and extra["curvature_window"] == {"window": 0}
    assert isinstance(extra["data_fingerprint"], dict) and extra["optimizer_at_weights"] is True
    assert extra["weight_decay"] == 0.0
    assert extra["loss"] == "torch.nn.modules.loss.MSELoss, reduction 'mean'"


def test_a_run_with_annealing_adds_its_restarts_and_annealer_state(tmp_path, regression):
    from moller_scg import SCG, AnnealingRestarts

    path = tmp_path / "run.pt"
    model, data = regression
    annealing = AnnealingRestarts(window=3, rel_tol=0.2, temperature=0.01, scale=0.05, perturbations=4)
    fit(model, nn.MSELoss(), data, optimizer=SCG(model.parameters()), annealing=annealing, max_iter=8,
        batch_size=16, progress=False, checkpoint=path)  # fmt: skip
    extra = load_checkpoint(path)["extra"]
    assert list(extra) == TODAYS_KEYS + ANNEALING_KEYS
    assert isinstance(extra["restarts"], list) and isinstance(extra["annealing"], dict)


def _rewritten_in_todays_layout(path, **changes):
    """The checkpoint at ``path`` with its extra spelled out key by key, as the code before RunState wrote it."""
    checkpoint = load_checkpoint(path)
    written = checkpoint["extra"]
    early = written["early_stopping"]
    checkpoint["extra"] = {
        "stop_reason": written["stop_reason"],
        "best_iteration": written["best_iteration"],
        "early_stopping": {
            "best_loss": early["best_loss"],
            "best_iteration": early["best_iteration"],
            "best_weights": early["best_weights"],
            "fails": early["fails"],
        },
        "elapsed": written["elapsed"],
        "world_size": 1,
        "curvature_window": {"window": 0},
        "data_fingerprint": written["data_fingerprint"],
        "optimizer_at_weights": True,
    } | changes
    save_checkpoint(path, checkpoint)


def test_a_checkpoint_in_todays_layout_resumes_bit_identically(tmp_path):
    reference, data = regression_problem()
    uninterrupted = validated_fit(reference, data, max_iter=12)

    path = tmp_path / "run.pt"
    model, data = regression_problem()
    validated_fit(model, data, max_iter=5, checkpoint=path)
    _rewritten_in_todays_layout(path)
    fresh, _ = regression_problem(seed=99)
    resumed = validated_fit(fresh, data, max_iter=12, checkpoint=path, resume=True)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), reference.parameters()))
    for column in ("k", "loss", "val_loss", "lambd", "success", "closure_calls", "hvp_calls"):
        assert resumed[column] == uninterrupted[column], column
    assert resumed.best_iteration == uninterrupted.best_iteration


@pytest.mark.parametrize(
    ("changes", "options", "expected"),
    [
        ({"elapsed": 1e9}, {"max_time": 1e6}, "max_time"),  # the time already spent counts against max_time
        (
            {"early_stopping": {"best_loss": -math.inf, "best_iteration": 1, "best_weights": None, "fails": 6}},
            {"max_fail": 7},
            "max_fail",
        ),  # fmt: skip
    ],
    ids=["elapsed", "early_stopping"],
)
def test_each_field_of_todays_layout_is_read_on_resume(tmp_path, changes, options, expected, regression):
    path = tmp_path / "run.pt"
    model, data = regression
    validated_fit(model, data, max_iter=5, checkpoint=path)
    _rewritten_in_todays_layout(path, **changes)
    resumed = validated_fit(model, data, max_iter=50, checkpoint=path, resume=True, **options)
    assert resumed.stop_reason == expected
    assert len(resumed) <= 6


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path, regression):
    path = tmp_path / "run.pt"
    model, data = regression
    validated_fit(model, data, max_iter=2, checkpoint=path)
    _rewritten_in_todays_layout(path, world_size=2)
    with pytest.raises(CheckpointError, match="over 2 process"):
        validated_fit(model, data, max_iter=4, checkpoint=path, resume=True)


@pytest.mark.parametrize("value", ["abc", "0.3", None, [1], float("nan"), -1.0, True])
def test_a_checkpoint_with_an_invalid_weight_decay_is_refused_before_anything_is_loaded(tmp_path, regression, value):
    path = tmp_path / "run.pt"
    model, data = regression
    validated_fit(model, data, max_iter=2, checkpoint=path)
    _rewritten_in_todays_layout(path, weight_decay=value)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # weights that differ from the checkpoint's, so a half-load would show
        moved = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=f"cannot resume from {path}: its weight_decay is invalid"):
        validated_fit(model, data, max_iter=4, checkpoint=path, resume=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), moved))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_an_extra_without_run_state_reads_as_a_fresh_run():
    assert RunState.from_extra({}) == RunState()


def test_run_state_round_trips_through_its_extra():
    state = RunState(
        stop_reason="goal",
        best_iteration=3,
        early_stopping=EarlyStopping(best_loss=0.5, best_iteration=3, fails=2),
        elapsed=1.25,
        curvature_window={"window": 7},
        data_fingerprint={"samples": 4},
        optimizer_at_weights=True,
        restarts=[],
        annealing={"pending": None},
    )
    assert RunState.from_extra(state.to_extra()) == state
    assert RunState.from_extra({"curvature_window": 7}).curvature_window == {"window": 7}  # the older int form
