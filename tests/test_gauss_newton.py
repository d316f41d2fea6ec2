"""hvp_method="gauss-newton": the accumulator's product is G v = Jᵀ H_L J v (+ ν v), over the whole dataset."""

from __future__ import annotations

import logging

import pytest
import torch
from problems import regression_problem
from torch import nn
from torch.func import functional_call

from moller_scg import SCG, GradientAccumulator

NU = 0.3


def classification_problem(seed: int = 0, ignored: bool = True):
    """A 4-5-3 tanh network (float64) and 23 samples with class-index targets, one of them ignored (-100)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(23, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=generator)
    if ignored:
        y[3] = -100
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, (x, y)


def multilabel_problem(seed: int = 0):
    """A 4-6-3 tanh network (float64) with three independent binary targets per sample (BCE with logits)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(17, 4, generator=generator, dtype=torch.float64)
    y = (torch.rand(17, 3, generator=generator, dtype=torch.float64) > 0.5).double()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, (x, y)


LOSSES = {
    "mean squared error": (regression_problem, nn.MSELoss),
    "cross-entropy": (lambda: classification_problem(ignored=False), nn.CrossEntropyLoss),
    "class-weighted cross-entropy with an ignored target": (
        classification_problem,
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
    ),
    "binary cross-entropy with logits": (multilabel_problem, nn.BCEWithLogitsLoss),
}


def reference_gauss_newton(model, loss_fn, data, vectors, weight_decay=0.0):
    """Jᵀ H_L J v (+ ν v) with J and H_L as explicit matrices over all the data at once."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    inputs, targets = data

    def outputs_of(*weights):
        return functional_call(model, dict(zip(names, weights)), (inputs,))

    outputs = outputs_of(*params).detach()
    jacobians = torch.autograd.functional.jacobian(outputs_of, tuple(params))
    jacobian = torch.cat([j.reshape(outputs.numel(), -1) for j in jacobians], dim=1)
    loss_hessian = torch.autograd.functional.hessian(lambda y: loss_fn(y, targets), outputs)
    loss_hessian = loss_hessian.reshape(outputs.numel(), outputs.numel())
    flat_v = torch.cat([v.reshape(-1) for v in vectors])
    product = jacobian.T @ (loss_hessian @ (jacobian @ flat_v)) + weight_decay * flat_v
    return [piece.reshape(p.shape) for piece, p in zip(torch.split(product, [p.numel() for p in params]), params)]


def exact_hessian_product(model, loss_fn, data, vectors):
    params = list(model.parameters())
    gradient = torch.autograd.grad(loss_fn(model(data[0]), data[1]), params, create_graph=True)
    return torch.autograd.grad(sum((g * v).sum() for g, v in zip(gradient, vectors)), params)


def flat(vectors):
    return torch.cat([v.reshape(-1) for v in vectors])


@pytest.mark.parametrize("weight_decay", [0.0, NU])
@pytest.mark.parametrize("batch_size", [1, 5, 23])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_the_product_is_the_full_batch_gauss_newton_product(loss_name, batch_size, weight_decay):
    make_problem, make_loss = LOSSES[loss_name]
    model, data = make_problem()
    loss_fn = make_loss()
    generator = torch.Generator().manual_seed(1)
    vectors = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    accumulator = GradientAccumulator(
        model, loss_fn, data, batch_size=batch_size, hvp_method="gauss-newton", weight_decay=weight_decay
    )
    want = reference_gauss_newton(model, loss_fn, data, vectors, weight_decay)
    got = accumulator.hvp(vectors)
    assert accumulator.hvp_method == "gauss-newton"
    for g, w, p in zip(got, want, model.parameters()):
        assert g.shape == p.shape
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-14)
    # and it is not the exact product: the network's own second derivatives are left out
    exact = exact_hessian_product(model, loss_fn, data, vectors)
    assert not torch.allclose(flat(got), flat(exact) + weight_decay * flat(vectors), rtol=1e-6)


@pytest.mark.parametrize("loss_name", ["mean squared error", "cross-entropy"])
def test_on_a_linear_model_it_is_the_exact_hessian_product(loss_name):
    make_loss = LOSSES[loss_name][1]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(19, 4, generator=generator, dtype=torch.float64)
    y = (
        torch.randn(19, 3, generator=generator, dtype=torch.float64)
        if loss_name == "mean squared error"
        else (torch.randint(0, 3, (19,), generator=generator))
    )
    torch.manual_seed(2)
    model = nn.Linear(4, 3).double()
    vectors = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    gauss_newton = GradientAccumulator(model, make_loss(), (x, y), batch_size=6, hvp_method="gauss-newton")
    exact = GradientAccumulator(model, make_loss(), (x, y), batch_size=6)
    for g, e in zip(gauss_newton.hvp(vectors), exact.hvp(vectors)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def matrix_of(accumulator, params):
    """The accumulator's curvature matrix, column by column from its products with the basis vectors."""
    sizes = [p.numel() for p in params]
    columns = []
    for column in torch.eye(sum(sizes), dtype=torch.float64):
        pieces = [piece.reshape(p.shape) for piece, p in zip(torch.split(column, sizes), params)]
        columns.append(flat(accumulator.hvp(pieces)))
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("loss_name", ["mean squared error", "cross-entropy"])
def test_it_is_positive_semi_definite_where_the_hessian_is_not(loss_name):
    make_problem, make_loss = LOSSES[loss_name]
    model, data = make_problem()
    with torch.no_grad():  # larger weights: saturated units give the Hessian negative eigenvalues
        for p in model.parameters():
            p.mul_(3.0)
    params = list(model.parameters())
    exact = matrix_of(GradientAccumulator(model, make_loss(), data, batch_size=7), params)
    gauss_newton = matrix_of(
        GradientAccumulator(model, make_loss(), data, batch_size=7, hvp_method="gauss-newton"), params
    )
    torch.testing.assert_close(gauss_newton, gauss_newton.T, rtol=1e-10, atol=1e-13)
    assert float(torch.linalg.eigvalsh(exact).min()) < -1e-3  # the Hessian has directions of negative curvature
    assert float(torch.linalg.eigvalsh(gauss_newton).min()) > -1e-12  # the Gauss–Newton matrix has none


def test_a_subsampled_product_takes_the_same_samples_as_the_exact_one():
    """On a linear model G = E'', so the two methods agree sample for sample: the subsets are the same."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(40, 2, generator=generator, dtype=torch.float64)
    torch.manual_seed(4)
    model = nn.Linear(3, 2).double()
    options = {"batch_size": 8, "curvature_fraction": 0.25, "curvature_seed": 5}
    gauss_newton = GradientAccumulator(model, nn.MSELoss(), (x, y), hvp_method="gauss-newton", **options)
    exact = GradientAccumulator(model, nn.MSELoss(), (x, y), **options)
    full = GradientAccumulator(model, nn.MSELoss(), (x, y), batch_size=8)
    vectors = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    for _ in range(3):  # three rotating windows
        got, want = gauss_newton.hvp(vectors), exact.hvp(vectors)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(flat(got), flat(full.hvp(vectors)))  # a subset, not the whole dataset


def test_scg_on_the_accumulator_follows_scg_on_a_closure_with_the_reference_product():
    """SCG's exact-curvature path asks the objective for s = G p: same trajectory as with the explicit G."""
    model, data = classification_problem()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    twin = classification_problem()[0]
    accumulator = GradientAccumulator(model, loss_fn, data, batch_size=5, hvp_method="gauss-newton", weight_decay=NU)

    class ReferenceClosure:
        def __call__(self):
            params = list(twin.parameters())
            loss = loss_fn(twin(data[0]), data[1]) + 0.5 * NU * sum((p * p).sum() for p in params)
            gradients = torch.autograd.grad(loss, params)
            for p, g in zip(params, gradients):
                p.grad = g
            return loss.detach()

        def hvp(self, vectors):
            return reference_gauss_newton(twin, loss_fn, data, vectors, NU)

    reference_closure = ReferenceClosure()
    initial_loss = float(accumulator.loss())
    ours, theirs = SCG(model.parameters()), SCG(twin.parameters())
    for _ in range(12):
        loss = ours.step(accumulator)
        reference_loss = theirs.step(reference_closure)
        assert float(loss) == pytest.approx(float(reference_loss), rel=1e-10)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    assert float(accumulator.loss()) < initial_loss


def test_complex_parameters_are_refused():
    model = nn.Linear(3, 2, dtype=torch.complex128)
    data = (torch.randn(5, 3, dtype=torch.complex128), torch.randn(5, 2, dtype=torch.complex128))
    with pytest.raises(ValueError, match="gauss-newton' supports real parameters only"):
        GradientAccumulator(
            model, lambda y, t: (y - t).abs().square().mean(), data, reduction="mean", hvp_method="gauss-newton"
        )


class NoForwardMode(torch.autograd.Function):
    """tanh without a forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        return grad_output * (1 - y * y)


class NoForwardModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1).double()

    def forward(self, x):
        return NoForwardMode.apply(self.layer(x))


def test_a_model_without_a_forward_mode_derivative_is_a_clear_error():
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    model = NoForwardModeNet()
    accumulator = GradientAccumulator(model, nn.MSELoss(), (x, y), hvp_method="gauss-newton")
    vectors = [torch.ones_like(p) for p in model.parameters()]
    with pytest.raises(
        RuntimeError, match="that forward failed \\(NotImplementedError: .*use hvp_method='double-backward'"
    ):
        accumulator.hvp(vectors)
    assert accumulator.hvp_method == "gauss-newton"  # no silent switch to another matrix


class OutOfMemoryInCurvature(nn.Module):
    """Stands in for a GPU model whose curvature pass (a dual forward: values and tangents) does not fit in memory:
    once ``tight`` is set, its forward raises as CUDA's allocator would."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1).double()
        self.tight = False

    def forward(self, x):
        if self.tight:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.linear(x)


@pytest.mark.parametrize("hvp_method", ["gauss-newton", "forward-over-reverse"])
def test_an_out_of_memory_error_in_forward_mode_stays_one(hvp_method):
    """Not turned into "no forward-mode derivative" (whose advice, double-backward, needs more memory), nor taken
    for a reason to switch forward-over-reverse off for good."""
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    model = OutOfMemoryInCurvature()
    accumulator = GradientAccumulator(model, nn.MSELoss(), (x, y), hvp_method=hvp_method)
    accumulator()  # the first pass, with its checks, fits
    model.tight = True
    with pytest.raises(torch.OutOfMemoryError):
        accumulator.hvp([torch.ones_like(p) for p in model.parameters()])
    assert accumulator.hvp_method == hvp_method


def test_a_loss_without_a_second_derivative_is_named_with_what_to_use_instead():
    torch.manual_seed(0)
    steps, batch, classes, length = 6, 4, 5, 3
    model = nn.Linear(classes, classes).double()
    inputs = torch.randn(batch, steps, classes, dtype=torch.float64)
    targets = torch.randint(1, classes, (batch, length))

    def ctc(outputs, targets):
        log_probs = outputs.log_softmax(-1).transpose(0, 1)
        lengths = torch.full((outputs.shape[0],), steps, dtype=torch.long)
        return nn.functional.ctc_loss(log_probs, targets, lengths, torch.full_like(lengths, length))

    accumulator = GradientAccumulator(model, ctc, (inputs, targets), hvp_method="gauss-newton", reduction="mean")
    with pytest.raises(
        RuntimeError,
        match=r"Gauss–Newton curvature failed: the loss has no second derivative.*"
        r"hvp='finite-difference'",
    ):
        accumulator.hvp([torch.ones_like(p) for p in model.parameters()])


def test_a_loss_linear_in_the_outputs_is_warned_about(caplog):
    model, data = classification_problem(ignored=False)
    log_model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    accumulator = GradientAccumulator(log_model, nn.NLLLoss(), data, batch_size=5, hvp_method="gauss-newton")
    vectors = [torch.ones_like(p) for p in log_model.parameters()]
    with caplog.at_level(logging.WARNING, logger="moller_scg.batch_derivatives"):
        products = accumulator.hvp(vectors)
        accumulator.hvp(vectors)
    assert "the Gauss–Newton matrix is 0" in caplog.text and "CrossEntropyLoss" in caplog.text
    assert caplog.text.count("the Gauss–Newton matrix is 0") == 1  # once per accumulator, not per batch
    assert all(not p.any() for p in products)
    caplog.clear()
    GradientAccumulator(model, nn.CrossEntropyLoss(), data, hvp_method="gauss-newton").hvp(vectors)
    assert "Gauss–Newton matrix is 0" not in caplog.text


def test_the_repr_names_the_method():
    model, data = regression_problem()
    accumulator = GradientAccumulator(model, nn.MSELoss(), data, hvp_method="gauss-newton")
    assert "hvp_method='gauss-newton'" in repr(accumulator)


def test_fit_with_gauss_newton_runs_moller_scg_on_the_gauss_newton_accumulator():
    from moller_scg import fit

    model, data = classification_problem()
    twin = classification_problem()[0]
    loss_fn = nn.CrossEntropyLoss()
    history = fit(model, loss_fn, data, batch_size=5, max_iter=6, progress=False, hvp_method="gauss-newton")
    accumulator = GradientAccumulator(twin, loss_fn, data, batch_size=5, hvp_method="gauss-newton")
    optimizer = SCG(twin.parameters())  # Møller's SCG: it asks the accumulator for each product
    losses = [float(optimizer.step(accumulator)) for _ in range(6)]
    assert optimizer.trace.hvp_calls > 0
    assert len(history) == 6
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert history["loss"][-1] < losses[0]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"hvp_method": "newton"}, "Invalid hvp_method 'newton'"),
        ({"hvp_method": "gauss-newton", "optimizer": "secant"}, "this SCG does not ask for them"),
        ({"hvp_method": "gauss-newton", "optimizer": "lbfgs"}, "this LBFGS does not ask for them"),
    ],
)
def test_fit_refuses_a_curvature_method_nobody_asks_for(options, match):
    from moller_scg import fit

    model, data = regression_problem()
    optimizers = {
        "secant": lambda: SCG(model.parameters(), memory=5),
        "lbfgs": lambda: torch.optim.LBFGS(model.parameters()),
    }
    if "optimizer" in options:
        options = {**options, "optimizer": optimizers[options["optimizer"]]()}
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(model, nn.MSELoss(), data, max_iter=2, progress=False, **options)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_cli_passes_gauss_newton_to_the_main_job(monkeypatch):
    from moller_scg import mnist
    from moller_scg.cli import main

    seen = {}

    def fake_train_mnist(**options):
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr(mnist, "train_mnist", fake_train_mnist)
    main(["mnist", "--quiet", "--memory", "0", "--gauss-newton"])
    assert seen["hvp_method"] == "gauss-newton" and seen["memory"] == 0
    main(["mnist", "--quiet", "--memory", "0"])
    assert seen["hvp_method"] == "double-backward"


def test_the_cli_refuses_gauss_newton_without_exact_curvature(capsys):
    from moller_scg.cli import main

    status = main(["mnist", "--quiet", "--max-train", "20", "--max-iter", "1", "--gauss-newton"])
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("moller-scg mnist: --gauss-newton") and "--memory 0" in error


def test_the_main_job_trains_with_gauss_newton_curvature(capsys):
    from moller_scg.cli import main

    status = main(["mnist", "--quiet", "--max-train", "300", "--max-iter", "4", "--memory", "0", "--gauss-newton"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "iterations     4" in output


def test_a_first_batch_without_targets_is_not_taken_for_a_loss_without_curvature(caplog):
    """Every target of the first batch ignored: H_L = 0 there, but not on the others; no warning."""
    model, (x, y) = classification_problem(ignored=False)
    y = y.clone()
    y[:5] = -100
    accumulator = GradientAccumulator(model, nn.CrossEntropyLoss(), (x, y), batch_size=5, hvp_method="gauss-newton")
    with caplog.at_level(logging.WARNING, logger="moller_scg.batch_derivatives"):
        accumulator.hvp([torch.ones_like(p) for p in model.parameters()])
    assert "Gauss–Newton matrix is 0" not in caplog.text


def test_kl_divergence_on_log_probabilities_is_warned_about(caplog):
    model, (x, _) = multilabel_problem()
    log_model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    targets = torch.softmax(torch.randn(17, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 1)
    loss_fn = nn.KLDivLoss(reduction="batchmean")
    accumulator = GradientAccumulator(log_model, loss_fn, (x, targets), batch_size=6, hvp_method="gauss-newton")
    with caplog.at_level(logging.WARNING, logger="moller_scg.batch_derivatives"):
        accumulator.hvp([torch.ones_like(p) for p in log_model.parameters()])
    assert "KLDivLoss" in caplog.text and "the Gauss–Newton matrix is 0" in caplog.text


def test_a_model_that_returns_a_tuple_is_a_type_error():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2).double()

        def forward(self, x):
            y = self.layer(x)
            return y, y

    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    model = TwoHeads()
    loss_fn = lambda outputs, targets: nn.functional.mse_loss(outputs[0], targets)  # noqa: E731
    accumulator = GradientAccumulator(model, loss_fn, (x, y), reduction="mean", hvp_method="gauss-newton")
    with pytest.raises(TypeError, match="needs a model that returns one tensor .* got tuple"):
        accumulator.hvp([torch.ones_like(p) for p in model.parameters()])


@pytest.mark.filterwarnings("ignore::moller_scg.StochasticObjectiveWarning")
def test_training_mode_batch_norm_runs_once_per_batch_as_in_an_exact_product():
    """One forward per batch: a training-mode batch norm's statistics move as in a double-backward pass, and the
    product is the Gauss–Newton product of that forward (the batch statistics are part of the model's function)."""
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)

    def make_model():
        torch.manual_seed(6)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()

    gauss_newton_model, exact_model = make_model(), make_model()
    vectors = [torch.randn_like(p) for p in gauss_newton_model.parameters()]
    gauss_newton = GradientAccumulator(
        gauss_newton_model, nn.MSELoss(), (x, y), batch_size=20, hvp_method="gauss-newton"
    )
    exact = GradientAccumulator(exact_model, nn.MSELoss(), (x, y), batch_size=20)
    got = gauss_newton.hvp(vectors)
    exact.hvp(vectors)
    for a, b in zip(gauss_newton_model.buffers(), exact_model.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(gauss_newton_model[1].num_batches_tracked) == 1
    reference_model = make_model()  # the reference's forward in training mode: the same batch statistics
    want = reference_gauss_newton(reference_model, nn.MSELoss(), (x, y), vectors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-14)


@pytest.mark.filterwarnings("ignore::moller_scg.StochasticObjectiveWarning")
def test_with_dropout_the_product_stays_positive_semi_definite():
    """One forward per batch, so Jᵀ and J share the dropout mask: vᵀ G v ≥ 0 on every call."""
    torch.manual_seed(7)
    x, y = torch.randn(1, 2, dtype=torch.float64), torch.randn(1, 1, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Dropout(0.5), nn.Linear(2, 1)).double()
    accumulator = GradientAccumulator(model, nn.MSELoss(), (x, y), hvp_method="gauss-newton")
    v = [torch.randn_like(p) for p in model.parameters()]
    curvatures = [float(flat(v) @ flat(accumulator.hvp(v))) for _ in range(100)]
    assert min(curvatures) >= 0 and max(curvatures) > 0


def test_float32_models_get_float32_products_close_to_the_float64_ones():
    model, data = classification_problem(ignored=False)
    vectors = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(8), dtype=p.dtype) for p in model.parameters()
    ]
    want = GradientAccumulator(model, nn.CrossEntropyLoss(), data, batch_size=5, hvp_method="gauss-newton").hvp(vectors)
    single = classification_problem(ignored=False)[0].float()
    inputs = data[0].float()
    got = GradientAccumulator(
        single, nn.CrossEntropyLoss(), (inputs, data[1]), batch_size=5, hvp_method="gauss-newton"
    ).hvp([v.float() for v in vectors])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def test_fit_with_forward_over_reverse_runs_moller_scg_on_its_products(monkeypatch):
    from moller_scg import fit

    model, data = regression_problem()
    calls = []
    original = GradientAccumulator.hvp

    def counting(self, vectors):
        calls.append(self.hvp_method)
        return original(self, vectors)

    monkeypatch.setattr(GradientAccumulator, "hvp", counting)
    fit(model, nn.MSELoss(), data, max_iter=3, progress=False, hvp_method="forward-over-reverse")
    assert calls  # the default optimizer asked for the products the method forms


def test_a_model_whose_outputs_no_parameter_reaches_gets_a_zero_product_as_with_exact_products():
    class Ignores(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return x * 2.0

    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    model = Ignores()
    vectors = [torch.ones_like(model.unused)]
    for method in ("gauss-newton", "double-backward"):
        (product,) = GradientAccumulator(model, nn.MSELoss(), (x, y), hvp_method=method).hvp(vectors)
        assert torch.equal(product, torch.zeros(2, dtype=torch.float64))
