"""How the race's interleaving moves the time ratio of SCG(memory=20) to torch LBFGS(100) on the small problems.

``benchmarks/peers.py`` runs every optimizer of a problem at once, in threads that hand one baton round-robin, each
clock running only while its optimizer holds the baton. On problems whose gradient pass takes about a millisecond
the time ratios then depend on which threads take part. This script races the same two rows four ways: the two
alone, interleaved; the two among 12 more interleaved rows of torch LBFGS (history 2); the two among 12 more rows of
SCG (memory 5); and one after the other, without threads. It prints the time to the report's 90 / 99 / 99.9 %
targets as SCG's ratio to LBFGS's. The two crowds tell apart a crowd that slows SCG itself from one that favours
the rows whose code it runs (and keeps warm in the caches).

Usage:
    python benchmarks/interleaving_effect.py     # about a minute; writes benchmarks/results/interleaving_effect.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import environment
from peers import race
from peers_adapters import lbfgs, scg, warm_up
from peers_metering import calibrate
from peers_problems import PROBLEMS
from peers_report import seconds_to_targets

TARGETS = {"logistic": (0.3091, 0.1054, 0.08505), "regression": (0.02957, 0.002977, 0.0003177)}
"""T1 / T2 / T3 of ``benchmarks/results/peers.txt`` (E* + 10⁻¹ / 10⁻² / 10⁻³ × (E₀ − E*) of that run)."""
RESULTS = Path(__file__).resolve().parent / "results" / "interleaving_effect.txt"


def main() -> int:
    torch.set_num_threads(1)
    warm_up()
    lines = [
        "SCG(memory=20) against torch LBFGS(100): time to T1 / T2 / T3 as SCG's ÷ LBFGS's, three ways of racing them",
        "command: python benchmarks/interleaving_effect.py",
        "; ".join(f"{key} {value}" for key, value in environment("python benchmarks/interleaving_effect.py").items()),
        "",
    ]
    for name, targets in TARGETS.items():
        problem = PROBLEMS[name](False, 0)
        initial = problem.make_model().state_dict()
        costs = calibrate(problem, initial)
        pair = {"torch LBFGS": lbfgs(100), "SCG m=20": scg(hvp="secant", memory=20)}
        lbfgs_crowd = pair | {f"LBFGS h=2 #{i}": lbfgs(2) for i in range(12)}
        scg_crowd = pair | {f"SCG m=5 #{i}": scg(hvp="secant", memory=5) for i in range(12)}
        ways = {
            "interleaved, 2 threads": (pair, True),
            "interleaved, 14 threads (12 more LBFGS h=2 rows)": (lbfgs_crowd, True),
            "interleaved, 14 threads (12 more SCG m=5 rows)": (scg_crowd, True),
            "one after the other": (pair, False),
        }
        for way, (table, interleaved) in ways.items():
            results = {r["name"]: r for r in race(problem, initial, costs, table, interleaved=interleaved)}
            reference = seconds_to_targets(results["torch LBFGS"], targets)
            ours = seconds_to_targets(results["SCG m=20"], targets)
            ratios = " / ".join("—" if a is None or b is None else f"{a / b:.2f}" for a, b in zip(ours, reference))
            line = f"{name:10s}  {way:50s}  {ratios}"
            print(line, flush=True)
            lines.append(line)
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
