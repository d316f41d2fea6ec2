"""The blog's Figure 4: full-batch SCG gives the same learning curves for every minibatch size.

The gradient accumulator streams the training set in minibatches, but E(w), E'(w) and E''(w)p are the exact
full-batch quantities whatever the batch size, so SCG takes the same steps: the curves coincide (up to rounding,
which float64 keeps at ~1e-12). The batch size only bounds memory.

    python examples/batch_size_invariance.py                       # 600 MNIST digits, 15 iterations, float64
    python examples/batch_size_invariance.py --plot figure4.png    # also draw the figure
    python examples/batch_size_invariance.py --data DIR --train-size 10000 --batch-sizes -1 1024 512 256 128 64 32
                                                  # the blog's: full MNIST's first 10,000 training images

A batch size of -1 is the whole training set in one batch (the blog's "-1": no minibatches, no accumulation).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from moller_scg import SCG, History, fit
from moller_scg.data import load_embedded_mnist, load_mnist_idx
from moller_scg.models import MnistCNN

WHOLE_BATCH = -1
"""The batch size that stands for the whole training set in one batch."""
HELD_OUT_SIZE = 500
"""Images of the held-out curves (dashed): the test split of the embedded digits, the validation split of full MNIST."""


def load_data(data: str | None, train_size: int, seed: int) -> tuple[tuple, tuple]:
    """(training, held-out) pairs: a stratified subset of the embedded digits and their test split, or with ``data``
    the first ``train_size`` training images of full MNIST and its validation split."""
    if data is None:
        splits = load_embedded_mnist(seed=seed, max_train=train_size)
        held_out = splits.test
    else:
        splits = load_mnist_idx(data)
        if splits.validation is None:
            raise ValueError(f"the training file in {data} has under 6 images, so there is no validation split")
        held_out = splits.validation
        if train_size > len(splits.train[1]):
            raise ValueError(f"--train-size {train_size} is more than the {len(splits.train[1])} training images")
    train = (splits.train[0][:train_size], splits.train[1][:train_size])
    return train, (held_out[0][:HELD_OUT_SIZE], held_out[1][:HELD_OUT_SIZE])


def curves(
    batch_sizes: list[int],
    train_size: int,
    iterations: int,
    hvp: str,
    seed: int = 0,
    data: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[int, History]:
    """One History per batch size (-1: the whole training set at once), each from the same initial weights on the
    same data; float64 by default."""
    (train_images, train_labels), (held_out_images, held_out_labels) = load_data(data, train_size, seed)
    train = (train_images.to(dtype), train_labels)
    held_out = (held_out_images.to(dtype), held_out_labels)
    histories = {}
    for batch_size in batch_sizes:
        torch.manual_seed(seed)
        model = MnistCNN().to(dtype)
        histories[batch_size] = fit(
            model,
            nn.CrossEntropyLoss(),
            train,
            val_data=held_out,
            optimizer=SCG(model.parameters(), hvp=hvp),
            batch_size=len(train_labels) if batch_size == WHOLE_BATCH else batch_size,
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


def plot(histories: dict[int, History], filename: str, held_out: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for batch_size, history in histories.items():
        name = "whole batch" if batch_size == WHOLE_BATCH else f"batch {batch_size}"
        (line,) = axes.plot(history["k"], history["loss"], label=f"{name} (train)")
        axes.plot(history["k"], history["val_loss"], "--", color=line.get_color(), label=f"{name} ({held_out})")
    axes.set(yscale="log", xlabel="SCG iteration", ylabel="cross-entropy", title="Same curves for every minibatch size")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(filename, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[int, History]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[600, 256, 64, 32], help="first = reference; -1 = whole batch"
    )
    parser.add_argument(
        "--train-size", type=int, default=600, help="training digits (a stratified subset, or the first)"
    )
    parser.add_argument("--data", metavar="DIR", help="full MNIST from its IDX files instead of the embedded digits")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--iterations", type=int, default=15, help="SCG iterations per batch size")
    parser.add_argument("--hvp", choices=["double-backward", "finite-difference"], default="finite-difference")
    parser.add_argument("--plot", metavar="FILE", help="save the figure (PNG)")
    args = parser.parse_args(argv)
    bad = [size for size in args.batch_sizes if size < 1 and size != WHOLE_BATCH]
    if bad:
        parser.error(f"--batch-sizes must be ≥ 1 or {WHOLE_BATCH} (the whole batch), got {bad}")
    dtype = getattr(torch, args.dtype)
    histories = curves(args.batch_sizes, args.train_size, args.iterations, args.hvp, data=args.data, dtype=dtype)
    print(f"{'batch size':>10} {'final train loss':>18} {'final test loss':>16}")
    for batch_size, history in histories.items():
        print(f"{batch_size:>10} {history['loss'][-1]:18.12f} {history['val_loss'][-1]:16.12f}")
    print(f"largest relative difference between the curves: {largest_relative_difference(histories):.2e}")
    if args.plot:
        plot(histories, args.plot, held_out="test" if args.data is None else "validation")
        print(f"figure saved to {args.plot}")
    return histories


if __name__ == "__main__":
    main()
