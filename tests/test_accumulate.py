"""GradientAccumulator: streamed sums equal the loss on the whole dataset at once, and bad input says why.

The reference beside the fast path is always plain autograd on the whole dataset at once, in float64: the loss,
its gradient and its Hessian-vector product by double-backward.
"""

from __future__ import annotations

import copy
import doctest
import logging
import math
import re
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SubsetRandomSampler, TensorDataset

import moller_scg.accumulate as accumulate
from moller_scg import SCG, batches
from moller_scg._vectors import as_real
from moller_scg.accumulate import GradientAccumulator, StochasticObjectiveWarning

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 130  # uneven for batch sizes 7 (18 × 7 + 4) and 64 (2 × 64 + 2)
FEATURES, CLASSES, OUTPUTS = 5, 3, 2
EXACT = 1e-12  # relative tolerance in float64 (the issue's)
TRAJECTORY = 1e-10  # relative tolerance of a 20-iteration SCG run in float64 (the issue's)
FUNCTORCH_WARNING = "ignore:`torch.jit.script` is deprecated:FutureWarning"  # torch.func's own, on first jvp


# ------------------------------------------------------------------------------------------------------------------
# Data, models and the full-batch reference


def regression_data(samples: int = SAMPLES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randn(samples, OUTPUTS, generator=generator, dtype=torch.float64)
    return inputs, targets


def classification_data(samples: int = SAMPLES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, CLASSES, (samples,), generator=generator)
    return inputs, targets


def tanh_mlp(outputs: int, seed: int = 0, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).double()


def random_vectors(params: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


def full_batch(model, loss_fn, inputs, targets, vectors, params=None):
    """E, E' and E''v on the whole dataset at once: the reference."""
    params = list(model.parameters()) if params is None else params
    loss = loss_fn(model(inputs), targets)
    gradients = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    gradients = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gradients)]
    directional = sum(torch.sum(as_real(g) * as_real(v)) for g, v in zip(gradients, vectors))
    products = torch.autograd.grad(directional, params, allow_unused=True)
    products = [torch.zeros_like(p) if s is None else s for p, s in zip(params, products)]
    return loss.detach(), [g.detach() for g in gradients], [s.detach() for s in products]


def relative_error(actual, expected) -> float:
    if isinstance(actual, torch.Tensor) and actual.dim() == 0:
        actual, expected = [actual], [expected]
    a = torch.cat([as_real(x).flatten().double() for x in actual])
    e = torch.cat([as_real(x).flatten().double() for x in expected])
    return float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e))


def grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params]


def assert_matches_full_batch(acc, model, loss_fn, inputs, targets, params=None):
    params = list(model.parameters()) if params is None else params
    vectors = random_vectors(params)
    loss, gradient, product = full_batch(model, loss_fn, inputs, targets, vectors, params)
    assert relative_error(acc(), loss) <= EXACT
    assert relative_error(grads(params), gradient) <= EXACT
    assert relative_error(acc.hvp(vectors), product) <= EXACT
    assert relative_error(acc.loss(), loss) <= EXACT


# ------------------------------------------------------------------------------------------------------------------
# Exactness: the same numbers as the whole dataset at once


@pytest.mark.parametrize("hvp_method", ["double-backward", "forward-over-reverse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", ["mse", "cross-entropy"])
@pytest.mark.parametrize("batch_size", [1, 7, 64, SAMPLES])
@pytest.mark.filterwarnings(FUNCTORCH_WARNING)
def test_loss_gradient_and_hvp_equal_the_whole_dataset_at_once(batch_size, problem, reduction, hvp_method):
    if problem == "mse":
        (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss(reduction=reduction)
    else:
        (inputs, targets), model = classification_data(), tanh_mlp(CLASSES)
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=batch_size, hvp_method=hvp_method)
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)


@pytest.mark.filterwarnings(FUNCTORCH_WARNING)
def test_forward_over_reverse_is_used_when_torch_func_supports_the_model():
    (inputs, targets), model, loss_fn = classification_data(), tanh_mlp(CLASSES), nn.CrossEntropyLoss()
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7, hvp_method="forward-over-reverse")
    calls = []
    original = accumulate.functional_hvp_and_loss

    def counting(*args):
        calls.append(1)
        return original(*args)

    accumulate.functional_hvp_and_loss = counting
    try:
        acc.hvp(random_vectors(acc.params))
    finally:
        accumulate.functional_hvp_and_loss = original
    assert len(calls) == acc.num_batches and acc.hvp_method == "forward-over-reverse"


@pytest.mark.parametrize("batch_size", [7, 64])
@pytest.mark.parametrize("loss_fn", [nn.SmoothL1Loss(), nn.BCEWithLogitsLoss()], ids=["smooth-l1", "bce"])
@pytest.mark.filterwarnings(FUNCTORCH_WARNING)
def test_forward_over_reverse_weights_mean_losses_by_batch_size(loss_fn, batch_size):
    """Mean losses that torch.func supports (F.mse_loss's mean is not: pytorch/pytorch#123996)."""
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS)
    targets = torch.sigmoid(targets)
    acc = GradientAccumulator(
        model, loss_fn, (inputs, targets), batch_size=batch_size, hvp_method="forward-over-reverse"
    )
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)
    assert acc.hvp_method == "forward-over-reverse"  # no fallback happened


def test_forward_over_reverse_falls_back_to_double_backward_when_torch_func_fails(monkeypatch, caplog):
    def unsupported(*args):
        raise RuntimeError("ZeroTensors are immutable")

    monkeypatch.setattr(accumulate, "functional_hvp_and_loss", unsupported)
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7, hvp_method="forward-over-reverse")
    with caplog.at_level(logging.WARNING, logger="moller_scg.accumulate"):
        assert_matches_full_batch(acc, model, loss_fn, inputs, targets)
    assert acc.hvp_method == "double-backward"
    assert "forward-over-reverse' failed on the first batch (RuntimeError: ZeroTensors are immutable)" in caplog.text


def test_averaging_batch_means_is_measurably_wrong_here():
    """The data above would catch the usual bug: the mean of batch means differs from E far beyond EXACT."""
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    with torch.no_grad():
        batch_means = [loss_fn(model(inputs[i : i + 64]), targets[i : i + 64]) for i in range(0, SAMPLES, 64)]
        full = loss_fn(model(inputs), targets)
    assert relative_error(torch.stack(batch_means).mean(), full) > 1e3 * EXACT


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize(
    "make_loss",
    [
        lambda w: nn.CrossEntropyLoss(weight=w),
        lambda w: nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1),
        lambda w: nn.CrossEntropyLoss(ignore_index=2),
    ],
    ids=["class-weights", "weights-ignore-smoothing", "ignore-index"],
)
def test_cross_entropy_with_class_weights_and_ignored_targets_is_exact(batch_size, make_loss):
    (inputs, targets), model = classification_data(), tanh_mlp(CLASSES)
    loss_fn = make_loss(torch.tensor([0.2, 1.0, 3.5], dtype=torch.float64))
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=batch_size)
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)


def test_class_weights_with_uint8_class_targets_are_exact():
    # torch's cross-entropy takes uint8 class indices; indexing the class weights with them as a mask would not.
    (inputs, targets), model = classification_data(), tanh_mlp(CLASSES)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.5], dtype=torch.float64))
    small_targets = targets.to(torch.uint8)
    acc = GradientAccumulator(model, loss_fn, (inputs, small_targets), batch_size=7)
    assert_matches_full_batch(acc, model, loss_fn, inputs, small_targets)


def test_a_curvature_subset_whose_targets_are_all_ignored_is_named_as_the_subset():
    # 2 samples a subset, 1 target in 4 labelled: the dataset's mean is fine, a subset of two ignored targets' is 0/0.
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.full((40,), -100)
    y[::4] = torch.randint(0, 3, (10,))
    model = nn.Linear(3, 3)
    acc = GradientAccumulator(model, nn.CrossEntropyLoss(), (x, y), batch_size=8, curvature_fraction=0.05)
    assert math.isfinite(float(acc()))
    vectors = [torch.ones_like(p) for p in model.parameters()]
    named = "in this Hessian-vector product's curvature subset .* raise curvature_fraction"
    with pytest.raises(ValueError, match=named):
        for _ in range(20):  # rotating subsets of 2 samples: some hold no labelled one
            acc.hvp(vectors)


def test_nll_loss_with_class_weights_and_ignore_index_is_exact():
    (inputs, targets), model = classification_data(), nn.Sequential(tanh_mlp(CLASSES), nn.LogSoftmax(dim=1))
    loss_fn = nn.NLLLoss(weight=torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64), ignore_index=0)
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7)
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)


def test_cross_entropy_with_class_probability_targets_is_exact():
    inputs, _ = classification_data()
    probabilities = torch.softmax(torch.randn(SAMPLES, CLASSES, dtype=torch.float64), dim=1)
    model, loss_fn = tanh_mlp(CLASSES), nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.5], dtype=torch.float64))
    acc = GradientAccumulator(model, loss_fn, (inputs, probabilities), batch_size=64)
    assert_matches_full_batch(acc, model, loss_fn, inputs, probabilities)


def test_kl_divergence_with_batchmean_is_exact():
    inputs, _ = classification_data()
    probabilities = torch.softmax(torch.randn(SAMPLES, CLASSES, dtype=torch.float64), dim=1)
    model = nn.Sequential(tanh_mlp(CLASSES), nn.LogSoftmax(dim=1))
    loss_fn = nn.KLDivLoss(reduction="batchmean")
    acc = GradientAccumulator(model, loss_fn, (inputs, probabilities), batch_size=64)
    assert_matches_full_batch(acc, model, loss_fn, inputs, probabilities)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_callable_with_explicit_reduction_is_exact(reduction):
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS)

    def loss_fn(outputs, targets):
        return F.smooth_l1_loss(outputs, targets, reduction=reduction)

    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7, reduction=reduction)
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)


def test_complex_parameters_get_the_exact_gradient_and_hvp():
    class ComplexModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(OUTPUTS, FEATURES, dtype=torch.complex128))

        def forward(self, x):
            return torch.abs(x.to(torch.complex128) @ self.weight.T) ** 2

    torch.manual_seed(0)
    (inputs, targets), model, loss_fn = regression_data(), ComplexModel(), nn.MSELoss()
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7)
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)
    assert model.weight.grad.dtype == torch.complex128


@pytest.mark.parametrize("hvp_method", ["double-backward", "gauss-newton"])
def test_a_channels_last_cnn_gets_the_loss_gradient_and_curvature_of_the_contiguous_one(hvp_method):
    """The main job lays its CNN out as channels_last: the same E, E' and E''v (or G v) in other last bits."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()
    images, labels = torch.randn(20, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (20,))
    vectors = [torch.randn_like(p) for p in cnn.parameters()]
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = copy.deepcopy(cnn).to(memory_format=memory_format)
        acc = GradientAccumulator(model, nn.CrossEntropyLoss(), (images, labels), batch_size=6, hvp_method=hvp_method)
        loss = acc()
        gradients = [p.grad.clone() for p in model.parameters()]
        results.append((loss, gradients, acc.hvp(vectors)))
    assert not model[0].weight.is_contiguous()  # the channels_last model really is laid out otherwise
    (loss, gradients, products), (cl_loss, cl_gradients, cl_products) = results
    torch.testing.assert_close(cl_loss, loss, rtol=1e-12, atol=0.0)
    for expected, actual in zip(gradients + products, cl_gradients + cl_products):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-13)
    assert max(float(p.abs().max()) for p in products) > 1e-3  # products that could differ


def test_sums_do_not_drift_with_the_number_of_batches_in_float32():
    """4096 one-sample batches of a float32 model: E and E' within one float32 rounding of the exact sums.

    A hand-written loop that lets ``backward()`` add each batch into the float32 ``.grad`` drifts ~10× further.
    """
    samples = 4096
    generator = torch.Generator().manual_seed(0)
    inputs = (1 + torch.rand(samples, 1, generator=generator, dtype=torch.float64)).float()
    targets = torch.zeros(samples, 1)
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 + 2**-10)
    loss_fn = nn.MSELoss(reduction="sum")
    exact_model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        exact_model.weight.copy_(model.weight)
    exact_loss = loss_fn(exact_model(inputs.double()), targets.double())  # the float32 data, summed in float64
    (exact_gradient,) = torch.autograd.grad(exact_loss, exact_model.weight)

    model.zero_grad()
    for i in range(samples):
        loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]).backward()
    assert relative_error([model.weight.grad], [exact_gradient]) > 5e-7  # the drift this test would catch

    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=1)
    assert relative_error(acc(), exact_loss.detach()) <= 1e-8
    assert model.weight.grad.dtype == torch.float32
    assert relative_error([model.weight.grad], [exact_gradient]) <= 1e-7


@pytest.mark.parametrize("batch_size, partial_sum_batches", [(1, 8), (7, 8), (64, 8), (SAMPLES, 8), (1, 1), (7, 3)])
def test_float32_model_matches_the_float64_reference_to_float32_precision(batch_size, partial_sum_batches, monkeypatch):
    """Partial sums in float32 over blocks of batches (and the last, incomplete block) lose nothing visible."""
    monkeypatch.setattr(accumulate, "PARTIAL_SUM_BATCHES", partial_sum_batches)
    inputs, targets = classification_data()
    model32, model64, loss_fn = tanh_mlp(CLASSES).float(), tanh_mlp(CLASSES), nn.CrossEntropyLoss()
    vectors = random_vectors(list(model64.parameters()))
    loss, gradient, product = full_batch(model64, loss_fn, inputs, targets, vectors)
    acc = GradientAccumulator(model32, loss_fn, (inputs.float(), targets), batch_size=batch_size)
    assert relative_error(acc(), loss) <= 1e-6
    assert relative_error(grads(acc.params), gradient) <= 1e-6
    assert relative_error(acc.hvp([v.float() for v in vectors]), product) <= 1e-5


@pytest.mark.parametrize("batch_size, partial_sum_batches", [(512, 8), (256, 8), (256, 1), (64, 8)])
def test_a_float16_models_mean_gradient_does_not_overflow_in_its_partial_sums(
    batch_size, partial_sum_batches, monkeypatch
):
    """E' = 400 fits float16 easily, but a batch's n_b · E_b' (up to 204,800) does not: the partial sums are float32."""
    monkeypatch.setattr(accumulate, "PARTIAL_SUM_BATCHES", partial_sum_batches)
    samples = 512
    inputs = torch.full((samples, 1), 10.0, dtype=torch.float16)
    targets = torch.full((samples, 1), -10.0, dtype=torch.float16)
    model = nn.Linear(1, 1).half()
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    acc = GradientAccumulator(model, nn.MSELoss(), (inputs, targets), batch_size=batch_size)
    assert float(acc()) == 400.0  # (w x + b − y)² = 20²
    assert model.weight.grad.dtype == torch.float16
    assert float(model.weight.grad) == 400.0 and float(model.bias.grad) == 40.0  # 2 · 20 · x, 2 · 20


# ------------------------------------------------------------------------------------------------------------------
# What a pass returns and what it leaves behind


@pytest.mark.parametrize("hvp_method", ["double-backward", "gauss-newton"])
def test_no_tensor_a_batch_saved_for_backward_outlives_its_batch(hvp_method):
    """Memory bounded by one batch: when a batch's forward pass starts, no tensor that autograd saved in an earlier
    batch is alive (an HVP pass's batch loss once held its forward graph into the next batch)."""

    class Saved:
        def __init__(self, tensor: torch.Tensor, batch: int) -> None:
            self.tensor, self.batch = tensor, batch

    saved: list = []
    batch = [-1]
    carried_over: list[list[tuple[int, ...]]] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch[0] += 1
            alive = (ref() for ref in saved)
            carried_over.append([tuple(s.tensor.shape) for s in alive if s is not None and s.batch < batch[0]])
            return x

    def pack(tensor: torch.Tensor) -> Saved:
        holder = Saved(tensor, batch[0])
        saved.append(weakref.ref(holder))
        return holder

    (inputs, targets), classifier = classification_data(), tanh_mlp(CLASSES)
    model = nn.Sequential(Probe(), classifier)
    acc = GradientAccumulator(model, nn.CrossEntropyLoss(), (inputs, targets), batch_size=16, hvp_method=hvp_method)
    acc.loss()
    vectors = [torch.randn_like(p) for p in acc.params]
    for evaluate in (acc, lambda: acc.hvp(vectors)):
        saved.clear()
        carried_over.clear()
        batch[0] = -1
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            evaluate()
        assert len(carried_over) > 2 and not any(carried_over)


def test_grad_is_replaced_never_added_to_and_the_old_grad_is_untouched():
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    params = list(model.parameters())
    stale = [torch.full_like(p, 7.0) for p in params]
    for p, g in zip(params, stale):
        p.grad = g
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7)
    acc()
    first = [g.clone() for g in grads(params)]
    acc()
    _, gradient, _ = full_batch(model, loss_fn, inputs, targets, random_vectors(params))
    assert relative_error(grads(params), gradient) <= EXACT  # not doubled by the second call
    assert relative_error(first, gradient) <= EXACT
    assert all(p.grad is not g for p, g in zip(params, stale))
    assert all(bool((g == 7.0).all()) for g in stale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_then_gradient_over_one_batch_defers_the_backward_and_gives_the_same_bits(dtype):
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS).to(dtype)
    acc = GradientAccumulator(model, nn.MSELoss(), (inputs.to(dtype), targets.to(dtype)), batch_size=SAMPLES)
    expected_loss = acc()
    expected = [p.grad.clone() for p in acc.params]
    stale = [torch.full_like(p, 7.0) for p in acc.params]
    for p, g in zip(acc.params, stale):
        p.grad = g
    assert acc.defers_gradient
    loss, gradient = acc.value_then_gradient()
    assert torch.equal(loss, expected_loss)
    assert all(p.grad is g for p, g in zip(acc.params, stale))  # no backward yet
    assert acc.passes == accumulate.PassCounts(gradient=1, loss=1)  # the forward alone counts as a loss pass
    gradients = gradient()
    assert all(torch.equal(g, e) and p.grad is g for p, g, e in zip(acc.params, gradients, expected))
    assert acc.passes == accumulate.PassCounts(gradient=2, loss=0)  # and as a gradient pass once completed
    assert gradient() is gradients and acc.passes.gradient == 2


def test_value_then_gradient_defers_over_a_one_batch_dataloader_with_a_progress_bar():
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=SAMPLES)
    acc = GradientAccumulator(model, nn.MSELoss(), loader, progress=True)
    expected_loss = acc()
    expected = [p.grad.clone() for p in acc.params]
    assert acc.defers_gradient
    loss, gradient = acc.value_then_gradient()
    assert acc.passes == accumulate.PassCounts(gradient=1, loss=1)
    assert torch.equal(loss, expected_loss) and all(torch.equal(g, e) for g, e in zip(gradient(), expected))


def test_value_then_gradient_over_several_batches_is_one_gradient_pass():
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS)
    acc = GradientAccumulator(model, nn.MSELoss(), (inputs, targets), batch_size=7)
    assert not acc.defers_gradient
    loss, gradient = acc.value_then_gradient()  # the graphs of every batch would break the one-batch memory bound
    assert acc.passes == accumulate.PassCounts(gradient=1)
    assert all(p.grad is g for p, g in zip(acc.params, gradient()))
    assert torch.equal(loss, acc()) and acc.passes == accumulate.PassCounts(gradient=2)


def test_scg_rejects_a_trial_on_its_loss_alone_over_one_batch_and_takes_the_same_steps():
    (inputs, targets) = regression_data()

    def run(defer: bool):
        model = tanh_mlp(OUTPUTS, hidden=16)
        acc = GradientAccumulator(model, nn.MSELoss(), (inputs, targets), batch_size=SAMPLES)
        optimizer = SCG(acc.params, hvp="secant", memory=5)
        rejected = 0
        for _ in range(60):
            optimizer.step(acc if defer else lambda: acc())  # a plain closure: the full gradient pass every time
            rejected += not optimizer.trace.success
        return optimizer.trace, acc.passes, rejected, [p.detach().clone() for p in acc.params]

    deferred, full = run(True), run(False)
    assert deferred[0] == full[0] and all(torch.equal(a, b) for a, b in zip(deferred[3], full[3]))
    rejected = deferred[2]
    assert rejected > 0
    assert full[1] == accumulate.PassCounts(gradient=deferred[0].closure_calls)
    assert deferred[1] == accumulate.PassCounts(gradient=deferred[0].closure_calls - rejected, loss=rejected)


def test_a_non_finite_trial_over_one_batch_is_rejected_without_its_gradient_and_never_reaches_the_weights():
    model = nn.Linear(1, 1, bias=False).double()
    nn.init.constant_(model.weight, 0.0)
    x, y = torch.ones(4, 1, dtype=torch.float64), torch.full((4, 1), 10.0, dtype=torch.float64)

    def loss_fn(outputs, targets):  # (w − 10)², not finite beyond w = 2
        return F.mse_loss(outputs, targets) * (math.nan if float(model.weight) > 2 else 1.0)

    acc = GradientAccumulator(model, loss_fn, (x, y), batch_size=4, reduction="mean", on_non_finite="return")
    optimizer = SCG(acc.params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        optimizer.step(acc)
    assert not optimizer.trace.success and math.isnan(optimizer.trace.comparison)
    assert float(model.weight) == 0.0 and model.weight.grad is not None
    # The start is a gradient pass and the curvature along p an HVP pass; the trial was a forward only.
    assert acc.passes == accumulate.PassCounts(gradient=1, hvp=1, loss=1)


def test_parameter_the_loss_does_not_reach_gets_zero_gradient_and_zero_curvature():
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    model.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7)
    acc()
    products = acc.hvp(random_vectors(acc.params))
    unused = next(i for i, p in enumerate(acc.params) if p is model.unused)
    assert model.unused.grad is not None and bool((model.unused.grad == 0).all())
    assert bool((products[unused] == 0).all())
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)


def test_loss_is_a_detached_zero_dim_float64_tensor_for_a_float32_model():
    inputs, targets = regression_data()
    model = tanh_mlp(OUTPUTS).float()
    acc = GradientAccumulator(model, nn.MSELoss(), (inputs.float(), targets.float()), batch_size=7)
    for loss in (acc(), acc.loss()):
        assert loss.dtype == torch.float64 and loss.dim() == 0 and not loss.requires_grad
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(s.dtype == torch.float32 for s in acc.hvp(random_vectors(acc.params)))


def test_loss_pass_runs_without_autograd_and_leaves_grad_alone():
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS)
    grad_modes = []

    def loss_fn(outputs, targets):
        grad_modes.append(torch.is_grad_enabled())
        return F.mse_loss(outputs, targets)

    loss_fn.reduction = "mean"
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=64)
    acc.loss()
    # one call per batch, and the three of the once-per-accumulator additivity check (whole and two halves)
    assert grad_modes == [False] * (acc.num_batches + 3)
    assert all(p.grad is None for p in model.parameters())
    assert acc.passes == accumulate.PassCounts(gradient=0, hvp=0, loss=1)


def batch_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(dim=1) == targets).double().mean()


@pytest.mark.parametrize("batch_size", [1, 7, SAMPLES])
def test_evaluate_gives_the_loss_and_every_metric_from_one_forward_per_batch(batch_size):
    (inputs, targets), model = classification_data(), tanh_mlp(CLASSES)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), ignore_index=1)
    acc = GradientAccumulator(model, nn.CrossEntropyLoss(), (inputs, targets), batch_size=batch_size)
    forwards = []
    handle = model.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        values = acc.evaluate({"accuracy": batch_accuracy, "weighted": weighted})
    finally:
        handle.remove()
    assert len(forwards) == acc.num_batches  # the loss and both metrics share each batch's forward pass
    assert set(values) == {"loss", "accuracy", "weighted"}
    assert values["loss"] == float(acc.loss())
    with torch.no_grad():
        outputs = model(inputs)
    assert values["accuracy"] == pytest.approx(float(batch_accuracy(outputs, targets)), rel=EXACT)
    assert values["weighted"] == pytest.approx(float(weighted(outputs, targets)), rel=EXACT)  # class weights
    assert acc.passes.loss == 2 and all(p.grad is None for p in model.parameters())


def test_evaluate_says_what_is_wrong_with_its_metrics():
    acc = GradientAccumulator(tanh_mlp(CLASSES), nn.CrossEntropyLoss(), classification_data())
    with pytest.raises(ValueError, match="'loss' names the loss itself"):
        acc.evaluate({"loss": batch_accuracy})
    with pytest.raises(TypeError, match="metrics must map names to callables"):
        acc.evaluate([batch_accuracy])
    with pytest.raises(TypeError, match="metrics must map names to callables"):
        acc.evaluate({"accuracy": 0.5})


def test_passes_work_inside_torch_no_grad():
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    params = list(model.parameters())
    vectors = random_vectors(params)
    loss, gradient, product = full_batch(model, loss_fn, inputs, targets, vectors)
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7)
    with torch.no_grad():
        assert relative_error(acc(), loss) <= EXACT
        assert relative_error(acc.hvp(vectors), product) <= EXACT
    assert relative_error(grads(params), gradient) <= EXACT


def test_params_subset_differentiates_only_those_in_their_order():
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    last = model[2]
    subset = [last.bias, last.weight]
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7, params=subset)
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets, params=subset)
    assert model[0].weight.grad is None


# ------------------------------------------------------------------------------------------------------------------
# Data in every accepted form


class PairDataset(Dataset):
    """A map-style Dataset of (input, target) items, collated by the DataLoader the accumulator builds."""

    def __init__(self, inputs, targets) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


@pytest.mark.parametrize(
    "make_data",
    [
        lambda x, y: PairDataset(x, y),
        lambda x, y: TensorDataset(x, y),
        lambda x, y: [x, y],
    ],
    ids=["map-style-dataset", "tensor-dataset", "list-pair"],
)
def test_datasets_give_the_full_batch_result(make_data):
    (inputs, targets), model, loss_fn = classification_data(), tanh_mlp(CLASSES), nn.CrossEntropyLoss()
    acc = GradientAccumulator(model, loss_fn, make_data(inputs, targets), batch_size=7)
    assert acc.num_batches == 19 and acc.samples == SAMPLES
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)


NINE_SAMPLE_BATCHES = [list(range(start, min(start + 9, SAMPLES))) for start in range(0, SAMPLES, 9)]


@pytest.mark.parametrize(
    "make_loader",
    [
        lambda data: DataLoader(data, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(0)),
        lambda data: DataLoader(data, batch_size=64, drop_last=False),
        lambda data: DataLoader(data, batch_sampler=NINE_SAMPLE_BATCHES),
    ],
    ids=["shuffled", "sequential", "custom-batch-sampler"],
)
def test_dataloaders_give_the_full_batch_result(make_loader):
    (inputs, targets), model, loss_fn = classification_data(), tanh_mlp(CLASSES), nn.CrossEntropyLoss()
    acc = GradientAccumulator(model, loss_fn, make_loader(TensorDataset(inputs, targets)))
    assert_matches_full_batch(acc, model, loss_fn, inputs, targets)


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        ([[0, 1, 2], [2, 3, 4], [5, 6, 7], [8]], "yields 1 indices more than once and misses 1 of the dataset's 10"),
        ([[0, 1, 2, 3, 4], [5, 6, 7, 8, 10]], "yields index 10, outside the dataset's 10 samples"),
    ],
)
def test_a_custom_batch_sampler_that_repeats_or_skips_indices_is_refused(batches, match):
    """Its count per pass can still be N: what the per-pass count cannot see is checked on its indices."""
    inputs, targets = torch.randn(10, 3), torch.randn(10, 1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_sampler=batches)
    with pytest.raises(ValueError, match=match):
        GradientAccumulator(nn.Linear(3, 1), nn.MSELoss(), loader)


def test_tensor_data_on_the_device_is_used_in_place_without_copies():
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS)
    acc = GradientAccumulator(model, nn.MSELoss(), (inputs, targets), batch_size=7, device="cpu")
    assert acc.data_cached_on_device
    first_inputs, _ = next(iter(acc._batches))
    assert first_inputs.untyped_storage().data_ptr() == inputs.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------------------------------------------
# With optimizers: SCG in both curvature modes, LBFGS


def scg_run(closure, model, steps: int = 20, **options):
    optimizer = SCG(model.parameters(), **options)
    losses = [float(optimizer.step(closure)) for _ in range(steps)]
    return losses, [p.detach().clone() for p in model.parameters()], optimizer


def full_batch_closure(model, loss_fn, inputs, targets, create_graph):
    def closure():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward(create_graph=create_graph)
        return loss.detach()

    return closure


@pytest.mark.parametrize("hvp", ["double-backward", "finite-difference"])
def test_scg_trajectory_is_the_same_for_every_batch_size(hvp):
    """The blog's Figure 4: 20 SCG iterations do not depend on the batch size (float64)."""
    inputs, targets = classification_data()
    loss_fn = nn.CrossEntropyLoss()
    reference_model = tanh_mlp(CLASSES)
    closure = full_batch_closure(reference_model, loss_fn, inputs, targets, create_graph=hvp == "double-backward")
    reference_losses, reference_weights, reference = scg_run(closure, reference_model, hvp=hvp)
    assert reference.trace.k == 20 and reference_losses[-1] < 0.9 * reference_losses[0]
    # Batch size 1 is covered pass by pass above; 20 iterations of it would take seconds.
    for batch_size in [7, 64, SAMPLES] if hvp == "double-backward" else [7, SAMPLES]:
        model = tanh_mlp(CLASSES)
        acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=batch_size)
        losses, weights, optimizer = scg_run(acc, model, hvp=hvp)
        assert relative_error(torch.tensor(losses), torch.tensor(reference_losses)) <= TRAJECTORY
        assert relative_error(weights, reference_weights) <= TRAJECTORY
        # Every closure call is one gradient pass, every curvature evaluation one HVP pass (or none with FD).
        assert acc.passes.gradient == optimizer.trace.closure_calls
        assert acc.passes.hvp == (optimizer.trace.hvp_calls if hvp == "double-backward" else 0)


def test_scg_first_step_costs_two_gradient_passes_and_one_hvp_pass():
    (inputs, targets), model, loss_fn = classification_data(), tanh_mlp(CLASSES), nn.CrossEntropyLoss()
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=64)
    optimizer = SCG(model.parameters())
    optimizer.step(acc)
    assert acc.passes == accumulate.PassCounts(gradient=2, hvp=1, loss=0)
    assert optimizer.trace.closure_calls == 2 and optimizer.trace.hvp_calls == 1


def test_lbfgs_with_the_accumulator_follows_the_full_batch_trajectory():
    inputs, targets = regression_data()
    loss_fn = nn.MSELoss()
    trajectories = []
    for batch_size in (None, 7):
        model = tanh_mlp(OUTPUTS)
        if batch_size is None:
            closure = full_batch_closure(model, loss_fn, inputs, targets, create_graph=False)
        else:
            closure = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=batch_size)
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=20, history_size=5)
        losses = [float(optimizer.step(closure)) for _ in range(2)]
        trajectories.append((losses, [p.detach().clone() for p in model.parameters()]))
    (reference_losses, reference_weights), (losses, weights) = trajectories
    assert losses[-1] < 0.9 * losses[0]
    assert relative_error(torch.tensor(losses), torch.tensor(reference_losses)) <= TRAJECTORY
    assert relative_error(weights, reference_weights) <= TRAJECTORY


# ------------------------------------------------------------------------------------------------------------------
# Training mode with dropout or batch norm


@pytest.mark.parametrize(
    "layer", [nn.Dropout(0.5), nn.BatchNorm1d(CLASSES, dtype=torch.float64)], ids=["dropout", "batchnorm"]
)
def test_stochastic_training_mode_warns_once_and_says_what_to_do(layer):
    (inputs, targets) = classification_data()
    model = nn.Sequential(tanh_mlp(CLASSES), layer)
    acc = GradientAccumulator(model, nn.CrossEntropyLoss(), (inputs, targets), batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc()
        acc.hvp(random_vectors(acc.params))
        acc.loss()
    stochastic = [w for w in caught if issubclass(w.category, StochasticObjectiveWarning)]
    assert len(stochastic) == 1
    message = str(stochastic[0].message)
    assert "model.eval()" in message and "training mode" in message and "StochasticObjectiveWarning" in message
    assert stochastic[0].filename == __file__  # points at the caller's line


def test_eval_mode_and_inert_dropout_do_not_warn():
    inputs, targets = classification_data()
    model = nn.Sequential(tanh_mlp(CLASSES), nn.BatchNorm1d(CLASSES, dtype=torch.float64), nn.Dropout(0.5)).eval()
    inert = nn.Sequential(tanh_mlp(CLASSES), nn.Dropout(0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StochasticObjectiveWarning)
        for net in (model, inert):
            GradientAccumulator(net, nn.CrossEntropyLoss(), (inputs, targets), batch_size=64)()


# ------------------------------------------------------------------------------------------------------------------
# Progress bar


def test_progress_true_shows_a_tqdm_bar_over_the_batches(capsys):
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS)
    GradientAccumulator(model, nn.MSELoss(), (inputs, targets), batch_size=7, progress=True)()
    err = capsys.readouterr().err
    assert "gradient pass" in err and "/19" in err and "batch" in err


def test_progress_false_prints_nothing(capsys):
    (inputs, targets), model = regression_data(), tanh_mlp(OUTPUTS)
    GradientAccumulator(model, nn.MSELoss(), (inputs, targets), batch_size=7)()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# ------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors that name the problem


def make(data=None, loss_fn=None, model=None, **options):
    inputs, targets = regression_data()
    options.setdefault("batch_size", 7)
    return GradientAccumulator(
        tanh_mlp(OUTPUTS) if model is None else model,
        nn.MSELoss() if loss_fn is None else loss_fn,
        (inputs, targets) if data is None else data,
        **options,
    )


def test_empty_dataset_is_an_error():
    empty = (torch.zeros(0, FEATURES, dtype=torch.float64), torch.zeros(0, OUTPUTS, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        make(empty)
    with pytest.raises(ValueError, match="empty"):
        make(PairDataset(*empty))
    with pytest.raises(ValueError, match="empty"):
        make(DataLoader(TensorDataset(*empty), batch_size=4), batch_size=None)


def test_inputs_and_targets_of_different_lengths_is_an_error():
    inputs, targets = regression_data()
    with pytest.raises(ValueError, match=r"130 inputs .* and 129 targets"):
        make((inputs, targets[:-1]))


def test_non_finite_batch_loss_names_the_first_bad_batch_and_leaves_grad_untouched():
    inputs, targets = regression_data()
    targets = targets.clone()
    targets[17, 0] = float("nan")  # sample 17 is in batch 2 (samples 14–20)
    targets[100, 1] = float("inf")
    acc = make((inputs, targets))
    with pytest.raises(FloatingPointError, match=r"batch 2 \(samples 14–20\) is not finite \(nan\); 2 of 19"):
        acc()
    assert all(p.grad is None for p in acc.params)
    with pytest.raises(FloatingPointError, match="batch 2"):
        acc.hvp(random_vectors(acc.params))
    with pytest.raises(FloatingPointError, match="batch 2"):
        acc.loss()


def test_non_finite_batch_with_on_non_finite_return_logs_and_returns_it(caplog):
    inputs, targets = regression_data()
    targets = targets.clone()
    targets[17, 0] = float("nan")
    acc = make((inputs, targets), on_non_finite="return")
    with caplog.at_level(logging.WARNING, logger="moller_scg.accumulate"):
        loss = acc()
    assert torch.isnan(loss)
    assert "batch 2" in caplog.text


def test_dataloader_that_drops_the_last_batch_is_an_error():
    with pytest.raises(ValueError, match=r"drop_last=True.*4 of 130"):
        make(DataLoader(TensorDataset(*regression_data()), batch_size=7, drop_last=True), batch_size=None)


def test_dataloader_drop_last_that_drops_nothing_is_accepted():
    data = TensorDataset(*regression_data())
    acc = make(DataLoader(data, batch_size=65, drop_last=True), batch_size=None)
    assert acc.num_batches == 2


@pytest.mark.parametrize(
    "sampler, match",
    [
        (SubsetRandomSampler(range(100)), r"yields 100 samples, but the dataset holds 130"),
        (RandomSampler(range(SAMPLES), replacement=True), "with replacement"),
    ],
    ids=["subset", "with-replacement"],
)
def test_dataloader_whose_sampler_does_not_cover_the_dataset_once_is_an_error(sampler, match):
    with pytest.raises(ValueError, match=match):
        make(DataLoader(TensorDataset(*regression_data()), batch_size=7, sampler=sampler), batch_size=None)


def test_sampler_without_length_that_skips_samples_is_caught_during_the_pass():
    class FirstHundred(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(range(100))

    acc = make(DataLoader(TensorDataset(*regression_data()), batch_size=7, sampler=FirstHundred()), batch_size=None)
    with pytest.raises(ValueError, match=r"yielded 100 samples in one pass, but its dataset holds 130"):
        acc()


def test_dataloader_with_a_different_batch_size_argument_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size=8 was given, but the DataLoader has its own batch_size=7"):
        make(DataLoader(TensorDataset(*regression_data()), batch_size=7), batch_size=8)


def test_dataloader_yielding_something_else_than_pairs_is_an_error():
    class Triples(PairDataset):
        def __getitem__(self, index):
            return self.inputs[index], self.targets[index], index

    acc = make(DataLoader(Triples(*regression_data()), batch_size=7), batch_size=None)
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pairs, but batch 0 is list"):
        acc()


def test_iterable_dataset_is_an_error():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(TypeError, match="IterableDataset"):
        make(Stream())
    with pytest.raises(TypeError, match="IterableDataset"):
        make(DataLoader(Stream(), batch_size=7), batch_size=None)


def test_model_without_trainable_parameters_is_an_error():
    model = tanh_mlp(OUTPUTS).requires_grad_(False)
    with pytest.raises(ValueError, match=r"Sequential\) has no trainable parameters"):
        make(model=model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make(model=nn.Tanh())


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "64"])
def test_invalid_batch_size_is_an_error(batch_size):
    with pytest.raises(ValueError, match=re.escape(f"Invalid batch_size {batch_size!r}")):
        make(batch_size=batch_size)


def test_default_batch_size_for_tensors_and_datasets():
    inputs, targets = regression_data(samples=600)
    for data in ((inputs, targets), PairDataset(inputs, targets)):
        acc = make(data, batch_size=None)
        assert accumulate.DEFAULT_BATCH_SIZE == 256 and acc.num_batches == 3  # 256 + 256 + 88


@pytest.mark.parametrize(
    "data, match",
    [
        ("not data", "data must be an"),
        ((torch.zeros(3, 2),), r"\(inputs, targets\) pair of tensors"),
        ((torch.zeros(3, 2), [1, 2, 3]), r"\(inputs, targets\) pair of tensors"),
    ],
)
def test_data_of_the_wrong_kind_is_a_type_error(data, match):
    with pytest.raises(TypeError, match=match):
        make(data)


def test_loss_without_known_reduction_needs_an_explicit_one():
    with pytest.raises(ValueError, match=r"pass reduction='mean' or reduction='sum'"):
        make(loss_fn=lambda outputs, targets: F.mse_loss(outputs, targets))


@pytest.mark.parametrize(
    "loss_fn, reduction, match",
    [
        (nn.MSELoss(reduction="none"), None, "reduction='none' gives per-sample losses"),
        (nn.MSELoss(), "sum", r"reduction='sum' contradicts loss_fn.reduction='mean'"),
        (lambda o, t: F.mse_loss(o, t), "median", "Invalid reduction 'median'"),
    ],
)
def test_unusable_reduction_is_an_error(loss_fn, reduction, match):
    with pytest.raises(ValueError, match=match):
        make(loss_fn=loss_fn, reduction=reduction)


@pytest.mark.parametrize(
    "declared, actual, match",
    [
        ("mean", "sum", "behaves like reduction='sum'"),
        ("sum", "mean", "behaves like reduction='mean'"),
    ],
)
def test_wrong_explicit_reduction_is_caught_on_the_first_pass(declared, actual, match):
    acc = make(loss_fn=lambda o, t: F.mse_loss(o, t, reduction=actual), reduction=declared, batch_size=1)
    with pytest.raises(ValueError, match=match):
        acc()
    assert all(p.grad is None for p in acc.params)


def test_wrong_explicit_reduction_is_caught_with_a_dataloader():
    loader = DataLoader(TensorDataset(*regression_data()), batch_size=7)
    acc = make(loader, loss_fn=lambda o, t: F.mse_loss(o, t, reduction="sum"), reduction="mean", batch_size=None)
    with pytest.raises(ValueError, match="behaves like reduction='sum'"):
        acc.loss()


def test_loss_that_is_not_a_per_sample_sum_or_mean_is_an_error():
    (inputs, targets), model = classification_data(), tanh_mlp(CLASSES)
    weight = torch.tensor([0.2, 1.0, 3.5], dtype=torch.float64)
    acc = GradientAccumulator(
        model, lambda o, t: F.cross_entropy(o, t, weight=weight), (inputs, targets), batch_size=7, reduction="mean"
    )
    with pytest.raises(ValueError, match=r"neither a sum nor a mean of per-sample losses.*nn.CrossEntropyLoss"):
        acc()


def test_loss_returning_per_sample_values_is_an_error():
    acc = make(loss_fn=lambda o, t: ((o - t) ** 2).sum(1), reduction="sum", batch_size=1)
    with pytest.raises(ValueError, match=r"must return a scalar tensor per batch, got \(8,\)"):
        acc()


def test_every_target_ignored_is_an_error():
    inputs, targets = classification_data()
    acc = GradientAccumulator(
        tanh_mlp(CLASSES), nn.CrossEntropyLoss(ignore_index=0), (inputs, torch.zeros_like(targets)), batch_size=7
    )
    with pytest.raises(ValueError, match=r"total class weight is 0.0 .* 0/0"):
        acc()


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"hvp_method": "finite-difference"}, ValueError, "Invalid hvp_method 'finite-difference'"),
        ({"on_non_finite": "ignore"}, ValueError, "Invalid on_non_finite 'ignore'"),
        ({"device_cache_bytes": -1}, ValueError, "Invalid device_cache_bytes -1"),
        ({"progress": "yes"}, TypeError, "progress must be True or False"),
        ({"device": "warp-drive"}, ValueError, "Invalid device 'warp-drive'"),
        ({"params": torch.zeros(2)}, TypeError, "not a single tensor"),
        ({"params": [torch.zeros(2)]}, ValueError, r"params\[0\] must be a tensor that requires grad"),
    ],
)
def test_invalid_options_are_errors(options, error, match):
    with pytest.raises(error, match=match):
        make(**options)


def test_model_and_loss_of_the_wrong_type_are_type_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        make(model=lambda x: x)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        make(loss_fn="mse")


def test_forward_over_reverse_needs_parameters_of_the_model():
    stranger = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="not among model.named_parameters"):
        make(params=[stranger], hvp_method="forward-over-reverse")


def test_hvp_with_vectors_that_do_not_match_the_parameters_is_an_error():
    acc = make()
    vectors = random_vectors(acc.params)
    with pytest.raises(ValueError, match="hvp got 3 vectors for 4 parameters"):
        acc.hvp(vectors[:3])
    with pytest.raises(ValueError, match=r"hvp vector 1 has shape \(3,\), but parameter 1 has \(8,\)"):
        acc.hvp([vectors[0], torch.zeros(3), *vectors[2:]])
    with pytest.raises(TypeError, match="sequence of tensors"):
        acc.hvp(torch.zeros(4))


# ------------------------------------------------------------------------------------------------------------------
# The examples run


def test_docstring_examples_run():
    result = doctest.testmod(accumulate, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_docs_accumulation_snippets_run():
    text = (ROOT / "docs" / "accumulation.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/accumulation.md", "exec"), {})  # noqa: S102 - the docs' own code


def test_a_custom_batch_sampler_is_checked_without_moving_the_random_generators():
    """Its check draws one pass of indices; the passes that train must draw what they would have without it."""

    class Shuffled:
        def __iter__(self):
            order = torch.randperm(10).tolist()
            return iter([order[:4], order[4:8], order[8:]])

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    batches._check_indices_of_a_pass(Shuffled(), 10)  # (a DataLoader draws its workers' base seed at each pass)
    assert torch.equal(torch.rand(3), expected)


def test_a_custom_batch_sampler_of_keys_that_are_not_integers_is_left_to_the_count_of_each_pass():
    class Keyed(torch.utils.data.Dataset):
        def __init__(self):
            self.items = {f"sample-{i}": (torch.randn(3), torch.randn(1)) for i in range(6)}

        def __len__(self):
            return len(self.items)

        def __getitem__(self, key):
            return self.items[key]

    dataset = Keyed()
    keys = list(dataset.items)
    loader = DataLoader(dataset, batch_sampler=[keys[:3], keys[3:]])
    accumulator = GradientAccumulator(nn.Linear(3, 1), nn.MSELoss(), loader)
    assert accumulator.samples == 6
