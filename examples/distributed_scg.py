"""Data-parallel full-batch SCG with ``torch.distributed``: each rank streams its shard, one all-reduce per pass.

    python examples/distributed_scg.py                      # 2 processes on this machine (gloo, CPU, loopback)
    python examples/distributed_scg.py --processes 3
    torchrun --standalone --nproc-per-node 2 examples/distributed_scg.py   # the same, started by torchrun

Every rank builds the same model (same seed) and passes the same full data to
:class:`~moller_scg.GradientAccumulator`. Because a process group is initialised, the accumulator shards the data
(rank r streams samples [r·N // W, (r+1)·N // W)) and all-reduces each pass's float64 sums — loss, sample count
and gradient or Hessian-vector product — in one flat buffer. Every rank then holds the same bits of the exact
full-batch E, E' and E''p, so SCG, deterministic given those numbers, takes the same step on every rank and the
weights stay identical without ever being broadcast. Nothing in the training code is distributed-specific.

Not ``DistributedDataParallel``: DDP averages gradients inside ``backward`` and does not synchronise the
double-backward of ``create_graph=True``; the accumulator does the only communication SCG needs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moller_scg import SCG, GradientAccumulator
from moller_scg import distributed as moller_dist

SAMPLES = 240


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 4, generator=generator, dtype=torch.float64)
    y = torch.sin(x @ torch.tensor([[1.0], [-1.0], [0.5], [2.0]], dtype=torch.float64))
    return x, y


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 1)).double()


# --8<-- [start:train]
def train(iterations: int) -> tuple[nn.Module, float]:
    """The single-process training code, unchanged: with a process group, each rank streams only its shard."""
    x, y = make_data()  # every rank passes the same full data; the accumulator picks the rank's shard
    model = make_model()  # the same initial weights on every rank (checked when the accumulator is built)
    objective = GradientAccumulator(model, nn.MSELoss(), (x, y), batch_size=32)
    optimizer = SCG(model.parameters())  # exact curvature: SCG calls objective.hvp, one all-reduce each
    for _ in range(iterations):
        loss = optimizer.step(objective)
    return model, float(loss)


# --8<-- [end:train]


def _worker(rank: int, world_size: int, folder: str, iterations: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # one core per process: the ranks share this machine
    store = dist.FileStore(str(Path(folder) / "store"), world_size)  # a file, not a port: nothing to collide
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=5)
    )
    finished = False
    try:
        model, loss = train(iterations)
        if rank == 0:
            print(f"{world_size} ranks: loss {loss:.6e} after {iterations} iterations")
        torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
        finished = True
    finally:
        moller_dist.shut_down(finished)  # all ranks leave together after a normal finish


def run(processes: int, iterations: int, out_dir: str) -> list[dict[str, torch.Tensor]]:
    """Start ``processes`` ranks on this machine and return each rank's final ``state_dict``."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's traffic on the loopback interface
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(_worker, args=(processes, folder, iterations, out_dir), nprocs=processes)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(processes)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--out", metavar="DIR", help="keep each rank's final weights here (rank0.pt, …)")
    args = parser.parse_args(argv)
    if moller_dist.init_from_env():  # started by torchrun: this process is one rank
        finished = False
        try:
            _, loss = train(args.iterations)
            if moller_dist.is_main_process():
                print(f"{moller_dist.world_size()} ranks: loss {loss:.6e} after {args.iterations} iterations")
            finished = True
        finally:
            moller_dist.shut_down(finished)
        return
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = args.out or scratch
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        states = run(args.processes, args.iterations, out_dir)
    identical = all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    print(f"weights identical on all {args.processes} ranks: {identical}")


if __name__ == "__main__":
    main()
