"""Problems shared by several test modules, as plain functions (importable by a test and by the scripts a test runs
in a subprocess); ``conftest.py`` offers the common ones as fixtures."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def regression_problem(seed: int = 0, n: int = 48) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A 2-8-1 tanh network (float64, initial weights from ``seed``) and n samples of y = sin(2x₁)·cos(x₂)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    y = torch.sin(2 * x[:, :1]) * torch.cos(x[:, 1:])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return model, (x, y)


def softmax_problem(seed: int = 0) -> tuple[nn.Module, Any]:
    """A 6-4-3 tanh classifier (float64, initial weights from ``seed``) and a ``GradientAccumulator`` of its
    cross-entropy over 64 random samples of 3 classes, in one batch."""
    from moller_scg import GradientAccumulator

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    inputs = torch.randn(64, 6, dtype=torch.float64)
    targets = torch.randint(0, 3, (64,))
    return model, GradientAccumulator(model, nn.CrossEntropyLoss(), (inputs, targets))


def mean_squared_error_closure(
    optimizer: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Any:
    """A ``torch.optim`` closure of the mean squared error of ``model`` on (x, y): zero the gradients, evaluate,
    back-propagate (no graph kept), return the loss."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        return loss

    return closure


def rosenbrock(w: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's function of a vector w: Σᵢ 100 (wᵢ₊₁ − wᵢ²)² + (1 − wᵢ)², least 0 at w = (1, …, 1)."""
    return torch.sum(100 * (w[1:] - w[:-1] ** 2) ** 2 + (1 - w[:-1]) ** 2)


def linear_least_squares_benchmark_problem() -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A ``benchmarks/peers_problems.Problem`` whose Gauss–Newton matrix is its Hessian: a linear model of 5 inputs
    with the mean squared error over 64 samples (batches of 16), and its inputs x and targets y. ``benchmarks/``
    must be on ``sys.path`` (the ``load_script`` fixture puts it there)."""
    from peers_problems import Problem

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(5, 1, generator=generator, dtype=torch.float64) + 0.1 * torch.randn(
        64, 1, generator=generator, dtype=torch.float64
    )

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(5, 1).double()

    problem = Problem(
        name="linear",
        title="linear least squares",
        make_model=make_model,
        make_loss=lambda model: nn.MSELoss(),
        reduction=None,
        train=(x, y),
        test=(x, y),
        metric_name="mse",
        metric=lambda model, data: 0.0,
        higher_is_better=False,
        accumulator_batch=16,
        budget=200.0,
        adam_lrs=(),
        adam_batch=8,
        calibration_rounds=1,
    )
    return problem, x, y


def least_squares_optimum(x: torch.Tensor, y: torch.Tensor) -> float:
    """The least mean squared error of an affine model of x for y."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    return float(((design @ solution - y) ** 2).mean())
