"""The MNIST CNN's passes, as the main job runs them today and as it ran them before, side by side.

Three changes of 2026-12-06 make the main job's passes faster on the CPU without changing what they compute:

* ``moller-scg mnist`` lays the CNN's weights out as ``torch.channels_last``
  (:data:`moller_scg.mnist.DEFAULT_MEMORY_FORMAT`): the convolution and max-pooling then run on NHWC data, which
  oneDNN's CPU kernels take faster than NCHW. The objective is the same; its float32 sums round differently.
* :class:`moller_scg.models.MnistCNN` max-pools before its first tanh, not after: tanh is increasing, so the two
  orders are the same function, and pooling first leaves a quarter of the numbers to take the tanh of (lever 58).
* :class:`moller_scg.models.MnistCNN` hands the gradient of its pooled activations back in channels_last: ``flatten``
  brings it back NCHW, which max-pooling's CPU backward converted at a cost (lever 59; the same bits).

This script times the CNN in PyTorch's default layout with the old order (the main job before), in channels_last with
the old order, in channels_last with today's order but the gradient left NCHW (:class:`NchwGradientCNN`, the main job
after lever 58), and today's CNN (the main job now), on the 4,000 embedded training digits
streamed in minibatches of 128 as the main job streams them, in rounds that alternate the rows (so that the
machine's load falls on all alike):

* a gradient pass (loss and gradient, what SCG's secant mode and LBFGS take per evaluation), a loss-only pass, and
  a Hessian-vector pass over 10 % of the images (Møller's SCG with subsampled curvature: by double backward and the
  Gauss–Newton product), as the median seconds of ``--rounds`` rounds and their ratio to the first row's (and
  today's to lever 58's);
* the loss of each row's first gradient pass (the same function: the same loss but for float32 rounding);
* with ``--compile``, also a gradient pass of ``torch.compile`` of today's model (its compilation timed apart);
* with ``--main-job R``, the whole main job (``train_mnist``, its defaults but the layout, the CNN and H₀ = γI) R times
  for each row, alternated, with each run's training time, test accuracy and training objective, and each row's
  time run by run over the first row's (and today's over lever 58's).

Usage:
    python benchmarks/mnist_cnn_passes.py                 # the passes, 5 rounds (about a minute)
    python benchmarks/mnist_cnn_passes.py --compile       # and torch.compile's gradient pass
    python benchmarks/mnist_cnn_passes.py --main-job 2 --out benchmarks/results/mnist_cnn_passes.txt   # and the job
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
from unittest import mock

import torch
from common import environment
from peers_problems import TanhThenPoolCNN
from torch import nn

from moller_scg import GradientAccumulator, mnist
from moller_scg.data import load_embedded_mnist
from moller_scg.mnist import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CURVATURE_FRACTION,
    DEFAULT_MAX_ITER,
    train_mnist,
)
from moller_scg.models import MnistCNN

PASSES = ("gradient", "loss only", "HVP, 10 % (double backward)", "HVP, 10 % (Gauss–Newton)")
"""The passes timed: a gradient pass over every image, a loss-only pass, and one curvature product over a rotating
10 % of the images (:data:`moller_scg.mnist.DEFAULT_CURVATURE_FRACTION`) by each of the accumulator's methods."""


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
    return {
        "gradient": gradient,
        "loss only": gradient.loss,
        "HVP, 10 % (double backward)": lambda: exact.hvp(direction),
        "HVP, 10 % (Gauss–Newton)": lambda: gauss_newton.hvp(direction),
    }


def seconds(one_pass: Callable[[], Any]) -> float:
    started = time.perf_counter()
    one_pass()
    return time.perf_counter() - started


class NchwGradientCNN(MnistCNN):
    """Today's CNN as lever 58 left it: its pooled activations' gradient comes back through ``flatten`` in the default
    (NCHW) layout, which max-pooling's CPU backward converts (``MnistCNN`` hands it back in channels_last: lever 59)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(torch.max_pool2d(self.conv(images.reshape(-1, 1, 28, 28)), 2))
        return self.output(torch.tanh(self.hidden(x.flatten(1))))


ROWS = {
    "NCHW, tanh then pool (before)": (TanhThenPoolCNN, torch.contiguous_format),
    "channels_last, tanh then pool": (TanhThenPoolCNN, torch.channels_last),
    "channels_last, pool then tanh": (NchwGradientCNN, torch.channels_last),
    "the same, NHWC gradient (now)": (MnistCNN, torch.channels_last),
}
"""The models timed: the main job's CNN before 2026-12-06, with the new layout alone, with pooling first (lever 58),
and today's (lever 59: the gradient handed back in channels_last)."""
NOW = "the same, NHWC gradient (now)"
"""The row of today's CNN."""
LEVER_58 = "channels_last, pool then tanh"
"""The row of the CNN before lever 59, which today's is also compared with."""


def time_passes(rounds: int, with_compile: bool, max_train: int | None = None) -> list[str]:
    """Every pass of every row of :data:`ROWS` (and torch.compile's gradient pass), alternated round by round, over
    the embedded training digits (a stratified ``max_train`` of them if given)."""
    train = load_embedded_mnist(seed=0, max_train=max_train).train
    torch.manual_seed(0)
    initial_weights = MnistCNN().state_dict()
    models = {}
    for name, (model_type, memory_format) in ROWS.items():
        model = model_type()
        model.load_state_dict(initial_weights)
        models[name] = model.to(memory_format=memory_format)
    rows = {name: passes_of(model, train) for name, model in models.items()}
    lines = []
    if with_compile:
        compiled = torch.compile(copy.deepcopy(models[NOW]))
        compiled_pass = GradientAccumulator(compiled, nn.CrossEntropyLoss(), train, batch_size=DEFAULT_BATCH_SIZE)
        compiling = seconds(compiled_pass)
        lines.append(f"torch.compile of today's model: first gradient pass (compiling) {compiling:.1f} s")
        rows["the same, torch.compile"] = {"gradient": compiled_pass}
    first_losses = {}
    for row, passes in rows.items():
        for kind, one_pass in passes.items():  # one warm-up of each pass; the gradient pass's loss is reported
            result = one_pass()
            if kind == "gradient":
                first_losses[row] = float(result)
    measured: dict[str, dict[str, list[float]]] = {row: {kind: [] for kind in passes} for row, passes in rows.items()}
    for _ in range(rounds):
        for kind in PASSES:
            for row, passes in rows.items():
                if kind in passes:
                    measured[row][kind].append(seconds(passes[kind]))
    first_row = next(iter(rows))
    lines.append(
        f"seconds per pass over {len(train[1]):,} embedded training digits, minibatches of {DEFAULT_BATCH_SIZE} "
        f"(median of {rounds} alternated rounds), and the ratio to the first row's; the loss of each row's first pass"
    )
    lines.append(f"  {'':36s}" + "".join(f"{kind:>30s}" for kind in PASSES) + f"{'loss':>20s}")
    for row in rows:
        cells = []
        for kind in PASSES:
            if kind not in measured[row]:
                cells.append(f"{'':>30s}")
                continue
            median = statistics.median(measured[row][kind])
            baseline = statistics.median(measured[first_row][kind])
            cells.append(f"{median:>19.3f} s ({median / baseline:4.2f}×)")
        lines.append(f"  {row:36s}" + "".join(cells) + f"{first_losses[row]:>20.9f}")
    ratios = ", ".join(
        f"{kind} {statistics.median(measured[NOW][kind]) / statistics.median(measured[LEVER_58][kind]):.2f}×"
        for kind in PASSES
    )
    lines.append(f"  {NOW} ÷ {LEVER_58}: {ratios}")
    return lines


def time_main_job(repetitions: int, max_iter: int = DEFAULT_MAX_ITER, max_train: int | None = None) -> list[str]:
    """``train_mnist`` with its defaults (but ``max_iter``, ``max_train`` and H₀ = γI) for each row of :data:`ROWS`,
    alternated ``repetitions`` times: its ``memory_format``, and ``moller_scg.mnist.MnistCNN`` replaced by the row's
    model for the run."""
    images = "the 4,000" if max_train is None else f"{max_train:,}"
    lines = [
        f"the main job (train_mnist, its defaults but H₀ = γI: SCG(memory=20); {max_iter} iterations on {images} "
        f"embedded training digits), {repetitions}× each row, alternated: seconds of training, test accuracy, "
        f"training objective"
    ]
    wall: dict[str, list[float]] = {name: [] for name in ROWS}
    for repetition in range(repetitions):
        for name, (model_type, memory_format) in ROWS.items():
            with mock.patch.object(mnist, "MnistCNN", model_type):
                result = train_mnist(
                    memory_format=memory_format,
                    preconditioner="scalar",  # the γI of lever 58's runs, not K-FAC's H₀ (the default since lever 74)
                    max_iter=max_iter,
                    max_train=max_train,
                    progress=False,
                )
            wall[name].append(result.wall_time)
            lines.append(
                f"  {name:36s} run {repetition + 1}: {result.wall_time:6.1f} s, test accuracy "
                f"{result.test_accuracy:.2%}, train loss {result.train_loss:.6f}, {result.closure_calls} closure calls"
            )
    first = next(iter(ROWS))
    for name, baseline in [(name, first) for name in list(ROWS)[1:]] + [(NOW, LEVER_58)]:
        ratios = ", ".join(f"{this / before:.2f}" for before, this in zip(wall[baseline], wall[name]))
        lines.append(f"  {name} ÷ {baseline}, run by run: {ratios}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds of every pass")
    parser.add_argument("--compile", action="store_true", help="add torch.compile's gradient pass (today's model)")
    parser.add_argument("--main-job", type=int, default=0, metavar="R", help="run the main job R times each way")
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER, help="the main job's iterations")
    parser.add_argument("--max-train", type=int, default=None, help="only this many training digits (smoke tests)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    command = "python benchmarks/mnist_cnn_passes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = environment(command.strip())
    lines = [
        f"the MNIST CNN's passes, before and now (layout, order of pooling and tanh, layout of the pooled gradient); "
        f"torch {info['torch']}, CPU "
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
