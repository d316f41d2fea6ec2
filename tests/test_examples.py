"""The examples run and show what they claim (small budgets)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rosenbrock_scg_reaches_the_minimum_and_draws_figure_2(tmp_path, capsys):
    rosenbrock = load_example("rosenbrock")
    figure = tmp_path / "figure2.png"
    paths = rosenbrock.main(["--iterations", "2000", "--plot", str(figure)])
    x, y, loss = paths["SCG"][-1]
    assert loss < 1e-20 and abs(x - 1) < 1e-9 and abs(y - 1) < 1e-9
    # docs/choosing.md: SCG reaches f < 1e-6 in 100 iterations, Adam and SGD at the blog's rates not within 2,000
    assert rosenbrock.iterations_to(paths["SCG"], 1e-6) <= 100
    assert all(rosenbrock.iterations_to(path, 1e-6) is None for name, path in paths.items() if name != "SCG")
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert "SCG" in capsys.readouterr().out


@pytest.mark.slow
def test_batch_size_invariance_curves_coincide(tmp_path):
    example = load_example("batch_size_invariance")
    figure = tmp_path / "figure4.png"
    histories = example.main(
        ["--train-size", "40", "--iterations", "3", "--batch-sizes", "40", "16", "7", "--plot", str(figure)]
    )
    assert example.largest_relative_difference(histories) <= 1e-10
    assert all(len(history) == 3 for history in histories.values())
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_batch_size_invariance_on_idx_files_with_the_whole_batch(tmp_path):
    from test_cli import write_tiny_mnist

    write_tiny_mnist(tmp_path, train=48, test=10)  # 40 training images, 8 validation
    example = load_example("batch_size_invariance")
    args = ["--data", str(tmp_path), "--train-size", "30", "--iterations", "3", "--batch-sizes", "-1", "16", "7"]
    histories = example.main(args)
    assert list(histories) == [-1, 16, 7]
    assert example.largest_relative_difference(histories) <= 1e-10
    assert all(len(history) == 3 for history in histories.values())
    # full MNIST's held-out curve is its validation split (8 of the 48 images), not its test split (10)
    train, held_out = example.load_data(str(tmp_path), 30, seed=0)
    assert len(train[1]) == 30 and len(held_out[1]) == 8


def test_batch_size_invariance_refuses_a_batch_size_of_zero(capsys):
    example = load_example("batch_size_invariance")
    with pytest.raises(SystemExit):
        example.main(["--batch-sizes", "0", "32"])
    assert "--batch-sizes must be ≥ 1 or -1 (the whole batch), got [0]" in capsys.readouterr().err
