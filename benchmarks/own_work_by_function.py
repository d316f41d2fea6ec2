"""Where ``SCG(params, memory=m)``'s own work between two evaluations goes, function by function, caches cold.

``benchmarks/own_work.py --before-each-evaluation E --cold-caches MIB`` gives the own work before each of a fresh
optimizer's first E evaluations as one number each. This script splits one of those gaps — the work after evaluation
``--gap`` and before the next — among the library's functions: each function listed in :data:`TIMED` is wrapped by
a timer, and the time it spent inside the gap (its callees included, the objective's evaluations left out) is
reported, the median over ``--repeats`` fresh runs, largest first. The gap's own total is measured by the same
clock, so the timers' own cost (a few µs a function) is in it; compare the functions with one another, and the
total with ``own_work.py``'s figure for that gap.

Gap 1 is SCG's first step (its setup after the first evaluation, then the trial point); a later gap is one
iteration's work after an accepted trial's gradient (the trial's products, the pair, H r₊, the bookkeeping) and
before the next trial (docs/performance.md, lever 50):

    python benchmarks/own_work_by_function.py --gap 1 --cold-caches 32
    python benchmarks/own_work_by_function.py --gap 5 --cold-caches 32 --diagonal-scaling
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import environment
from own_work import _EvaluationStarts, run_until_stopped, stopping_objective

from moller_scg import SCG

TIMED = (
    ("moller_scg.scg", "SCG.step"),
    ("moller_scg.scg", "SCG._start"),
    ("moller_scg.scg", "SCG._iterate"),
    ("moller_scg.scg", "evaluate"),
    ("moller_scg.scg", "trial_at"),
    ("moller_scg.scg", "next_direction"),
    ("moller_scg.scg", "make_trace"),
    ("moller_scg.scg", "warn_when_stalled"),
    ("moller_scg.scg", "_checked_step_closure"),
    ("moller_scg.scg_objective", "EvaluationTally.add_to"),
    ("moller_scg.scg_objective", "_StepObjective.objective_for"),
    ("moller_scg.scg_storage", "_StateVectors.start"),
    ("moller_scg.scg_storage", "_StateVectors.hold_in_flat_buffers"),
    ("moller_scg.scg_storage", "_StateVectors.copy_of_weights"),
    ("moller_scg.scg_storage", "_StateVectors.squared_norm"),
    ("moller_scg.scg_storage", "_StateVectors.negated"),
    ("moller_scg.scg_storage", "_StateVectors.trial_products"),
    ("moller_scg.scg_storage", "_StateVectors.keep_residual"),
    ("moller_scg.scg_storage", "_StateVectors.remember_products"),
    ("moller_scg.flat_vector", "FlatLayout.__init__"),
    ("moller_scg.flat_vector", "FlatBuffers.__init__"),
    ("moller_scg.quasi_newton", "SecantPairs.__init__"),
    ("moller_scg.quasi_newton", "SecantPairs.start_scaling"),
    ("moller_scg.quasi_newton", "SecantPairs.prepare_advance"),
    ("moller_scg.quasi_newton", "SecantPairs.advance_flat"),
    ("moller_scg.quasi_newton", "SecantPairs._push_flat"),
    ("moller_scg.quasi_newton", "SecantPairs._apply_flat"),
    ("moller_scg.diagonal_scaling", "DiagonalScaling.__init__"),
    ("moller_scg.diagonal_scaling", "DiagonalScaling.start"),
    ("moller_scg.diagonal_scaling", "DiagonalScaling.observe"),
    ("moller_scg._vectors", "l1_norm"),
    ("moller_scg._vectors", "add_"),
    ("moller_scg.step_arithmetic", "loss_decrease"),
    ("moller_scg.step_arithmetic", "loss_epsilon"),
)
"""(module, attribute) of the functions timed: SCG's step and the pieces of the fast path (flat buffers, NumPy pair
arithmetic) it runs on the race's small problems. A module-level function is wrapped where ``moller_scg.scg`` or its
own module looks it up (the name in the module given); a method on its class."""


class Timers:
    """While installed (``with Timers() as timers:``), the functions of :data:`TIMED` run behind a clock, and
    ``intervals`` holds (label, start, end) of every call; on leaving, the functions are put back."""

    def __init__(self) -> None:
        self.intervals: list[tuple[str, float, float]] = []
        self._replaced: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Timers:
        for module_name, attribute in TIMED:
            owner: Any = importlib.import_module(module_name)
            *classes, name = attribute.split(".")
            for class_name in classes:
                owner = getattr(owner, class_name)
            original = owner.__dict__[name]
            self._replaced.append((owner, name, original))
            setattr(owner, name, self._timed(attribute, getattr(owner, name)))
        return self

    def __exit__(self, *exception: object) -> None:
        for owner, name, original in reversed(self._replaced):
            setattr(owner, name, original)
        self._replaced.clear()

    def _timed(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        intervals = self.intervals

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                intervals.append((label, started, time.perf_counter()))

        return timed


class _MarkedEvaluations(_EvaluationStarts):
    """:class:`own_work._EvaluationStarts` that also keeps the (start, end) of every outermost evaluation and of every
    eviction of the caches, so that a gap's window and the evaluations inside a function's call can be told apart."""

    evaluations: list[tuple[float, float]]
    evictions: list[tuple[float, float]]

    def _timed(self, evaluation: Callable, *args: Any, completes_last: bool = False) -> Any:
        outermost = self.depth == 0
        started = time.perf_counter()
        try:
            return super()._timed(evaluation, *args, completes_last=completes_last)
        finally:
            if outermost:
                self.evaluations.append((started, time.perf_counter()))

    def reset(self) -> None:
        super().reset()
        self.evaluations, self.evictions = [], []

    def _evict_caches(self) -> None:
        started = time.perf_counter()
        super()._evict_caches()
        self.evictions.append((started, time.perf_counter()))


def _overlap(a: float, b: float, low: float, high: float) -> float:
    return max(0.0, min(b, high) - max(a, low))


def split_gap(
    problem_name: str, gap: int, repeats: int, memory: int, diagonal_scaling: bool, cold_caches_mib: int
) -> tuple[list[float], dict[str, list[float]]]:
    """(the gap's own work in each run, µs; each timed function's µs inside the gap in each run that called it there).

    The gap runs from the end of the last evaluation before evaluation ``gap`` + 1 (before the eviction that precedes
    it, with ``cold_caches_mib``) to its start (to that eviction); a function's evaluations inside the window are
    subtracted from its time (a trial's forward, say)."""
    model, initial, objective = stopping_objective(problem_name, gap + 1, cold_caches_mib, _MarkedEvaluations)
    assert isinstance(objective, _MarkedEvaluations)
    totals: list[float] = []
    by_function: dict[str, list[float]] = {}
    with Timers() as timers:
        for _ in range(repeats):
            timers.intervals.clear()
            run_until_stopped(
                model, initial, objective, lambda params: SCG(params, memory=memory, diagonal_scaling=diagonal_scaling)
            )
            high = objective.evictions[gap][0] if cold_caches_mib > 0 else objective.starts[gap][0]
            low = max(end for _, end in objective.evaluations if end <= high)
            totals.append((high - low) * 1e6)
            for label, microseconds in _inside(timers.intervals, objective.evaluations, low, high).items():
                by_function.setdefault(label, []).append(microseconds)
    return totals, by_function


def _inside(
    intervals: list[tuple[str, float, float]], evaluations: list[tuple[float, float]], low: float, high: float
) -> dict[str, float]:
    """µs of each label's calls inside [low, high], the evaluations inside them left out."""
    seen: dict[str, float] = {}
    for label, start, end in intervals:
        inside = _overlap(start, end, low, high)
        if inside > 0.0:
            evaluating = sum(_overlap(a, b, max(start, low), min(end, high)) for a, b in evaluations)
            seen[label] = seen.get(label, 0.0) + (inside - evaluating) * 1e6
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="logistic")
    parser.add_argument("--gap", type=int, default=1, help="the work after evaluation GAP, before the next (≥ 1)")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--memory", type=int, default=20, help="m of SCG(params, memory=m)")
    parser.add_argument("--diagonal-scaling", action="store_true", help="SCG(..., diagonal_scaling=True)")
    parser.add_argument("--cold-caches", type=int, default=32, metavar="MIB", help="MiB evicted before each evaluation")
    args = parser.parse_args(argv)
    if args.gap < 1 or args.memory < 1 or args.cold_caches < 0:
        parser.error("--gap and --memory take values ≥ 1, --cold-caches ≥ 0")
    torch.set_num_threads(1)
    arguments = sys.argv[1:] if argv is None else argv
    env = environment(" ".join(["python benchmarks/own_work_by_function.py", *arguments]))
    totals, by_function = split_gap(
        args.problem, args.gap, args.repeats, args.memory, args.diagonal_scaling, args.cold_caches
    )
    mode = f"memory={args.memory}" + (", diagonal_scaling=True" if args.diagonal_scaling else "")
    cold = f"{args.cold_caches} MiB evicted before each evaluation" if args.cold_caches else "caches warm"
    print(f"torch {env['torch']}, 1 thread, {env['date']}; {env['command']}")
    print(
        f"{args.problem}: SCG({mode})'s own work after evaluation {args.gap}, before evaluation {args.gap + 1}; "
        f"median of {args.repeats} runs, {cold}: {statistics.median(totals):.0f} µs"
    )
    print("  µs inside each function (callees included; median over the runs that called it in the gap):")
    for label, values in sorted(by_function.items(), key=lambda item: -statistics.median(item[1])):
        print(f"    {label:40s} {statistics.median(values):7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
