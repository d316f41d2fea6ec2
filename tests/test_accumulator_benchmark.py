"""benchmarks/bench_accumulator.py: the speed rows (every curvature product against a gradient pass) and the memory
child of each pass kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_accumulator.py"


@pytest.fixture
def benchmark(monkeypatch):
    pytest.importorskip("mlxtend", reason="benchmarks/bench_accumulator.py needs mlxtend: pip install mlxtend")
    return load_script(BENCHMARK, monkeypatch)


def test_every_curvature_product_is_timed_against_a_gradient_pass(benchmark):
    row = benchmark.measure_speed(64, 32, 1, torch.device("cpu"))
    for ratio in (
        "hvp_double_backward_over_gradient",
        "hvp_forward_over_reverse_over_gradient",
        "gauss_newton_over_gradient",
    ):
        assert row[ratio] > 0
    assert "accumulator gauss-newton" in row["median_seconds"]
    text = benchmark.report(
        {
            "environment": {"command": "c", "torch": "t", "device": "cpu", "threads": 1},
            "speed": [row],
            "memory": [],
            "memory_batch_size": 32,
        }
    )
    assert "gauss-newton/grad" in text


def test_the_memory_child_runs_a_gauss_newton_pass(benchmark):
    result = benchmark.memory_child("accumulator gauss-newton", 64, 32, torch.device("cpu"))
    assert result["kind"] == "accumulator gauss-newton" and result["python_traced_peak_bytes"] > 0
