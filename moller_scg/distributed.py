"""Data-parallel full-batch evaluation with ``torch.distributed``: shards, one all-reduce per pass, agreement.

Every quantity SCG needs is a sum over samples (Møller 1993: E, E' and E''p of the whole training set), so with
the N samples cut into disjoint shards, one per rank, each sum is the sum of the ranks' partial sums. A rank
streams its shard (:class:`~moller_scg.GradientAccumulator` with ``distributed=True``, or detected from an
initialised process group), packs its float64 partial sums — loss, class-weight denominator, sample count and the
gradient or Hessian-vector product — into **one** flat float64 buffer, and :func:`all_reduce_sum` adds the buffers
of all ranks. Every rank then holds the same bits of the full-batch result, so SCG, which is deterministic given
those numbers, takes the same step on every rank and the weights never need to be broadcast.

Shards are contiguous index ranges, rank r holding [r·N // W, (r+1)·N // W) (:func:`shard_range`): disjoint,
covering every sample exactly once, with no padding or dropping (``DistributedSampler`` pads or drops, which would
change the objective). Shard sizes differ by at most one, and a rank may hold none (N < W).

:func:`resolve_distributed` decides whether an accumulator reduces over a process group, :func:`check_ranks_agree`
checks once that the ranks share N and the initial weights, and :func:`reduce_pass_sums` is the reduce step of
every pass. What the ranks do not compute from all-reduced sums they agree on: :func:`agree_on_max` a rank-local
decision, :func:`broadcast_from_main` numbers that every rank forms alike but may round otherwise (K-FAC's factors).

A rank that raises or dies must not leave the others waiting forever: the process group's ``timeout`` bounds
every collective, and a failed or timed-out collective is re-raised as :class:`DistributedError` naming this rank.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from moller_scg._vectors import as_complex, as_real
from moller_scg.float64_sums import PassSums

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
"""How long :func:`init_from_env` lets a collective wait for the slowest rank (torch's own default for gloo).

It must exceed the longest pass over one shard, since the ranks meet once per pass; after it a dead or stuck rank
turns into a :class:`DistributedError` on the others. The environment variable ``MOLLER_SCG_DIST_TIMEOUT``
(seconds) overrides it."""
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The environment ``torchrun`` sets for every worker; :func:`init_from_env` starts a process group when all are set."""


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank raised, died, or is stuck; the message names this rank."""


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """W, the number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank r (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Whether this is rank 0, the one that prints progress and writes files (True without a process group)."""
    return rank() == 0


def shard_range(samples: int, rank: int, world_size: int) -> range:
    """The indices of rank ``rank``'s shard: [r·N // W, (r+1)·N // W), disjoint, together exactly 0, …, N−1.

    Example:
        >>> [list(shard_range(5, r, 3)) for r in range(3)]
        [[0], [1, 2], [3, 4]]
        >>> [len(shard_range(2, r, 3)) for r in range(3)]  # a rank may hold no sample
        [0, 1, 1]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"Invalid rank {rank} for world_size {world_size}; it must be in [0, {world_size})")
    return range(rank * samples // world_size, (rank + 1) * samples // world_size)


def all_reduce_sum(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Σ over ranks of each tensor, by **one** ``all_reduce`` of a flat float64 buffer.

    Each tensor is widened to float64 (complex ones are viewed as pairs of reals) and packed; the sums come back in
    float64 (complex128), in the input shapes, on the input's device. ``None`` entries stay ``None``. Every rank
    receives the same bits, so anything computed from them identically on every rank agrees bitwise.

    Raises:
        DistributedError: the all-reduce failed or timed out (a rank raised, died or is stuck).
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    parts = [_as_float64(t).reshape(-1) for t in present]
    buffer = torch.cat(parts)
    _all_reduce(buffer, dist.ReduceOp.SUM, f"{buffer.numel()} float64 sums")
    results: list[torch.Tensor | None] = []
    start = 0
    for t in tensors:
        if t is None:
            results.append(None)
            continue
        count = t.numel() * (2 if t.is_complex() else 1)
        chunk = buffer[start : start + count]
        start += count
        results.append(as_complex(chunk.view(*t.shape, 2)) if t.is_complex() else chunk.view(t.shape))
    return results


def broadcast_from_main(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Overwrite each of ``tensors`` (real floating-point, on one device), in place, with rank 0's, by **one**
    ``broadcast`` of a flat float64 buffer, after one all-reduce that checks the ranks hold as many numbers.

    For what every rank computes alike from the same numbers but need not round alike (K-FAC's factors, through
    convolution backwards that a GPU may sum in another order): after it every rank holds rank 0's bits, and what
    it computes from them agrees bitwise, as after :func:`all_reduce_sum`.

    Raises:
        ValueError: on every rank, when the ranks hold different numbers of them (``what`` names them).
        DistributedError: the broadcast failed or timed out (a rank raised, died or is stuck).
    """
    check_same_on_every_rank({f"the number of {what}": float(sum(t.numel() for t in tensors))})
    if not tensors:
        return
    buffer = torch.cat([_as_float64(t).reshape(-1) for t in tensors])
    _collective("broadcast", f"{what} from rank 0", lambda: dist.broadcast(buffer, src=0))
    start = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(buffer[start : start + t.numel()].view(t.shape))
            start += t.numel()


def check_same_on_every_rank(values: Mapping[str, float]) -> None:
    """Raise ``ValueError`` on every rank unless each named number is the same on all ranks (one all-reduce).

    Used for the number of samples N, the number of parameters and a checksum of the initial weights: ranks that
    disagree would each compute their own objective and their weights would drift apart silently.
    """
    names = list(values)
    local = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=_coordination_device())
    # A maximum over NaN is not defined: each number travels as its value (0 for NaN) and whether it is NaN, so a
    # rank whose checksum is NaN differs from one whose checksum is 0.
    is_nan = local.isnan()
    entries = torch.cat([local.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf), is_nan.to(torch.float64)])
    extremes = torch.cat([entries, -entries])
    _all_reduce(extremes, dist.ReduceOp.MAX, "a consistency check")
    reduced, mine = extremes.tolist(), local.tolist()  # one copy to the host
    highest, lowest = reduced[: len(entries)], [-value for value in reduced[len(entries) :]]
    count = len(names)
    differing = []
    for i, name in enumerate(names):
        if highest[count + i] != lowest[count + i]:
            differing.append(f"{name} is NaN on some ranks only (rank {rank()} has {mine[i]:.17g})")
        elif highest[i] != lowest[i]:
            differing.append(
                f"{name} ranges from {lowest[i]:.17g} to {highest[i]:.17g} (rank {rank()} has {mine[i]:.17g})"
            )
    if differing:
        raise ValueError(
            f"the {world_size()} ranks disagree: {'; '.join(differing)}. Every rank must pass the same data (the "
            f"accumulator shards it), the same model and the same initial weights (seed every rank alike or "
            f"broadcast the weights from rank 0 before training)"
        )


def _coordination_device() -> torch.device:
    """Where the ranks' small coordination tensors go: the CPU when the group has a backend for it (gloo, or
    ``"cpu:gloo,cuda:nccl"``), else the current GPU (a group started with ``"nccl"`` alone, which has no CPU
    transport)."""
    if "cpu:" in dist.get_backend_config():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def agree_on_max(code: int, what: str = "a stop decision") -> int:
    """The largest of the ranks' ``code`` (one tiny all-reduce): how ranks agree on a rank-local decision
    (``what`` names it in a failure's message)."""
    if not is_distributed():
        return code
    value = torch.tensor([code], dtype=torch.float64, device=_coordination_device())
    _all_reduce(value, dist.ReduceOp.MAX, what)
    return int(value.item())


def timeout_from_env() -> datetime.timedelta:
    """``MOLLER_SCG_DIST_TIMEOUT`` seconds, or :data:`DEFAULT_TIMEOUT` when it is unset or empty.

    Raises:
        ValueError: it is not a finite number of seconds > 0 (the message names the variable).
    """
    text = os.environ.get("MOLLER_SCG_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (0.0 < seconds < math.inf):
        raise ValueError(
            f"MOLLER_SCG_DIST_TIMEOUT={text!r} is not a number of seconds > 0 (how long a collective may wait; "
            f"unset it for the default of {DEFAULT_TIMEOUT.total_seconds():g} s)"
        )
    return datetime.timedelta(seconds=seconds)


def init_from_env(timeout: datetime.timedelta | None = None, backend: str | None = None) -> bool:
    """Start the process group from ``torchrun``'s environment, if it is set and no group exists yet.

    Args:
        timeout: how long a collective may wait; default :data:`DEFAULT_TIMEOUT` (or ``MOLLER_SCG_DIST_TIMEOUT``
            seconds).
        backend: default ``"cpu:gloo,cuda:nccl"`` when CUDA is available (NCCL for tensors on the GPUs, gloo for
            those on the CPU), ``"gloo"`` otherwise.

    Returns:
        ``True`` if this call started the group (then the caller should ``destroy_process_group()`` at the end).
    """
    if is_distributed() or not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return False
    if not dist.is_available():
        raise RuntimeError("torchrun started this process, but this PyTorch build has no torch.distributed")
    if timeout is None:
        timeout = timeout_from_env()
    if backend is None:
        # NCCL for the GPUs' tensors, gloo for the CPU's: the coordination collectives, and a run on --device cpu
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL needs each process on its own GPU
    dist.init_process_group(backend, timeout=timeout)
    logger.debug("process group started: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


_SHUT_DOWN_WORKS: list[Any] = []
"""The ``Work`` objects of :func:`shut_down`'s last all-reduce and barrier, referenced until the interpreter exits."""


def shut_down(finished_normally: bool) -> None:
    """Destroy the process group that :func:`init_from_env` started; after a normal finish, all ranks together.

    After a finish with status 0 the ranks all-reduce one number and meet at a barrier, both as asynchronous
    collectives whose ``Work`` objects this module keeps until the interpreter exits, and then destroy the group.

    Why: once ``torch._dynamo`` is imported (every ``torch.optim`` step does), ``destroy_process_group`` no longer
    stops gloo's worker threads, and a worker lets go of a finished collective a moment after ``wait()`` has
    returned. When its reference is the last one, the worker frees the work and its tensors, which needs the GIL;
    during interpreter shutdown the thread is then killed and the process aborts ("terminate called without an
    active exception"; core dumps of the two-rank MNIST example showed ``~AsyncAllreduceWork`` inside
    ``~AsyncBarrierWork`` inside ``ProcessGroupGloo::runLoop``, about 1 run in 30 without this, 1 in 200 with a bare
    barrier). Holding the two works here makes the main thread, not a worker, free them — and through the barrier's
    record of the collectives still in progress, any earlier one — at exit, with the GIL; the round trips of the two
    collectives give the workers time to let go of the earlier ones while Python runs.

    After an error or a failure status a peer may be gone, stuck or still in a collective, so the group is
    destroyed without waiting for anyone.
    """
    if not is_distributed():
        return
    if finished_normally:
        all_reduce = dist.all_reduce(torch.zeros(1, dtype=torch.float64, device=_coordination_device()), async_op=True)
        _SHUT_DOWN_WORKS.append(all_reduce)
        all_reduce.wait()
        barrier = dist.barrier(async_op=True)
        _SHUT_DOWN_WORKS.append(barrier)
        barrier.wait()
    dist.destroy_process_group()


def local_device(device: str | torch.device | None) -> str | torch.device | None:
    """The device this process should train on: under a process group, a bare ``"cuda"`` is ``cuda:LOCAL_RANK``.

    ``torchrun`` starts one process per GPU and sets ``LOCAL_RANK`` (the process's index on its machine); every
    other device (``"cpu"``, ``"cuda:1"``, ``None``) is returned as given.
    """
    if device is None or not is_distributed():
        return device
    resolved = torch.device(device)
    if resolved.type != "cuda" or resolved.index is not None:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def resolve_distributed(distributed: bool | None, data: Any) -> bool:
    """Whether passes all-reduce over a process group: detected when ``None``; a DataLoader cannot be sharded."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
    active = is_distributed() if distributed is None else distributed
    if active and not is_distributed():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group first (torchrun sets its environment), or leave distributed=None"
        )
    if active and isinstance(data, DataLoader):
        raise TypeError(
            "a distributed GradientAccumulator shards the data itself, but a DataLoader fixes its own sampler: pass "
            "its dataset and batch_size instead (GradientAccumulator(model, loss_fn, loader.dataset, "
            "batch_size=loader.batch_size)), or distributed=False to stream the whole DataLoader on every rank"
        )
    return active


def check_ranks_agree(samples: int, params: Sequence[torch.Tensor], weight_decay: float = 0.0) -> None:
    """Every rank must have the same N, the same parameters, the same initial weights and the same weight decay ν
    (one all-reduce)."""
    with torch.no_grad():
        checksum = sum(float(as_real(p).double().sum()) for p in params)
    check_same_on_every_rank(
        {
            "the number of samples N": samples,
            "the number of parameters": sum(p.numel() for p in params),
            "the sum of the initial weights": checksum,
            "the weight decay ν": weight_decay,
        }
    )


def reduce_pass_sums(sums: PassSums, device: torch.device) -> PassSums:
    """The global sums of one pass: Σ over ranks of this rank's :class:`~moller_scg.float64_sums.PassSums`.

    The shards are disjoint (a rank may have 0 samples), so the global loss, vector sums, denominator, metric sums
    and sample count are the sums over ranks: one ``all_reduce`` of a flat float64 buffer (:func:`all_reduce_sum`).
    The batch losses ``terms`` stay local; they only name a non-finite batch.
    """
    samples = torch.tensor(sums.samples, dtype=torch.float64, device=device)
    # all_reduce_sum gives None back only for a None: here at most the denominator and the metric sums, which
    # PassSums allows.
    loss, denominator, samples, metrics, metric_denominators, *vectors = cast(
        list[torch.Tensor],
        all_reduce_sum(
            [sums.loss, sums.denominator, samples, sums.metrics, sums.metric_denominators, *(sums.vectors or [])]
        ),
    )
    return PassSums(
        loss=loss,
        vectors=vectors if sums.vectors is not None else None,
        denominator=denominator,
        samples=int(samples.item()),
        terms=sums.terms,
        metrics=metrics,
        metric_denominators=metric_denominators,
    )


def _as_float64(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_complex():
        return torch.view_as_real(tensor.to(torch.complex128))
    return tensor.to(torch.float64)


def _all_reduce(buffer: torch.Tensor, op: dist.ReduceOp | dist.ReduceOp.RedOpType, what: str) -> None:
    """``dist.all_reduce`` in place, with a failure or timeout re-raised as :class:`DistributedError`."""
    _collective("all_reduce", what, lambda: dist.all_reduce(buffer, op=op))


def _collective(name: str, what: str, run: Callable[[], object]) -> None:
    """Run one collective, with a failure or timeout re-raised as :class:`DistributedError` naming this rank."""
    try:
        run()
    except Exception as error:  # gloo raises RuntimeError, NCCL DistBackendError; both are reported alike
        size, me = world_size(), rank()
        raise DistributedError(
            f"{name} of {what} over {size} ranks failed or timed out (rank {me}): {error}. "
            f"A rank may have died or raised; the traceback of the rank that failed first says why"
        ) from error
