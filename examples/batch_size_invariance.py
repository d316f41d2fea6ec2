"""The blog's Figure 4: full-batch SCG gives the same learning curves for every minibatch size.

The gradient accumulator streams the training set in minibatches, but E(w), E'(w) and E''(w)p are the exact
full-batch quantities whatever the batch size, so SCG takes the same steps: the curves coincide (up to rounding,
which float64 keeps at ~1e-12). The batch size only bounds memory.

    python examples/batch_size_invariance.py                       # 600 MNIST digits, 15 iterations, float64
    python examples/batch_size_invariance.py --plot figure4.png    # also draw the figure
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from moller_scg import SCG, History, fit
from moller_scg.data import load_embedded_mnist
from moller_scg.models import MnistCNN


def curves(batch_sizes: list[int], train_size: int, iterations: int, hvp: str, seed: int = 0) -> dict[int, History]:
    """One History per batch size, each from the same initial weights on the same data (float64)."""
    splits = load_embedded_mnist(seed=seed, max_train=train_size)
    train = (splits.train[0].double(), splits.train[1])
    test = (splits.test[0][:500].double(), splits.test[1][:500])
    histories = {}
    for batch_size in batch_sizes:
        torch.manual_seed(seed)
        model = MnistCNN().double()
        histories[batch_size] = fit(
            model,
            nn.CrossEntropyLoss(),
            train,
            val_data=test,
            optimizer=SCG(model.parameters(), hvp=hvp),
            batch_size=batch_size,
            max_iter=iterations,
            max_fail=None,
            progress=False,
        )
    return histories


def largest_relative_difference(histories: dict[int, History]) -> float:
    """max over batch sizes and iterations of |E_b − E_ref| / |E_ref| against the first batch size."""
    reference = histories[next(iter(histories))]["loss"]
    return max(
        abs(loss - expected) / abs(expected)
        for history in histories.values()
        for loss, expected in zip(history["loss"], reference)
    )


def plot(histories: dict[int, History], filename: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for batch_size, history in histories.items():
        (line,) = axes.plot(history["k"], history["loss"], label=f"batch {batch_size} (train)")
        axes.plot(history["k"], history["val_loss"], "--", color=line.get_color(), label=f"batch {batch_size} (test)")
    axes.set(yscale="log", xlabel="SCG iteration", ylabel="cross-entropy", title="Same curves for every minibatch size")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(filename, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[int, History]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[600, 256, 64, 32], help="first = reference")
    parser.add_argument("--train-size", type=int, default=600, help="training digits (stratified subset)")
    parser.add_argument("--iterations", type=int, default=15, help="SCG iterations per batch size")
    parser.add_argument("--hvp", choices=["double-backward", "finite-difference"], default="finite-difference")
    parser.add_argument("--plot", metavar="FILE", help="save the figure (PNG)")
    args = parser.parse_args(argv)
    histories = curves(args.batch_sizes, args.train_size, args.iterations, args.hvp)
    print(f"{'batch size':>10} {'final train loss':>18} {'final test loss':>16}")
    for batch_size, history in histories.items():
        print(f"{batch_size:>10} {history['loss'][-1]:18.12f} {history['val_loss'][-1]:16.12f}")
    print(f"largest relative difference between the curves: {largest_relative_difference(histories):.2e}")
    if args.plot:
        plot(histories, args.plot)
        print(f"figure saved to {args.plot}")
    return histories


if __name__ == "__main__":
    main()
