"""Loss checks: a loss that is not additive over samples, or that broadcasts mismatched shapes, is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from moller_scg.accumulate import GradientAccumulator
from moller_scg.loss_checks import ELEMENTWISE_LOSSES, check_same_shape, is_elementwise_loss, stochastic_modules

SAMPLES, FEATURES = 40, 3
PENALTY = 0.5


def regression_problem(outputs: int = 1) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randn(SAMPLES, outputs, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Linear(FEATURES, outputs).double(), inputs, targets


class PenalisedSum(nn.MSELoss):
    """A sum-reduced MSE plus a penalty added once per call: counted once per batch by the accumulator."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(reduction="sum")
        self.model = model

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        penalty = sum((p**2).sum() for p in self.model.parameters())
        return super().forward(outputs, targets) + PENALTY * penalty


class PenalisedMean(PenalisedSum):
    """The same penalty on a mean-reduced MSE: E_b = mean_b + P, so Σ_b (n_b / N) E_b = mean + P exactly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.reduction = "mean"


class SumThatSaysMean(nn.Module):
    reduction = "mean"

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets, reduction="sum")


# ------------------------------------------------------------------------------------------------------------------
# Additivity


@pytest.mark.parametrize("batch_size", [1, 8, SAMPLES])
def test_penalty_per_call_in_a_sum_loss_is_refused_whatever_the_batch_size(batch_size):
    model, inputs, targets = regression_problem()
    acc = GradientAccumulator(model, PenalisedSum(model), (inputs, targets), batch_size=batch_size)
    with pytest.raises(ValueError, match=r"neither a sum nor a mean.*depend on batch_size.*n_b / N"):
        acc()
    assert all(p.grad is None for p in model.parameters())


def test_the_refused_penalty_really_makes_the_loss_depend_on_the_batch_size():
    model, inputs, targets = regression_problem()
    loss_fn = PenalisedSum(model)
    with torch.no_grad():
        whole = float(loss_fn(model(inputs), targets))
        in_four_batches = sum(float(loss_fn(model(x), t)) for x, t in zip(inputs.split(10), targets.split(10)))
        penalty = PENALTY * float(sum((p**2).sum() for p in model.parameters()))
    assert in_four_batches - whole == pytest.approx(3 * penalty, rel=1e-12)  # counted once per batch


def test_penalty_per_call_in_a_mean_loss_is_additive_and_accepted():
    model, inputs, targets = regression_problem()
    loss_fn = PenalisedMean(model)
    losses = [float(GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=size)()) for size in (7, SAMPLES)]
    with torch.no_grad():
        reference = float(loss_fn(model(inputs), targets))
    assert losses == pytest.approx([reference, reference], rel=1e-12)


def test_declared_reduction_that_contradicts_the_loss_names_the_attribute():
    model, inputs, targets = regression_problem()
    acc = GradientAccumulator(model, SumThatSaysMean(), (inputs, targets), batch_size=8)
    with pytest.raises(ValueError, match=r"loss_fn.reduction is 'mean', but loss_fn behaves like reduction='sum'"):
        acc.loss()


def test_penalty_is_refused_with_a_dataloader_too():
    model, inputs, targets = regression_problem()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=8)
    acc = GradientAccumulator(model, PenalisedSum(model), loader)
    with pytest.raises(ValueError, match="neither a sum nor a mean"):
        acc.loss()


def test_additivity_is_checked_once_per_accumulator_on_a_few_samples():
    model, inputs, targets = regression_problem()
    seen = []

    class CountingMSE(nn.MSELoss):
        def forward(self, outputs, targets):
            seen.append(targets.shape[0])
            return super().forward(outputs, targets)

    acc = GradientAccumulator(model, CountingMSE(), (inputs, targets), batch_size=SAMPLES)
    acc()
    assert seen == [8, 4, 4, SAMPLES]  # the check (whole and halves), then the pass's one batch
    acc()
    acc.loss()
    assert seen == [8, 4, 4, SAMPLES, SAMPLES, SAMPLES]


# ------------------------------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize(
    "loss_cls", [nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss]
)
def test_broadcasting_targets_are_refused_naming_both_shapes(loss_cls):
    model, inputs, targets = regression_problem()
    model = nn.Sequential(model, nn.Sigmoid())  # outputs in (0, 1), as BCELoss needs
    acc = GradientAccumulator(model, loss_cls(), (inputs, targets.squeeze(1).clamp(0, 1)), batch_size=16)
    with pytest.raises(ValueError, match=r"outputs have shape \(8, 1\) but the targets have shape \(8,\).*\(8, 8\)"):
        acc()
    assert all(p.grad is None for p in model.parameters())


def test_shapes_that_do_not_broadcast_are_refused_too():
    with pytest.raises(ValueError, match=r"shape \(4, 2\) but the targets have shape \(4, 3\).*L1Loss compares"):
        check_same_shape(nn.L1Loss(), torch.zeros(4, 2), torch.zeros(4, 3))


def test_every_listed_elementwise_loss_is_recognised_but_a_subclass_with_its_own_forward_is_trusted():
    assert all(is_elementwise_loss(cls()) for cls in ELEMENTWISE_LOSSES)

    class ReshapingMSE(nn.MSELoss):
        def forward(self, outputs, targets):
            return super().forward(outputs, targets.view_as(outputs))

    assert not is_elementwise_loss(ReshapingMSE())
    assert not is_elementwise_loss(nn.CrossEntropyLoss()) and not is_elementwise_loss(F.mse_loss)
    model, inputs, targets = regression_problem()
    acc = GradientAccumulator(model, ReshapingMSE(), (inputs, targets.squeeze(1)), batch_size=16)
    with torch.no_grad():
        expected = F.mse_loss(model(inputs), targets)
    assert float(acc()) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda outputs, targets: F.mse_loss(outputs, targets) + torch.tensor(0.01, dtype=torch.float64),
        lambda outputs, targets: F.mse_loss(outputs, targets).double(),
    ],
    ids=["float64-penalty", "double"],
)
def test_a_float32_models_mean_loss_returned_in_float64_is_accepted(loss_fn):
    """It carries float32's rounding: the check's tolerance is the least precise dtype's, not the result's."""
    for seed in range(20):
        torch.manual_seed(seed)
        inputs, targets = torch.randn(64, 10), torch.randn(64, 1)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
        GradientAccumulator(model, loss_fn, (inputs, targets), reduction="mean")()


@pytest.mark.parametrize(
    "module",
    [nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True), nn.GRU(3, 4, num_layers=2, dropout=0.5), nn.RReLU()],
    ids=["lstm-dropout", "gru-dropout", "rrelu"],
)
def test_recurrent_dropout_and_rrelu_are_random_in_training_mode(module):
    model = nn.Sequential(module).train()
    assert stochastic_modules(model) == ["0"]
    assert stochastic_modules(model.eval()) == []
    assert stochastic_modules(nn.Sequential(nn.LSTM(3, 4, num_layers=2, dropout=0.0))) == []
