"""The MNIST CNN's passes with its weights in PyTorch's default layout and in channels_last, side by side.

``moller-scg mnist`` (the main job) lays the CNN's weights out as ``torch.channels_last``
(:data:`moller_scg.mnist.DEFAULT_MEMORY_FORMAT`): the convolution, tanh and max-pooling then run on NHWC data, which
oneDNN's CPU kernels take faster than NCHW. The objective is the same; its sums round differently. This script
measures what the layout is worth where the main job spends its time, on the 4,000 embedded training digits streamed
in minibatches of 128 as the main job streams them, in rounds that alternate the two layouts (so that the machine's
load falls on both alike):

* a gradient pass (loss and gradient, what SCG's secant mode and LBFGS take per evaluation), a loss-only pass, and
  Hessian-vector passes over 10 % of the images (Møller's SCG with subsampled curvature: by double backward and the
  Gauss–Newton product), as the median seconds of ``--rounds`` rounds and their ratio;
* with ``--compile``, also a gradient pass of ``torch.compile`` of the channels_last model (its compilation timed
  apart): a third row;
* with ``--main-job R``, the whole main job (``train_mnist``, its defaults but the layout) R times each way,
  alternated, with each run's training time, test accuracy and training objective.

Usage:
    python benchmarks/memory_format.py                       # the passes, 5 rounds (about a minute)
    python benchmarks/memory_format.py --compile             # and torch.compile's gradient pass
    python benchmarks/memory_format.py --main-job 2 --out benchmarks/results/memory_format.txt   # and the main job
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import environment
from torch import nn

from moller_scg import GradientAccumulator
from moller_scg.data import load_embedded_mnist
from moller_scg.mnist import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CURVATURE_FRACTION,
    DEFAULT_MAX_ITER,
    MEMORY_FORMATS,
    train_mnist,
)
from moller_scg.models import MnistCNN

PASSES = ("gradient", "loss only", "HVP, 10 % (double backward)", "HVP, 10 % (Gauss–Newton)")


def passes_of(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """Each pass of :data:`PASSES` on ``model`` over ``train``, as the main job's accumulators make them."""
    loss_fn = nn.CrossEntropyLoss()
    gradient = GradientAccumulator(model, loss_fn, train, batch_size=DEFAULT_BATCH_SIZE)
    exact, gauss_newton = (
        GradientAccumulator(
            model,
            loss_fn,
            train,
            batch_size=DEFAULT_BATCH_SIZE,
            curvature_fraction=DEFAULT_CURVATURE_FRACTION,
            hvp_method=method,
        )
        for method in ("double-backward", "gauss-newton")
    )
    generator = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=generator) for p in gradient.params]
    exact()  # the double-backward product differentiates the graph of a gradient evaluation
    return {
        "gradient": gradient,
        "loss only": gradient.loss,
        "HVP, 10 % (double backward)": lambda: (exact(), exact.hvp(direction)),
        "HVP, 10 % (Gauss–Newton)": lambda: gauss_newton.hvp(direction),
    }


def seconds(one_pass: Callable[[], Any]) -> float:
    started = time.perf_counter()
    one_pass()
    return time.perf_counter() - started


def time_passes(rounds: int, with_compile: bool, max_train: int | None = None) -> list[str]:
    """The passes in both layouts (and torch.compile's gradient pass), alternated round by round, over the embedded
    training digits (a stratified ``max_train`` of them if given)."""
    train = load_embedded_mnist(seed=0, max_train=max_train).train
    torch.manual_seed(0)
    initial = MnistCNN()
    rows = {
        name: passes_of(copy.deepcopy(initial).to(memory_format=MEMORY_FORMATS[name]), train)
        for name in ("contiguous", "channels_last")
    }
    lines = []
    if with_compile:
        compiled = torch.compile(copy.deepcopy(initial).to(memory_format=torch.channels_last))
        compiled_pass = GradientAccumulator(compiled, nn.CrossEntropyLoss(), train, batch_size=DEFAULT_BATCH_SIZE)
        compiling = seconds(compiled_pass)
        lines.append(f"torch.compile of the channels_last model: first gradient pass (compiling) {compiling:.1f} s")
        rows["channels_last, torch.compile"] = {"gradient": compiled_pass}
    for passes in rows.values():
        for one_pass in passes.values():
            one_pass()  # warm-up
    measured: dict[str, dict[str, list[float]]] = {row: {kind: [] for kind in passes} for row, passes in rows.items()}
    for _ in range(rounds):
        for kind in PASSES:
            for row, passes in rows.items():
                if kind in passes:
                    measured[row][kind].append(seconds(passes[kind]))
    lines.append(
        f"seconds per pass over {len(train[1]):,} embedded training digits, minibatches of {DEFAULT_BATCH_SIZE} "
        f"(median of {rounds} alternated rounds), and the ratio to the contiguous layout's"
    )
    lines.append(f"  {'pass':30s}" + "".join(f"{row:>32s}" for row in rows))
    for kind in PASSES:
        baseline = statistics.median(measured["contiguous"][kind])
        cells = []
        for row in rows:
            if kind not in measured[row]:
                cells.append(f"{'':>32s}")
                continue
            median = statistics.median(measured[row][kind])
            cells.append(f"{median:>21.3f} s ({median / baseline:4.2f}×)")
        lines.append(f"  {kind:30s}" + "".join(cells))
    return lines


def time_main_job(repetitions: int, max_iter: int = DEFAULT_MAX_ITER, max_train: int | None = None) -> list[str]:
    """``train_mnist`` with its defaults in each layout (but ``max_iter`` and ``max_train``), alternated
    ``repetitions`` times."""
    images = "every" if max_train is None else f"{max_train:,}"
    lines = [
        f"the main job (train_mnist, its defaults: SCG(memory=20); {max_iter} iterations on {images} embedded training "
        f"digits), {repetitions}× each layout, alternated: seconds of training, test accuracy, training objective"
    ]
    wall: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
    for repetition in range(repetitions):
        for name in wall:
            result = train_mnist(
                memory_format=MEMORY_FORMATS[name], max_iter=max_iter, max_train=max_train, progress=False
            )
            wall[name].append(result.wall_time)
            lines.append(
                f"  {name:14s} run {repetition + 1}: {result.wall_time:6.1f} s, test accuracy "
                f"{result.test_accuracy:.2%}, train loss {result.train_loss:.6f}, {result.closure_calls} closure calls"
            )
    ratios = [last / first for first, last in zip(wall["contiguous"], wall["channels_last"])]
    lines.append(f"  channels_last ÷ contiguous, run by run: {', '.join(f'{r:.2f}' for r in ratios)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds of every pass")
    parser.add_argument("--compile", action="store_true", help="add torch.compile's gradient pass (channels_last)")
    parser.add_argument("--main-job", type=int, default=0, metavar="R", help="run the main job R times each way")
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER, help="the main job's iterations")
    parser.add_argument("--max-train", type=int, default=None, help="only this many training digits (smoke tests)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    command = "python benchmarks/memory_format.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = environment(command.strip())
    lines = [
        f"the MNIST CNN's passes in PyTorch's default layout and in channels_last; torch {info['torch']}, CPU "
        f"({info['cpu_capability']}), {info['threads']} threads, {info['date']}; {info['command']}"
    ]
    lines += time_passes(args.rounds, args.compile, args.max_train)
    if args.main_job:
        lines += time_main_job(args.main_job, args.max_iter, args.max_train)
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
