"""benchmarks/levers_variants.py: the flat research copy of SCG(memory=m) and the rule variants raced for passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moller_scg import SCG

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from levers_variants import FlatSCG  # noqa: E402


class CountingClosure:
    """E(w) = mean squared error of a small tanh MLP, float64; counts gradient passes."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(64, 2, generator=generator, dtype=torch.float64)
        self.y = torch.sin(3 * self.x[:, :1]) * self.x[:, 1:]
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        self.passes = 0

    def __call__(self) -> torch.Tensor:
        self.passes += 1
        self.model.zero_grad()
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        return loss.detach()


def test_flat_default_is_the_library_mode():
    library, flat = CountingClosure(), CountingClosure()
    scg = SCG(library.model.parameters(), memory=5)
    variant = FlatSCG(list(flat.model.parameters()), memory=5)
    for _ in range(25):
        scg.step(library)
        variant.step(flat)
        assert variant.loss == pytest.approx(scg.trace.loss, rel=1e-9)
    assert flat.passes == library.passes


@pytest.mark.parametrize(
    "options",
    [
        {"first_step": "scaled"},
        {"gamma_window": 5},
        {"gamma_window": 5, "first_step": "scaled", "retry": "interpolate-raise"},
        {"retry": "interpolate"},
        {"gamma_pick": "bb1"},
        {"growth": 2.0},
    ],
)
def test_variants_never_accept_a_higher_loss(options):
    closure = CountingClosure(seed=1)
    variant = FlatSCG(list(closure.model.parameters()), memory=5, **options)
    losses = [variant.step(closure) for _ in range(60)]
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_scaled_first_step_takes_no_curvature_pass():
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=5, first_step="scaled")
    variant.step(closure)
    assert closure.passes == 2  # E(w₁) and the trial; Møller's σ would add E'(w₁ + σp₁)


def test_gamma_max_uses_the_largest_ratio_of_the_window():
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=5, gamma_window=5)
    for _ in range(8):
        variant.step(closure)
    pairs = variant.pairs
    ratios = [pairs.sy[i, i] / pairs.yy[i, i] for i in pairs.slots]
    assert len(ratios) >= 2 and max(ratios) > ratios[-1]
    assert pairs.gamma == pytest.approx(max(ratios))
