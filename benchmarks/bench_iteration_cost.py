"""The cost of one SCG iteration with GradientAccumulator, in units of one gradient pass, on the blog's MNIST CNN.

Measured side by side in one run (interleaved rounds; every round times one gradient pass ``acc()``, one HVP pass
``acc.hvp(v)``, one over a tenth of the samples, and one ``SCG.step`` in each of the four curvature modes below), and
compared with the floors the passes themselves set:

* exact curvature (``hvp="double-backward"``, SCG calls ``acc.hvp``): a successful step makes 1 gradient pass and
  1 HVP pass; target ≤ 1.05 × (gradient pass + HVP pass);
* finite differences (``hvp="finite-difference"``): a successful step makes 2 gradient passes; target ≤ 2.1
  gradient passes;
* subsampled exact curvature (``GradientAccumulator(..., curvature_fraction=0.1)``): a successful step makes 1
  gradient pass and 1 HVP pass over a tenth of the samples; target ≤ 1.05 × (gradient pass + that HVP pass);
* secant m = 20 (``SCG(params, memory=20)``, whose ``hvp`` defaults to ``"secant"``): δ = μ from the quasi-Newton
  model of the stored secant pairs, so a successful step with pairs makes 1 gradient pass (the trial) plus SCG's
  own work, H r₊ from the 20 pairs; target ≤ 1.05 gradient passes. A step without pairs (the first, or the one
  after the pairs were dropped) takes Møller's finite difference; such steps (an HVP call or more than one closure
  call in the trace) are left out of this mode's ratio and counted in the report. Before the timed rounds this
  mode steps until it has made m successful steps, so the timed steps form H r₊ from a full memory of pairs.

A failed step (Δ < 0) makes only the trial's gradient pass; the closure and HVP calls of each step are read from
``optimizer.trace``, and the ratios are medians over successful steps of (step time) / (floor in the same round).
SCG's own vector arithmetic (clones, axpys, inner products over w) does not shrink with N, so on small datasets it
shows in the ratios; the report prints it in milliseconds (the step's time outside the accumulator's passes).
Results go to ``benchmarks/results/bench_iteration_cost.{txt,json}``.

Usage:
    python benchmarks/bench_iteration_cost.py            # a few minutes on 2 CPU cores
    python benchmarks/bench_iteration_cost.py --quick    # well under a minute
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accumulator import mnist, write_results  # noqa: E402 - the benchmarks' shared helpers
from common import command_line, environment  # noqa: E402

from moller_scg.accumulate import GradientAccumulator  # noqa: E402
from moller_scg.models import MnistCNN  # noqa: E402
from moller_scg.scg import SCG  # noqa: E402

EXACT_TARGET = 1.05  # × (1 gradient pass + 1 HVP pass), also for the subsampled HVP pass
CURVATURE_FRACTION = 0.1
FINITE_DIFFERENCE_TARGET = 2.1  # gradient passes
MEMORY = 20  # m, the secant pairs of SCG(params, memory=20)
SECANT_TARGET = 1.05  # gradient passes
MODES = ("exact", "finite-difference", "subsampled", "secant")


def _timed(function) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


class _TimedClosure:
    """The accumulator as SCG sees it (a closure with ``hvp``), adding up the seconds spent in its passes."""

    def __init__(self, accumulator: GradientAccumulator) -> None:
        self.accumulator = accumulator
        self.seconds = 0.0

    def __call__(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.accumulator()
        finally:
            self.seconds += time.perf_counter() - start

    def hvp(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        start = time.perf_counter()
        try:
            return self.accumulator.hvp(vectors)
        finally:
            self.seconds += time.perf_counter() - start


class _Run:
    """One SCG optimizer on its own copy of the model, stepping through its own accumulator."""

    def __init__(
        self,
        model: nn.Module,
        data,
        batch_size: int,
        hvp: str,
        curvature_fraction: float = 1.0,
        memory: int = 0,
    ) -> None:
        self.model = copy.deepcopy(model)
        accumulator = GradientAccumulator(
            self.model, nn.CrossEntropyLoss(), data, batch_size=batch_size, curvature_fraction=curvature_fraction
        )
        self.closure = _TimedClosure(accumulator)
        self.optimizer = SCG(self.model.parameters(), hvp=hvp, memory=memory)

    def step(self) -> dict[str, float]:
        before = self.optimizer.trace
        closure_before = before.closure_calls if before else 0
        hvp_before = before.hvp_calls if before else 0
        in_passes_before = self.closure.seconds
        seconds = _timed(lambda: self.optimizer.step(self.closure))
        trace = self.optimizer.trace
        return {
            "seconds": seconds,
            "outside_passes": seconds - (self.closure.seconds - in_passes_before),
            "closure_calls": trace.closure_calls - closure_before,
            "hvp_calls": trace.hvp_calls - hvp_before,
            "success": trace.success,
            "loss": trace.loss,
        }


def measure(samples: int, batch_size: int, rounds: int, device: torch.device) -> dict[str, object]:
    torch.manual_seed(0)
    data = mnist(samples, device)
    model = MnistCNN().to(device)
    passes = GradientAccumulator(model, nn.CrossEntropyLoss(), data, batch_size=batch_size)
    subsampled_passes = GradientAccumulator(
        model, nn.CrossEntropyLoss(), data, batch_size=batch_size, curvature_fraction=CURVATURE_FRACTION
    )
    vectors = [torch.randn_like(p) for p in passes.params]
    runs = {
        "exact": _Run(model, data, batch_size, "double-backward"),
        "finite-difference": _Run(model, data, batch_size, "finite-difference"),
        "subsampled": _Run(model, data, batch_size, "double-backward", CURVATURE_FRACTION),
        "secant": _Run(model, data, batch_size, "secant", memory=MEMORY),
    }
    # Warm-up: one pass of each kind, and each optimizer's first step (which also evaluates its start point).
    passes(), passes.hvp(vectors), subsampled_passes.hvp(vectors)
    for run in runs.values():
        run.step()
    secant_warm_up_successes = _fill_memory(runs["secant"])
    records = []
    for round_index in range(rounds):
        tasks = [
            ("gradient", lambda: _timed(passes)),
            ("hvp", lambda: _timed(lambda: passes.hvp(vectors))),
            ("subsampled_hvp", lambda: _timed(lambda: subsampled_passes.hvp(vectors))),
            ("exact", runs["exact"].step),
            ("finite-difference", runs["finite-difference"].step),
            ("subsampled", runs["subsampled"].step),
            ("secant", runs["secant"].step),
        ]
        shift = round_index % len(tasks)
        record = {}
        for name, task in tasks[shift:] + tasks[:shift]:
            record[name] = task()
        records.append(record)
    result = summarize(records, samples, batch_size, rounds)
    result["secant"]["warm_up_successful_steps"] = secant_warm_up_successes
    return result


def _fill_memory(run: _Run) -> int:
    """Step until m steps were accepted, so the timed steps form H r₊ from m secant pairs, not fewer.

    Each accepted step stores its pair (unless the pair fails the curvature condition). Returns the number of
    accepted steps made before the timed rounds, the first step included.
    """
    successes = 1 if run.optimizer.trace is not None and run.optimizer.trace.success else 0
    for _ in range(3 * MEMORY):  # a bound, in case many trials fail
        if successes >= MEMORY:
            break
        successes += run.step()["success"]
    return successes


def _is_secant_step(step: dict[str, float]) -> bool:
    """A step that took δ from the secant pairs: its only closure call is the trial, and it made no HVP call."""
    return step["closure_calls"] == 1 and step["hvp_calls"] == 0


def summarize(records: list[dict], samples: int, batch_size: int, rounds: int) -> dict[str, object]:
    gradient = [r["gradient"] for r in records]
    hvp = [r["hvp"] for r in records]
    result: dict[str, object] = {
        "samples": samples,
        "batch_size": batch_size,
        "rounds": rounds,
        "gradient_pass_seconds": statistics.median(gradient),
        "hvp_pass_seconds": statistics.median(hvp),
        "hvp_over_gradient": statistics.median(h / g for h, g in zip(hvp, gradient)),
        "curvature_fraction": CURVATURE_FRACTION,
        "subsampled_hvp_over_gradient": statistics.median(r["subsampled_hvp"] / r["gradient"] for r in records),
    }
    for mode in MODES:
        hvp_kind = "subsampled_hvp" if mode == "subsampled" else "hvp"
        steps = [(r[mode], r["gradient"], r[hvp_kind]) for r in records]
        successes = [s for s in steps if s[0]["success"]]
        excluded = 0
        if mode == "secant":
            secant_successes = [s for s in successes if _is_secant_step(s[0])]
            excluded = len(successes) - len(secant_successes)
            successes = secant_successes
        if mode == "finite-difference":
            floor = [2 * g for _, g, _ in successes]
        elif mode == "secant":
            floor = [g for _, g, _ in successes]
        else:
            floor = [g + h for _, g, h in successes]
        in_units = [s["seconds"] / f for (s, _, _), f in zip(successes, floor)]
        own = [s["outside_passes"] for s, _, _ in successes]
        result[mode] = {
            "steps": len(steps),
            "successful_steps": len(successes),
            "successful_steps_excluded": excluded,  # secant: successes with an HVP call or a finite difference
            "closure_calls_per_successful_step": sorted({s["closure_calls"] for s, _, _ in successes}),
            "hvp_calls_per_successful_step": sorted({s["hvp_calls"] for s, _, _ in successes}),
            "successful_step_in_gradient_passes": statistics.median(s["seconds"] / g for s, g, _ in successes)
            if successes
            else None,
            "successful_step_over_floor": statistics.median(in_units) if in_units else None,
            "scg_own_seconds_per_successful_step": statistics.median(own) if own else None,
            "mean_step_in_gradient_passes": statistics.mean(s["seconds"] / g for s, g, _ in steps),
            "loss_after": steps[-1][0]["loss"],
        }
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def report(results: dict[str, object]) -> str:
    env, row = results["environment"], results["measurement"]
    exact, fd, sub, secant = row["exact"], row["finite-difference"], row["subsampled"], row["secant"]
    floor_exact = 1 + row["hvp_over_gradient"]
    floor_subsampled = 1 + row["subsampled_hvp_over_gradient"]

    def verdict(value, target):
        return "n/a" if value is None else ("ok" if value <= target else f"> {target}")

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    def own_ms(mode):
        return fmt(_ms(mode["scg_own_seconds_per_successful_step"]), ".1f")

    return "\n".join(
        [
            "One SCG iteration with GradientAccumulator, on the blog's MNIST CNN (float32, nn.CrossEntropyLoss)",
            f"command: {env['command']}",
            f"torch {env['torch']}, device {env['device']}, {env['threads']} thread(s); "
            f"N = {row['samples']}, batch {row['batch_size']}, {row['rounds']} interleaved rounds",
            "",
            f"gradient pass (acc()):     {row['gradient_pass_seconds']:.3f} s  = 1 unit",
            f"HVP pass (acc.hvp(v)):     {row['hvp_pass_seconds']:.3f} s  = {row['hvp_over_gradient']:.2f} units",
            f"HVP pass over {row['curvature_fraction']:.0%} of the samples (curvature_fraction="
            f"{row['curvature_fraction']:g}): {row['subsampled_hvp_over_gradient']:.2f} units",
            "",
            "exact curvature (hvp='double-backward', SCG calls acc.hvp)",
            f"  successful steps: {exact['successful_steps']} of {exact['steps']}; closure calls per successful step "
            f"{exact['closure_calls_per_successful_step']}, HVP calls {exact['hvp_calls_per_successful_step']}",
            f"  successful step = {fmt(exact['successful_step_in_gradient_passes'], '.2f')} gradient passes; "
            f"floor 1 + {row['hvp_over_gradient']:.2f} = {floor_exact:.2f}",
            f"  step / (gradient pass + HVP pass) = {fmt(exact['successful_step_over_floor'])}  "
            f"(target ≤ {EXACT_TARGET}: {verdict(exact['successful_step_over_floor'], EXACT_TARGET)})",
            f"  mean over all steps = {exact['mean_step_in_gradient_passes']:.2f} gradient passes; SCG's own "
            f"work per successful step (outside the passes) {own_ms(exact)} ms",
            "",
            "finite differences (hvp='finite-difference')",
            f"  successful steps: {fd['successful_steps']} of {fd['steps']}; closure calls per successful step "
            f"{fd['closure_calls_per_successful_step']}",
            f"  successful step = {fmt(fd['successful_step_in_gradient_passes'])} gradient passes  "
            f"(target ≤ {FINITE_DIFFERENCE_TARGET}: "
            f"{verdict(fd['successful_step_in_gradient_passes'], FINITE_DIFFERENCE_TARGET)})",
            f"  mean over all steps = {fd['mean_step_in_gradient_passes']:.2f} gradient passes; SCG's own "
            f"work per successful step (outside the passes) {own_ms(fd)} ms",
            "",
            f"subsampled exact curvature (curvature_fraction={row['curvature_fraction']:g}, SCG calls acc.hvp)",
            f"  successful steps: {sub['successful_steps']} of {sub['steps']}; closure calls per successful step "
            f"{sub['closure_calls_per_successful_step']}, HVP calls {sub['hvp_calls_per_successful_step']}",
            f"  successful step = {fmt(sub['successful_step_in_gradient_passes'], '.2f')} gradient passes; "
            f"floor 1 + {row['subsampled_hvp_over_gradient']:.2f} = {floor_subsampled:.2f}",
            f"  step / (gradient pass + subsampled HVP pass) = {fmt(sub['successful_step_over_floor'])}  "
            f"(target ≤ {EXACT_TARGET}: {verdict(sub['successful_step_over_floor'], EXACT_TARGET)})",
            f"  mean over all steps = {sub['mean_step_in_gradient_passes']:.2f} gradient passes; SCG's own "
            f"work per successful step (outside the passes) {own_ms(sub)} ms",
            "",
            f"secant m = {MEMORY} (SCG(params, memory={MEMORY}), hvp='secant': δ from the quasi-Newton model, "
            f"timed after {secant['warm_up_successful_steps']} accepted warm-up steps)",
            f"  successful steps counted: {secant['successful_steps']} of {secant['steps']} (left out: "
            f"{secant['successful_steps_excluded']} with an HVP call or a finite difference); closure calls per "
            f"counted step {secant['closure_calls_per_successful_step']}, HVP calls "
            f"{secant['hvp_calls_per_successful_step']}",
            f"  successful step = {fmt(secant['successful_step_in_gradient_passes'])} gradient passes; floor 1  "
            f"(target ≤ {SECANT_TARGET}: {verdict(secant['successful_step_over_floor'], SECANT_TARGET)})",
            f"  mean over all steps = {secant['mean_step_in_gradient_passes']:.2f} gradient passes; SCG's own "
            f"work per successful step (outside the passes, H r₊ included) {own_ms(secant)} ms",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier timings)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    samples, batch_size, rounds = (768, 64, 7) if args.quick else (2048, 64, 11)
    results = {"environment": environment(command_line(), device), "quick": args.quick}
    results["measurement"] = measure(samples, batch_size, rounds, device)
    text = report(results)
    print(text)
    path = write_results("bench_iteration_cost" + ("_quick" if args.quick else ""), results, text)
    print(f"\nwritten to {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
