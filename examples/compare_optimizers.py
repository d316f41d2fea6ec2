"""Minibatch SCGAdam, CoBA-HZ and Adam against full-batch SCG on the blog's MNIST CNN, at an equal budget.

    python examples/compare_optimizers.py            # embedded MNIST-5k (4,000 train / 1,000 test), ~6 min, 1 thread
    python examples/compare_optimizers.py --quick    # 400 training and 200 test images, 3 passes: well under a minute
    python examples/compare_optimizers.py --help     # every option

A small, reproducible version of the comparisons in Sato, Izumi & Iiduka (2024) and Kobayashi & Iiduka (2020), on
the data this package ships: it measures, it does not reproduce their results. Every optimizer starts from the same
initial weights (``torch.manual_seed(seed)``, then ``MnistCNN()``), and the minibatch methods see the same batches
in the same order (one shuffling generator seeded with ``seed``, shared recipe).

**The budget** is counted in gradient passes over the training set (forward and backward over every training
image once):

* a minibatch epoch is 1 pass (the optimizer's own arithmetic is counted in the time, not in passes);
* full-batch SCG in finite-difference mode (Møller's σ) spends 1 pass per trial point and 1 more for the curvature
  after a successful step, plus 1 for the starting point: ``GradientAccumulator.passes.gradient`` counts them
  (equal to ``optimizer.trace.closure_calls``). SCG runs until its passes reach the budget, so its last step may
  overshoot by one pass; the table reports the passes actually used.

**What is recorded** after every epoch (minibatch) or iteration (SCG), outside the clock and outside the budget:
the training loss E(w) on the whole training set (one loss-only pass) and the accuracy on the test set. Time is
the training time only, on ``--threads`` CPU threads (default 1: the numbers do not depend on what else runs on a
shared machine's other cores, though a busy machine still slows them).

The figure (training loss against passes and against time, test accuracy against passes) and a table go to
``benchmarks/results/compare_optimizers.{png,txt}`` (``--out`` to change the folder).

References:
    Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
    neural networks. Journal of Machine Learning Research 25(395), 1–37. arXiv:2412.11400.
    Kobayashi, Y. & Iiduka, H. (2020). Conjugate-gradient-based Adam for stochastic optimization and its
    application to deep learning. arXiv:2003.00231.
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning. Neural Networks 6(4),
    525–533.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from moller_scg import SCG, CoBA, SCGAdam
from moller_scg.accumulate import GradientAccumulator
from moller_scg.data import MnistSplits, load_embedded_mnist
from moller_scg.models import MnistCNN
from moller_scg.train import accuracy

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_BUDGET = 20
"""Gradient passes per optimizer in the full run (about 6 minutes for the four on one CPU thread)."""
QUICK_BUDGET = 3
QUICK_TRAIN, QUICK_TEST = 400, 200
EVALUATION_BATCH = 1000
"""Samples per batch of the full-batch passes (SCG's and the evaluations'): memory only, never the result."""


@dataclasses.dataclass
class Curve:
    """One optimizer's run: settings, and at each evaluation the passes used, time, training loss, test accuracy."""

    name: str
    settings: str
    passes: list[int] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    steps: int = 0

    def record(self, passes: int, seconds: float, evaluation: tuple[float, float]) -> None:
        self.passes.append(passes)
        self.times.append(seconds)
        self.train_loss.append(evaluation[0])
        self.test_accuracy.append(evaluation[1])

    def loss_within(self, passes: int) -> float:
        """The training loss at the last evaluation made with at most ``passes`` passes used."""
        return [loss for used, loss in zip(self.passes, self.train_loss) if used <= passes][-1]


class Evaluator:
    """Training loss on the whole training set and test accuracy, by loss-only passes that are not counted."""

    def __init__(self, model: nn.Module, splits: MnistSplits) -> None:
        self.train = GradientAccumulator(model, nn.CrossEntropyLoss(), splits.train, batch_size=EVALUATION_BATCH)
        self.test = GradientAccumulator(model, accuracy, splits.test, batch_size=EVALUATION_BATCH, reduction="mean")

    def __call__(self) -> tuple[float, float]:
        return float(self.train.loss()), float(self.test.loss())


# ------------------------------------------------------------------------------------------------------------------
# The runs


def run_minibatch(
    name: str,
    settings: str,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    model: nn.Module,
    splits: MnistSplits,
    *,
    budget: int,
    batch_size: int,
    seed: int,
) -> Curve:
    """``budget`` epochs of minibatch training, evaluated after each epoch."""
    curve, evaluate = Curve(name, settings), Evaluator(model, splits)
    optimizer = make_optimizer(list(model.parameters()))
    loss_fn = nn.CrossEntropyLoss()
    images, labels = splits.train
    shuffling = torch.Generator().manual_seed(seed)
    clock = 0.0
    curve.record(0, clock, evaluate())
    for epoch in range(1, budget + 1):
        started = time.perf_counter()
        for batch in torch.randperm(len(labels), generator=shuffling).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images[batch]), labels[batch]).backward()
            optimizer.step()
            curve.steps += 1
        clock += time.perf_counter() - started
        curve.record(epoch, clock, evaluate())
    return curve


def run_scg(model: nn.Module, splits: MnistSplits, *, budget: int) -> Curve:
    """Full-batch SCG (finite-difference curvature) until its gradient passes reach ``budget``."""
    curve = Curve(
        "SCG (full batch)", f"finite-difference curvature, σ = 5e-5, λ₁ = 5e-7, batches of {EVALUATION_BATCH}"
    )
    evaluate = Evaluator(model, splits)
    objective = GradientAccumulator(model, nn.CrossEntropyLoss(), splits.train, batch_size=EVALUATION_BATCH)
    optimizer = SCG(model.parameters(), hvp="finite-difference")
    clock = 0.0
    curve.record(0, clock, evaluate())
    while objective.passes.gradient < budget:
        started = time.perf_counter()
        optimizer.step(objective)
        clock += time.perf_counter() - started
        curve.steps += 1
        curve.record(objective.passes.gradient, clock, evaluate())
    if optimizer.trace.closure_calls != objective.passes.gradient:  # every closure call must be one gradient pass
        raise RuntimeError(
            f"SCG made {optimizer.trace.closure_calls} closure calls but {objective.passes.gradient} gradient passes"
        )
    return curve


def compare(splits: MnistSplits, *, budget: int, batch_size: int, lr: float, seed: int) -> list[Curve]:
    """Run the four optimizers from the same initial weights; the minibatch ones on the same batches."""
    torch.manual_seed(seed)
    initial = MnistCNN()
    minibatch = [
        ("Adam", f"lr = {lr:g}, betas (0.9, 0.999)", lambda params: torch.optim.Adam(params, lr=lr)),
        (
            "SCGAdam",
            f"lr = {lr:g}, γ = δ = 0.1 (constant), the authors' code's sign",
            lambda params: SCGAdam(params, lr=lr, direction_form="authors-code"),
        ),
        (
            "CoBA-HZ",
            f"lr = {lr:g}, Adam form, per-tensor β, M = 1e-3, a = 1 + 1e-8",
            lambda params: CoBA(params, lr=lr, cg_rule="HZ", amsgrad=False, beta_scope="per-tensor"),
        ),
    ]
    curves = []
    for name, settings, make_optimizer in minibatch:
        settings = f"{settings}, batch {batch_size}"
        curves.append(
            run_minibatch(
                name,
                settings,
                make_optimizer,
                copy.deepcopy(initial),
                splits,
                budget=budget,
                batch_size=batch_size,
                seed=seed,
            )
        )
    curves.append(run_scg(copy.deepcopy(initial), splits, budget=budget))
    return curves


# ------------------------------------------------------------------------------------------------------------------
# Output


def table(curves: Sequence[Curve], budget: int) -> str:
    """The results table: settings, then the training loss within ¼, ½ and all of the budget, and the final numbers."""
    marks = sorted({max(1, budget // 4), max(1, budget // 2), budget})
    head = f"{'optimizer':<17} " + " ".join(f"{f'loss ≤{m}p':>10}" for m in marks)
    head += f" {'passes':>6} {'steps':>6} {'time [s]':>8} {'final loss':>10} {'test acc':>8}"
    initial = {curve.train_loss[0] for curve in curves}
    lines = [
        f"initial training loss {initial.pop():.4f}, the same for every optimizer (the same initial weights)"
        if len(initial) == 1
        else "initial training losses differ: " + ", ".join(f"{c.name} {c.train_loss[0]:.6g}" for c in curves),
        "",
        head,
        "-" * len(head),
    ]
    for curve in curves:
        line = f"{curve.name:<17} " + " ".join(f"{curve.loss_within(m):>10.4f}" for m in marks)
        line += f" {curve.passes[-1]:>6} {curve.steps:>6} {curve.times[-1]:>8.1f}"
        line += f" {curve.train_loss[-1]:>10.4f} {curve.test_accuracy[-1]:>8.2%}"
        lines.append(line)
    lines.append("")
    lines.extend(f"{curve.name}: {curve.settings}" for curve in curves)
    return "\n".join(lines)


def header(command: str, splits: MnistSplits, budget: int, threads: int) -> str:
    return "\n".join(
        [
            "Minibatch Adam, SCGAdam, CoBA-HZ and full-batch SCG on the blog's MNIST CNN (float32, cross-entropy)",
            f"command: {command}",
            f"date: {datetime.date.today().isoformat()}; torch {torch.__version__}, Python {platform.python_version()},"
            f" CPU, {threads} thread(s)",
            f"data: embedded MNIST, {len(splits.train[1])} training / {len(splits.test[1])} test images; "
            f"budget {budget} gradient passes per optimizer",
            "loss = cross-entropy on the whole training set; 'loss ≤Np' = at the last evaluation within N passes;",
            "time = training time only (evaluations excluded); test acc = accuracy on the test images at the end",
            "",
        ]
    )


def plot(curves: Sequence[Curve], filename: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_passes, by_time, by_accuracy) = plt.subplots(1, 3, figsize=(15, 4.2))
    for curve in curves:
        style = {"marker": "o", "markersize": 3, "label": curve.name}
        by_passes.semilogy(curve.passes, curve.train_loss, **style)
        by_time.semilogy(curve.times, curve.train_loss, **style)
        by_accuracy.plot(curve.passes, [100 * a for a in curve.test_accuracy], **style)
    by_passes.set(
        title="training loss vs gradient passes",
        xlabel="gradient passes over the training set",
        ylabel="cross-entropy (whole training set)",
    )
    by_time.set(title="training loss vs time", xlabel="training time [s]")
    by_accuracy.set(title="test accuracy vs gradient passes", xlabel="gradient passes", ylabel="test accuracy [%]")
    for axes in (by_passes, by_time, by_accuracy):
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(filename, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_TRAIN} train / {QUICK_TEST} test images, {QUICK_BUDGET} passes: a smoke test",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help=f"gradient passes per optimizer (default {DEFAULT_BUDGET}, {QUICK_BUDGET} with --quick)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size of Adam, SCGAdam and CoBA")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of Adam, SCGAdam and CoBA")
    parser.add_argument("--seed", type=int, default=0, help="data split, initial weights and batch order")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for compare_optimizers.{png,txt}")
    args = parser.parse_args(argv)
    budget = args.budget if args.budget is not None else (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
    if budget < 1:
        parser.error(f"--budget must be ≥ 1, got {budget}")

    torch.set_num_threads(args.threads)
    splits = load_embedded_mnist(seed=args.seed, max_train=QUICK_TRAIN if args.quick else None)
    if args.quick:
        images, labels = splits.test
        splits = dataclasses.replace(splits, test=(images[:QUICK_TEST], labels[:QUICK_TEST]))
    curves = compare(splits, budget=budget, batch_size=args.batch_size, lr=args.lr, seed=args.seed)

    command = " ".join(["python examples/compare_optimizers.py", *(argv if argv is not None else sys.argv[1:])])
    report = header(command.strip(), splits, budget, args.threads) + table(curves, budget)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_optimizers.txt").write_text(report + "\n", encoding="utf-8")
    plot(
        curves,
        args.out / "compare_optimizers.png",
        f"MNIST CNN, {len(splits.train[1])} training images, same initial weights, {budget} gradient passes each",
    )
    print(report)
    print(f"\nwrote {args.out / 'compare_optimizers.txt'} and {args.out / 'compare_optimizers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
