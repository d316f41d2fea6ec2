"""The moller-scg command line and the MNIST main job, on small data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import FILE_NAMES, idx_bytes, write_file

from moller_scg import __version__
from moller_scg.cli import main

ROOT = Path(__file__).resolve().parent.parent


def write_tiny_mnist(folder: Path, train: int = 60, test: int = 20, gz: bool = False) -> None:
    rng = np.random.default_rng(7)
    arrays = {}
    for split, count in (("train", train), ("test", test)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = rng.integers(0, 40, size=(count, 28, 28), dtype=np.uint8)
        for index, label in enumerate(labels):  # a bright bar whose position is the class: learnable
            images[index, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
        arrays[(split, "images")] = images
        arrays[(split, "labels")] = labels
    for (split, kind), name in FILE_NAMES.items():
        write_file(folder, name, idx_bytes(arrays[(split, kind)]), gz=gz)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_explains_the_mnist_command(capsys):
    with pytest.raises(SystemExit):
        main(["mnist", "--help"])
    text = capsys.readouterr().out
    for option in ("--data", "--batch-size", "--max-iter", "--device", "--hvp", "--checkpoint", "--resume", "--plot"):
        assert option in text
    assert "embedded" in text


def test_mnist_smoke_run_on_200_embedded_images(capsys, tmp_path):
    plot = tmp_path / "trace.png"
    status = main(["mnist", "--max-train", "200", "--max-iter", "3", "--quiet", "--plot", str(plot)])
    output = capsys.readouterr().out
    assert status == 0, output
    for label in (
        "train loss",
        "test accuracy",
        "iterations     3",
        "closure calls",
        "wall time",
        "stop reason    max_iter",
    ):
        assert label in output
    assert "(200 images)" in output and "(1000 images)" in output
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_mnist_with_a_time_budget_spent_before_the_first_step_reports_no_iteration(capsys):
    status = main(["mnist", "--max-train", "200", "--max-time", "0", "--quiet"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "iterations     0" in output and "stop reason    max_time" in output and "train loss     nan" in output


@pytest.mark.parametrize(
    "flags, conv_weight_stride", [([], (25, 1, 5, 1)), (["--memory-format", "contiguous"], (25, 25, 5, 1))]
)
def test_the_cnn_is_laid_out_channels_last_unless_told_otherwise(flags, conv_weight_stride, monkeypatch, capsys):
    from moller_scg import default_optimizer

    strides = []

    def spy(params, **options):
        params = list(params)
        strides.append(params[0].stride())  # the convolution's weights, 32 × 1 × 5 × 5
        return built_scg(params, **options)

    built_scg = default_optimizer.SCG  # the main job's SCG: the secant mode with the H₀ it chooses
    monkeypatch.setattr(default_optimizer, "SCG", spy)
    status = main(["mnist", "--max-train", "100", "--max-iter", "1", "--quiet", *flags])
    assert status == 0, capsys.readouterr().out
    assert strides == [conv_weight_stride]


@pytest.mark.parametrize(
    "memory_format, shown", [("channels_last_3d", "torch.channels_last_3d"), (None, "'channels_last'")]
)
def test_a_memory_format_other_than_the_two_is_refused_by_name(memory_format, shown):
    import torch

    from moller_scg.mnist import train_mnist

    given = getattr(torch, memory_format) if memory_format else "channels_last"  # a name is not a torch.memory_format
    with pytest.raises(
        ValueError, match="memory_format must be torch.channels_last or torch.contiguous_format"
    ) as error:
        train_mnist(memory_format=given, max_train=100, max_iter=1, progress=False)
    assert str(error.value).endswith(f"not {shown}")


def test_mnist_with_subsampled_exact_curvature(capsys, tmp_path):
    write_tiny_mnist(tmp_path)
    arguments = ["mnist", "--data", str(tmp_path), "--max-iter", "4", "--quiet", "--batch-size", "16"]
    status = main([*arguments, "--hvp", "double-backward", "--curvature-fraction", "0.2"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "iterations     4" in output and "(HVPs " in output


def test_curvature_fraction_without_exact_curvature_is_refused_with_the_reason(capsys, tmp_path):
    write_tiny_mnist(tmp_path)
    arguments = ["mnist", "--data", str(tmp_path), "--max-iter", "1", "--quiet", "--hvp", "finite-difference"]
    status = main([*arguments, "--curvature-fraction", "0.2"])
    assert status == 1
    assert "hvp='double-backward'" in capsys.readouterr().err


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_on_tiny_idx_files(capsys, tmp_path, gz):
    write_tiny_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    status = main(["mnist", "--data", str(tmp_path), "--max-iter", "5", "--quiet", "--batch-size", "16"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "(50 images)" in output and "(20 images)" in output  # 60 train → 50 train + 10 validation


@pytest.mark.parametrize("first_layout", ["channels_last", "contiguous"])
def test_mnist_checkpoint_and_resume(first_layout, capsys, tmp_path):
    """A run resumes from its checkpoint, also one written in the other layout (before the main job's channels_last)."""
    write_tiny_mnist(tmp_path)
    checkpoint = tmp_path / "run.pt"
    arguments = ["mnist", "--data", str(tmp_path), "--quiet", "--batch-size", "32", "--checkpoint", str(checkpoint)]
    assert main([*arguments, "--max-iter", "2", "--memory-format", first_layout]) == 0
    assert main([*arguments, "--max-iter", "4", "--resume"]) == 0
    output = capsys.readouterr().out
    assert "iterations     4" in output


def test_a_kronecker_run_resumed_from_its_checkpoint_ends_bit_identical(tmp_path):
    """The main job with its default, K-FAC's H₀ (refreshed every 5 accepted steps): 3 iterations, then a resume to 8
    from the checkpoint (through torch.load(weights_only=True)) end with the weights of 8 iterations in one go."""
    import torch

    from moller_scg.checkpoint import load_checkpoint
    from moller_scg.mnist import train_mnist

    write_tiny_mnist(tmp_path)
    options = {"data": tmp_path, "batch_size": 32, "max_fail": None, "progress": False}
    whole, parted = tmp_path / "whole.pt", tmp_path / "parted.pt"
    train_mnist(max_iter=8, checkpoint=whole, **options)
    train_mnist(max_iter=3, checkpoint=parted, **options)
    train_mnist(max_iter=8, checkpoint=parted, resume=True, **options)
    first, second = load_checkpoint(whole), load_checkpoint(parted)
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name
    assert first["optimizer"]["scg"]["secant_pairs"]["kronecker_factors"]["refreshes"] >= 2


def test_mnist_bad_path_is_a_clear_error(capsys, tmp_path):
    status = main(["mnist", "--data", str(tmp_path / "nowhere"), "--quiet"])
    assert status == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("max_train", ["-3", "0"])
def test_a_max_train_below_one_with_idx_files_is_named(capsys, tmp_path, max_train):
    """A negative one sliced the last images off and trained on the rest; 0 failed later as an empty data set."""
    write_tiny_mnist(tmp_path)
    status = main(["mnist", "--data", str(tmp_path), "--quiet", "--max-iter", "1", "--max-train", max_train])
    assert status == 1
    assert f"Invalid max_train: {max_train} (expected 1 ≤ max_train)" in capsys.readouterr().err


def test_download_without_data_is_refused(capsys):
    assert main(["mnist", "--download", "--max-iter", "1", "--quiet"]) == 2
    assert "--download needs --data PATH" in capsys.readouterr().err


def test_mnist_malformed_file_is_a_clear_error(capsys, tmp_path):
    write_tiny_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    status = main(["mnist", "--data", str(tmp_path), "--quiet"])
    assert status == 1
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def test_resume_without_checkpoint_is_refused(capsys):
    assert main(["mnist", "--resume", "--quiet"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_python_dash_m_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "moller_scg", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0 and __version__ in result.stdout


# --------------------------------------------------------------------------------------------------------------
# Reliability (issue #15)


def test_existing_checkpoint_is_refused_without_resume_or_overwrite(capsys, tmp_path):
    write_tiny_mnist(tmp_path)
    checkpoint = tmp_path / "run.pt"
    arguments = ["mnist", "--data", str(tmp_path), "--quiet", "--batch-size", "32", "--checkpoint", str(checkpoint)]
    assert main([*arguments, "--max-iter", "2"]) == 0
    saved = checkpoint.read_bytes()
    capsys.readouterr()
    assert main([*arguments, "--max-iter", "3"]) == 1
    error = capsys.readouterr().err
    assert "already exists" in error and "--resume" in error and "--overwrite" in error
    assert checkpoint.read_bytes() == saved
    assert main([*arguments, "--max-iter", "3", "--overwrite"]) == 0
    assert "iterations     3" in capsys.readouterr().out
    assert main([*arguments, "--resume", "--overwrite"]) == 2


@pytest.mark.parametrize("kind", ["plot_is_a_folder", "checkpoint_is_a_folder"])
def test_output_paths_are_checked_before_training(capsys, tmp_path, monkeypatch, kind):
    monkeypatch.setattr("moller_scg.mnist.train_mnist", lambda **options: pytest.fail("training started"))
    arguments = ["--plot", str(tmp_path)] if kind == "plot_is_a_folder" else ["--checkpoint", str(tmp_path)]
    assert main(["mnist", "--quiet", *arguments]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_plot_into_a_missing_folder_creates_it_before_training(capsys, tmp_path, monkeypatch):
    def training(**options):
        raise ValueError(f"training started; folder there: {(tmp_path / 'new').is_dir()}")

    monkeypatch.setattr("moller_scg.mnist.train_mnist", training)
    assert main(["mnist", "--quiet", "--plot", str(tmp_path / "new" / "trace.png")]) == 1
    assert "training started; folder there: True" in capsys.readouterr().err


def test_plot_into_a_folder_that_cannot_be_created_fails_before_training(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("moller_scg.mnist.train_mnist", lambda **options: pytest.fail("training started"))
    (tmp_path / "file").write_text("x")
    assert main(["mnist", "--quiet", "--plot", str(tmp_path / "file" / "trace.png")]) == 1
    assert "cannot be created or written" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_unusable_device_is_one_line_not_a_traceback(capsys, device):
    status = main(["mnist", "--quiet", "--max-train", "20", "--max-iter", "1", "--device", device])
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith(f"moller-scg mnist: --device {device!r}") and error.count("\n") == 1
    assert "Traceback" not in error


def test_default_device_is_the_gpu_when_available_and_the_run_says_which(capsys, monkeypatch):
    import torch

    seen = {}

    def record(**options):
        seen["device"] = options["device"]
        raise ValueError("stop here")

    monkeypatch.setattr("moller_scg.mnist.train_mnist", record)
    main(["mnist", "--quiet"])
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert torch.device(seen["device"]).type == expected
    assert f"device         {expected}" in capsys.readouterr().out


def test_mnist_files_spelt_with_a_dot_are_found_by_data(capsys, tmp_path):
    write_tiny_mnist(tmp_path / "kaggle")
    for path in (tmp_path / "kaggle").iterdir():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    status = main(["mnist", "--data", str(tmp_path / "kaggle"), "--max-iter", "2", "--quiet", "--batch-size", "16"])
    assert status == 0, capsys.readouterr().err
    assert "(50 images)" in capsys.readouterr().out


def test_after_a_max_fail_stop_the_train_loss_is_that_of_the_weights_held(tmp_path):
    import torch
    from torch import nn

    from moller_scg.checkpoint import load_checkpoint
    from moller_scg.data import load_mnist_idx
    from moller_scg.mnist import DEFAULT_WEIGHT_DECAY, train_mnist
    from moller_scg.models import MnistCNN
    from moller_scg.weight_decay import squared_norm

    rng = np.random.default_rng(3)  # random labels: fitting the training images cannot help the validation ones
    for (split, kind), name in FILE_NAMES.items():
        count = 120 if split == "train" else 10
        array = rng.integers(0, 256, (count, 28, 28)) if kind == "images" else rng.integers(0, 10, count)
        write_file(tmp_path, name, idx_bytes(array))
    checkpoint = tmp_path / "run.pt"
    result = train_mnist(data=tmp_path, max_iter=40, max_fail=2, batch_size=64, checkpoint=checkpoint, progress=False)
    assert result.stop_reason == "max_fail"
    model = MnistCNN()
    model.load_state_dict(load_checkpoint(checkpoint)["model"])  # the weights fit left in the model
    images, labels = load_mnist_idx(tmp_path).train
    with torch.no_grad():  # the objective: the cross-entropy + (ν/2)|w|²
        penalty = 0.5 * DEFAULT_WEIGHT_DECAY * float(squared_norm(list(model.parameters())))
        held = float(nn.functional.cross_entropy(model(images), labels)) + penalty
    assert penalty > 1e-3  # the penalty is there and the check below would see it missing
    assert result.train_loss == pytest.approx(held, rel=1e-5)
    assert result.train_loss != result.history["loss"][-1]


@pytest.mark.parametrize(
    "flags, memory, expected",
    [
        (["--preconditioner", "scalar"], 20, False),
        (["--preconditioner", "diagonal"], 20, True),
        (["--diagonal-scaling"], 20, True),
        (["--memory", "0"], 0, False),
    ],
)
def test_the_diagonal_h0_is_chosen_by_name_and_memory_0_has_none(flags, memory, expected, monkeypatch):
    from moller_scg import default_optimizer, mnist

    seen = {}

    def record_optimizer(model_params, **options):
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr(mnist, "SCG", record_optimizer)
    monkeypatch.setattr(default_optimizer, "SCG", record_optimizer)
    assert main(["mnist", "--quiet", "--max-train", "100", *flags]) != 0
    assert seen["memory"] == memory and seen.get("diagonal_scaling", False) is expected
    assert seen.get("kronecker_factors") is None


@pytest.mark.parametrize(
    "flags", [[], ["--preconditioner", "auto"], ["--preconditioner", "kronecker"], ["--kronecker"]]
)
def test_k_facs_h0_is_the_default_and_gives_scg_factors_of_the_cnn_over_its_training_images(flags, monkeypatch):
    from moller_scg import KroneckerFactors, default_optimizer

    seen = {}

    def record_optimizer(model_params, **options):
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr(default_optimizer, "SCG", record_optimizer)
    assert main(["mnist", "--quiet", "--max-train", "100", *flags]) != 0
    factors = seen["kronecker_factors"]
    assert isinstance(factors, KroneckerFactors) and factors.loss == "cross_entropy"
    assert factors.inputs.shape == (100, 1, 28, 28) and factors.samples == 5
    assert seen["memory"] == 20 and not seen.get("diagonal_scaling", False)


def test_two_names_for_h0_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["mnist", "--quiet", "--preconditioner", "scalar", "--kronecker"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--kronecker"], ["--preconditioner", "diagonal"]])
def test_a_named_h0_without_memory_is_one_line_not_a_traceback(flag, capsys):
    assert main(["mnist", "--quiet", "--max-train", "100", "--max-iter", "1", "--memory", "0", *flag]) == 1
    assert "memory=m ≥ 1" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "expected"), [([], 3e-4), (["--weight-decay", "0"], 0.0)])
def test_weight_decay_defaults_to_the_main_jobs_and_zero_turns_it_off(monkeypatch, arguments, expected):
    from moller_scg.mnist import DEFAULT_WEIGHT_DECAY

    seen = {}

    def record(**options):
        seen["weight_decay"] = options["weight_decay"]
        raise ValueError("stop here")

    monkeypatch.setattr("moller_scg.mnist.train_mnist", record)
    main(["mnist", "--quiet", *arguments])
    assert DEFAULT_WEIGHT_DECAY == 3e-4
    assert seen["weight_decay"] == expected


def test_a_negative_weight_decay_is_one_line_not_a_traceback(capsys):
    status = main(["mnist", "--quiet", "--max-train", "20", "--max-iter", "1", "--weight-decay", "-1"])
    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith("moller-scg mnist: Invalid weight_decay value: -1.0") and "Traceback" not in error
