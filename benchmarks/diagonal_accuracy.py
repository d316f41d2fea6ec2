"""Test accuracy of the main job's CNN (``moller-scg mnist``, the embedded digits) with the diagonal H₀ of
``SCG(memory=20, diagonal_scaling=True)`` at several powers κ of Λ = diag(1 / (v^κ + ε mean v^κ)), and with γI.

The library's κ is :data:`moller_scg.diagonal_scaling.POWER` (¼); this script sets that constant for each row, so
the rows are the library's own step with another κ (a research device: ``SCG`` has no argument for κ). Every row
trains 60 iterations from the same seeded start, as ``moller-scg mnist --seed S [--diagonal-scaling]`` does, with
torch's default number of threads as the command does (the last digits of a float reduction, and so the accuracies,
change with it); the runs are deterministic on a given CPU and thread count (docs/performance.md, levers 14 and 15):

    python benchmarks/diagonal_accuracy.py                       # κ = ⅛, ¼ and γI on seeds 0, 1, 2 (about 9 minutes)
    python benchmarks/diagonal_accuracy.py --powers 0.125 --seeds 0
    python benchmarks/diagonal_accuracy.py --weight-decay 0     # the objective without weight decay (before 2026-12-04)
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import environment

import moller_scg.diagonal_scaling as diagonal_scaling
from moller_scg.mnist import DEFAULT_MAX_ITER, DEFAULT_WEIGHT_DECAY, train_mnist


def test_accuracy(
    power: float | None, seed: int, max_iter: int, max_train: int | None, weight_decay: float = DEFAULT_WEIGHT_DECAY
) -> tuple[float, float]:
    """(test accuracy, final training loss) of ``train_mnist(seed=seed, weight_decay=ν)`` with the diagonal H₀ at
    κ = ``power``, or with γI when ``power`` is ``None``; the library's κ is restored afterwards."""
    library_power = diagonal_scaling.POWER
    try:
        if power is not None:
            diagonal_scaling.POWER = power
        result = train_mnist(
            seed=seed,
            preconditioner="scalar" if power is None else "diagonal",
            max_iter=max_iter,
            max_train=max_train,
            weight_decay=weight_decay,
            progress=False,
        )
    finally:
        diagonal_scaling.POWER = library_power
    return result.test_accuracy, result.train_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--powers", type=float, nargs="+", default=[0.125, 0.25], help="κ of the diagonal rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-gamma", action="store_true", help="leave out the γI row")
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER)
    parser.add_argument("--max-train", type=int, help="train on the first samples only (for a quick check)")
    parser.add_argument(
        "--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY, help="ν of the main job's objective (0: none)"
    )
    args = parser.parse_args(argv)
    env = environment(" ".join(["python benchmarks/diagonal_accuracy.py", *(sys.argv[1:] if argv is None else argv)]))
    threads = torch.get_num_threads()
    print(
        f"test accuracy of moller-scg mnist's CNN, {args.max_iter} iterations, weight decay ν = {args.weight_decay:g}; "
        f"torch {env['torch']}, "
        f"{threads} thread(s), {env['date']}"
    )
    rows: list[tuple[str, float | None]] = [(f"diagonal H₀, κ = {power:g}", power) for power in args.powers]
    if not args.no_gamma:
        rows.append(("γI", None))
    for label, power in rows:
        cells = []
        for seed in args.seeds:
            accuracy, loss = test_accuracy(power, seed, args.max_iter, args.max_train, args.weight_decay)
            cells.append(f"seed {seed}: {100 * accuracy:.1f} % (loss {loss:.1e})")
        print(f"{label:22s} " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
