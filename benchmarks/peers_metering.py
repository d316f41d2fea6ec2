"""Metering for ``benchmarks/peers.py``: the cost of a pass, the baton that interleaves the optimizers, one
optimizer's run (budget, clock, history) and its working memory."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import random
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from peers_problems import Problem, make_accumulator
from torch import nn

from moller_scg.accumulate import GradientAccumulator
from moller_scg.kronecker import KroneckerFactors

CURVATURE_FRACTION = 0.1
"""The subsampled SCG's curvature_fraction: each E''p over a rotating 10 % of the training samples."""


class BudgetSpent(Exception):
    """Raised inside an evaluation that would exceed the optimizer's budget; the run ends there."""


# ------------------------------------------------------------------------------------------------------------------
# The cost of a pass


def calibrate(problem: Problem, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """Seconds of a gradient, HVP and loss-only pass at the initial weights; ratios = medians of per-round ratios."""
    model = problem.make_model()
    model.load_state_dict(initial)
    acc = make_accumulator(problem, model)
    forward_over_reverse = make_accumulator(problem, model, hvp_method="forward-over-reverse")
    subsampled = make_accumulator(problem, model, curvature_fraction=CURVATURE_FRACTION)
    generator = torch.Generator().manual_seed(problem.seed + 1)
    vectors = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in acc.params]
    tasks = {
        "gradient": acc,
        "hvp": lambda: acc.hvp(vectors),
        "loss": acc.loss,
        # SCG's trial: the forward of a gradient pass, whose backward is made only for a trial that may be accepted
        # (a full gradient pass when the accumulator cannot defer it: several batches)
        "forward": acc.value_then_gradient,
        "hvp_forward_over_reverse": lambda: forward_over_reverse.hvp(vectors),
        "hvp_subsampled": lambda: subsampled.hvp(vectors),
    }
    for task in tasks.values():  # warm-up (the forward-over-reverse accumulator falls back here if it must)
        task()
    if forward_over_reverse.hvp_method != "forward-over-reverse":
        del tasks["hvp_forward_over_reverse"]
    times: dict[str, list[float]] = {name: [] for name in tasks}
    names = list(tasks)
    for round_index in range(problem.calibration_rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            tasks[name]()
            times[name].append(time.perf_counter() - start)

    def ratio(name: str) -> float | None:
        if name not in tasks:
            return None
        return statistics.median(t / g for t, g in zip(times[name], times["gradient"]))

    return {
        "gradient_seconds": statistics.median(times["gradient"]),
        "hvp": ratio("hvp"),
        "loss": ratio("loss"),
        "forward": ratio("forward") if acc.defers_gradient else 1.0,
        "hvp_forward_over_reverse": ratio("hvp_forward_over_reverse"),
        "hvp_subsampled": ratio("hvp_subsampled"),
        "rounds": problem.calibration_rounds,
    }


# ------------------------------------------------------------------------------------------------------------------
# Interleaving: one baton, handed round-robin; each optimizer's clock runs only while it holds it


class RoundRobin:
    """A baton passed among named threads in laps, each thread once a lap; threads that finished are skipped.

    Each thread waits on its own event, and passing the baton sets only the next thread's: the threads not next
    stay asleep. (With one shared condition notified to all, every pass woke all the waiting threads, and their
    wake-ups competed for the GIL with the optimizer that had just taken the baton and started its clock.)

    With ``shuffle_seed`` the order of every lap after the first is a new random permutation (seeded, so a run can be
    repeated), and a thread never takes two turns in a row while another is waiting. In a fixed order every
    optimizer always runs right after the same one, whose code and data it finds in the processor's caches (or
    not): on the millisecond problems the first row, the reference torch LBFGS, took 1.05–1.9 times the time of its
    twin with history 40, which computes the same (docs/performance.md, lever 17). ``benchmarks/peers.py`` shuffles
    by default.
    """

    def __init__(self, names: list[str], shuffle_seed: int | None = None) -> None:
        self._order = list(names)
        self._active = set(names)
        self._lock = threading.Lock()
        self._turn_of = {name: threading.Event() for name in names}
        self._random = random.Random(shuffle_seed) if shuffle_seed is not None else None
        if names:
            self._turn_of[names[0]].set()

    def wait_turn(self, name: str) -> None:
        self._turn_of[name].wait()

    def pass_turn(self, name: str) -> None:
        with self._lock:
            self._hand_on_from(name)

    def leave(self, name: str) -> None:
        with self._lock:
            self._active.discard(name)
            if self._turn_of[name].is_set():
                self._hand_on_from(name)

    def _hand_on_from(self, name: str) -> None:
        self._turn_of[name].clear()
        following = self._next_after(name)
        if following is not None:
            self._turn_of[following].set()

    def _next_after(self, name: str) -> str | None:
        start = self._order.index(name)
        if self._random is not None:
            following = [n for n in self._order[start + 1 :] if n in self._active]
            if following:
                return following[0]
            self._random.shuffle(self._order)  # a new lap in a new order, not starting with the thread just run
            lap = [n for n in self._order if n in self._active]
            if len(lap) > 1 and lap[0] == name:
                i, j = self._order.index(lap[0]), self._order.index(lap[1])
                self._order[i], self._order[j] = self._order[j], self._order[i]
                lap[0], lap[1] = lap[1], lap[0]
            return lap[0] if lap else None
        for offset in range(1, len(self._order) + 1):
            candidate = self._order[(start + offset) % len(self._order)]
            if candidate in self._active:
                return candidate
        return None


class Clock:
    """Seconds spent while running (not while waiting for the baton or inside ``paused``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def now(self) -> float:
        return self.seconds + (0.0 if self._since is None else time.perf_counter() - self._since)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()


# ------------------------------------------------------------------------------------------------------------------
# One optimizer's run: its model, accumulator, budget, clock and history


@dataclasses.dataclass
class Record:
    passes: float
    evaluations: int
    seconds: float
    loss: float


class Run:
    """Everything one optimizer's race needs; the evaluation methods charge the budget and hand the baton on."""

    def __init__(self, name: str, problem: Problem, initial: dict[str, torch.Tensor], costs: dict[str, float]) -> None:
        self.name = name
        self.problem = problem
        self.model = problem.make_model()
        self.model.load_state_dict(initial)
        self.acc = make_accumulator(problem, self.model)
        self.params = self.acc.params
        self.n = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.calibrated = costs
        self.costs = {"gradient": 1.0, "hvp": costs["hvp"], "loss": costs["loss"]}
        self.calls = {"gradient": 0, "hvp": 0, "loss": 0}
        self.passes = 0.0
        self.budget = problem.budget
        self.clock = Clock()
        self.history: list[Record] = []
        self.best_loss = math.inf
        self.best_weights: torch.Tensor | None = None
        self.peak_state_numbers = 0
        self.status = "not started"
        self.baton: RoundRobin | None = None
        self.entry_code: types.CodeType | None = None
        self.extra: dict[str, Any] = {}
        self.evaluation_end = 0.0
        """The clock when the last evaluation (loss and gradient) was complete: the time of a point an optimizer
        records after its own work on that evaluation (SCG, after its step), as another's is recorded then."""

    # -- bookkeeping -------------------------------------------------------------------------------------------

    @property
    def evaluations(self) -> int:
        return sum(self.calls.values())

    def charge(self, kind: str, cost: float | None = None, completes_evaluation: bool = False) -> None:
        """Before a pass: refuse it if it would exceed the budget, hand the baton on, sample the optimizer's memory.
        ``cost``: the pass's cost in gradient passes, when not that of ``kind``.

        ``completes_evaluation``: the pass is the second half of an evaluation (SCG's backward after its trial's
        forward), which a real run makes right after the first. It keeps the baton, and the memory is not sampled
        again: the optimizer's frames hold what they held at the first half, and walking them between a forward and
        its backward evicts from the processor's caches what the backward is about to use, a cost no training loop
        pays and one evaluation of LBFGS never pays (``docs/performance.md``, lever 20)."""
        cost = self.costs[kind] if cost is None else cost
        if self.passes + cost > self.budget + 1e-9:
            raise BudgetSpent
        if not completes_evaluation:
            self.switch()
            with self.clock.paused():
                self.sample_memory(sys._getframe())
        self.passes += cost
        self.calls[kind] += 1

    def switch(self) -> None:
        """Let every other optimizer run until its next evaluation."""
        if self.baton is None:
            return
        self.clock.stop()
        self.baton.pass_turn(self.name)
        self.baton.wait_turn(self.name)
        self.clock.start()

    def record(self, loss: float, weights: Callable[[], torch.Tensor], at: float | None = None) -> None:
        """Add a point to the history: the lowest candidate loss so far (and keep the weights that gave it).

        ``at``: the clock's time of the point, when it is not now: SCG records its accepted point after its step,
        whose work after the trial's evaluation (the pair update, the next direction) belongs to the next point, as
        LBFGS's work after an evaluation does (``docs/performance.md``, lever 61)."""
        with self.clock.paused():
            if math.isfinite(loss) and loss < self.best_loss:
                self.best_loss = loss
                self.best_weights = weights().detach().clone()
            seconds = self.clock.now() if at is None else at
            self.history.append(Record(self.passes, self.evaluations, seconds, self.best_loss))

    def record_current(self, loss: float) -> None:
        """Add a point to the history of a minibatch run: the full-batch loss at its current weights."""
        with self.clock.paused():
            self.history.append(Record(self.passes, self.evaluations, self.clock.now(), loss))

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def set_flat(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(x[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.params])

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(v[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return out

    def sample_memory(self, frame: types.FrameType | None) -> None:
        numbers = optimizer_state_numbers(frame, self.entry_code, self.excluded_storages())
        self.peak_state_numbers = max(self.peak_state_numbers, numbers)

    def excluded_storages(self) -> set[int]:
        excluded = {self.problem.train[0].untyped_storage().data_ptr()}  # (K-FAC's factors hold the inputs)
        for p in self.params:
            excluded.add(p.untyped_storage().data_ptr())
            if p.grad is not None:
                excluded.add(p.grad.untyped_storage().data_ptr())
        return excluded

    # -- the objective as each optimizer family calls it ----------------------------------------------------------

    def __call__(self) -> torch.Tensor:
        """torch.optim style: E(w) with .grad set, one gradient pass.

        Every evaluation is a candidate, except for SCG, whose accepted points are recorded after each step (its
        first evaluation, at the start, is recorded here).
        """
        self.charge("gradient")
        loss = self.acc()
        self.evaluation_end = self.clock.now()
        if not self.extra.get("record_in_step") or not self.history:
            self.record(float(loss), self.flat_params)
        return loss

    def value_then_grad(self) -> tuple[torch.Tensor, Callable[[], list[torch.Tensor]]]:
        """SCG's trial (:meth:`GradientAccumulator.value_then_gradient`): E(w) from a forward charged c_F, E'(w)
        when asked, charged 1 − c_F, so that a completed trial costs one gradient pass and a trial rejected on its
        loss the forward alone. Over several batches the accumulator cannot defer the backward: one gradient pass."""
        if not self.acc.defers_gradient:
            loss = self()
            gradients = [cast(torch.Tensor, p.grad) for p in self.params]
            return loss, lambda: gradients
        forward = self.calibrated["forward"]
        self.charge("loss", cost=forward)  # the accumulator counts it as a loss pass until the gradient is formed
        loss, gradient = self.acc.value_then_gradient()
        formed: list[list[torch.Tensor]] = []

        def completed() -> list[torch.Tensor]:
            if not formed:
                self.charge("gradient", cost=max(1.0 - forward, 0.0), completes_evaluation=True)
                self.calls["loss"] -= 1  # a gradient pass now, as the accumulator counts it
                formed.append(gradient())
                self.evaluation_end = self.clock.now()
            return formed[0]

        return loss, completed

    def hvp(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """What SCG calls for exact curvature: one HVP pass through the accumulator."""
        self.charge("hvp")
        return self.acc.hvp(vectors)

    def value_and_grad_at(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E(x) and E'(x) for a flat vector x: one gradient pass (candidate)."""
        self.charge("gradient")
        self.set_flat(x)
        loss = self.acc()
        self.record(float(loss), lambda: x)
        return loss.to(x.dtype), self.flat_grad().to(x.dtype)

    def hvp_at(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """E''(x) v for flat x and v: one HVP pass."""
        self.charge("hvp")
        self.set_flat(x)
        return torch.cat([s.reshape(-1) for s in self.acc.hvp(self.unflatten(v))]).to(v.dtype)

    def numpy_loss(self, x: np.ndarray) -> float:
        """paramz's f: a loss-only pass at float64 x (candidate)."""
        self.charge("loss")
        tensor = torch.from_numpy(x)
        self.set_flat(tensor)
        loss = float(self.acc.loss())
        self.record(loss, lambda: tensor)
        return loss

    def numpy_grad(self, x: np.ndarray) -> np.ndarray:
        """paramz's gradf: a gradient pass at float64 x (not a candidate: netlab ignores its loss)."""
        self.charge("gradient")
        self.set_flat(torch.from_numpy(x))
        self.acc()
        return self.flat_grad().double().numpy()

    # -- the end ---------------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Final train loss and test metric at the best candidate weights (for Adam: the last weights)."""
        if self.best_weights is not None:
            self.set_flat(self.best_weights.to(self.dtype))
        final_loss = float(self.acc.loss())
        self.acc.passes.loss -= 1  # an evaluation of the harness, not of the optimizer
        metric = self.problem.metric(self.model, self.problem.test)
        accumulator_calls = dataclasses.asdict(self.acc.passes)
        if accumulator_calls != self.calls:
            raise RuntimeError(f"{self.name}: accumulator counted {accumulator_calls}, the harness {self.calls}")
        return {
            "name": self.name,
            "status": self.status,
            "passes": self.passes,
            "calls": dict(self.calls),
            "evaluations": self.evaluations,
            "seconds": self.clock.seconds,
            "final_loss": final_loss,
            "metric": metric,
            "state_numbers": self.peak_state_numbers,
            "state_in_n": self.peak_state_numbers / self.n,
            "history": [dataclasses.asdict(r) for r in self.history],
            **self.extra,
        }


# ------------------------------------------------------------------------------------------------------------------
# The optimizer's working memory: floating-point numbers reachable from its frames and state


_RECURSE_MODULES = (
    "torch.optim",
    "torchmin",
    "paramz",
    "moller_scg.scg",
    "moller_scg.quasi_newton",
    "moller_scg.diagonal_scaling",
    "moller_scg.kronecker",
    "collections",
)


def optimizer_state_numbers(
    frame: types.FrameType | None, stop: types.CodeType | None, excluded: set[int], extra: list[Any] | None = None
) -> int:
    """Numbers held by tensors and arrays reachable from the frames between ``frame`` and the run's entry frame.

    Frames of this file (the harness) are skipped, as are modules, models, accumulators and the harness's objects.
    Tensors are counted once per storage, arrays once per base buffer (an array that views a tensor's memory, as
    ``tensor.numpy()`` gives it, as that tensor); the model's parameters and gradients
    (``excluded`` storages) are not counted.
    """
    roots: list[Any] = list(extra or [])
    while frame is not None and frame.f_code is not stop:
        if is_optimizer_frame(frame):
            roots.extend(frame.f_locals.values())
        frame = frame.f_back
    return reachable_numbers(roots, excluded)


_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_TORCH_OPTIM_DIR = str(Path(torch.optim.__file__).resolve().parent) + os.sep
_ACCUMULATOR_FILE = str(Path(sys.modules[GradientAccumulator.__module__].__file__).resolve())
_HARNESS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
"""The benchmark's own files (``benchmarks/peers*.py``): their frames are the harness's, never an optimizer's."""


def is_optimizer_frame(frame: types.FrameType) -> bool:
    """Frames of the optimizers (torch.optim, SCG and its vector helpers, torchmin, paramz), not of the harness, the
    accumulator or torch's own machinery (autograd, nn)."""
    filename = frame.f_code.co_filename
    if filename == _ACCUMULATOR_FILE or filename.startswith(("<", _HARNESS_DIR)):
        return False
    return not filename.startswith(_TORCH_DIR) or filename.startswith(_TORCH_OPTIM_DIR)


def inside_objective(frame: types.FrameType | None) -> bool:
    """Whether the accumulator is on the stack: then the frame belongs to the objective's evaluation (such as
    ``moller_scg.curvature.graph_hvp`` on one batch), whose memory is the data loop's, not the optimizer's."""
    while frame is not None:
        if frame.f_code.co_filename == _ACCUMULATOR_FILE:
            return True
        frame = frame.f_back
    return False


def reachable_numbers(roots: list[Any], excluded: set[int]) -> int:
    """Floating-point numbers in the tensors and arrays reachable from ``roots`` (see ``optimizer_state_numbers``)."""
    seen_objects: set[int] = set()
    seen_buffers: set[int] = set(excluded)
    total = 0
    stack = [(value, 0) for value in roots]
    while stack:
        value, depth = stack.pop()
        if id(value) in seen_objects or depth > 6:
            continue
        seen_objects.add(id(value))
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen_buffers and storage.nbytes() > 0:
                    seen_buffers.add(storage.data_ptr())
                    total += storage.nbytes() // value.element_size()
        elif isinstance(value, np.ndarray):
            base = value
            while isinstance(base.base, np.ndarray):
                base = base.base
            if isinstance(base.base, torch.Tensor):  # a view of a tensor's memory (SCG's pairs on small CPU blocks)
                stack.append((base.base, depth))
                continue
            pointer = base.__array_interface__["data"][0]
            if base.dtype.kind in "fc" and pointer not in seen_buffers:
                seen_buffers.add(pointer)
                total += base.size
        elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, (nn.Module, GradientAccumulator, Run, types.ModuleType, type, types.FunctionType)):
            continue
        elif type(value).__module__.startswith(_RECURSE_MODULES) or isinstance(value, KroneckerFactors):
            with contextlib.suppress(TypeError):
                stack.extend((item, depth + 1) for item in vars(value).values())
            if hasattr(type(value), "__slots__"):
                stack.extend((getattr(value, s, None), depth + 1) for s in type(value).__slots__)
    return total
