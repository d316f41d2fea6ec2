"""fit: each stop reason, early stopping, checkpoints, interruption, and kill-and-resume bit-identity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from problems import regression_problem
from torch import nn

from moller_scg import SCG, History, fit
from moller_scg.checkpoint import CheckpointError, load_checkpoint
from moller_scg.history import STOP_REASONS

ROOT = Path(__file__).resolve().parent.parent


def quiet_fit(model, data, **options):
    options.setdefault("max_iter", 30)
    return fit(model, nn.MSELoss(), data, progress=False, batch_size=16, **options)


def test_max_iter_stops_after_the_budget_and_records_every_iteration(regression):
    model, data = regression
    history = quiet_fit(model, data, max_iter=7)
    assert history.stop_reason == "max_iter" and len(history) == 7
    assert history["k"] == list(range(1, 8))
    losses = history["loss"]
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]


def test_goal_stops_when_the_loss_reaches_it():
    model, data = regression_problem()
    first = quiet_fit(*regression_problem(), max_iter=5)["loss"]
    goal = first[2]
    history = quiet_fit(model, data, goal=goal)
    assert history.stop_reason == "goal"
    assert history["loss"][-1] <= goal and all(loss > goal for loss in history["loss"][:-1])


def test_min_grad_stops_when_the_gradient_is_small():
    model, data = regression_problem()
    norms = quiet_fit(*regression_problem(), max_iter=6)["residual_norm"]
    history = quiet_fit(model, data, min_grad=norms[3])
    assert history.stop_reason == "min_grad"
    assert history["residual_norm"][-1] <= norms[3]


def test_max_time_stops_on_the_time_budget(regression):
    model, data = regression
    started = time.perf_counter()
    history = quiet_fit(model, data, max_iter=10_000, max_time=0.5, callbacks=[lambda h: time.sleep(0.05)])
    assert history.stop_reason == "max_time"
    assert time.perf_counter() - started >= 0.5
    assert 1 <= len(history) <= 0.5 / 0.05 + 1


def test_callback_can_stop_the_run(regression):
    model, data = regression
    history = quiet_fit(model, data, callbacks=[lambda h: len(h) == 3])
    assert history.stop_reason == "callback" and len(history) == 3


def test_stalled_when_the_loss_stops_decreasing():
    # Linear least squares in float32: SCG solves it in a few iterations, after which the loss cannot decrease any
    # more. (In float64 SCG now solves it to an exactly zero gradient, which stops the run as min_grad instead.)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 + 0.01 * torch.randn(30, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    history = quiet_fit(model, (x, y), max_iter=500, max_stall=5, optimizer=SCG(model.parameters()))
    assert history.stop_reason == "stalled"
    assert len(history) < 500
    assert history["loss"][-1] == min(history["loss"])


@pytest.fixture
def sigint_handler():
    """SIGINT as in an interactive session (pytest may have been started with it ignored), restored afterwards."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigint_stops_after_the_current_iteration(sigint_handler, regression):
    model, data = regression

    def interrupt(history):
        if len(history) == 4:
            os.kill(os.getpid(), signal.SIGINT)

    history = quiet_fit(model, data, callbacks=[interrupt])
    assert history.stop_reason == "interrupted" and len(history) == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored(sigint_handler, regression):
    # A job started with nohup or in the background of a script ignores SIGINT; fit must not make it interruptible.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    model, data = regression

    def interrupt(history):
        if len(history) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    history = quiet_fit(model, data, max_iter=4, callbacks=[interrupt])
    assert history.stop_reason == "max_iter" and len(history) == 4
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_non_finite_run_stops_with_a_reason_and_finite_weights(regression):
    model, data = regression
    start = [p.detach().clone() for p in model.parameters()]

    def loss_fn(outputs, targets):
        # Finite only at the starting weights: every trial point SCG tries is non-finite.
        at_start = all(torch.equal(p, q) for p, q in zip(model.parameters(), start))
        return nn.functional.mse_loss(outputs, targets) * (1.0 if at_start else float("inf"))

    history = fit(model, loss_fn, data, batch_size=16, max_iter=100, progress=False, reduction="mean")
    assert history.stop_reason == "non_finite"
    assert "not finite" in history.detail
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_max_fail_restores_the_weights_of_the_best_validation_loss(regression):
    model, (x, y) = regression
    validation = (x + 0.3, -y)  # fitting the training data makes this worse
    history = quiet_fit(model, (x, y), val_data=validation, max_iter=200, max_fail=3)
    assert history.stop_reason == "max_fail"
    best = history.best_iteration
    assert history["val_loss"][best - 1] == min(history["val_loss"])
    with torch.no_grad():
        restored = float(nn.functional.mse_loss(model(validation[0]), validation[1]))
    assert restored == pytest.approx(min(history["val_loss"]), rel=1e-12)
    assert len(history) - best >= 3


def test_validation_metric_is_recorded():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    from moller_scg import accuracy

    history = fit(model, nn.CrossEntropyLoss(), (x, y), val_data=(x, y), metric=accuracy, max_iter=10, progress=False)
    assert 0.0 <= history["val_metric"][-1] <= 1.0
    with torch.no_grad():
        expected = float((model(x).argmax(1) == y).double().mean())
    if history.stop_reason != "max_fail":
        assert history["val_metric"][-1] == pytest.approx(expected, abs=1e-12)


def test_fit_works_with_lbfgs(regression):
    model, data = regression
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=5, line_search_fn="strong_wolfe")
    history = quiet_fit(model, data, optimizer=optimizer, max_iter=4)
    assert history.stop_reason == "max_iter" and len(history) == 4
    assert history["loss"][-1] < history["loss"][0]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"max_iter": 0}, "max_iter"),
        ({"max_fail": 0}, "max_fail"),
        ({"min_grad": -1.0}, "min_grad"),
        ({"max_time": -1.0}, "max_time"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"resume": True}, "resume=True needs checkpoint"),
    ],
)
def test_bad_arguments_raise_value_error(options, match, regression):
    model, data = regression
    options.setdefault("max_iter", 3)
    with pytest.raises(ValueError, match=match):
        fit(model, nn.MSELoss(), data, progress=False, **options)


def test_every_stop_reason_is_explained():
    for reason, sentence in STOP_REASONS.items():
        assert History(stop_reason=reason).message == sentence


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_written_on_stop_and_resume_continues_bit_identically(tmp_path):
    path = tmp_path / "run.pt"
    reference_model, data = regression_problem()
    quiet_fit(reference_model, data, max_iter=20)

    model, data = regression_problem()
    first = quiet_fit(model, data, max_iter=9, checkpoint=path, checkpoint_every=4)
    assert first.stop_reason == "max_iter"
    assert load_checkpoint(path)["iteration"] == 9

    fresh_model, _ = regression_problem(seed=99)  # different initial weights: all come from the checkpoint
    resumed = quiet_fit(fresh_model, data, max_iter=20, checkpoint=path, resume=True)
    assert len(resumed) == 20 and resumed["k"] == list(range(1, 21))
    for p, q in zip(fresh_model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)


def test_resume_without_a_checkpoint_file_starts_afresh(tmp_path, regression):
    model, data = regression
    history = quiet_fit(model, data, max_iter=3, checkpoint=tmp_path / "new.pt", resume=True)
    assert len(history) == 3 and (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("content", [b"\x00not a checkpoint at all" * 10, b""])
def test_resume_from_a_corrupt_checkpoint_refuses_and_changes_nothing(tmp_path, content, regression):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    model, data = regression
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=str(path.name)):
        quiet_fit(model, data, checkpoint=path, resume=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_resume_with_another_models_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    other = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    _, data = regression_problem()
    quiet_fit(other, data, max_iter=2, checkpoint=path)
    model, data = regression_problem()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError):
        quiet_fit(model, data, checkpoint=path, resume=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "history, extra", [({"loss": [0.5, 0.4]}, {"epoch": 2}), ({}, {"early_stopping": {"patience": 3}})]
)
def test_a_checkpoint_of_a_users_own_loop_is_refused_by_name(tmp_path, history, extra):
    from moller_scg.checkpoint import make_checkpoint, save_checkpoint

    path = tmp_path / "own_loop.pt"
    model, data = regression_problem()
    optimizer = SCG(model.parameters(), memory=20)
    save_checkpoint(path, make_checkpoint(model, optimizer, iteration=2, history=history, extra=extra))
    model, data = regression_problem()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="its run state is not one fit wrote"):
        quiet_fit(model, data, checkpoint=path, resume=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    model, data = regression_problem()
    quiet_fit(model, data, max_iter=3, checkpoint=path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError):
        quiet_fit(*regression_problem(), checkpoint=path, resume=True)


# --------------------------------------------------------------------------------------------------------------
# Processes: SIGKILL at random points, SIGTERM


RUN_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from problems import regression_problem
    from moller_scg import fit
    from torch import nn
    torch.set_num_threads(1)
    model, data = regression_problem()
    history = fit(model, nn.MSELoss(), data, batch_size=16, max_iter=40, progress=False,
                  checkpoint=sys.argv[1], checkpoint_every=1, resume=True,
                  callbacks=[lambda h: time.sleep(float(sys.argv[3]))])
    torch.save([p.detach() for p in model.parameters()], sys.argv[2])
    print("STOP", history.stop_reason, len(history), flush=True)
    """
)


def _run_script(tmp_path: Path) -> Path:
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(tests=str(ROOT / "tests")), encoding="utf-8")
    return script


def _start(script: Path, checkpoint: Path, weights: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(checkpoint), str(weights), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )


def _wait_for_iteration(checkpoint: Path, iteration: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended before iteration {iteration}: {process.communicate()}")
        if checkpoint.exists():
            try:
                if load_checkpoint(checkpoint)["iteration"] >= iteration:
                    return
            except CheckpointError:
                pass
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of iteration {iteration} within {timeout} s")


@pytest.mark.slow
def test_sigkill_at_two_random_points_then_resume_ends_bit_identical(tmp_path):
    script = _run_script(tmp_path)
    uninterrupted = _start(script, tmp_path / "a.pt", tmp_path / "a_weights.pt", 0.0)
    output, errors = uninterrupted.communicate(timeout=120)
    assert uninterrupted.returncode == 0, errors
    assert "STOP max_iter 40" in output

    generator = torch.Generator().manual_seed(int(time.time()))
    kill_points = sorted(torch.randint(3, 35, (2,), generator=generator).tolist())
    checkpoint, weights = tmp_path / "b.pt", tmp_path / "b_weights.pt"
    for point in kill_points:
        process = _start(script, checkpoint, weights, 0.03)
        _wait_for_iteration(checkpoint, point, process)
        time.sleep(float(torch.rand(1, generator=generator)) * 0.03)  # somewhere inside an iteration
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL
        assert not list(tmp_path.glob("b.pt.*")) or all(p.suffix != ".pt" for p in tmp_path.glob("b.pt.*"))
    final = _start(script, checkpoint, weights, 0.0)
    output, errors = final.communicate(timeout=120)
    assert final.returncode == 0, errors
    assert "STOP max_iter 40" in output, (kill_points, output, errors)
    expected = torch.load(tmp_path / "a_weights.pt", weights_only=True)
    actual = torch.load(weights, weights_only=True)
    for a, b in zip(actual, expected):
        assert torch.equal(a, b), f"weights differ after kills at {kill_points}"


@pytest.mark.slow
def test_sigterm_stops_writes_the_checkpoint_and_reports_interrupted(tmp_path):
    script = _run_script(tmp_path)
    checkpoint = tmp_path / "term.pt"
    process = _start(script, checkpoint, tmp_path / "w.pt", 0.05)
    _wait_for_iteration(checkpoint, 3, process)
    process.send_signal(signal.SIGTERM)
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    stop_line = next(line for line in output.splitlines() if line.startswith("STOP"))
    _, reason, iterations = stop_line.split()
    assert reason == "interrupted" and 3 <= int(iterations) < 40
    saved = load_checkpoint(checkpoint)
    assert saved["iteration"] == int(iterations)
    assert saved["extra"]["stop_reason"] == "interrupted"


def test_save_checkpoint_is_used_atomically_by_fit(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    model, data = regression_problem()
    quiet_fit(model, data, max_iter=2, checkpoint=path)
    good = path.read_bytes()

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moller_scg.checkpoint.torch.save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        quiet_fit(*regression_problem(), max_iter=2, checkpoint=path, overwrite=True)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


# --------------------------------------------------------------------------------------------------------------
# Reliability (issue #15): refusing to overwrite, paths checked first, resume recomputes what it cannot trust


def mse_at(model, data) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(data[0]), data[1]))


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_existing_checkpoint_is_not_overwritten_without_resume_or_overwrite(tmp_path):
    path = tmp_path / "run.pt"
    quiet_fit(*regression_problem(), max_iter=2, checkpoint=path)
    saved = path.read_bytes()
    model, data = regression_problem(seed=1)
    before = weights(model)
    with pytest.raises(FileExistsError, match=r"resume=True.*overwrite=True"):
        quiet_fit(model, data, max_iter=2, checkpoint=path)
    assert path.read_bytes() == saved
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    history = quiet_fit(model, data, max_iter=3, checkpoint=path, overwrite=True)
    assert load_checkpoint(path)["iteration"] == 3 == len(history)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        quiet_fit(*regression_problem(), checkpoint=tmp_path / "run.pt", resume=True, overwrite=True)


def _never_called(history):
    raise AssertionError("training started")


@pytest.mark.parametrize("kind", ["folder", "fifo", "parent_is_a_file"])
def test_unusable_checkpoint_path_is_refused_before_training(tmp_path, kind):
    if kind == "folder":
        path, match = tmp_path, "is a folder"
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        path, match = tmp_path / "pipe.pt", "not a regular file"
        os.mkfifo(path)
    else:
        (tmp_path / "file").write_text("x")
        path, match = tmp_path / "file" / "run.pt", "cannot be created or written"
    for resume in (False, True):
        with pytest.raises(ValueError, match=match):
            quiet_fit(*regression_problem(), checkpoint=path, resume=resume, callbacks=[_never_called])


def test_read_only_checkpoint_folder_is_refused_before_training(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".probe"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)  # root ignores file modes, so the refusal is simulated
    with pytest.raises(ValueError, match=r"Permission denied.*writable folder"):
        quiet_fit(*regression_problem(), checkpoint=tmp_path / "run.pt", callbacks=[_never_called])


def test_missing_checkpoint_folders_are_created_before_training(tmp_path):
    path = tmp_path / "a" / "b" / "run.pt"
    seen = []
    quiet_fit(
        *regression_problem(), max_iter=1, checkpoint=path, callbacks=[lambda h: seen.append(path.parent.is_dir())]
    )
    assert seen == [True] and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.pt"]  # the probe file is gone


def test_resume_after_a_max_fail_stop_recomputes_the_loss_at_the_restored_weights(tmp_path):
    path = tmp_path / "run.pt"
    model, (x, y) = regression_problem()
    validation = (x + 0.3, -y)  # fitting the training data makes this worse
    first = quiet_fit(model, (x, y), val_data=validation, max_iter=200, max_fail=3, checkpoint=path)
    assert first.stop_reason == "max_fail"
    restored = mse_at(model, (x, y))
    assert restored == pytest.approx(first["loss"][first.best_iteration - 1], rel=1e-12)
    assert load_checkpoint(path)["extra"]["optimizer_at_weights"] is False

    fresh, _ = regression_problem(seed=5)
    resumed = quiet_fit(fresh, (x, y), max_iter=len(first) + 10, checkpoint=path, resume=True)
    new_rows = resumed["loss"][len(first) :]
    assert resumed.stop_reason == "max_iter", resumed.message
    assert all(resumed["success"][len(first) :][:3]), "trials rejected: SCG kept the E and r of other weights"
    assert new_rows[0] < restored  # the first step from the restored weights lowers their loss
    assert new_rows[-1] == pytest.approx(mse_at(fresh, (x, y)), rel=1e-12)


def test_resume_on_other_data_warns_and_recomputes_the_loss(tmp_path):
    path = tmp_path / "run.pt"
    model, data = regression_problem()
    quiet_fit(model, data, max_iter=5, checkpoint=path)
    _, other = regression_problem(seed=7)
    with pytest.warns(UserWarning, match="other training data.*values differ"):
        resumed = quiet_fit(model, other, max_iter=8, checkpoint=path, resume=True)
    assert resumed.stop_reason == "max_iter" and all(resumed["success"][5:])
    assert resumed["loss"][-1] == pytest.approx(mse_at(model, other), rel=1e-12)


def test_weights_a_callback_writes_get_their_validation_loss_even_if_the_next_trial_fails():
    model, (x, y) = regression_problem()
    generator = torch.Generator().manual_seed(1)

    def scatter_the_weights(history):
        if len(history) == 5:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 20.0)

    validation = (x + 0.1, y)
    history = quiet_fit(model, (x, y), val_data=validation, max_iter=6, callbacks=[scatter_the_weights])
    assert not history["success"][-1]  # SCG's first trial from the written weights was rejected
    assert history["val_loss"][-1] == pytest.approx(mse_at(model, validation), rel=1e-12)
    assert history["val_loss"][-1] > 100 * history["val_loss"][-2]


def test_resume_with_an_scg_of_other_settings_is_refused_and_changes_nothing(tmp_path):
    # load_state_dict would take the saved settings over, past fit's checks of the optimizer it was given.
    path = tmp_path / "run.pt"
    model, data = regression_problem()
    quiet_fit(model, data, max_iter=3, optimizer=SCG(model.parameters(), hvp="finite-difference", sigma=1e-4),
              checkpoint=path)  # fmt: skip
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=r"hvp='finite-difference' \(this one has 'double-backward'\)"):
        quiet_fit(model, data, max_iter=6, optimizer=SCG(model.parameters()), checkpoint=path, resume=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    same = SCG(model.parameters(), hvp="finite-difference", sigma=1e-4)
    assert len(quiet_fit(model, data, max_iter=6, optimizer=same, checkpoint=path, resume=True)) == 6


def test_resume_with_another_loss_warns_and_recomputes_the_loss(tmp_path):
    path = tmp_path / "run.pt"
    model, data = regression_problem()
    fit(model, nn.MSELoss(), data, max_iter=5, checkpoint=path, progress=False, batch_size=16)
    assert load_checkpoint(path)["extra"]["loss"] == "torch.nn.modules.loss.MSELoss, reduction 'mean'"
    summed = nn.MSELoss(reduction="sum")
    with pytest.warns(UserWarning, match="with the loss .*MSELoss, reduction 'sum' where the run that wrote it had"):
        resumed = fit(model, summed, data, max_iter=8, checkpoint=path, resume=True, progress=False, batch_size=16)
    assert all(resumed["success"][5:])  # SCG restarted on the new objective: no trial judged by the old E
    assert resumed["loss"][-1] == pytest.approx(float(summed(model(data[0]), data[1])), rel=1e-12)


def test_resume_on_the_same_data_trusts_the_checkpoint_and_does_not_warn(tmp_path, recwarn, regression):
    path = tmp_path / "run.pt"
    model, data = regression
    quiet_fit(model, data, max_iter=4, checkpoint=path)
    assert load_checkpoint(path)["extra"]["optimizer_at_weights"] is True
    quiet_fit(model, data, max_iter=6, checkpoint=path, resume=True)
    assert not [w for w in recwarn if "training data" in str(w.message)]


def test_a_resume_that_takes_no_step_leaves_its_checkpoint_as_it_was(tmp_path, recwarn):
    # A resume mistakenly given other data, at a budget already spent: it warns, takes no step and must not rewrite
    # the file with the other data's fingerprint (a later resume on the right data would distrust SCG's state).
    path = tmp_path / "run.pt"
    model, data = regression_problem()
    quiet_fit(model, data, max_iter=4, checkpoint=path)
    saved = path.read_bytes()
    _, other = regression_problem(seed=7)
    with pytest.warns(UserWarning, match="other training data"):
        mistaken = quiet_fit(model, other, max_iter=4, checkpoint=path, resume=True)
    assert mistaken.stop_reason == "max_iter" and len(mistaken) == 4
    assert path.read_bytes() == saved
    recwarn.clear()
    quiet_fit(model, data, max_iter=6, checkpoint=path, resume=True)
    assert not [w for w in recwarn if "training data" in str(w.message)]
    assert load_checkpoint(path)["extra"]["optimizer_at_weights"] is True


def test_a_finished_run_resumed_with_its_arguments_stays_finished(tmp_path):
    # The same call again after the run met its goal: no step, the same weights, the checkpoint untouched; a lower
    # goal lets it go on from there.
    path = tmp_path / "run.pt"
    model, data = regression_problem()
    goal = quiet_fit(regression_problem()[0], data, max_iter=12)["loss"][9]
    finished = quiet_fit(model, data, max_iter=100, goal=goal, checkpoint=path)
    assert finished.stop_reason == "goal" and len(finished) == 10
    weights, saved = [p.detach().clone() for p in model.parameters()], path.read_bytes()
    again = quiet_fit(model, data, max_iter=100, goal=goal, checkpoint=path, resume=True)
    assert again.stop_reason == "goal" and len(again) == 10
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights)) and path.read_bytes() == saved
    further = quiet_fit(model, data, max_iter=100, goal=goal / 2, checkpoint=path, resume=True)
    assert further.stop_reason == "goal" and len(further) > 10


def test_a_finished_run_resumed_on_other_data_goes_on(tmp_path):
    # Its saved losses are the old objective's: the goal they met says nothing of the new data's loss.
    path = tmp_path / "run.pt"
    model, data = regression_problem()
    goal = quiet_fit(regression_problem()[0], data, max_iter=12)["loss"][9]
    assert len(quiet_fit(model, data, max_iter=100, goal=goal, checkpoint=path)) == 10
    _, other = regression_problem(seed=7)
    with pytest.warns(UserWarning, match="other training data"):
        resumed = quiet_fit(model, other, max_iter=100, goal=goal, checkpoint=path, resume=True)
    assert len(resumed) > 10 and resumed["loss"][-1] <= goal


def test_a_resume_that_stops_by_max_fail_before_a_step_writes_the_restored_weights(tmp_path):
    # Saved at max_iter with fails pending; resumed with a max_fail they exceed: no step, the best weights restored,
    # and the checkpoint says so (it kept the last weights and the old stop before).
    path = tmp_path / "run.pt"
    model, (x, y) = regression_problem(n=24)
    validation = (x + 0.3, y)
    first = quiet_fit(model, (x, y), val_data=validation, max_iter=60, max_fail=None, checkpoint=path)
    assert first.stop_reason == "max_iter" and load_checkpoint(path)["extra"]["early_stopping"]["fails"] > 5
    resumed = quiet_fit(model, (x, y), val_data=validation, max_iter=100, max_fail=5, checkpoint=path, resume=True)
    assert resumed.stop_reason == "max_fail" and len(resumed) == 60
    saved = load_checkpoint(path)
    assert saved["extra"]["stop_reason"] == "max_fail"
    assert all(torch.equal(value, saved["model"][name]) for name, value in model.state_dict().items())


def test_weights_given_new_storage_by_a_callback_are_not_trusted_by_the_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    model, data = regression_problem()

    def halve_into_new_storage(history):
        if len(history) == 5:
            halved = nn.utils.parameters_to_vector(model.parameters()).detach() * 0.5
            nn.utils.vector_to_parameters(halved, model.parameters())

    quiet_fit(model, data, max_iter=5, checkpoint=path, callbacks=[halve_into_new_storage])
    assert load_checkpoint(path)["extra"]["optimizer_at_weights"] is False


def test_lbfgs_history_records_the_loss_at_the_weights_after_the_step(regression):
    model, data = regression
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=5, line_search_fn="strong_wolfe")
    history = quiet_fit(model, data, optimizer=optimizer, max_iter=3)
    assert history["loss"][-1] == pytest.approx(mse_at(model, data), rel=1e-12)


def test_fit_trains_a_partly_frozen_model_with_the_default_optimizer(regression):
    model, data = regression
    model[0].requires_grad_(False)
    frozen = weights(model[0])
    history = quiet_fit(model, data, max_iter=5)
    assert history.stop_reason == "max_iter" and history["loss"][-1] < history["loss"][0]
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))


@pytest.mark.parametrize("callbacks", [[print, "not a function"], print])
def test_a_callback_that_is_not_callable_is_refused_at_the_start(callbacks, regression):
    model, data = regression
    before = weights(model)
    with pytest.raises(TypeError, match="callback"):
        quiet_fit(model, data, callbacks=callbacks)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("truth", [np.bool_(True), torch.tensor(True), 1, "yes"], ids=repr)
def test_any_true_callback_answer_stops_the_run(truth):
    calls = []
    history = quiet_fit(
        *regression_problem(),
        callbacks=[lambda h: truth if len(h) == 2 else np.bool_(False), lambda h: calls.append(len(h))],
    )
    assert history.stop_reason == "callback" and len(history) == 2
    assert calls == [1, 2]  # every callback sees every iteration, the last one included


def test_a_callback_that_raises_leaves_a_checkpoint_and_the_history(tmp_path, regression):
    path = tmp_path / "run.pt"

    def broken(history):
        if len(history) == 3:
            raise RuntimeError("callback bug")

    model, data = regression
    with pytest.raises(RuntimeError, match="callback bug") as raised:
        quiet_fit(model, data, checkpoint=path, checkpoint_every=100, callbacks=[broken])
    assert len(raised.value.history) == 3
    saved = load_checkpoint(path)
    assert saved["iteration"] == 3 and saved["extra"]["stop_reason"] is None
    assert all(torch.equal(p, saved["model"][name]) for name, p in model.state_dict().items())
    resumed = quiet_fit(model, data, max_iter=5, checkpoint=path, resume=True)
    assert resumed["k"] == [1, 2, 3, 4, 5]


def test_an_scg_holding_frozen_parameters_is_refused_with_the_fix(regression):
    from moller_scg import SCG

    model, data = regression
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"2 frozen parameter\(s\).*if p.requires_grad"):
        quiet_fit(model, data, optimizer=SCG(model.parameters()))


def test_the_default_max_fail_does_not_stop_a_still_improving_regression_on_noise():
    # benchmarks/early_stopping.py's sine_1d, seed 0: with trainscg's max_fail=6 the run stops on noise while the
    # validation loss still reaches new bests later (with Møller's SCG it stopped at iteration 46 with 4× the
    # validation loss of 300 iterations; with SCG(memory=20) and H₀ = γI at iteration 83, best 74, 6 % worse). The
    # run is γI's: fit's default H₀, K-FAC's, reaches its best validation loss at iteration 60 and no new one after
    # it, so there the default max_fail stops it, as it should.
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, generator=generator, dtype=torch.float64) * 4 - 2
    y = torch.sin(3 * x) + 0.1 * torch.randn(200, 1, generator=generator, dtype=torch.float64)

    def run(**options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)).double()
        data, val_data = (x[:100], y[:100]), (x[100:], y[100:])
        return fit(
            model,
            nn.MSELoss(),
            data,
            val_data=val_data,
            max_iter=120,
            progress=False,
            preconditioner="scalar",
            **options,
        )

    history, trainscg = run(), run(max_fail=6)
    assert trainscg.stop_reason == "max_fail"
    assert history.stop_reason == "max_iter"
    late_best = min(history["val_loss"][len(trainscg["val_loss"]) :])
    assert late_best < min(trainscg["val_loss"])  # a new best after max_fail=6 gave up


def test_the_default_max_fail_stops_the_default_h0s_regression_after_its_best():
    # The same problem under fit's default H₀ (K-FAC's): its best validation loss comes at iteration 60, below γI's
    # best of the whole run, and no new one after it, so the default max_fail stops it 50 successful steps later, with
    # the best weights back.
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, generator=generator, dtype=torch.float64) * 4 - 2
    y = torch.sin(3 * x) + 0.1 * torch.randn(200, 1, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)).double()
    data, val_data = (x[:100], y[:100]), (x[100:], y[100:])
    history = fit(model, nn.MSELoss(), data, val_data=val_data, max_iter=300, progress=False)
    assert history.stop_reason == "max_fail" and len(history) < 300
    best = history.best_iteration
    assert history["val_loss"][best - 1] == min(history["val_loss"]) and len(history) - best >= 50
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model(val_data[0]), val_data[1])) == pytest.approx(
            history["val_loss"][best - 1], rel=1e-12
        )
