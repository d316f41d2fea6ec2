"""Problems shared by several test modules, as plain functions (importable by a test and by the scripts a test runs
in a subprocess); ``conftest.py`` offers the common ones as fixtures."""

from __future__ import annotations

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


def rosenbrock(w: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's function of a vector w: Σᵢ 100 (wᵢ₊₁ − wᵢ²)² + (1 − wᵢ)², least 0 at w = (1, …, 1)."""
    return torch.sum(100 * (w[1:] - w[:-1] ** 2) ** 2 + (1 - w[:-1]) ** 2)
