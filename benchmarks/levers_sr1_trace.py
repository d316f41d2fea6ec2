"""Lever 67's L-SR1 variant step by step on one problem of the race: what its model does after each pair.

Prints, for each of the first steps of ``FlatSR1`` (``benchmarks/levers_sr1.py``) on the problem's full-batch objective
at the race's initial weights: μ = pᵀr, |p|², Δ, the λ_e the trial used, b₀, λ_min(B) (b₀ itself where b₀ certifies
B ⪰ b₀I), the trial's loss, the loss held and the pairs held after the step. Steps count from 0.

Usage:
    python benchmarks/levers_sr1_trace.py                           # MNIST, seed 0, b₀ = 1/γ, 30 steps
    python benchmarks/levers_sr1_trace.py --initial pencil          # b₀ below the pencil's smallest eigenvalue
    python benchmarks/levers_sr1_trace.py --problem pinn --steps 50
"""

from __future__ import annotations

import argparse

import torch
from levers_sr1 import INITIAL_RULES, FlatSR1
from peers_problems import PROBLEMS, make_accumulator

COLUMNS = ("mu", "p_sq", "comparison", "lambd", "b0", "smallest", "trial_loss", "loss")


def trace(problem_name: str, seed: int, steps: int, initial: str, memory: int, quick: bool) -> list[dict[str, float]]:
    """The log of ``steps`` steps of :class:`FlatSR1` on the problem (one torch thread, as the race)."""
    torch.set_num_threads(1)
    problem = PROBLEMS[problem_name](quick, seed)
    model = problem.make_model()
    accumulator = make_accumulator(problem, model)
    optimizer = FlatSR1(list(model.parameters()), memory=memory, initial=initial)
    optimizer.log = []
    for _ in range(steps):
        optimizer.step(accumulator)
    return optimizer.log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=list(PROBLEMS), default="mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--memory", type=int, default=20)
    parser.add_argument("--initial", choices=INITIAL_RULES, default="ratio")
    parser.add_argument("--quick", action="store_true", help="the problem's small version")
    arguments = parser.parse_args(argv)
    log = trace(
        arguments.problem, arguments.seed, arguments.steps, arguments.initial, arguments.memory, arguments.quick
    )
    name = f"FlatSR1(memory={arguments.memory}, initial={arguments.initial!r})"
    print(f"{name} on {arguments.problem}, seed {arguments.seed}")
    print(f"{'step':>4} " + " ".join(f"{column:>11}" for column in COLUMNS) + "  pairs")
    for step, entry in enumerate(log):
        print(f"{step:>4} " + " ".join(f"{entry[column]:>11.3g}" for column in COLUMNS) + f"  {entry['pairs']:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
