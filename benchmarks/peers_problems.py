"""The problems of ``benchmarks/peers.py``: data, a model factory and the settings every optimizer is given."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from moller_scg.accumulate import GradientAccumulator
from moller_scg.models import MnistCNN


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
