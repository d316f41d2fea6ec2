"""Several runs of ``benchmarks/peers.py`` read as one: their races pooled.

One full run races each problem three or nine times, and two runs of the same version on the same machine type have
given two verdicts on issue #14's goal (docs/performance.md, "What is left"): its cells sit inside the race's noise.
:func:`pool_runs` merges saved runs (their JSON) into one whose races are all of theirs, so that every time ratio and
every equal-memory verdict is the median over more races — ``python benchmarks/peers.py --report-from A.json B.json
--out DIR`` — without changing the rule the report applies.

Pooling is only meaningful between runs that computed the same thing, so :func:`check_same_trajectories` refuses runs
whose rows, targets, or evaluations to a target differ (another version of the library, another seed, a float32
problem on another instruction set): the races of such runs do not time the same computation. A problem raced in
some of the runs only (``--problems logistic --races 9``) is pooled over those.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

TARGET_TOLERANCE = 1e-5
"""How far two runs' targets T1 / T2 / T3 may differ and count as the same, as a share of the first run's achievable
decrease E₀ − E*. E* is the lowest final loss of any row, and a row that takes HVPs or loss-only trials is charged
each run's own measured cost of one against its budget, so when such a row ends lowest, E* moves in its last digits
from run to run (3.8e-7 of the decrease on the regression of the two full runs of 2026-12-07; docs/performance.md,
lever 62). What pooling needs is that every race times the same computation to the same evaluation:
:func:`check_same_block` checks that every row recorded the same losses in both runs, and reached every target at the
same evaluation unless the target moved across one of those losses."""


POOLED_ALIKE = ("threads", "torch", "moller_scg")
"""What pooled runs must share besides their trajectories: a change of threads, of torch or of the library's version
can change the time of the same computation. (Their commits may differ, by a change to the docs, say: the report's
header lists each run's.)"""


def pool_runs(runs: list[dict[str, Any]], sources: list[str], command: str) -> dict[str, Any]:
    """The runs ``runs`` (as :func:`peers_report.from_json` reads them; ``sources`` names each, e.g. its file) as one
    run whose races are all of theirs: per problem, each row's time to each target is the median over every race of
    every run that raced the problem (``seconds_by_race`` and ``time_ratios_by_race`` their concatenation, in the
    runs' order), and ``races`` their count. Everything else of a problem — its rows, passes, evaluations, final
    losses, memory, the curves of the figure — is the first such run's, which :func:`check_same_trajectories` has
    found the same in every run. The memory-bound case (run once, not interleaved) is left out. ``command`` is the
    pooling command, for the report's header."""
    if len(runs) != len(sources):
        raise ValueError(f"pool_runs: {len(runs)} runs but {len(sources)} sources")
    if len(runs) < 2:
        raise ValueError(f"pool_runs needs at least two runs, got {len(runs)}")
    check_same_trajectories(runs, sources)
    pooled = copy.deepcopy(runs[0])
    pooled.pop("memory_bound", None)
    pooled["problems"] = []
    for name in problem_names(runs):
        blocks = [block for run in runs for block in run["problems"] if block["problem"]["name"] == name]
        pooled["problems"].append(pooled_block(blocks))
    environment = runs[0]["environment"]
    pooled["environment"] = dict(
        environment,
        command=command,
        pooled_from=[
            {
                "source": source,
                "date": run["environment"]["date"],
                "cpu_capability": run["environment"].get("cpu_capability"),
                "commit": run["environment"].get("commit"),
                "command": run["environment"]["command"],
                "problems": {block["problem"]["name"]: block.get("races", 1) for block in run["problems"]},
            }
            for source, run in zip(sources, runs)
        ],
    )
    return pooled


def problem_names(runs: list[dict[str, Any]]) -> list[str]:
    """Every problem raced in any of the runs, in the order the runs first name them."""
    names: list[str] = []
    for run in runs:
        names += [block["problem"]["name"] for block in run["problems"] if block["problem"]["name"] not in names]
    return names


def pooled_block(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """One problem's block from several runs' (the first's, with the times of every race). A target that a row reached
    in some runs only — the budget, charged at each run's own measured cost of an HVP, ended the others first
    (:func:`check_same_block`) — takes an infinite time in each race of the runs that missed it, so that its races
    stay aligned with every other row's and its median counts them; it is reached if that median is finite, and is
    listed in the block's ``reached_in_some_runs`` (``docs/performance.md``, lever 61: it took its times from the
    runs that reached it alone, a row reaching T3 in one run of two counted as reached). A target a row reached at
    another evaluation in another run, because the target moved with E*, keeps each run's own times and is listed in
    ``crossed_apart``."""
    pooled = copy.deepcopy(blocks[0])
    pooled["races"] = sum(block.get("races", 1) for block in blocks)
    pooled["memory_probe"] = next((block["memory_probe"] for block in blocks if block.get("memory_probe")), None)
    pooled["reached_in_some_runs"], pooled["crossed_apart"] = [], []
    orders = [block.get("order_seeds") for block in blocks]
    pooled["order_seeds"] = sum(orders, []) if all(orders) else None  # unknown for runs saved before they were kept
    for index, result in enumerate(pooled["results"]):
        for target_index in range(len(result["targets"])):
            entries = [block["results"][index]["targets"][target_index] for block in blocks]
            reached = [entry for entry in entries if entry["reached"]]
            if not reached:
                continue
            if len(reached) < len(entries):
                pooled["reached_in_some_runs"].append(
                    f"{result['name']} T{target_index + 1} in {len(reached)} of {len(entries)} runs"
                )
            crossings = sorted({entry["evaluations"] for entry in reached})
            if len(crossings) > 1:  # the target moved with E* across one of the row's losses (check_same_block)
                pooled["crossed_apart"].append(
                    f"{result['name']} T{target_index + 1} at {' or '.join(map(str, crossings))} evaluations"
                )
            entry = result["targets"][target_index] = copy.deepcopy(reached[0])
            seconds, ratios = [], []
            for block, mine in zip(blocks, entries):
                races = block.get("races", 1)
                seconds += mine.get("seconds_by_race", [mine["seconds"]]) if mine["reached"] else [math.inf] * races
                ratios += (
                    mine.get("time_ratios_by_race", [mine["time_ratio"]]) if mine["reached"] else [math.inf] * races
                )
            entry["seconds"], entry["seconds_by_race"] = statistics.median(seconds), seconds
            entry["races_reached"] = sum(math.isfinite(value) for value in seconds)
            entry["time_ratio"], entry["time_ratios_by_race"] = statistics.median(ratios), ratios
            entry["reached"] = math.isfinite(entry["seconds"])
    return pooled


def check_same_trajectories(runs: list[dict[str, Any]], sources: list[str]) -> None:
    """Raise ``ValueError``, naming the source, problem, row and target, unless every run that raced a problem has the
    first such run's rows in the same order, each row's recorded losses while both ran (:func:`shared_history_end`),
    its targets (to :data:`TARGET_TOLERANCE` of the decrease E₀ − E*), and for each row and target the same outcome
    (reached or not) in the same number of evaluations, unless one run's budget ended before the evaluation that
    reached it in the other (:func:`cut_by_budget`) or the target moved with E* across one of the row's losses — and
    the same ``--quick`` and baton order (a fixed order biases the millisecond problems' ratios: docs/performance.md,
    lever 17)."""
    if len({run.get("quick") for run in runs}) > 1:
        raise ValueError("cannot pool runs with different 'quick' settings: a --quick run races other problems")
    for key in POOLED_ALIKE:
        values = {source: run["environment"].get(key) for source, run in zip(sources, runs)}
        if len(set(map(repr, values.values()))) > 1:
            raise ValueError(
                f"cannot pool runs with different {key!r} ({values}): their times do not measure the same thing"
            )
    first_seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for source, run in zip(sources, runs):
        for block in run["problems"]:
            name = block["problem"]["name"]
            if name not in first_seen:
                first_seen[name] = (source, block)
                continue
            first_source, first = first_seen[name]
            check_same_block(block, first, f"{source} against {first_source}, problem {name!r}")


def check_same_block(block: dict[str, Any], first: dict[str, Any], where: str) -> None:
    """:func:`check_same_trajectories` for one problem's block against the first run's (``where`` names them)."""
    if block.get("shuffled_order") != first.get("shuffled_order"):
        raise ValueError(f"{where}: one run passed the baton in a fixed order, the other shuffled it")
    rows = [result["name"] for result in block["results"]]
    first_rows = [result["name"] for result in first["results"]]
    if rows != first_rows:
        raise ValueError(f"{where}: the rows differ ({rows} against {first_rows})")
    decrease = first["analysis"]["initial_loss"] - first["analysis"]["best_loss"]
    for index, (target, first_target) in enumerate(zip(block["analysis"]["targets"], first["analysis"]["targets"])):
        if not abs(target - first_target) <= TARGET_TOLERANCE * decrease:
            raise ValueError(
                f"{where}: target T{index + 1} is {target!r} against {first_target!r}, apart by more than "
                f"{TARGET_TOLERANCE:g} of the decrease E0 - E* = {decrease:.6g}"
            )
    for result, first_result in zip(block["results"], first["results"]):
        end = shared_history_end(result, first_result)
        if end is not None and _curve(result["history"], end) != _curve(first_result["history"], end):
            raise ValueError(
                f"{where}: {result['name']!r} recorded other losses (evaluation by evaluation, while both runs ran): "
                "the runs did not compute the same, so their races do not time the same computation"
            )
        for index, (entry, first_entry) in enumerate(zip(result["targets"], first_result["targets"])):
            mine = entry.get("evaluations") if entry["reached"] else None
            theirs = first_entry.get("evaluations") if first_entry["reached"] else None
            # Reached at other evaluations on the same losses (compared up to ``end``): the target moved with E*
            # across one of them (the regression's SCG m=5 of 2026-12-07: a loss of 3.14427e-4 at its 270th
            # evaluation, under one run's T3 of 3.14534e-4 and over the other's of 3.14422e-4).
            moved = end is not None and mine is not None and theirs is not None and max(mine, theirs) <= end
            if mine != theirs and not (moved or cut_by_budget(mine, theirs, result, first_result)):
                raise ValueError(
                    f"{where}: {result['name']!r} reached T{index + 1} in {_evaluations(mine)} against "
                    f"{_evaluations(theirs)}: the runs did not compute the same, so their races do not time the "
                    "same computation"
                )


def cut_by_budget(mine: int | None, theirs: int | None, result: dict[str, Any], first_result: dict[str, Any]) -> bool:
    """Whether a target reached in one run only (after ``mine`` or ``theirs`` evaluations) was missed in the other
    because its budget ended first: that run's row stopped after fewer evaluations than the other needed. The budget
    is in gradient passes, and a row that takes HVPs (Møller's SCG, torchmin's Newton-CG) is charged each run's own
    measured cost of one, so its last evaluations fall on either side of the budget from run to run."""
    if mine is None and theirs is not None:
        return result["evaluations"] < theirs
    if theirs is None and mine is not None:
        return first_result["evaluations"] < mine
    return False


def shared_history_end(result: dict[str, Any], first_result: dict[str, Any]) -> int | None:
    """The last evaluation both runs recorded a loss of this row at, up to which :func:`check_same_block` compares
    their losses (a budget charged at each run's measured costs may end one run's row a step before the other's);
    ``None`` when either recorded no history (an old or synthetic run), whose losses are not compared."""
    histories = [row.get("history") for row in (result, first_result)]
    if not all(histories):
        return None
    return min(max(point["evaluations"] for point in history) for history in histories)


def _curve(history: list[dict[str, Any]], last: int) -> list[tuple[int, str]]:
    """(evaluations, loss) up to evaluation ``last``, the loss as its repr so that NaN equals NaN."""
    return [(point["evaluations"], repr(point["loss"])) for point in history if point["evaluations"] <= last]


def _evaluations(count: int | None) -> str:
    return "no evaluation (not reached)" if count is None else f"{count} evaluations"
