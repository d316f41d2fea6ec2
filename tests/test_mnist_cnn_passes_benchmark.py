"""benchmarks/mnist_cnn_passes.py: the MNIST CNN's passes before and now, and the main job in both layouts."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from scripts import load_script

from moller_scg.models import MnistCNN

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_cnn_passes.py"


def test_it_times_every_pass_of_every_row_and_runs_the_main_job_in_each_layout(monkeypatch, capsys, tmp_path):
    benchmark = load_script(BENCHMARK, monkeypatch)
    models_timed, main_job_layouts = [], []
    passes_of, train_mnist = benchmark.passes_of, benchmark.train_mnist

    def passes_of_spy(model, train):
        models_timed.append((type(model), model.conv.weight.stride()))
        return passes_of(model, train)

    def train_mnist_spy(**options):
        main_job_layouts.append((benchmark.mnist.MnistCNN, options["memory_format"]))
        return train_mnist(**options)

    monkeypatch.setattr(benchmark, "passes_of", passes_of_spy)
    monkeypatch.setattr(benchmark, "train_mnist", train_mnist_spy)
    out = tmp_path / "report.txt"
    arguments = ["--rounds", "1", "--max-train", "100", "--main-job", "1", "--max-iter", "2", "--out", str(out)]
    assert benchmark.main(arguments) == 0

    # The rows: the old order in both layouts (the weights 32 × 1 × 5 × 5), then pooling first in channels_last with
    # the gradient left NCHW (lever 58), then today's CNN.
    nchw, nhwc = (25, 25, 5, 1), (25, 1, 5, 1)
    old_order, lever_58 = benchmark.TanhThenPoolCNN, benchmark.NchwGradientCNN
    assert models_timed == [(old_order, nchw), (old_order, nhwc), (lever_58, nhwc), (MnistCNN, nhwc)]
    assert main_job_layouts == [
        (old_order, torch.contiguous_format),
        (old_order, torch.channels_last),
        (lever_58, torch.channels_last),
        (MnistCNN, torch.channels_last),
    ]
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    lines = printed.splitlines()
    assert lines[0].startswith("the MNIST CNN's passes") and "--max-train 100" in lines[0]
    header = next(index for index, line in enumerate(lines) if line.startswith("seconds per pass over 100 "))
    assert all(kind in lines[header + 1] for kind in benchmark.PASSES)
    rows = lines[header + 2 : header + 2 + len(benchmark.ROWS)]
    losses = []
    for name, row in zip(benchmark.ROWS, rows):
        assert row.strip().startswith(name)
        cells = re.findall(r"([\d.]+) s \(([\d.]+)×\)", row)
        assert len(cells) == len(benchmark.PASSES), row
        losses.append(row.split()[-1])
        for first_row_cell, (seconds, ratio) in zip(re.findall(r"([\d.]+) s \(", rows[0]), cells):
            # The ratio of two medians, within what rounding them to 0.001 s and the ratio to 0.01 allows.
            base, this = float(first_row_cell), float(seconds)
            lowest, highest = (this - 5e-4) / (base + 5e-4), (this + 5e-4) / (base - 5e-4)
            assert lowest - 0.005 <= float(ratio) <= highest + 0.005, row
    # Pooling before the tanh is the same function: the same loss but for float32 rounding.
    assert all(abs(float(loss) - float(losses[0])) < 1e-5 for loss in losses)
    runs = [line for line in lines if " run 1: " in line]
    assert [run.split(" run 1: ")[0].strip() for run in runs] == list(benchmark.ROWS)
    assert all("3 closure calls" in run and "test accuracy" in run for run in runs)
    # The gradient handed back in channels_last changes no number (tests/test_models.py checks the bits): the same
    # main job.
    assert runs[2].split(" s, ")[1] == runs[3].split(" s, ")[1]  # test accuracy, train loss, closure calls
    ratio_lines = [line.strip() for line in lines if " ÷ " in line]
    assert [line.split(" ÷ ")[0] for line in ratio_lines] == [benchmark.NOW, *list(benchmark.ROWS)[1:], benchmark.NOW]
    # Today's CNN over lever 58's, pass by pass (from the medians printed, to rounding) and run by run.
    now_row, lever_58_row = (rows[list(benchmark.ROWS).index(name)] for name in (benchmark.NOW, benchmark.LEVER_58))
    printed_now = [float(x) for x in re.findall(r"([\d.]+) s \(", now_row)]
    printed_58 = [float(x) for x in re.findall(r"([\d.]+) s \(", lever_58_row)]
    for kind, this, before in zip(benchmark.PASSES, printed_now, printed_58):
        ratio = float(re.search(rf"{re.escape(kind)} ([\d.]+)×", ratio_lines[0]).group(1))
        lowest, highest = (this - 5e-4) / (before + 5e-4), (this + 5e-4) / (before - 5e-4)
        assert lowest - 0.005 <= ratio <= highest + 0.005, ratio_lines[0]
    assert ratio_lines[-1].startswith(f"{benchmark.NOW} ÷ {benchmark.LEVER_58}, run by run: ")
