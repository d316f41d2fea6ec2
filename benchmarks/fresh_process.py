"""A user's first run in a fresh Python process: the optimizer's construction and its first steps, timed.

``benchmarks/plain_loop.py`` and the race time runs in a process that has already made every one-time cost (imports,
first calls), and report medians. A user who measures once, in a new interpreter, times those costs too. This script
starts a new interpreter for each run, builds a small problem that imports nothing but torch (logistic regression of
1,000 random points with 64 features and 10 classes, float64, seeded), builds the optimizer and takes ``STEPS``
steps, timing the construction and the steps apart. The rows alternate; each figure is the median over
``--repetitions`` runs of a row.

``SCG(params, memory=m)`` works on its secant pairs with SciPy's LAPACK and BLAS, whose import takes tens of
milliseconds once per process: this shows whether the steps pay it (docs/performance.md, lever 47). torch's first
optimizer in a process pays a one-time import of its own, in the construction, whichever optimizer it is.

Usage:
    python benchmarks/fresh_process.py                    # 5 runs of each row
    python benchmarks/fresh_process.py --repetitions 1    # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STEPS = 10
"""Steps timed after the construction."""

ROWS = ("SCG(memory=20)", "torch LBFGS(h=20, strong Wolfe, one iteration a step)")
"""The optimizers, each built as :func:`make_optimizer` builds it."""


def make_optimizer(row: str, params: list[Any]) -> Any:
    """One of :data:`ROWS` over ``params`` (:func:`first_run` has imported torch and moller_scg by then)."""
    import torch

    from moller_scg import SCG

    if row == ROWS[0]:
        return SCG(params, memory=20)
    if row == ROWS[1]:
        return torch.optim.LBFGS(params, history_size=20, max_iter=1, line_search_fn="strong_wolfe")
    raise ValueError(f"unknown row {row!r}: one of {ROWS}")


def first_run(row: str) -> dict[str, Any]:
    """In this process: the problem, then the optimizer's construction and its first :data:`STEPS` steps, timed
    apart (milliseconds), and whether SciPy's ``linalg`` was imported before the construction and after it. torch
    and moller_scg are imported first, untimed, as a script imports them at its top."""
    import torch

    import moller_scg  # noqa: F401  (imported before the clock starts, as a user's script would)

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1000, 64, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (1000,), generator=generator)
    model = torch.nn.Linear(64, 10).double()
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        for p in params:
            p.grad = None
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    scipy_before = "scipy.linalg" in sys.modules
    started = time.perf_counter()
    optimizer = make_optimizer(row, params)
    built = time.perf_counter()
    scipy_after = "scipy.linalg" in sys.modules
    for _ in range(STEPS):
        optimizer.step(closure)
    stepped = time.perf_counter()
    return {
        "row": row,
        "construction_ms": 1e3 * (built - started),
        "steps_ms": 1e3 * (stepped - built),
        "scipy_before_construction": scipy_before,
        "scipy_after_construction": scipy_after,
    }


def run_in_fresh_process(row: str) -> dict[str, Any]:
    """:func:`first_run` in a new interpreter (this script with ``--child``)."""
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", row], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"the run of {row!r} in a fresh process failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(runs: list[dict[str, Any]]) -> list[str]:
    """Per row: the medians (and ranges) of the construction's and the steps' milliseconds."""
    lines = [
        f"{'optimizer':55s} {'construction ms':>22s} {f'first {STEPS} steps ms':>22s}",
    ]
    for row in ROWS:
        mine = [r for r in runs if r["row"] == row]
        cells = []
        for key in ("construction_ms", "steps_ms"):
            values = [r[key] for r in mine]
            cells.append(f"{statistics.median(values):7.1f} ({min(values):.1f}–{max(values):.1f})")
        lines.append(f"{row:55s} {cells[0]:>22s} {cells[1]:>22s}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repetitions", type=int, default=5, help="runs of each row, alternating (default 5)")
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(first_run(args.child)))
        return 0
    if args.repetitions < 1:
        parser.error(f"--repetitions must be at least 1, got {args.repetitions}")
    from common import environment

    runs = [run_in_fresh_process(row) for _ in range(args.repetitions) for row in ROWS]
    env = environment("python benchmarks/fresh_process.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"A first run in a fresh process, {args.repetitions} runs of each row (medians, ranges); 1 thread")
    print("; ".join(f"{key} {value}" for key, value in env.items() if key != "threads"))
    print("\n".join(report(runs)))
    flags = {
        row: sorted({(r["scipy_before_construction"], r["scipy_after_construction"]) for r in runs if r["row"] == row})
        for row in ROWS
    }
    print(
        "scipy.linalg imported before / after the construction, in every run: "
        + "; ".join(f"{row}: {' or '.join(map(str, pairs))}" for row, pairs in flags.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
