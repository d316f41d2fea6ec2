"""SCG's own work per step: the time ``SCG(params, memory=m).step`` takes beyond its closure's, on the small problems
of ``benchmarks/peers.py``.

The closure only sets each ``.grad`` to a fixed random tensor (scaled a little from call to call) and returns a
falling loss, so the optimizer's arithmetic — the trial point, the inner products, the secant pair and H r₊ — is all
that is timed. On the regression, logistic and physics-informed problems of the race a gradient pass takes 0.6–3 ms,
and this work is what separates SCG's time per pass from LBFGS's there (docs/performance.md, lever 4).

To compare two versions of the library, run the script once at each (``git worktree add``) and alternate the runs:

    python benchmarks/own_work.py                      # regression, logistic, pinn; best of 5 × 1,000 steps
    python benchmarks/own_work.py --problems regression --steps 200
    python benchmarks/own_work.py --problems memory-bound --memory 5 --steps 5 --repeats 3 --warm-up 8   # 50 M weights

``memory-bound`` is the 50 M-weight MLP of the memory-bound case of ``benchmarks/peers.py``
(``peers_memory_bound.py``, full size), where the optimizer's vector work on n numbers, not its dispatching, is
what a step costs beyond its gradient pass.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import environment
from peers_memory_bound import MEMORY_BOUND, memory_bound_problem
from peers_problems import PROBLEMS

from moller_scg import SCG

WARM_UP_STEPS = 40


def fake_closure(params: list[torch.Tensor], seed: int = 0):
    """A closure that sets ``.grad`` to fixed random tensors, scaled by 1 + 10⁻³ (call mod 7), and returns 10 / call."""
    generator = torch.Generator().manual_seed(seed)
    gradients = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        for p, g in zip(params, gradients):
            p.grad = g * (1.0 + 1e-3 * (calls[0] % 7))
        return torch.tensor(10.0 / calls[0], dtype=torch.float64)

    return closure


def best_seconds_per_call(function, calls: int, repeats: int) -> float:
    """The fastest of ``repeats`` timings of ``calls`` calls, per call."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def make_model(problem_name: str) -> torch.nn.Module:
    """The model of a problem of ``benchmarks/peers.py``: the small problems at their ``--quick`` size (the same
    model), the memory-bound case at its full size."""
    if problem_name == MEMORY_BOUND:
        return memory_bound_problem(False, 0).make_model()
    return PROBLEMS[problem_name](True, 0).make_model()


def own_work(
    problem_name: str,
    memory: int,
    steps: int,
    repeats: int,
    warm_up: int = WARM_UP_STEPS,
    diagonal_scaling: bool = False,
) -> tuple[float, float]:
    """(seconds per step, seconds per closure call) of SCG(memory=m, diagonal_scaling=…) on the problem's model
    with the fake closure, after ``warm_up`` steps."""
    params = list(make_model(problem_name).parameters())
    closure = fake_closure(params)
    optimizer = SCG(params, memory=memory, diagonal_scaling=diagonal_scaling)
    for _ in range(warm_up):
        optimizer.step(closure)
    step = best_seconds_per_call(lambda: optimizer.step(closure), steps, repeats)
    call = best_seconds_per_call(closure, steps, repeats)
    return step, call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problems", nargs="+", default=["regression", "logistic", "pinn"], choices=[*PROBLEMS, MEMORY_BOUND]
    )
    parser.add_argument("--memory", type=int, default=20, help="m of SCG(params, memory=m)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-up", type=int, default=WARM_UP_STEPS, help="steps before the timing")
    parser.add_argument("--diagonal-scaling", action="store_true", help="SCG(..., diagonal_scaling=True)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = environment(" ".join(["python benchmarks/own_work.py", *(sys.argv[1:] if argv is None else argv)]))
    mode = f"memory={args.memory}" + (", diagonal_scaling=True" if args.diagonal_scaling else "")
    print(f"SCG({mode}) own work per step; torch {env['torch']}, 1 thread, {env['date']}")
    for name in args.problems:
        step, call = own_work(name, args.memory, args.steps, args.repeats, args.warm_up, args.diagonal_scaling)
        own = step - call
        print(f"{name:12s} step {step * 1e6:7.0f} µs   closure {call * 1e6:5.0f} µs   own work {own * 1e6:7.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
