"""The diagonal mode's v^¼ as two square roots against a power, side by side (docs/performance.md, lever 51).

``SCG(params, memory=m, diagonal_scaling=True)`` forms Λ = diag(1 / (v^κ + ε mean v^κ)) with κ = ¼ at every accepted
step (:mod:`moller_scg.diagonal_scaling`). A power with a fractional exponent is a ``pow`` call per number; √√v is two
square roots, which the processor takes in a few cycles each, and it is within an ulp of the power. This script times
:func:`moller_scg.diagonal_scaling.power_into` (the library's way) and the plain power on the same vector, alternated
in one run, for vectors of the sizes of ``benchmarks/peers.py``'s problems, in NumPy (the pairs of a small CPU model)
and in torch (a large one):

    python benchmarks/fourth_root.py                                  # n = 650 (NumPy), 437,664 (torch float32)
    python benchmarks/fourth_root.py --sizes 501 462742 --dtype float64
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from common import environment
from own_work import best_seconds_per_call

from moller_scg import pair_arithmetic
from moller_scg.diagonal_scaling import POWER, power_into


def compare(n: int, dtype: torch.dtype, calls: int, repeats: int) -> tuple[float, float, float]:
    """(seconds of the plain power, seconds of ``power_into``, the largest relative difference of their results)
    on a vector of n positive numbers, as the secant pairs hold it: a NumPy view for a small CPU block, else the
    tensor (:func:`moller_scg.pair_arithmetic.on_host` with the 2m = 40 pair vectors of ``SCG(memory=20)``)."""
    generator = torch.Generator().manual_seed(0)
    second_moment = torch.rand(n, generator=generator, dtype=dtype) + 1e-12
    on_host = pair_arithmetic.on_host(torch.empty(40, n, dtype=dtype))
    (v,) = pair_arithmetic.working([second_moment], on_host)
    by_power = np.empty_like(v) if on_host else torch.empty_like(v)
    by_roots = np.empty_like(v) if on_host else torch.empty_like(v)

    def power() -> object:
        return np.power(v, POWER, out=by_power) if on_host else torch.pow(v, POWER, out=by_power)

    def roots() -> None:
        power_into(v, by_roots)

    power_seconds, roots_seconds = [], []
    for _ in range(3):  # alternated, so that the machine's load falls on both alike
        power_seconds.append(best_seconds_per_call(power, calls, repeats))
        roots_seconds.append(best_seconds_per_call(roots, calls, repeats))
    a, b = torch.as_tensor(by_power), torch.as_tensor(by_roots)
    difference = float(((a - b).abs() / a).max())
    return min(power_seconds), min(roots_seconds), difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[650, 437664], help="n, the number of weights")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None, help="default: float64 below 10^5")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = environment("python benchmarks/fourth_root.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(
        f"v^¼ of the diagonal H₀, µs per vector (best of {args.repeats} means of {args.calls} calls, alternated 3 "
        f"times); torch {info['torch']}, {info['threads']} thread, {info['cpu_capability']}, {info['date']}"
    )
    for n in args.sizes:
        name = args.dtype or ("float64" if n < 100_000 else "float32")
        dtype = getattr(torch, name)
        power, roots, difference = compare(n, dtype, args.calls, args.repeats)
        path = "NumPy" if pair_arithmetic.on_host(torch.empty(40, n, dtype=dtype)) else "torch"
        print(
            f"n = {n:>9,} {name} ({path}):  power {power * 1e6:9.1f}   √√v {roots * 1e6:9.1f}   "
            f"ratio {roots / power:5.2f}   largest relative difference {difference:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
