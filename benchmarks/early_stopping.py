"""How early does ``fit``'s validation early stopping (``max_fail``) stop on small regressions, and at what cost?

For each problem and seed, one run of ``max_iter`` SCG iterations with early stopping off records the validation
loss after every iteration. Early stopping does not change the iterations before it fires, so the stop of every
``max_fail`` is then read off that one history exactly: the iteration it stops at and the validation loss of the
weights it restores (its best so far), as a ratio to the best validation loss of the whole run.

Prints and writes ``benchmarks/results/early_stopping.{txt,json}``.

Usage:
    python benchmarks/early_stopping.py            # about a minute on one CPU core
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch
from torch import nn

from moller_scg import fit

MAX_ITER = 300
SEEDS = range(5)
MAX_FAILS: list[int | None] = [6, 12, 25, 50, 100, None]
RESULTS = Path(__file__).resolve().parent / "results"


def sine_1d(seed: int) -> tuple[nn.Module, tuple, tuple]:
    """y = sin(3x) + noise 0.1, 1-20-1 tanh network, 100 training and 100 validation samples."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(200, 1, generator=generator, dtype=torch.float64) * 4 - 2
    y = torch.sin(3 * x) + 0.1 * torch.randn(200, 1, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)).double()
    return model, (x[:100], y[:100]), (x[100:], y[100:])


def smooth_4d(seed: int) -> tuple[nn.Module, tuple, tuple]:
    """y = sin(x₁)cos(x₂) + x₃x₄/2 + noise 0.05, 4-16-16-1 tanh network, 256 training and 128 validation samples."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(384, 4, generator=generator, dtype=torch.float64)
    y = torch.sin(x[:, :1]) * torch.cos(x[:, 1:2]) + x[:, 2:3] * x[:, 3:] / 2
    y = y + 0.05 * torch.randn(384, 1, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    return model, (x[:256], y[:256]), (x[256:], y[256:])


def overfit_1d(seed: int) -> tuple[nn.Module, tuple, tuple]:
    """y = sin(3x) + noise 0.3, only 24 training samples for a 1-50-1 tanh network (it overfits), 200 validation."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(224, 1, generator=generator, dtype=torch.float64) * 4 - 2
    y = torch.sin(3 * x) + 0.3 * torch.randn(224, 1, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1)).double()
    return model, (x[:24], y[:24]), (x[24:], y[24:])


PROBLEMS = {"sine_1d": sine_1d, "smooth_4d": smooth_4d, "overfit_1d": overfit_1d}


def early_stop(val_losses: list[float], successes: list[bool], max_fail: int | None) -> tuple[int, int, float]:
    """(the iteration fit stops at, the best iteration it restores, that iteration's validation loss), following
    fit's rule: a successful step that does not improve on the best validation loss is one fail."""
    best, best_k, fails = math.inf, 0, 0
    for k, (val_loss, success) in enumerate(zip(val_losses, successes), start=1):
        if val_loss < best:
            best, best_k, fails = val_loss, k, 0
        elif success:
            fails += 1
        if max_fail is not None and fails >= max_fail:
            return k, best_k, best
    return len(val_losses), best_k, best


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, problem in PROBLEMS.items():
        for seed in SEEDS:
            model, train, validation = problem(seed)
            history = fit(
                model, nn.MSELoss(), train, val_data=validation, max_iter=MAX_ITER, max_fail=None, progress=False
            )
            best_overall = min(history["val_loss"])
            for max_fail in MAX_FAILS:
                stop, best_k, restored = early_stop(history["val_loss"], history["success"], max_fail)
                rows.append(
                    {
                        "problem": name,
                        "seed": seed,
                        "max_fail": max_fail,
                        "stopped_at": stop,
                        "iterations_after_best": stop - best_k,
                        "val_loss_ratio": restored / best_overall,
                    }
                )
    lines = [
        f"Validation early stopping on small regressions ({len(SEEDS)} seeds each, {MAX_ITER} SCG iterations): the "
        f"iteration each max_fail stops at, and the validation loss of the weights it restores over the best of the "
        f"whole run (1 = nothing lost).",
        "",
        f"{'problem':<11} {'max_fail':>8}  {'stops at (min–median–max)':>26}  {'val loss ratio (min–median–max)':>32}"
        f"  {'iterations after the best (median)':>34}",
    ]
    for name in PROBLEMS:
        for max_fail in MAX_FAILS:
            selected = [row for row in rows if row["problem"] == name and row["max_fail"] == max_fail]
            stops = [row["stopped_at"] for row in selected]
            ratios = [row["val_loss_ratio"] for row in selected]
            lines.append(
                f"{name:<11} {max_fail!s:>8}  {min(stops):>8} – {statistics.median(stops):>5} – {max(stops):>5}  "
                f"{min(ratios):>12.3f} – {statistics.median(ratios):.3f} – {max(ratios):.3f}"
                f"  {statistics.median(row['iterations_after_best'] for row in selected):>34}"
            )
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "early_stopping.txt").write_text(text + "\n", encoding="utf-8")
    (RESULTS / "early_stopping.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
