"""SCG's own work per step: the time ``SCG(params, memory=m).step`` takes beyond its closure's calls.

On the problems of ``benchmarks/peers.py`` (regression, logistic, physics-informed, MNIST, autoencoder) the closure
is the problem's own full-batch objective at the race's size, SCG starts from the race's initial weights,
and every call into the closure is timed and subtracted: what is left is the optimizer's arithmetic on the real
trajectory — the trial point, the inner products, the secant pair, the diagonal scaling and H r₊. On the regression,
logistic and physics-informed problems a gradient pass takes 0.6–3 ms, and this work is what separates SCG's time
per pass from LBFGS's there (docs/performance.md, levers 4 and 15).

``--fake-closure`` times instead a closure that only sets each ``.grad`` to a fixed random tensor (scaled a little
from call to call) and returns a falling loss: its steps keep few secant pairs, so it times less of a step than a
real trajectory does (the figures quoted before lever 15 were taken with it). ``memory-bound``, the 50 M-weight MLP
of the memory-bound case of ``benchmarks/peers.py`` (``peers_memory_bound.py``, full size), always takes the fake
closure: there the optimizer's vector work on n numbers, not its dispatching, is what a step costs beyond its
gradient pass.

To compare two versions of the library, run the script once at each (``git worktree add``) and alternate the runs:

    python benchmarks/own_work.py                      # regression, logistic, pinn; best of 5 runs of 120 steps
    python benchmarks/own_work.py --problems regression --diagonal-scaling
    python benchmarks/own_work.py --with-lbfgs --count-operations  # and torch LBFGS's own work; SCG's operations
    python benchmarks/own_work.py --problems memory-bound --memory 5 --steps 5 --repeats 3 --warm-up 8   # 50 M weights

``--before-each-evaluation E`` times instead the own work before each of the first E evaluations of a fresh optimizer
(constructed, then stepped from the race's initial weights; its construction counts in the first), SCG beside
torch LBFGS at the history ``--lbfgs-history`` (20: the equal-memory row of ``SCG(memory=20)``), the median of
``--repeats`` runs, the two rows' runs alternating — where a race to an early target, a few evaluations long, spends
its time outside them. ``--cold-caches MIB`` reads and writes MIB MiB of memory before each evaluation, outside the
clock, so that each step runs with its code and data evicted from the caches, as after other work — a race, where the
other optimizers run between two evaluations of one, or a loop that does more (docs/performance.md, lever 34):

    python benchmarks/own_work.py --problems logistic --before-each-evaluation 9 --repeats 40
    python benchmarks/own_work.py --problems logistic --before-each-evaluation 9 --repeats 40 --cold-caches 32
    python benchmarks/own_work.py --problems logistic --before-each-evaluation 9 --repeats 40 --lbfgs-no-line-search
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from common import environment
from peers_adapters import torch_lbfgs
from peers_memory_bound import MEMORY_BOUND, memory_bound_problem
from peers_problems import PROBLEMS
from torch.overrides import TorchFunctionMode

from moller_scg import SCG, GradientAccumulator

WARM_UP_STEPS = 40
"""Steps of the fake closure before its timing."""

REAL_STEPS = 120
"""Steps of a real trajectory (the regression reaches its 99.9 % target in about as many)."""


class TimedAccumulator(GradientAccumulator):
    """A :class:`~moller_scg.GradientAccumulator` that adds up the seconds spent inside its evaluations — the
    gradient pass, the trial's forward and its deferred backward, the HVP and loss-only passes — in ``seconds``.

    ``depth`` is the number of evaluations under way: over several batches ``value_then_gradient`` makes its pass by
    calling the accumulator itself, and only the outermost evaluation is timed. Given a list, ``evaluation_totals``
    takes ``seconds`` after each evaluation (a trial's deferred backward updates its forward's entry), so that the
    time inside the first e evaluations can be read (``benchmarks/race_attribution.py``)."""

    seconds = 0.0
    depth = 0
    evaluation_totals: list[float] | None = None

    def _timed(self, evaluation: Callable, *args, completes_last: bool = False):
        started = time.perf_counter()
        self.depth += 1
        try:
            return evaluation(*args)
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.seconds += time.perf_counter() - started
                if self.evaluation_totals is not None:
                    if completes_last:
                        self.evaluation_totals[-1] = self.seconds
                    else:
                        self.evaluation_totals.append(self.seconds)

    def __call__(self):
        return self._timed(super().__call__)

    def value_then_gradient(self):
        loss, gradient = self._timed(super().value_then_gradient)
        return loss, lambda: self._timed(gradient, completes_last=True)

    def hvp(self, vectors):
        return self._timed(super().hvp, vectors)

    def loss(self):
        return self._timed(super().loss)


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


def timed_objective(problem_name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], TimedAccumulator]:
    """The problem's model at the race's initial weights (and a copy of them) and its full-batch objective at the
    race's size, timed."""
    problem = PROBLEMS[problem_name](False, 0)
    model = problem.make_model()
    initial = copy.deepcopy(model.state_dict())
    objective = TimedAccumulator(
        model,
        problem.make_loss(model),
        problem.train,
        batch_size=problem.accumulator_batch,
        reduction=problem.reduction,
    )
    return model, initial, objective


def real_own_work(
    problem_name: str, memory: int, steps: int, repeats: int, diagonal_scaling: bool = False
) -> tuple[float, float]:
    """(own seconds per step, seconds per evaluation): ``steps`` steps of SCG(memory=m, diagonal_scaling=…) from the
    race's initial weights on the problem's full-batch objective at the race's size, the time inside the objective's
    evaluations subtracted; the fastest of ``repeats`` runs of the same trajectory."""
    model, initial, objective = timed_objective(problem_name)
    best_own = best_evaluation = float("inf")
    for _ in range(repeats):
        model.load_state_dict(initial)
        optimizer = SCG(model.parameters(), memory=memory, diagonal_scaling=diagonal_scaling)
        objective.seconds = 0.0
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.step(objective)
        total = time.perf_counter() - started
        best_own = min(best_own, (total - objective.seconds) / steps)
        trace = optimizer.trace
        best_evaluation = min(best_evaluation, objective.seconds / (trace.closure_calls + trace.hvp_calls))
    return best_own, best_evaluation


class _EnoughEvaluations(Exception):
    """Raised by :class:`_EvaluationStarts` once an optimizer has made the evaluations asked for."""


_ATTRIBUTE_READS = {"__get__", "is_complex", "numel", "dim", "size", "_set_grad_enabled"}
"""Calls a ``TorchFunctionMode`` sees that are attribute reads, not tensor operations."""


class _EvaluationStarts(TimedAccumulator):
    """A :class:`TimedAccumulator` that notes, at the start of each of its first ``limit`` evaluations, the clock and
    the seconds spent inside the evaluations before it, and raises :class:`_EnoughEvaluations` at the next one (a
    trial's deferred backward belongs to its forward's evaluation and is not one of its own).

    With a ``thrash`` buffer, every element of it is read and written before each of those evaluations, its time
    counted with the evaluations' (so left out of the own work): the optimizer's work after that evaluation then runs
    with its code and data evicted from the CPU's caches, as in a race, where the other optimizers run between two of
    its evaluations (the baton is handed on before each evaluation but a deferred backward), or in a run that is not
    the only thing its process does."""

    limit = 0
    starts: list[tuple[float, float]]
    thrash: np.ndarray | None = None

    def _timed(self, evaluation: Callable, *args, completes_last: bool = False):
        if self.depth == 0 and not completes_last:
            if len(self.starts) == self.limit:
                raise _EnoughEvaluations
            if self.thrash is not None:
                started = time.perf_counter()
                self._evict_caches()
                self.seconds += time.perf_counter() - started
            self.starts.append((time.perf_counter(), self.seconds))
        return super()._timed(evaluation, *args, completes_last=completes_last)

    def reset(self) -> None:
        """Forget the marks and the seconds of the last run."""
        self.seconds, self.starts = 0.0, []

    def _evict_caches(self) -> None:
        """Read and write every element of ``thrash``."""
        assert self.thrash is not None
        self.thrash += 1.0


def stopping_objective(
    problem_name: str, evaluations: int, cold_caches_mib: int = 0, kind: type[_EvaluationStarts] | None = None
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], _EvaluationStarts]:
    """:func:`timed_objective` made an :class:`_EvaluationStarts` (or its subclass ``kind``) that stops an optimizer at
    its ``evaluations`` + 1-th evaluation, evicting ``cold_caches_mib`` MiB before each evaluation if > 0."""
    model, initial, objective = timed_objective(problem_name)
    objective.__class__ = kind or _EvaluationStarts
    objective.limit = evaluations
    if cold_caches_mib > 0:
        objective.thrash = np.zeros(cold_caches_mib * 2**20 // 8)
    return model, initial, objective


def run_until_stopped(
    model: torch.nn.Module,
    initial: dict[str, torch.Tensor],
    objective: _EvaluationStarts,
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
) -> float:
    """One run from the initial weights, the objective's marks cleared (:meth:`_EvaluationStarts.reset`): a new
    optimizer (``make_optimizer(params)``) stepped until the objective stops it; returns the clock before its
    construction."""
    model.load_state_dict(initial)
    objective.reset()
    started = time.perf_counter()
    try:
        optimizer = make_optimizer(list(model.parameters()))
        while True:
            optimizer.step(objective)
    except _EnoughEvaluations:
        pass
    return started


def own_work_before_evaluations(
    problem_name: str,
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    evaluations: int,
    repeats: int,
    cold_caches_mib: int = 0,
) -> list[list[float]]:
    """Seconds of an optimizer's own work before each of its first ``evaluations`` evaluations, one list per run of
    ``repeats``: each run constructs the optimizer (``make_optimizer(params)``, counted before the first) and steps it
    on the problem's full-batch objective from the race's initial weights. With ``cold_caches_mib`` > 0, that many
    MiB of memory are read and written before each evaluation, outside the clock (:class:`_EvaluationStarts`)."""
    model, initial, objective = stopping_objective(problem_name, evaluations, cold_caches_mib)
    runs = []
    for _ in range(repeats):
        started = run_until_stopped(model, initial, objective, make_optimizer)
        marks = [(started, 0.0), *objective.starts]
        runs.append([(t - t0) - (inside - inside0) for (t0, inside0), (t, inside) in zip(marks, marks[1:])])
    return runs


def lbfgs_own_work(problem_name: str, evaluations: int, repeats: int, history_size: int = 100) -> float:
    """Own seconds per evaluation of torch.optim.LBFGS as ``benchmarks/peers.py`` runs it (strong-Wolfe line search,
    lr 1, one step without a bound on its iterations) over its first ``evaluations`` evaluations from the race's
    initial weights (its construction and its work up to the next evaluation included), the time inside them
    subtracted; the fastest of ``repeats`` runs."""
    runs = own_work_before_evaluations(
        problem_name, lambda params: torch_lbfgs(params, history_size), evaluations + 1, repeats
    )
    return min(sum(run) for run in runs) / evaluations


def print_before_each_evaluation(
    name: str,
    memory: int,
    diagonal_scaling: bool,
    lbfgs_history: int,
    evaluations: int,
    repeats: int,
    cold_caches_mib: int = 0,
    lbfgs_line_search: str | None = "strong_wolfe",
) -> None:
    """:func:`own_work_before_evaluations` of SCG(memory=m, diagonal_scaling=…) and torch LBFGS(history), a line
    each: the median µs before each evaluation, and the median of the runs' totals up to the last two evaluations.
    The two rows' runs alternate, so that a drift of the machine reaches both alike. ``lbfgs_line_search=None``:
    torch LBFGS without a line search (torch's default)."""
    lbfgs_label = f"torch LBFGS(h={lbfgs_history}{'' if lbfgs_line_search else ', no LS'})"
    rows = {
        f"SCG(memory={memory}{', diagonal' if diagonal_scaling else ''})": lambda params: SCG(
            params, memory=memory, diagonal_scaling=diagonal_scaling
        ),
        lbfgs_label: lambda params: torch_lbfgs(params, lbfgs_history, lbfgs_line_search),
    }
    print_rows_before_each_evaluation(name, rows, evaluations, repeats, cold_caches_mib)


def print_rows_before_each_evaluation(
    name: str,
    rows: dict[str, Callable[[list[torch.Tensor]], Any]],
    evaluations: int,
    repeats: int,
    cold_caches_mib: int = 0,
    label_width: int = 26,
) -> None:
    """:func:`own_work_before_evaluations` of each row (a label and a function that makes the optimizer from the
    parameters), a line each: the median µs before each evaluation, and the median of the runs' totals up to the last
    two evaluations. The rows' runs alternate, so that a drift of the machine reaches them alike."""
    cold = f", {cold_caches_mib} MiB read and written before each evaluation" if cold_caches_mib else ""
    print(f"{name}: own work before each of the first {evaluations} evaluations, µs (median of {repeats} runs{cold})")
    runs_of: dict[str, list[list[float]]] = {label: [] for label in rows}
    for _ in range(repeats):
        for label, make in rows.items():
            runs_of[label] += own_work_before_evaluations(name, make, evaluations, 1, cold_caches_mib)
    for label, runs in runs_of.items():
        cells = " ".join(f"{statistics.median(run[i] for run in runs) * 1e6:.0f}" for i in range(evaluations))
        last_two = (evaluations - 1, evaluations) if evaluations > 1 else (evaluations,)
        totals = ", ".join(f"{e}: {statistics.median(sum(run[:e]) for run in runs) * 1e6:.0f}" for e in last_two)
        print(f"  {label:{label_width}s} {cells}   (total to evaluation {totals})")


def tensor_operations_per_step(problem_name: str, memory: int, steps: int, diagonal_scaling: bool = False) -> float:
    """The torch functions and tensor methods SCG(memory=m, diagonal_scaling=…) calls per step outside the
    objective's evaluations (attribute reads not counted), over ``steps`` steps from the race's initial weights."""
    model, initial, objective = timed_objective(problem_name)
    optimizer = SCG(model.parameters(), memory=memory, diagonal_scaling=diagonal_scaling)
    counted = [0]

    class CountOperations(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if objective.depth == 0 and getattr(func, "__name__", "") not in _ATTRIBUTE_READS:
                counted[0] += 1
            return func(*args, **(kwargs or {}))

    with CountOperations():
        for _ in range(steps):
            optimizer.step(objective)
    return counted[0] / steps


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
    parser.add_argument("--steps", type=int, help=f"steps per run (default {REAL_STEPS}; 1,000 with the fake closure)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-up", type=int, default=WARM_UP_STEPS, help="fake closure: steps before the timing")
    parser.add_argument("--diagonal-scaling", action="store_true", help="SCG(..., diagonal_scaling=True)")
    parser.add_argument("--fake-closure", action="store_true", help="time the fake closure's steps instead")
    parser.add_argument(
        "--with-lbfgs", action="store_true", help="also torch LBFGS(100)'s own work per evaluation, as many evaluations"
    )
    parser.add_argument("--count-operations", action="store_true", help="also SCG's tensor operations per step")
    parser.add_argument(
        "--before-each-evaluation",
        type=int,
        metavar="E",
        help="instead: own work before each of the first E evaluations of SCG and torch LBFGS(--lbfgs-history)",
    )
    parser.add_argument("--lbfgs-history", type=int, default=20, help="with --before-each-evaluation (default 20)")
    parser.add_argument(
        "--lbfgs-no-line-search",
        action="store_true",
        help="with --before-each-evaluation: torch LBFGS without a line search (torch's default; lever 40)",
    )
    parser.add_argument(
        "--cold-caches",
        type=int,
        default=0,
        metavar="MIB",
        help="with --before-each-evaluation: MIB MiB read and written before each evaluation (unclocked)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = environment(" ".join(["python benchmarks/own_work.py", *(sys.argv[1:] if argv is None else argv)]))
    if args.cold_caches < 0 or (args.cold_caches and args.before_each_evaluation is None):
        parser.error("--cold-caches takes MIB ≥ 0, with --before-each-evaluation")
    if args.before_each_evaluation is not None:
        if args.before_each_evaluation < 1 or MEMORY_BOUND in args.problems or args.fake_closure:
            parser.error("--before-each-evaluation takes E ≥ 1 and the real problems' objectives")
        print(f"torch {env['torch']}, 1 thread, {env['date']}; {env['command']}")
        for name in args.problems:
            print_before_each_evaluation(
                name,
                args.memory,
                args.diagonal_scaling,
                args.lbfgs_history,
                args.before_each_evaluation,
                args.repeats,
                args.cold_caches,
                None if args.lbfgs_no_line_search else "strong_wolfe",
            )
        return 0
    mode = f"memory={args.memory}" + (", diagonal_scaling=True" if args.diagonal_scaling else "")
    print(f"SCG({mode}) own work per step; torch {env['torch']}, 1 thread, {env['date']}")
    for name in args.problems:
        if args.fake_closure or name == MEMORY_BOUND:
            steps = args.steps or 1000
            step, call = own_work(name, args.memory, steps, args.repeats, args.warm_up, args.diagonal_scaling)
            own, kind = step - call, "fake closure"
        else:
            steps = args.steps or REAL_STEPS
            own, call = real_own_work(name, args.memory, steps, args.repeats, args.diagonal_scaling)
            kind = "evaluation"
        print(f"{name:12s} own work {own * 1e6:7.0f} µs per step   {kind} {call * 1e6:6.0f} µs   ({steps} steps)")
        if args.with_lbfgs and not (args.fake_closure or name == MEMORY_BOUND):
            lbfgs = lbfgs_own_work(name, steps, args.repeats)
            print(f"{'':12s} torch LBFGS(100): own work {lbfgs * 1e6:7.0f} µs per evaluation   ({steps} evaluations)")
        if args.count_operations and not (args.fake_closure or name == MEMORY_BOUND):
            operations = tensor_operations_per_step(name, args.memory, steps, args.diagonal_scaling)
            print(f"{'':12s} {operations:.0f} tensor operations per step (attribute reads not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
