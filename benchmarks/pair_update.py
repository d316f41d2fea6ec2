"""The time of SCG's quasi-Newton pair update alone: ``SecantPairs.advance_flat`` (step 7 with memory).

The update keeps the accepted step's secant pair (s, y) = (αp, r − r₊) and forms p₊ = H r₊ from the last m pairs —
with ``--diagonal-scaling`` also v and Λ from r₊ and H₀ = γ_D Λ (``moller_scg.quasi_newton``). It is the part of
SCG's own work per step that grows with m and that the diagonal mode adds to, and timed alone, on a synthetic
quadratic with every slot in use, it moves much less with the machine's load than a whole step does
(``benchmarks/own_work.py``): the medians of the best of several timings moved by a few µs from run to run, the
whole step's own work by ±30 µs. n = 501 is the size of the race's regression and physics-informed net.

To compare two versions of the library, run it once at each (``git worktree add``) and alternate the runs:

    python benchmarks/pair_update.py                          # n = 501; m = 20 and 40; γI and the diagonal H₀
    python benchmarks/pair_update.py --sizes 501 462742 --memory 20
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import environment

from moller_scg.quasi_newton import SecantPairs

STEP_LENGTH = 0.01
"""α of every synthetic step (small enough that every pair passes the curvature condition)."""


def pair_update_seconds(n: int, memory: int, diagonal_scaling: bool, calls: int = 200, repeats: int = 7) -> float:
    """Seconds per ``advance_flat`` call with all m slots in use: the best of ``repeats`` means over ``calls`` calls,
    on the gradients r = b − Aw of a positive definite quadratic in n float64 weights, along random directions."""
    generator = torch.Generator().manual_seed(0)
    # A positive definite curvature applied as a low-rank product plus a multiple of I: O(n) memory at any n.
    factor = torch.randn(n, 8, generator=generator, dtype=torch.float64) / n**0.5
    directions = [torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(50)]
    pairs = SecantPairs([torch.zeros(n, dtype=torch.float64)], memory, diagonal_scaling=diagonal_scaling)
    rows = torch.empty(3, n, dtype=torch.float64)  # y (scratch), p, r₊ — as SCG's flat buffers hold them
    residual = torch.randn(n, generator=generator, dtype=torch.float64)
    pairs.start_scaling([residual])

    def one_update(index: int) -> float:
        nonlocal residual
        direction = directions[index % len(directions)]
        rows[1].copy_(direction)
        curvature_times_step = factor @ (factor.T @ direction) + 0.1 * direction
        torch.sub(residual, curvature_times_step, alpha=STEP_LENGTH, out=rows[2])
        started = time.perf_counter()
        pairs.advance_flat(rows, STEP_LENGTH, residual)
        elapsed = time.perf_counter() - started
        residual = rows[2].clone()
        return elapsed

    for index in range(3 * memory):  # fill every slot, then wrap around
        one_update(index)
    assert len(pairs) == memory
    return min(sum(one_update(index) for index in range(calls)) / calls for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[501], help="n, the number of weights")
    parser.add_argument("--memory", type=int, nargs="+", default=[20, 40], help="m, the pairs kept")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = environment("python benchmarks/pair_update.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(
        f"SecantPairs.advance_flat, µs per call (best of {args.repeats} means of {args.calls} calls); torch "
        f"{info['torch']}, {info['threads']} thread, {info['cpu_capability']}, {info['date']}"
    )
    for n in args.sizes:
        for memory in args.memory:
            scalar = pair_update_seconds(n, memory, False, args.calls, args.repeats)
            diagonal = pair_update_seconds(n, memory, True, args.calls, args.repeats)
            print(f"n = {n:>9,}  m = {memory:>3}   γI {scalar * 1e6:9.1f}   diagonal H₀ {diagonal * 1e6:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
