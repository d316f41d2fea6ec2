"""The memory-bound case of ``benchmarks/peers.py`` (issue #14): a model so large (n ≥ 50 M weights) that torch
LBFGS at its default history of 100 pairs cannot hold its vectors in this machine's memory while SCG runs.

Whether an optimizer fits is decided by arithmetic before anything is allocated, never by trying: it needs
(``MODEL_BUFFERS`` + its own buffers) weight-sized vectors of n numbers, its own buffers being those the race
measures on the other problems (SCG 4 at its peak; LBFGS 2 h + ``LBFGS_EXTRA_BUFFERS``). The memory the case may
use is ``CAP_BYTES`` at full size, scaled with n under ``--quick``, and never more than half of the memory the
kernel reports available (``MemAvailable`` in /proc/meminfo), since the machine is shared. The SCG rows that fit
run, and of the torch LBFGS rows that fit, the one with the largest history: it is the reference of the time ratios.
They run one at a time (no baton), so that only one optimizer's vectors are held at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peers_adapters import LBFGS_FAMILY, SCG_FAMILY, Row
from peers_problems import Problem
from peers_report import ratio_cell
from torch import nn

MEMORY_BOUND = "memory-bound"
WIDTH = 1_000
"""Inputs and outputs of the wide MLP WIDTH → hidden → WIDTH."""
HIDDEN_FULL, HIDDEN_QUICK = 25_000, 2_500  # n = 50.0 M and 5.0 M weights
SAMPLES = 32
CAP_BYTES = 6 * 2**30
"""The memory the full-size case may use (--quick: scaled by its n / the full n), at most half of MemAvailable."""
MODEL_BUFFERS = 4
"""Weight-sized vectors any optimizer needs besides its own: the weights, their gradient, and during an HVP pass
the differentiable gradient and the accumulated product."""
SCG_BUFFERS = 4  # p, r, the accepted w and s = E''p (or the new r) at the peak, as the memory probe measures
SECANT_EXTRA_BUFFERS = 1
"""With memory m, besides the 2m pairs: the accepted w, and y = r − r₊, p, r₊ and r as the rows of one (4, n) buffer
kept between steps — one more than Møller's 4 (the race measures 2m + 5 n at evaluations)."""
DIAGONAL_SCALING_BUFFERS = 2
"""With ``diagonal_scaling=True``: the gradients' second moment v and the diagonal Λ (the race measures 2m + 7 n at
evaluations)."""
LBFGS_EXTRA_BUFFERS = 9
"""torch LBFGS beyond its 2 h history vectors (the direction, the previous gradient, the flat gradient, the line
search's copies of the weights and gradients): the race measures 13, 19 and 49 n at h = 2, 5 and 20."""
GIB = 2**30


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """``MemTotal`` and ``MemAvailable`` of /proc/meminfo, in bytes."""
    values = {}
    for line in meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def optimizer_buffers(row: Row) -> float | None:
    """The weight-sized vectors a row's optimizer holds at its peak (None: a family this case does not run)."""
    if row.family == SCG_FAMILY:
        secant = 2 * row.memory + SECANT_EXTRA_BUFFERS + DIAGONAL_SCALING_BUFFERS * row.diagonal_scaling
        return SCG_BUFFERS + (secant if row.memory else 0)
    if row.family == LBFGS_FAMILY and row.history_size is not None:
        return 2 * row.history_size + LBFGS_EXTRA_BUFFERS
    return None


def plan(table: dict[str, Row], n: int, element_size: int, cap: int) -> dict[str, dict[str, Any]]:
    """Per row: the bytes it needs, whether it fits under ``cap`` and whether it runs (every SCG row that fits; the
    fitting LBFGS row of the largest history)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, row in table.items():
        buffers = optimizer_buffers(row)
        if buffers is None:
            continue
        needed = int((MODEL_BUFFERS + buffers) * n * element_size)
        rows[name] = {"family": row.family, "buffers": buffers, "needed_bytes": needed, "fits": needed <= cap}
        rows[name]["history_size"] = row.history_size
    fitting_lbfgs = [name for name, r in rows.items() if r["family"] == LBFGS_FAMILY and r["fits"]]
    largest = max(fitting_lbfgs, key=lambda name: rows[name]["history_size"], default=None)
    for name, r in rows.items():
        r["runs"] = r["fits"] and (r["family"] == SCG_FAMILY or name == largest)
    return rows


def memory_bound_problem(quick: bool, seed: int) -> Problem:
    """A wide tanh MLP WIDTH → hidden → WIDTH (float32, MSE) fitting sin of a random projection of SAMPLES inputs."""
    hidden = HIDDEN_QUICK if quick else HIDDEN_FULL
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2 * SAMPLES, WIDTH, generator=generator)
    projection = torch.randn(WIDTH, WIDTH, generator=generator) / WIDTH**0.5
    targets = torch.sin(inputs @ projection)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(WIDTH, hidden), nn.Tanh(), nn.Linear(hidden, WIDTH))

    def rmse(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
        with torch.no_grad():
            return float((model(data[0]) - data[1]).square().mean().sqrt())

    return Problem(
        name=MEMORY_BOUND,
        title=f"wide tanh MLP {WIDTH:,}-{hidden:,}-{WIDTH:,} (MSE, {SAMPLES} samples of sin(x P), float32)",
        make_model=make_model,
        make_loss=lambda model: nn.MSELoss(),
        reduction=None,
        train=(inputs[:SAMPLES], targets[:SAMPLES]),
        test=(inputs[SAMPLES:], targets[SAMPLES:]),
        metric_name="test RMSE",
        metric=rmse,
        higher_is_better=False,
        accumulator_batch=SAMPLES,
        budget=12.0,
        adam_lrs=(),
        adam_batch=SAMPLES,
        calibration_rounds=2,
        seed=seed,
    )


def case_cap(quick: bool, n: int, full_n: int, memory: dict[str, int]) -> int:
    """The bytes this case may use: CAP_BYTES scaled to n under --quick, at most half of MemAvailable."""
    cap = CAP_BYTES * (n / full_n if quick else 1.0)
    return int(min(cap, memory["MemAvailable"] / 2))


def full_size_n() -> int:
    return WIDTH * HIDDEN_FULL + HIDDEN_FULL + HIDDEN_FULL * WIDTH + WIDTH


def section(block: dict[str, Any]) -> list[str]:
    """The memory-bound case's report: who can run at all, and time to the targets against the LBFGS that fits."""
    problem, memory, reference = block["problem"], block["memory"], block["reference"]
    lines = [
        f"## {problem['name']}: {problem['title']}",
        f"n = {problem['n']:,} weights; memory: machine {memory['MemTotal'] / GIB:.1f} GiB, available "
        f"{memory['MemAvailable'] / GIB:.1f} GiB, this case's cap {block['cap_bytes'] / GIB:.2f} GiB "
        f"(CAP_BYTES, scaled with n under --quick, ≤ half of the available); an optimizer needs "
        f"({MODEL_BUFFERS} + its buffers) × n × {block['element_size']} bytes; budget {problem['budget']:g} "
        "gradient-pass equivalents; run one at a time",
        f"time and passes to T1 / T2 / T3 as ratios to {reference or 'no LBFGS: none fits'}, the torch LBFGS of the "
        "largest history that fits (— = not reached, ≤x = reached where it did not: at most x)",
        "",
        f"{'optimizer':<23}{'buffers':>8}{'needs GiB':>10}{'machine':>9}{'cap':>5}  {'time→T1':>8}{'T2':>6}{'T3':>6}"
        f"{'passes→T1':>10}{'T2':>6}{'T3':>6}{'final loss':>12}{'state':>7}  status",
        "-" * 120,
    ]
    results = {r["name"]: r for r in block["results"]}
    for name, row in block["plan"].items():
        machine = "fits" if row["needed_bytes"] <= memory["MemTotal"] else "no"
        cap = "fits" if row["fits"] else "no"
        head = f"{name:<23}{row['buffers']:>8g}{row['needed_bytes'] / GIB:>10.2f}{machine:>9}{cap:>5}  "
        result = results.get(name)
        if result is None:
            reason = "not run: a larger LBFGS history fits" if row["fits"] else "cannot run: needs more than the cap"
            lines.append(head + f"{'':>54}  {reason}")
            continue
        t = result["targets"]
        cells = "".join(f"{ratio_cell(e, 'time_ratio'):>{w}}" for e, w in zip(t, (8, 6, 6)))
        cells += "".join(f"{ratio_cell(e, 'passes_ratio'):>{w}}" for e, w in zip(t, (10, 6, 6)))
        lines.append(head + cells + f"{result['final_loss']:>12.4g}{result['state_in_n']:>7.1f}  {result['status']}")
    return lines
