"""The analysis and report of ``benchmarks/peers.py``: targets, ratios to torch LBFGS, tables, goals, the figure
and the JSON."""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peers_adapters import (
    DEFAULT_LBFGS_FAMILY,
    LBFGS_FAMILY,
    NETLAB,
    REFERENCE,
    SCG_FAMILY,
    SUBSAMPLED,
)
from peers_metering import CURVATURE_FRACTION
from peers_problems import Problem

TARGET_GAPS = (1e-1, 1e-2, 1e-3)
"""Targets E* + g (E₀ − E*): g is the part of the achievable decrease E₀ − E* still left (E* = best loss of the run)."""
TIME_GOAL = 0.8
"""Issue #14: the best SCG mode reaches T2 and T3 in ≤ 0.8 × torch LBFGS(100)'s time (in each race, the median time
of it and its copies: :func:`time_against_reference_copies`) ..."""
TIME_GOAL_TARGETS = (1, 2)  # T2 and T3, as indices into TARGET_GAPS
TIME_GOAL_PROBLEMS = 3
"""... on at least 3 of the 5 problems, and beats LBFGS at equal optimizer memory on all of them."""


# ------------------------------------------------------------------------------------------------------------------
# Analysis


def best_adam(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the Adam run with the lowest final training loss; the others go into ``adam_grid``."""
    adams = [r for r in results if r["name"].startswith("Adam")]
    if not adams:
        return results
    best = min(adams, key=lambda r: r["final_loss"])
    best = dict(best, name=f"Adam (best lr of {len(adams)})", adam_grid={r["name"]: r["final_loss"] for r in adams})
    return [r for r in results if not r["name"].startswith("Adam")] + [best]


def first_reaching(history: list[dict[str, float]], target: float) -> dict[str, float] | None:
    for h in history:
        if h["loss"] <= target:
            return h
    return None


def seconds_to_targets(result: dict[str, Any], targets: Sequence[float]) -> list[float | None]:
    """The clock's reading at the first candidate loss at or below each target (``None``: not reached)."""
    hits = [first_reaching(result["history"], target) for target in targets]
    return [None if hit is None else hit["seconds"] for hit in hits]


def lowest_loss(results: list[dict[str, Any]]) -> float:
    """E*: the lowest loss in the histories of ``results``."""
    return min(h["loss"] for r in results for h in r["history"])


def targets_of(initial_loss: float, best_loss: float) -> list[float]:
    """T1 / T2 / T3 = E* + g (E₀ − E*) for each g of :data:`TARGET_GAPS`."""
    return [best_loss + gap * (initial_loss - best_loss) for gap in TARGET_GAPS]


def analyse(problem: Problem, results: list[dict[str, Any]], reference_name: str = REFERENCE) -> dict[str, Any]:
    """Targets from the run's E₀ and E*, and each result's time and passes to them as ratios to the reference's."""
    reference = next(r for r in results if r["name"] == reference_name)
    initial_loss = reference["history"][0]["loss"]  # every full-batch run's first evaluation is the start
    best_loss = lowest_loss(results)
    targets = targets_of(initial_loss, best_loss)
    reference_hits = [first_reaching(reference["history"], t) for t in targets]
    for result in results:
        reached = []
        for target, ref_hit in zip(targets, reference_hits):
            hit = first_reaching(result["history"], target)
            entry = {"target": target, "reached": hit is not None, "reference_reached": ref_hit is not None}
            if hit is not None:
                entry.update(passes=hit["passes"], seconds=hit["seconds"], evaluations=hit["evaluations"])
                # Reached where torch LBFGS did not: its time to the target is more than its whole run's, so the
                # ratio is at most this one's time over that run's (lever 61; it was 0, which any time passed).
                entry["time_ratio"] = hit["seconds"] / (ref_hit or reference)["seconds"]
                entry["passes_ratio"] = hit["passes"] / (ref_hit or reference)["passes"]
            reached.append(entry)
        result["targets"] = reached
        result["final_loss_ratio"] = result["final_loss"] / reference["final_loss"]
    return {
        "targets": targets,
        "target_gaps": list(TARGET_GAPS),
        "initial_loss": initial_loss,
        "best_loss": best_loss,
        "reference_final_loss": reference["final_loss"],
    }


def median_over_races(
    results: list[dict[str, Any]],
    races: list[list[dict[str, Any]]],
    targets: list[float],
    reference_name: str = REFERENCE,
) -> None:
    """Each result's time to each target as the median over several races of the same problem (``races``: each
    race's results, the first race's among them), in place: ``seconds`` is the median of the races' times and
    ``time_ratio`` the median of each race's ratio to its own reference, with the per-race numbers kept beside them
    (``seconds_by_race``, ``time_ratios_by_race``). The races run the same trajectories (the passes and evaluations
    to a target are the first race's); only the machine's speed differs from race to race. A row or a reference that
    reaches a target in some races only (which deterministic runs do not) is named on stderr and the medians are
    taken over the races that reached it (``races_reached`` records how many)."""
    by_name = [{r["name"]: r for r in race} for race in races]
    for result in results:
        for entry, target in zip(result["targets"], targets):
            if not entry["reached"]:
                continue
            seconds, ratios, reference_hits = [], [], 0
            for race in by_name:
                hit = first_reaching(race[result["name"]]["history"], target)
                reference_hit = first_reaching(race[reference_name]["history"], target)
                reference_hits += reference_hit is not None
                if hit is None:
                    continue
                seconds.append(hit["seconds"])
                # Where the reference misses the target, the bound analyse() takes: its whole run's time.
                ratios.append(hit["seconds"] / (reference_hit or race[reference_name])["seconds"])
            entry["seconds"], entry["seconds_by_race"] = statistics.median(seconds), seconds
            entry["races_reached"] = len(seconds)
            if len(seconds) != len(races) or reference_hits not in (0, len(races)):
                print(
                    f"warning: {result['name']} or {reference_name} reached the target {target:.4g} in some races "
                    f"only ({len(seconds)} and {reference_hits} of {len(races)}): medians over those",
                    file=sys.stderr,
                )
            entry["time_ratio"], entry["time_ratios_by_race"] = statistics.median(ratios), ratios


def reference_copies(results: list[dict[str, Any]], reference_name: str = REFERENCE) -> list[list[str]]:
    """For each target, the rows that computed what the reference computed up to its crossing of it: rows of the
    reference's own code (torch LBFGS with the strong-Wolfe line search, another history size) that recorded the same
    losses at the same evaluations up to that crossing. LBFGS with history h computes what history 100 computes up to
    its h-th iteration, so on the MNIST CNN history 40 is a copy of the reference at every target. An empty list where
    the reference did not reach the target."""
    reference = next(r for r in results if r["name"] == reference_name)
    copies = []
    for index, entry in enumerate(reference["targets"]):
        names = []
        if entry["reached"]:
            upto = entry["evaluations"]
            own = [(h["evaluations"], h["loss"]) for h in reference["history"] if h["evaluations"] <= upto]
            for result in results:
                mine = result["targets"][index]
                if (
                    result is not reference
                    and result.get("family") == reference.get("family")
                    and mine["reached"]
                    and mine["evaluations"] == upto
                    and [(h["evaluations"], h["loss"]) for h in result["history"] if h["evaluations"] <= upto] == own
                ):
                    names.append(result["name"])
        copies.append(names)
    return copies


def time_against_reference_copies(block: dict[str, Any], reference_name: str = REFERENCE) -> None:
    """Every row's time ratio to each target the reference reached, in place: in each race, its time over the median
    time of the reference and its copies (:func:`reference_copies`) in that race, and ``time_ratio`` the median over
    the races. The torch LBFGS rows of one MNIST race took 0.92–1.14 of their median to the same evaluation
    (``docs/performance.md``, lever 63), so one row's time is a noisy unit: the median of the rows that computed the
    same is a steadier one. The reference's own ratio is then its time over that median. Recomputed from the
    recorded ``seconds_by_race``, so a saved run re-rendered or pooled gets the same.

    Where the reference or a copy has no finite time in every race (pooled runs of which some missed the target),
    the target keeps its ratios over the reference alone and is given no copies; a row whose times do not cover every
    race keeps its ratios as measured, and is named on stderr. ``block["reference_copies"]``: the copies per target
    that the unit was taken over."""
    results = block["results"]
    races = block.get("races", 1)
    reference = next(r for r in results if r["name"] == reference_name)
    copies = reference_copies(results, reference_name)
    for index, names in enumerate(copies):
        if not reference["targets"][index]["reached"]:
            continue  # rows reaching it keep the bound analyse() gives: the reference's whole run
        timed = [reference] + [r for r in results if r["name"] in names]
        timings = [r["targets"][index].get("seconds_by_race", [r["targets"][index]["seconds"]]) for r in timed]
        if any(len(seconds) != races or not all(map(math.isfinite, seconds)) for seconds in timings):
            copies[index] = []
            continue
        unit = [statistics.median(seconds) for seconds in zip(*timings)]
        for result in results:
            entry = result["targets"][index]
            if not entry["reached"]:
                continue
            seconds = entry.get("seconds_by_race", [entry["seconds"]])
            if len(seconds) != races:
                print(
                    f"warning: {result['name']} has times for {len(seconds)} of {races} races at T{index + 1}: its "
                    f"ratio stays over {reference_name} alone",
                    file=sys.stderr,
                )
                continue
            ratios = [mine / theirs for mine, theirs in zip(seconds, unit)]
            entry["time_ratio"] = statistics.median(ratios)
            if "time_ratios_by_race" in entry or races > 1:
                entry["time_ratios_by_race"] = ratios
    block["reference_copies"] = copies


# ------------------------------------------------------------------------------------------------------------------
# Report


def ratio_cell(entry: dict[str, Any], key: str) -> str:
    if not entry["reached"]:
        return "—"
    if not entry["reference_reached"]:
        return f"≤{entry[key]:.2f}"  # the reference missed it: at most this row's time over its whole run's
    return f"{entry[key]:.2f}"


def _metric(problem: dict[str, Any], value: float) -> str:
    return f"{100 * value:.1f}%" if problem["metric_name"].endswith("acc") else f"{value:.4f}"


def problem_table(block: dict[str, Any]) -> list[str]:
    problem, costs, results = block["problem"], block["costs"], block["results"]
    reference = next(r for r in results if r["name"] == REFERENCE)
    targets = block["analysis"]["targets"]
    ref_hits = reference["targets"]
    hit_seconds = " / ".join(f"{h['seconds']:.2f}" if h["reached"] else "—" for h in ref_hits)
    hit_passes = " / ".join(f"{h['passes']:.1f}" if h["reached"] else "—" for h in ref_hits)
    lines = [
        f"## {problem['name']}: {problem['title']}",
        f"budget {problem['budget']:g} gradient-pass equivalents per optimizer; n = {problem['n']:,} weights; "
        f"one gradient pass = {costs['gradient_seconds'] * 1e3:.1f} ms, an HVP pass = {costs['hvp']:.2f} and a "
        f"loss-only pass = {costs['loss']:.2f} gradient passes (medians of {costs['rounds']} interleaved rounds), "
        f"SCG's trial forward (its backward made only for a trial its loss does not reject) = "
        f"{costs.get('forward', 1.0):.2f}, "
        f"an HVP over {CURVATURE_FRACTION:.0%} of the samples (the subsampled SCG's) = {costs['hvp_subsampled']:.2f}"
        + (
            f"; an HVP by forward-over-reverse (not used in the race) = {costs['hvp_forward_over_reverse']:.2f}"
            if costs["hvp_forward_over_reverse"] is not None
            else "; forward-over-reverse HVP not available for this loss"
        ),
        f"targets T1 / T2 / T3 = E* + 1e-1 / 1e-2 / 1e-3 × (E0 − E*), E0 = {block['analysis']['initial_loss']:.4g} "
        f"the initial loss, E* = {block['analysis']['best_loss']:.4g} the lowest loss of the run: "
        + " / ".join(f"{t:.4g}" for t in targets),
        f"torch LBFGS reaches them in {hit_seconds} s and {hit_passes} passes; final loss "
        f"{reference['final_loss']:.4g}, {problem['metric_name']} {_metric(problem, reference['metric'])}",
        "time and passes to each target: ratio to torch LBFGS (— = not reached within the budget, ≤x = reached where "
        "torch LBFGS did not, x its time or passes over torch LBFGS's whole run's)"
        + (
            "; time: over the median time of torch LBFGS and its copies (below) in the same race"
            if any(block.get("reference_copies") or [])
            else ""
        )
        + (
            f"; time: the median over {block['races']} interleaved races of the ratio in each race"
            if block.get("races", 1) > 1
            else ""
        )
        + ("; the baton's order a new random permutation every lap" if block.get("shuffled_order") else "")
        + "; evals = calls "
        "into the objective to reach T1/T2/T3 (a gradient, an HVP and a loss-only evaluation count 1 each); final "
        "loss at the budget, ratio to torch LBFGS; state = peak optimizer memory at evaluations, in units of n",
        "",
        f"{'optimizer':<23}{'time→T1':>8}{'T2':>6}{'T3':>6}{'passes→T1':>10}{'T2':>6}{'T3':>6}  "
        f"{'evals→T1/T2/T3':<15}{'final ×LBFGS':>13}{problem['metric_name']:>10}{'state':>7}  stopped",
        "-" * 120,
    ]
    for r in results:
        t = r["targets"]
        if r["name"].startswith("Adam"):
            evals = "minibatch"
        else:
            evals = "/".join(str(e["evaluations"]) if e["reached"] else "—" for e in t)
        lines.append(
            f"{r['name']:<23}{ratio_cell(t[0], 'time_ratio'):>8}{ratio_cell(t[1], 'time_ratio'):>6}"
            f"{ratio_cell(t[2], 'time_ratio'):>6}{ratio_cell(t[0], 'passes_ratio'):>10}"
            f"{ratio_cell(t[1], 'passes_ratio'):>6}{ratio_cell(t[2], 'passes_ratio'):>6}  {evals:<15}"
            f"{r['final_loss_ratio']:>13.3g}{_metric(problem, r['metric']):>10}{r['state_in_n']:>7.1f}  {r['status']}"
        )
    if block.get("races", 1) > 1:
        lines.append(f"time ratios to T1 / T2 / T3 in each of the {block['races']} races: " + race_ranges(results))
    unit = reference_line(block)
    if unit:
        lines.append(unit)
    scg_runs = [r for r in results if r.get("family") == SCG_FAMILY and "scg_steps" in r]
    lines.append(
        "SCG steps (of which rejected, Δ < 0): "
        + ", ".join(f"{r['name']} {r['scg_steps']} ({r['scg_rejected']})" for r in scg_runs)
    )
    adam = next((r for r in results if "adam_grid" in r), None)
    if adam:
        grid = ", ".join(f"{k.split('=')[1]}: {v:.4g}" for k, v in adam["adam_grid"].items())
        lines.append(f"Adam: batch {problem['adam_batch']}; final training loss per lr: {grid}")
    return lines


def reference_line(block: dict[str, Any]) -> str | None:
    """What the time ratios are over: in each race, the median time of the reference and its copies, named per target,
    and the reference's own time over that median (the race's fairness check: 1 where the reference ran as its copies
    did; a fixed baton order put history 40 at 0.52–0.95 of the reference's time on the millisecond problems,
    docs/performance.md, lever 17). ``None`` for a block without copies (:func:`time_against_reference_copies`)."""
    copies = block.get("reference_copies")
    if not copies or not any(copies):
        return None
    reference = next(r for r in block["results"] if r["name"] == REFERENCE)
    named = " / ".join(", ".join(short(name) for name in names) or "none" for names in copies)
    own = " / ".join(
        f"{entry['time_ratio']:.2f}" if entry["reached"] and names else "—"
        for entry, names in zip(reference["targets"], copies)
    )
    return (
        f"time unit: at each target, in each race, the median time of {REFERENCE} and its copies, the rows of its code "
        f"that recorded the same losses to the same evaluation (T1 / T2 / T3: {named}); {REFERENCE}'s own time over "
        f"that median is {own} (1 in a race fair to it)"
    )


def short(name: str) -> str:
    """A torch LBFGS row's name without the family's: ``h=40``."""
    return name.removeprefix(f"{REFERENCE} ")


def race_ranges(results: list[dict[str, Any]]) -> str:
    """The SCG rows' time ratios to each target, race by race (what the medians of the table are taken over)."""
    rows = []
    for r in results:
        if r.get("family") != SCG_FAMILY:
            continue
        cells = [
            ", ".join(f"{x:.2f}" for x in e["time_ratios_by_race"]) if "time_ratios_by_race" in e else "—"
            for e in r["targets"]
        ]
        rows.append(f"{r['name']} " + " / ".join(cells))
    return "; ".join(rows)


def memory_section(blocks: list[dict[str, Any]]) -> list[str]:
    probe_block = next((b for b in blocks if b.get("memory_probe")), None)
    names = [b["problem"]["name"] for b in blocks]
    lines = [
        "## Optimizer memory, in units of n (floating-point numbers held by the optimizer's frames and state; "
        "model parameters and gradients excluded)",
        "race = peak at the evaluations of the race"
        + (
            f"; probe = peak at every Python call and return of the optimizer's own code, "
            f"{probe_block['probe_budget']:g} passes on {probe_block['problem']['name']}, untimed"
            if probe_block
            else ""
        ),
        "",
        f"{'optimizer':<23}" + "".join(f"{'race ' + n:>18}" for n in names) + (f"{'probe':>8}" if probe_block else ""),
    ]
    for result in blocks[0]["results"]:
        name = result["name"]
        row = f"{name:<23}"
        for block in blocks:
            match = next(r for r in block["results"] if r["name"].split(" (")[0] == name.split(" (")[0])
            row += f"{match['state_in_n']:>18.1f}"
        if probe_block:
            key = "Adam" if name.startswith("Adam") else name
            row += f"{probe_block['memory_probe'].get(key, math.nan):>8.1f}"
        lines.append(row)
    return lines


def optimizer_memory(result: dict[str, Any], probe: dict[str, float]) -> float:
    """An optimizer's memory on a problem, in units of n: its peak in the race, or in ``probe`` if that is higher —
    the memory probe of the same problem (:func:`block_probe`): SCG's m × m matrices are a fixed number of floats,
    2.5 n on the logistic problem's 650 weights at m = 20 and 0.003 n on MNIST's, so a probe's peak in units of n
    is its own problem's (``docs/performance.md``, lever 61)."""
    return max(result["state_in_n"], probe.get(result["name"], 0.0))


def block_probe(block: dict[str, Any]) -> dict[str, float]:
    """The memory probe's peaks of the problem ``block`` raced (empty when the probe ran on another problem)."""
    return block.get("memory_probe") or {}


def equal_memory_partner(
    block: dict[str, Any], scg_result: dict[str, Any], probe: dict[str, float], family: str = LBFGS_FAMILY
) -> dict[str, Any]:
    """The torch LBFGS row (of ``family``: with the strong-Wolfe line search, or without one) whose measured memory
    is the nearest at or above the SCG row's (the largest LBFGS, the nearest below, if none is as large)."""
    lbfgs_rows = [r for r in block["results"] if r.get("family") == family]
    lbfgs_rows.sort(key=lambda r: optimizer_memory(r, probe))
    needed = optimizer_memory(scg_result, probe)
    return next((r for r in lbfgs_rows if optimizer_memory(r, probe) >= needed), lbfgs_rows[-1])


def beats(challenger: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether ``challenger`` reaches every target that either run reaches, each in less time than ``other``
    (:func:`faster`); when neither reaches any target, whether its final loss is lower."""
    return _first_to_every_target(challenger, other, faster)


def _first_to_every_target(
    challenger: dict[str, Any], other: dict[str, Any], first: Callable[[dict[str, Any], dict[str, Any]], bool]
) -> bool:
    """:func:`beats` and :func:`beats_in_every_race` with ``first(challenger's target, other's)`` deciding a target
    both reached: every target either run reaches is reached by ``challenger``, first where ``other`` reaches it too;
    when neither reaches any target, the lower final loss."""
    contested = [(c, o) for c, o in zip(challenger["targets"], other["targets"]) if c["reached"] or o["reached"]]
    if not contested:
        return challenger["final_loss"] < other["final_loss"]
    return all(c["reached"] and (not o["reached"] or first(c, o)) for c, o in contested)


def faster(entry: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether one row reached a target in less time than another: over several races, in the median race — the
    median over the races of the ratio of the two rows' times in the same race below 1, as the table's time ratios
    are medians of each race's ratio — and in one race, in fewer seconds. (The medians of each row's seconds over the
    races can rank two rows the other way round, the machine's speed moving between races: on the logistic problem
    raced nine times, a row at a median ratio of 1.08 to the other had the lower median seconds.)"""
    ratio = race_by_race_ratio(entry, other)
    return ratio is not None and ratio < 1.0


def race_by_race_ratio(entry: dict[str, Any], other: dict[str, Any]) -> float | None:
    """One row's time to a target over another's: the median over the races of the ratio of the two rows' times in
    the same race (one race: the ratio of their seconds); ``None`` when either did not reach it."""
    if not (entry["reached"] and other["reached"]):
        return None
    mine, theirs = entry.get("seconds_by_race"), other.get("seconds_by_race")
    if mine and theirs and len(mine) == len(theirs) > 1:
        # A race in which neither reached it (pooled runs: math.inf for both) is a tie.
        return statistics.median(1.0 if math.isinf(a) and math.isinf(b) else a / b for a, b in zip(mine, theirs))
    return entry["seconds"] / other["seconds"]


def races_ahead(entry: dict[str, Any], other: dict[str, Any]) -> tuple[int, int] | None:
    """(the races in which one row reached a target in less time than another, the races compared), race by race
    from their ``seconds_by_race`` (one race: their seconds); ``None`` when either did not reach it."""
    if not (entry["reached"] and other["reached"]):
        return None
    mine, theirs = entry.get("seconds_by_race"), other.get("seconds_by_race")
    if not (mine and theirs and len(mine) == len(theirs) > 1):
        mine, theirs = [entry["seconds"]], [other["seconds"]]
    return sum(a < b for a, b in zip(mine, theirs)), len(mine)


def beats_in_every_race(challenger: dict[str, Any], other: dict[str, Any]) -> bool:
    """:func:`beats` in each race, not only in the median one: ``challenger`` reaches every target that either run
    reaches, and each that ``other`` reaches too in less time in every race; when neither reaches any target, the
    lower final loss (a deterministic run's, the same in every race). Over three races a row whose time to a target
    is the other's within the race-to-race noise wins in the median race about half the time; in every race, about
    one time in eight."""
    return _first_to_every_target(challenger, other, _first_in_every_race)


def _first_in_every_race(entry: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether :func:`races_ahead` counts every race compared."""
    count = races_ahead(entry, other)
    return count is not None and count[0] == count[1]


def race_by_race_cell(scg_result: dict[str, Any], partner: dict[str, Any]) -> str:
    """An SCG row's time to T1 / T2 / T3 over its partner's, race by race (:func:`race_by_race_ratio`; "only SCG"
    or "only LBFGS" where one row alone reached the target, — where neither did), and in how many races it was
    first: "time ÷ its 0.97 / 0.92 / 0.78, first in 2 / 2 / 3 of 3 races"; where neither reaches any target, its
    final loss over the partner's (what :func:`beats` compares then): "final loss 0.77× its"."""
    pairs = list(zip(scg_result["targets"], partner["targets"]))
    if not any(mine["reached"] or theirs["reached"] for mine, theirs in pairs):
        return f"final loss {scg_result['final_loss'] / partner['final_loss']:.2f}× its"
    ratios = " / ".join(_target_ratio(mine, theirs) for mine, theirs in pairs)
    counts = [races_ahead(mine, theirs) for mine, theirs in pairs]
    races = max((count[1] for count in counts if count is not None), default=0)
    if races == 0:  # no target reached by both
        return f"time ÷ its {ratios}"
    firsts = " / ".join("—" if count is None else str(count[0]) for count in counts)
    return f"time ÷ its {ratios}, first in {firsts} of {races} race{'s' if races != 1 else ''}"


def _target_ratio(mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    """One target's cell of :func:`race_by_race_cell`."""
    if mine["reached"] and theirs["reached"]:
        return f"{race_by_race_ratio(mine, theirs):.2f}"
    return "only SCG" if mine["reached"] else "only LBFGS" if theirs["reached"] else "—"


def partner_cell(
    block: dict[str, Any], won: bool, partner: dict[str, Any], scg_result: dict[str, Any], probe: dict[str, float]
) -> str:
    """A problem's verdict against an equal-memory partner, as the goals print it, its parenthesis left open:
    "logistic no (vs torch LBFGS h=20, 51.1 n ≥ 48.1 n"."""
    memories = optimizer_memory(partner, probe), optimizer_memory(scg_result, probe)
    relation = "≥" if memories[0] >= memories[1] else "<"
    return (
        f"{block['problem']['name']} {'yes' if won else 'no'} "
        f"(vs {partner['name']}, {memories[0]:.1f} n {relation} {memories[1]:.1f} n"
    )


def default_lbfgs_comparison(blocks: list[dict[str, Any]], name: str) -> tuple[str, dict[str, bool]] | None:
    """The SCG row ``name`` against torch LBFGS without a line search (``peers.py --default-lbfgs``), by the goals'
    equal-memory rule and ``beats``, per problem, with the race-by-race time ratios to T1 / T2 / T3; ``None`` when
    the run has no such rows. Not one of the issue's goals, whose reference is the strong-Wolfe LBFGS."""
    if not any(r.get("family") == DEFAULT_LBFGS_FAMILY for b in blocks for r in b["results"]):
        return None
    cells, wins = [], {}
    for block in blocks:
        probe = block_probe(block)
        scg_result = next(r for r in block["results"] if r["name"] == name)
        partner = equal_memory_partner(block, scg_result, probe, DEFAULT_LBFGS_FAMILY)
        wins[block["problem"]["name"]] = won = beats(scg_result, partner)
        cells.append(
            partner_cell(block, won, partner, scg_result, probe) + f"; {race_by_race_cell(scg_result, partner)})"
        )
    return "  beats torch LBFGS without a line search at equal memory (not a goal): " + "; ".join(cells), wins


def within_time_goal(result: dict[str, Any]) -> bool:
    """T2 and T3 reached in ≤ TIME_GOAL × torch LBFGS(100)'s time, as the row's ``time_ratio`` gives it (where LBFGS
    misses a target, the bound :func:`analyse` sets: the time to it over LBFGS's whole run)."""
    return all(
        result["targets"][i]["reached"] and result["targets"][i]["time_ratio"] <= TIME_GOAL for i in TIME_GOAL_TARGETS
    )


def goals(blocks: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Issue #14's goals, per SCG row (every row of the SCG family in the table)."""
    lines = [
        "## Goals of issue #14",
        f"The best SCG mode reaches T2 and T3 in ≤ {TIME_GOAL}× torch LBFGS(100)'s time on at least "
        f"{TIME_GOAL_PROBLEMS} of the 5 problems, and beats torch LBFGS at equal optimizer memory on all of them "
        "(equal memory: the LBFGS row whose measured memory is the nearest at or above the SCG row's, or the largest "
        "LBFGS if none is as large; beats: reaches "
        "every target that either reaches, each in less time in the median race; each verdict also says whether "
        "every win held in every race)",
        "",
    ]
    verdicts: dict[str, Any] = {}
    names = [b["problem"]["name"] for b in blocks]
    scg_names = [r["name"] for r in blocks[0]["results"] if r.get("family") == SCG_FAMILY] if blocks else []
    for name in scg_names:
        time_wins, memory_wins, every_race_wins, partners = [], [], [], []
        for block in blocks:
            probe = block_probe(block)
            scg_result = next(r for r in block["results"] if r["name"] == name)
            partner = equal_memory_partner(block, scg_result, probe)
            time_wins.append(within_time_goal(scg_result))
            memory_wins.append(beats(scg_result, partner))
            every_race_wins.append(beats_in_every_race(scg_result, partner))
            cell = partner_cell(block, memory_wins[-1], partner, scg_result, probe)
            partners.append(f"{cell}; {race_by_race_cell(scg_result, partner)})")
        time_met = sum(time_wins) >= TIME_GOAL_PROBLEMS
        memory_met = all(memory_wins)
        verdicts[name] = {
            "t2_t3_time_le_0.8x_lbfgs100": dict(zip(names, time_wins)),
            "beats_lbfgs_at_equal_memory": dict(zip(names, memory_wins)),
            "beats_lbfgs_at_equal_memory_in_every_race": dict(zip(names, every_race_wins)),
            "time_goal_met": time_met,
            "equal_memory_goal_met": memory_met,
            "equal_memory_goal_met_in_every_race": all(every_race_wins),
        }
        mark = ", ".join(f"{n} {'yes' if f else 'no'}" for n, f in zip(names, time_wins))
        lines += [
            f"{name}:",
            f"  T2 and T3 in ≤ {TIME_GOAL}× torch LBFGS(100)'s time (goal: ≥ {TIME_GOAL_PROBLEMS} of 5 problems; "
            f"{len(blocks)} run): {mark} → {'met' if time_met else 'NOT met'} ({sum(time_wins)} of {len(blocks)})",
            f"  beats torch LBFGS at equal memory (goal: all): {'; '.join(partners)} "
            f"→ {equal_memory_verdict(names, memory_wins, every_race_wins)}",
        ]
        against_default = default_lbfgs_comparison(blocks, name)
        if against_default is not None:
            line, verdicts[name]["beats_default_lbfgs_at_equal_memory"] = against_default
            lines.append(line)
    best = [name for name, v in verdicts.items() if v["time_goal_met"] and v["equal_memory_goal_met"]]
    in_every_race = [name for name in best if verdicts[name]["equal_memory_goal_met_in_every_race"]]
    verdict = f"issue #14's goal {'met by ' + ', '.join(best) if best else 'NOT met by any SCG mode'}"
    if best:
        verdict += f" (with every equal-memory win held in every race: {', '.join(in_every_race) or 'none'})"
    lines.append(verdict)
    return lines, verdicts


def equal_memory_verdict(names: list[str], wins: list[bool], every_race_wins: list[bool]) -> str:
    """The equal-memory goal's verdict for one SCG row: met (in the median race) on every problem or not, and, if
    met, whether every win held in every race or which problems it won in the median race only."""
    if not all(wins):
        return "NOT met"
    narrow = [name for name, held in zip(names, every_race_wins) if not held]
    return "met, every win in every race" if not narrow else f"met; won in the median race only: {', '.join(narrow)}"


def report(results: dict[str, Any], memory_bound_lines: list[str] | None = None) -> str:
    env = results["environment"]
    cpu = env.get("cpu_capability", "instruction set not recorded")
    lines = [
        f"SCG and its peers on {len(results['problems'])} problems, side by side in "
        + (f"each of {len(env['pooled_from'])} runs pooled" if env.get("pooled_from") else "one run")
        + " (issues #7, #14)",
        f"command: {env['command']}",
        f"date: {env['date']}; torch {env['torch']}, Python {env['python']}, CPU ({cpu}), {env['threads']} thread(s); "
        f"optimizers interleaved round-robin (one baton, each clock runs only while its optimizer holds it)",
        "every full-batch optimizer evaluates E, E', E''v through its own GradientAccumulator; Adam: minibatches, "
        "best lr of the grid; every run starts from the same weights and stops at the budget (no tolerance stops)",
        *pooled_header(env, results["problems"]),
        "",
    ]
    for block in results["problems"]:
        lines += problem_table(block) + [""]
    if results["problems"]:  # none when only the memory-bound case was run
        lines += memory_section(results["problems"]) + [""]
    if memory_bound_lines:
        lines += [""] + memory_bound_lines
    lines += [""] + results["goals_text"]
    return "\n".join(lines)


COLORS = {
    REFERENCE: "black",
    "SCG exact": "tab:red",
    "SCG finite-diff": "tab:orange",
    SUBSAMPLED: "tab:olive",
    NETLAB: "tab:brown",
    "torch LBFGS h=2": "0.75",
    "torch LBFGS h=5": "0.6",
    "torch LBFGS h=20": "0.4",
    "torch LBFGS h=40": "0.25",
    "torchmin CG": "tab:blue",
    "torchmin L-BFGS": "tab:cyan",
    "torchmin Newton-CG": "tab:purple",
    "torchmin trust-ncg": "tab:pink",
    "LBFGS no LS": "goldenrod",
    "LBFGS h=20 no LS": "darkkhaki",
}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = results["problems"]
    figure, axes = plt.subplots(len(blocks), 2, figsize=(13, 4 * len(blocks)), squeeze=False)
    for row, block in zip(axes, blocks):
        best = block["analysis"]["best_loss"]
        for result in block["results"]:
            # The gap to the best loss of the run, on a log scale; the point that is the best itself is dropped.
            history = [h for h in result["history"] if math.isfinite(h["loss"]) and h["loss"] > best]
            if not history:
                continue
            color = COLORS.get(result["name"], "tab:green")
            width = 2 if result.get("family") == SCG_FAMILY else 1.2
            style = {"color": color, "label": result["name"], "linewidth": width}
            if result["name"] == REFERENCE:
                style["linestyle"] = "--"
            gaps = [h["loss"] - best for h in history]
            row[0].plot([h["seconds"] for h in history], gaps, **style)
            row[1].plot([h["passes"] for h in history], gaps, **style)
        for target in block["analysis"]["targets"]:
            for axis in row:
                axis.axhline(target - best, color="grey", linewidth=0.5, linestyle=":")
        row[0].set_xlabel("training time [s] (own clock, interleaved; log scale)")
        row[0].set_xscale("log")
        row[1].set_xlabel("gradient-pass equivalents")
        for axis in row:
            axis.set_yscale("log")
            axis.set_ylabel(f"training loss − E* (E* = {best:.4g})")
            axis.set_title(f"{block['problem']['name']} (dotted: targets T1, T2, T3)")
        row[1].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"{results['environment']['command']}  ({results['environment']['date']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def pooled_header(env: dict[str, Any], blocks: list[dict[str, Any]]) -> list[str]:
    """The header lines of a pooled report (``peers.py --report-from A.json B.json``, :mod:`peers_pooling`): which
    runs' races it pools; none for one run."""
    sources = env.get("pooled_from")
    if not sources:
        return []
    lines = [
        f"pooled from {len(sources)} runs: each time and time ratio is the median over every race of every run that "
        "raced the problem; the passes, evaluations, final losses, memory and curves are the first run's (every row's "
        "evaluations to every target checked the same in every run, but for the cells listed below); the date and "
        "machine above are the first run's"
    ]
    for source in sources:
        races = ", ".join(f"{name} {count}" for name, count in source["problems"].items())
        commit = f", commit {source['commit'][:10]}" if source.get("commit") else ""
        lines.append(
            f"  {source['source']} ({source['date']}, CPU {source['cpu_capability']}{commit}; races: {races}): "
            f"{source['command']}"
        )
    partial = [
        f"{block['problem']['name']}: {note}" for block in blocks for note in block.get("reached_in_some_runs", [])
    ]
    if partial:
        lines.append(
            "reached in some runs only (the budget, charged at each run's measured cost of an HVP, ended the others "
            "first; each race of those counts as an infinite time): " + "; ".join(partial)
        )
    repeated = [
        f"{block['problem']['name']} {len(seeds) - len(set(seeds))} of {len(seeds)}"
        for block in blocks
        if (seeds := block.get("order_seeds")) and len(set(seeds)) < len(seeds)
    ]
    if repeated:
        lines.append(
            "races that repeat another race's baton orders (runs with one --order-seed, by default --seed, race the "
            "same orders), by problem: " + "; ".join(repeated)
        )
    apart = [f"{block['problem']['name']}: {note}" for block in blocks for note in block.get("crossed_apart", [])]
    if apart:
        lines.append(
            "targets moved with E* (the lowest final loss, of a row charged each run's measured costs) across a loss "
            "of the same trajectory, so reached at another evaluation in some runs (each race times its own run's "
            "crossing; the first run's targets and evaluations are shown): " + "; ".join(apart)
        )
    return lines


def from_json(text: str) -> dict[str, Any]:
    """The results that :func:`to_json` wrote, histories as lists of records again (for ``--report-from``)."""
    results: dict[str, Any] = json.loads(text)
    for block in results["problems"] + ([results["memory_bound"]] if results.get("memory_bound") else []):
        for result in block["results"]:
            columns = result["history"]
            result["history"] = [dict(zip(columns, values)) for values in zip(*columns.values())]
        _bound_ratios_the_reference_missed(block)
    return results


def _bound_ratios_the_reference_missed(block: dict[str, Any]) -> None:
    """A run saved before lever 61 gave a target its reference missed a ratio of 0: give it the bound
    :func:`analyse` gives now (over the reference's whole run; race by race, over the first race's run)."""
    name = block.get("reference") or REFERENCE  # the memory-bound case's reference is the largest LBFGS that fits
    reference = next((r for r in block["results"] if r["name"] == name), None)
    if reference is None:
        return
    for result in block["results"]:
        for entry in result.get("targets", []):
            if entry["reached"] and not entry["reference_reached"] and entry.get("time_ratio") == 0.0:
                entry["time_ratio"] = entry["seconds"] / reference["seconds"]
                entry["passes_ratio"] = entry["passes"] / reference["passes"]
                if "seconds_by_race" in entry:
                    entry["time_ratios_by_race"] = [s / reference["seconds"] for s in entry["seconds_by_race"]]


def to_json(results: dict[str, Any]) -> str:
    """The results as JSON, histories as columns, each list of numbers on one line."""
    results = copy.deepcopy(results)
    for block in results["problems"] + ([results["memory_bound"]] if results.get("memory_bound") else []):
        block.pop("all_adam", None)
        for result in block["results"]:
            history = result.pop("history")
            result["history"] = {key: [h[key] for h in history] for key in ("passes", "evaluations", "seconds", "loss")}
    text = json.dumps(results, indent=1)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
