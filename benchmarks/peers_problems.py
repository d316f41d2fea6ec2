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


class TanhThenPoolCNN(MnistCNN):
    """:class:`~moller_scg.models.MnistCNN` in the blog's order, tanh on every output of the convolution and then
    max-pooling, as the CNN computed until 2026-12-06. The same function as ``MnistCNN``, which pools first, in other
    last bits of its gradient; the race keeps this order, and PyTorch's default layout, so that its MNIST problem
    computes what its recorded runs computed (docs/performance.md, lever 58)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(-1, 1, 28, 28)
        x = torch.max_pool2d(torch.tanh(self.conv(x)), 2)
        x = torch.tanh(self.hidden(x.flatten(1)))
        return self.output(x)


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
        return TanhThenPoolCNN()

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


class PoissonResidual(nn.Module):
    """A 2-D Poisson problem −Δu = f as a model for ``GradientAccumulator``: the network u(x, y) is ``net``, and the
    output at a collocation point is the quantity its target is compared with.

    Each input row is (x, y, b) with b = 1 on the boundary: there the output is √β u(x, y) (target √β g, the
    Dirichlet value), inside it is −Δu = −(u_xx + u_yy) (target f), both by autograd with the graph kept, so the
    loss's gradient and Hessian-vector products reach through the second derivatives. Every output depends on its own
    row only, so the mean squared error is a per-sample mean and streams exactly in batches.
    """

    def __init__(self, net: nn.Module, boundary_weight: float) -> None:
        super().__init__()
        self.net = net
        self.boundary_scale = math.sqrt(boundary_weight)  # √β

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        on_boundary = points[:, 2:] > 0.5
        with torch.enable_grad():  # also inside a loss-only pass: Δu needs derivatives with respect to x, y
            xy = points[:, :2].detach().requires_grad_(True)
            u = self.net(xy)
            (du,) = torch.autograd.grad(u.sum(), xy, create_graph=True)
            u_xx = torch.autograd.grad(du[:, 0].sum(), xy, create_graph=True)[0][:, :1]
            u_yy = torch.autograd.grad(du[:, 1].sum(), xy, create_graph=True)[0][:, 1:]
        return torch.where(on_boundary, self.boundary_scale * u, -(u_xx + u_yy))


def _poisson_solution(xy: torch.Tensor) -> torch.Tensor:
    """u(x, y) = sin(πx) sin(πy) on [0, 1]²: zero on the boundary, and −Δu = 2π² u = f."""
    return torch.sin(math.pi * xy[:, :1]) * torch.sin(math.pi * xy[:, 1:2])


def _boundary_points(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` points spread uniformly over the four edges of the unit square."""
    t = torch.rand(count, generator=generator, dtype=torch.float64)
    edge = torch.arange(count) % 4
    zeros, ones = torch.zeros(count, dtype=torch.float64), torch.ones(count, dtype=torch.float64)
    x = torch.where(edge == 0, zeros, torch.where(edge == 1, ones, t))
    y = torch.where(edge == 2, zeros, torch.where(edge == 3, ones, t))
    return torch.stack([x, y], dim=1)


def _solution_rmse(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(((model.net(data[0]) - data[1]) ** 2).mean().sqrt())


def pinn_problem(quick: bool, seed: int) -> Problem:
    """A physics-informed network: collocation points are the data set, and the loss holds Δu of the network."""
    generator = torch.Generator().manual_seed(seed)
    interior_count, boundary_count, test_count = (192, 64, 500) if quick else (800, 200, 2000)
    interior = torch.rand(interior_count, 2, generator=generator, dtype=torch.float64)
    boundary = _boundary_points(boundary_count, generator)
    boundary_weight = interior_count / boundary_count  # β: the boundary weighs as much as the interior in E
    points = torch.cat(
        [
            torch.cat([interior, torch.zeros(interior_count, 1, dtype=torch.float64)], dim=1),
            torch.cat([boundary, torch.ones(boundary_count, 1, dtype=torch.float64)], dim=1),
        ]
    )
    targets = torch.cat(
        [2 * math.pi**2 * _poisson_solution(interior), torch.zeros(boundary_count, 1, dtype=torch.float64)]
    )
    order = torch.randperm(len(points), generator=generator)  # boundary points in every batch
    test_xy = torch.rand(test_count, 2, generator=generator, dtype=torch.float64)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(2, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 1)).double()
        return PoissonResidual(net, boundary_weight)

    return Problem(
        name="pinn",
        title=f"physics-informed net (tanh MLP 2-20-20-1 solving -Δu = 2π² sin(πx) sin(πy), u = 0 on the boundary "
        f"of [0, 1]^2; loss = mean of (-Δu - f)² at {interior_count:,} interior and β u² at {boundary_count:,} "
        f"boundary collocation points, β = {boundary_weight:g}; test: RMSE of u at {test_count:,} points; float64)",
        make_model=make_model,
        make_loss=lambda model: nn.MSELoss(),
        reduction=None,
        train=(points[order], targets[order]),
        test=(test_xy, _poisson_solution(test_xy)),
        metric_name="test RMSE",
        metric=_solution_rmse,
        higher_is_better=False,
        accumulator_batch=len(points),
        budget=60.0 if quick else 500.0,
        adam_lrs=(3e-3,) if quick else (1e-3, 3e-3, 1e-2),
        adam_batch=32,
        calibration_rounds=10 if quick else 30,
        seed=seed,
    )


def _reconstruction_mse(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((torch.sigmoid(model(data[0])) - data[1]).square().mean())


AUTOENCODER_WIDTHS = (784, 256, 64, 16, 64, 256, 784)
"""The deep autoencoder's layers: tanh units, a linear 16-unit code, logistic (sigmoid) pixel outputs."""


def autoencoder_problem(quick: bool, seed: int) -> Problem:
    """The classic Hessian-free benchmark (Hinton & Salakhutdinov 2006; Martens 2010), scaled down: a deep
    autoencoder of MNIST digits with a cross-entropy reconstruction loss."""
    from moller_scg.data import load_embedded_mnist

    train_subset, test_subset, budget = (256, 200, 12.0) if quick else (1000, 1000, 100.0)
    splits = load_embedded_mnist(seed=seed, max_train=train_subset)
    train_images = splits.train[0].reshape(len(splits.train[0]), -1)
    test_images = splits.test[0][:test_subset].reshape(test_subset, -1)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        code = AUTOENCODER_WIDTHS.index(min(AUTOENCODER_WIDTHS))
        for index, (width_in, width_out) in enumerate(zip(AUTOENCODER_WIDTHS, AUTOENCODER_WIDTHS[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index + 1 not in (code, len(AUTOENCODER_WIDTHS) - 1):  # linear code; logits out (sigmoid in the loss)
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)

    return Problem(
        name="autoencoder",
        title=f"deep autoencoder ({'-'.join(map(str, AUTOENCODER_WIDTHS))}, tanh, linear code, sigmoid outputs, "
        f"pixel cross-entropy; embedded MNIST: {train_subset:,} training images, test: reconstruction MSE on "
        f"{test_subset:,} test images; float32)",
        make_model=make_model,
        make_loss=lambda model: nn.BCEWithLogitsLoss(),
        reduction=None,
        train=(train_images, train_images),
        test=(test_images, test_images),
        metric_name="test MSE",
        metric=_reconstruction_mse,
        higher_is_better=False,
        accumulator_batch=256,
        budget=budget,
        adam_lrs=(1e-3,) if quick else (3e-4, 1e-3, 3e-3),
        adam_batch=64,
        calibration_rounds=2 if quick else 3,
        seed=seed,
    )


PROBLEMS = {
    "mnist": mnist_problem,
    "regression": regression_problem,
    "logistic": logistic_problem,
    "pinn": pinn_problem,
    "autoencoder": autoencoder_problem,
}


def make_accumulator(
    problem: Problem,
    model: nn.Module,
    hvp_method: str = "double-backward",
    curvature_fraction: float = 1.0,
    accumulator_type: type[GradientAccumulator] = GradientAccumulator,
) -> GradientAccumulator:
    """The problem's accumulator over its training data (``accumulator_type``: a subclass, e.g. a timed one)."""
    return accumulator_type(
        model,
        problem.make_loss(model),
        problem.train,
        batch_size=problem.accumulator_batch,
        reduction=problem.reduction,
        hvp_method=hvp_method,
        curvature_fraction=curvature_fraction,
    )
