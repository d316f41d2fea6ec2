"""Data-parallel GradientAccumulator on the blog's MNIST CNN: one full-batch gradient pass on 1 and 2 processes.

Prints and writes to ``benchmarks/results/bench_distributed.{txt,json}``:

1. the time of one full-batch gradient pass (loss and gradient over all N samples, the all-reduce included) with
   one process and with two gloo processes on the same data. The comparison is fair on a machine with C cores:
   one process with C threads against W processes with C / W threads each (and one process with C / W threads
   as the per-core reference);
2. the communication per SCG iteration: the all-reduces an iteration makes (counted from the accumulator's
   passes over a few real SCG iterations) times the size of the buffer each one reduces (P + 3 float64 numbers:
   the gradient or Hessian-vector product, the loss sum, the class-weight denominator, the sample count).

Every rank times its pass after a barrier; a pass's time is the slowest rank's, as the next step waits for it.

Usage:
    python benchmarks/bench_distributed.py            # about a minute on 2 CPU cores
    python benchmarks/bench_distributed.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accumulator import mnist, write_results  # noqa: E402

from moller_scg import SCG  # noqa: E402
from moller_scg.accumulate import GradientAccumulator  # noqa: E402
from moller_scg.models import MnistCNN  # noqa: E402

FLOAT64_BYTES = 8
SCALARS_PER_REDUCE = 3  # loss sum, denominator, sample count, packed with the vector into one buffer


def measure(rank: int, world_size: int, threads: int, spec: dict, out: str | None) -> dict | None:
    """Seconds per full-batch gradient pass (the slowest rank's) and the passes of a few SCG iterations."""
    torch.set_num_threads(threads)
    inputs, targets = mnist(spec["samples"])
    torch.manual_seed(0)
    model = MnistCNN()
    acc = GradientAccumulator(model, nn.CrossEntropyLoss(), (inputs, targets), batch_size=spec["batch_size"])
    times = []
    for round_index in range(spec["rounds"] + 1):  # the first round warms up
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        acc()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if round_index:
            times.append(float(elapsed))
    reduce_times = []
    if dist.is_initialized():  # the all-reduce alone, on a buffer of the size one pass reduces
        buffer = torch.zeros(sum(p.numel() for p in acc.params) + SCALARS_PER_REDUCE, dtype=torch.float64)
        for _ in range(spec["rounds"]):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            reduce_times.append(time.perf_counter() - start)
    optimizer = SCG(model.parameters(), hvp=spec["hvp"])
    before = acc.passes.gradient + acc.passes.hvp + acc.passes.loss
    for _ in range(spec["iterations"]):
        optimizer.step(acc)
    passes = acc.passes.gradient + acc.passes.hvp + acc.passes.loss - before
    result = {
        "processes": world_size,
        "threads_per_process": threads,
        "shard_samples": acc.shard_samples,
        "pass_seconds": statistics.median(times),
        "all_reduce_seconds": statistics.median(reduce_times) if reduce_times else 0.0,
        "all_reduces_per_iteration": passes / spec["iterations"],
        "parameters": sum(p.numel() for p in acc.params),
    }
    if out is not None and rank == 0:
        Path(out).write_text(json.dumps(result), encoding="utf-8")
    return result


def _worker(rank: int, world_size: int, threads: int, spec: dict, folder: str) -> None:
    store = dist.FileStore(str(Path(folder) / "store"), world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10)
    )
    try:
        measure(rank, world_size, threads, spec, str(Path(folder) / "result.json"))
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int, threads: int, spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(_worker, args=(world_size, threads, spec, folder), nprocs=world_size)
        return json.loads((Path(folder) / "result.json").read_text(encoding="utf-8"))


def report(results: dict) -> str:
    spec, rows = results["spec"], results["rows"]
    baseline = rows[0]["pass_seconds"]
    parameters = rows[0]["parameters"]
    lines = [
        f"Distributed gradient pass, MNIST CNN ({parameters:,} parameters), N = {spec['samples']}, "
        f"batch {spec['batch_size']}, float32, CPU, {results['environment']['cores']} cores, "
        f"torch {results['environment']['torch']}",
        "",
        f"{'configuration':<36}{'samples/rank':>13}{'pass (s)':>11}{'of it all-reduce':>18}{'speed-up':>10}",
    ]
    for row in rows:
        name = f"{row['processes']} process(es) × {row['threads_per_process']} thread(s)"
        lines.append(
            f"{name:<36}{row['shard_samples']:>13}{row['pass_seconds']:>11.3f}{row['all_reduce_seconds']:>18.3f}"
            f"{baseline / row['pass_seconds']:>9.2f}×"
        )
    buffer_bytes = (parameters + SCALARS_PER_REDUCE) * FLOAT64_BYTES
    per_iteration = rows[-1]["all_reduces_per_iteration"]
    world = rows[-1]["processes"]
    lines += [
        "",
        f"Communication per SCG iteration (hvp={spec['hvp']!r}, measured over {spec['iterations']} iterations): "
        f"{per_iteration:.2f} all-reduces of one float64 buffer of P + 3 = {parameters + SCALARS_PER_REDUCE:,} "
        f"numbers ({buffer_bytes / 2**20:.2f} MiB) = {per_iteration * buffer_bytes / 2**20:.2f} MiB reduced per "
        f"iteration; a ring all-reduce sends 2(W−1)/W of that per rank: "
        f"{per_iteration * buffer_bytes * 2 * (world - 1) / world / 2**20:.2f} MiB at W = {world}, "
        f"below {2 * per_iteration * buffer_bytes / 2**20:.2f} MiB for any W.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="threads to share out (default: all)")
    parser.add_argument("--hvp", default="double-backward", help="SCG's curvature mode for the communication count")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # other work on the machine, before this benchmark adds its own
    spec = {
        "samples": 1000 if args.quick else 4000,
        "batch_size": 128,
        "rounds": 3 if args.quick else 5,
        "iterations": 2 if args.quick else 4,
        "hvp": args.hvp,
    }
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    per_rank = max(args.cores // 2, 1)
    rows = [
        measure(0, 1, args.cores, spec, None),  # one process using every core
        measure(0, 1, per_rank, spec, None),  # one process with one rank's share of the cores
        run_distributed(2, per_rank, spec),
    ]
    results = {
        "environment": {
            "torch": torch.__version__,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
        },
        "spec": spec,
        "rows": rows,
    }
    text = report(results)
    if load_before > 0.5:
        text += (
            f"\n\nNote: the load average was {load_before:.1f} on {os.cpu_count()} cores while measuring "
            f"(other work on the machine): the processes competed for cores, so the comparison is not fair."
        )
    print(text)
    path = write_results("bench_distributed_quick" if args.quick else "bench_distributed", results, text)
    print(f"\nwritten to {path} and .json")


if __name__ == "__main__":
    main()
