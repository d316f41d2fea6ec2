"""Test accuracy of the main job's CNN (``moller-scg mnist``, the embedded digits) for several weight decays ν.

The main job trains on E(w) = cross-entropy + (ν/2)|w|² (:mod:`moller_scg.weight_decay`,
:data:`moller_scg.mnist.DEFAULT_WEIGHT_DECAY`). Without it (ν = 0) the CNN drives the cross-entropy on its 4,000
digits towards 0, an objective with no finite minimiser, and the accuracy it ends at moves with the seed and the
CPU's rounding. Each cell is one run of ``moller-scg mnist --seed S --weight-decay ν [--memory M]`` (60 iterations,
torch's default number of threads, as the command; deterministic on a given CPU and thread count):

    python benchmarks/weight_decay_accuracy.py                          # ν = 0, 3e-4, 1e-3 on seeds 0, 1, 2 (~12 min)
    python benchmarks/weight_decay_accuracy.py --memory 0 --weight-decays 0 3e-4
    python benchmarks/weight_decay_accuracy.py --diagonal-scaling --weight-decays 3e-4
    python benchmarks/weight_decay_accuracy.py --preconditioner kronecker --weight-decays 0 3e-4   # the main job's H₀
    python benchmarks/weight_decay_accuracy.py --memory 0 --gauss-newton --weight-decays 0 3e-4

Each cell also gives the run's gradient passes (closure calls) and curvature products (HVP calls), and its seconds of
training (which move with the machine's load).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import environment

from moller_scg.default_optimizer import PRECONDITIONERS
from moller_scg.mnist import DEFAULT_MAX_ITER, DEFAULT_MEMORY, MEMORY_FORMATS, train_mnist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 3e-4, 1e-3], metavar="NU")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--memory", type=int, default=DEFAULT_MEMORY, help="SCG's secant pairs (0: Møller's SCG)")
    parser.add_argument(
        "--preconditioner",
        choices=PRECONDITIONERS,
        default="scalar",
        help="SCG's H₀ with --memory > 0 (train_mnist's preconditioner). Default scalar, γI: the H₀ of the saved runs "
        "without this option (the main job's own default is auto, K-FAC's H₀ for this CNN)",
    )
    parser.add_argument(
        "--diagonal-scaling",
        action="store_const",
        dest="preconditioner",
        const="diagonal",
        help="--preconditioner diagonal",
    )
    parser.add_argument("--gauss-newton", action="store_true", help="with --memory 0: Gauss–Newton curvature products")
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER)
    parser.add_argument("--max-train", type=int, help="train on the first samples only (for a quick check)")
    parser.add_argument(
        "--memory-format",
        choices=list(MEMORY_FORMATS),
        default="channels_last",
        help="the CNN's layout, as moller-scg mnist's (runs saved before 2026-12-06 used contiguous)",
    )
    args = parser.parse_args(argv)
    if args.memory == 0 and args.preconditioner != "scalar":
        parser.error(f"--preconditioner {args.preconditioner} shapes the H₀ of the secant mode: give --memory M ≥ 1")
    arguments = sys.argv[1:] if argv is None else argv
    env = environment(" ".join(["python benchmarks/weight_decay_accuracy.py", *arguments]))
    memory_only = args.preconditioner == "scalar" or args.memory == 0
    mode = f"SCG(memory={args.memory}{'' if memory_only else f', H₀ {args.preconditioner}'})"
    if args.gauss_newton:
        mode += ", Gauss–Newton curvature products"
    print(f"command: {env['command']}")
    print(
        f"test accuracy of moller-scg mnist's CNN ({args.memory_format}), {mode}, {args.max_iter} iterations; "
        f"torch {env['torch']}, "
        f"{torch.get_num_threads()} thread(s), CPU {env['cpu_capability']}, {env['date']}"
    )
    for weight_decay in args.weight_decays:
        cells = []
        for seed in args.seeds:
            result = train_mnist(
                seed=seed,
                memory=args.memory,
                preconditioner=args.preconditioner,
                weight_decay=weight_decay,
                max_iter=args.max_iter,
                max_train=args.max_train,
                progress=False,
                hvp_method="gauss-newton" if args.gauss_newton else "double-backward",
                memory_format=MEMORY_FORMATS[args.memory_format],
            )
            cells.append(
                f"seed {seed}: {100 * result.test_accuracy:.1f} % (E {result.train_loss:.2e}; "
                f"{result.closure_calls} passes, {result.hvp_calls} products, {result.wall_time:.0f} s)"
            )
        print(f"ν = {weight_decay:<7g} " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
