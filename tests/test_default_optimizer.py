"""fit's ``preconditioner``: which H₀ the SCG it builds gets (moller_scg.default_optimizer), that each choice trains
exactly as the SCG built by hand, resumes bit-identically, and that what it cannot serve is refused by name."""

from __future__ import annotations

import pytest
import torch
from problems import regression_problem
from torch import nn
from torch.nn import functional

from moller_scg import SCG, KroneckerFactors, fit
from moller_scg.default_optimizer import default_optimizer, kronecker_loss, training_inputs


def classifier_problem(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A 5-6-3 tanh classifier (float64) and 60 samples of 3 classes that a linear rule separates, noisily."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    labels = (x[:, :3] + 0.3 * torch.randn(60, 3, generator=generator, dtype=torch.float64)).argmax(dim=1)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double(), (x, labels)


def quiet_fit(model, loss_fn, data, **options):
    options.setdefault("max_iter", 25)
    return fit(model, loss_fn, data, progress=False, batch_size=16, **options)


def dropout_classifier_problem(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The classifier with dropout: its forward draws from torch's global generator, which fit's choice of H₀ must
    leave as it was."""
    model, data = classifier_problem(seed)
    return nn.Sequential(model[0], nn.Dropout(0.2), model[1], model[2]), data


def by_hand(model, data, loss, mode):
    """The SCG a user would build for ``mode``: what fit must build for the same choice."""
    params = list(model.parameters())
    if mode == "kronecker":
        return SCG(params, memory=20, kronecker_factors=KroneckerFactors(model, data[0], loss=loss))
    return SCG(params, memory=20, diagonal_scaling=mode == "diagonal")


@pytest.mark.parametrize(
    ("loss_fn", "expected"),
    [
        (nn.CrossEntropyLoss(), "cross_entropy"),
        (nn.CrossEntropyLoss(reduction="sum"), "cross_entropy"),
        (functional.cross_entropy, "cross_entropy"),
        (nn.MSELoss(), "mse"),
        (functional.mse_loss, "mse"),
        (nn.BCEWithLogitsLoss(), "binary_cross_entropy"),
        (functional.binary_cross_entropy_with_logits, "binary_cross_entropy"),
        (nn.CrossEntropyLoss(weight=torch.ones(3)), None),
        (nn.CrossEntropyLoss(label_smoothing=0.1), None),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(1)), None),
        (nn.L1Loss(), None),
        (nn.BCELoss(), None),  # on probabilities, not logits
        (lambda outputs, targets: functional.mse_loss(outputs, targets) + 0.0, None),
    ],
)
def test_kronecker_loss_names_the_distribution_of_the_losses_the_factors_know(loss_fn, expected):
    assert kronecker_loss(loss_fn) == expected


def test_the_factors_draw_from_the_training_inputs_in_each_form_fit_takes():
    x, y = torch.randn(10, 2), torch.randn(10, 1)
    dataset = torch.utils.data.TensorDataset(x, y)
    assert training_inputs((x, y)) is x
    assert training_inputs([x, y]) is x
    assert training_inputs(dataset) is dataset
    assert training_inputs(torch.utils.data.DataLoader(dataset, batch_size=4)) is dataset


@pytest.mark.parametrize(
    ("problem", "loss_fn", "preconditioner", "built"),
    [
        (classifier_problem, nn.CrossEntropyLoss(), "kronecker", "kronecker"),
        (classifier_problem, nn.CrossEntropyLoss(), "auto", "kronecker"),
        (dropout_classifier_problem, nn.CrossEntropyLoss(), "auto", "kronecker"),
        (classifier_problem, nn.CrossEntropyLoss(), "diagonal", "diagonal"),
        (classifier_problem, nn.CrossEntropyLoss(), "scalar", "scalar"),
        (regression_problem, nn.MSELoss(), "auto", "kronecker"),
        (regression_problem, nn.BCEWithLogitsLoss(), "auto", "diagonal"),  # the autoencoder's loss: lever 71
        (regression_problem, nn.BCEWithLogitsLoss(), "kronecker", "kronecker"),
        (regression_problem, nn.L1Loss(), "auto", "diagonal"),
    ],
)
def test_fit_with_a_preconditioner_trains_exactly_as_the_scg_built_by_hand(problem, loss_fn, preconditioner, built):
    model, data = problem()
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        data = (data[0], (data[1] > 0).double())
    torch.manual_seed(1)  # dropout's draws, the same for both runs
    history = quiet_fit(model, loss_fn, data, preconditioner=preconditioner)

    twin, _ = problem()
    torch.manual_seed(1)
    loss = kronecker_loss(loss_fn)
    reference = quiet_fit(twin, loss_fn, data, optimizer=by_hand(twin, data, loss, built))
    assert history["loss"] == reference["loss"]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    if problem is not dropout_classifier_problem:  # (dropout makes E noisy: that run stalls before 25 iterations)
        assert len(history) == 25 and history["loss"][-1] < history["loss"][0]


def test_auto_chooses_the_diagonal_h0_for_parameters_outside_the_factored_layers():
    model, data = regression_problem()
    model = nn.Sequential(model[0], nn.LayerNorm(8).double(), nn.Tanh(), model[2])
    optimizer = default_optimizer(list(model.parameters()), model, nn.MSELoss(), data, "auto", False)
    assert optimizer.defaults["diagonal_scaling"] and optimizer._kronecker_factors is None
    with pytest.raises(ValueError, match=r"nn.Linear and nn.Conv2d layers only.*1.weight"):
        default_optimizer(list(model.parameters()), model, nn.MSELoss(), data, "kronecker", False)


def test_fit_builds_moller_scg_where_curvature_products_are_asked_for_whatever_h0_is_named():
    model, data = regression_problem()
    for preconditioner in ("scalar", "auto"):
        optimizer = default_optimizer(list(model.parameters()), model, nn.MSELoss(), data, preconditioner, True)
        assert optimizer.defaults["memory"] == 0 and optimizer._kronecker_factors is None


def test_fits_default_is_auto_k_fac_for_the_cross_entropy_of_a_layered_model():
    model, data = classifier_problem()
    history = quiet_fit(model, nn.CrossEntropyLoss(), data)
    twin, _ = classifier_problem()
    reference = quiet_fit(
        twin, nn.CrossEntropyLoss(), data, optimizer=by_hand(twin, data, "cross_entropy", "kronecker")
    )
    assert history["loss"] == reference["loss"]
    scalar_model, _ = classifier_problem()
    assert quiet_fit(scalar_model, nn.CrossEntropyLoss(), data, preconditioner="scalar")["loss"] != history["loss"]


def test_the_default_auto_asks_for_nothing_where_fit_builds_no_secant_mode(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("auto asked KroneckerFactors where fit builds no secant mode")

    monkeypatch.setattr(KroneckerFactors, "__init__", never)
    model, data = regression_problem()
    history = quiet_fit(model, nn.MSELoss(), data, curvature_fraction=0.5, max_iter=5)  # Møller's SCG
    assert len(history) == 5 and history["hvp_calls"][-1] > 0
    given = SCG(model.parameters(), memory=5)
    assert len(quiet_fit(model, nn.MSELoss(), data, optimizer=given, max_iter=3)) == 3


def test_a_dataloader_with_its_own_collate_fn_gets_the_diagonal_h0_from_auto_and_a_refusal_from_kronecker():
    model, (x, y) = classifier_problem()
    dataset = torch.utils.data.TensorDataset(x, y)

    def scaled(items):  # the training sees inputs the dataset's items are not: the factors must not draw them
        inputs, labels = torch.utils.data.default_collate(items)
        return 2.0 * inputs, labels

    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=scaled)
    params = list(model.parameters())
    optimizer = default_optimizer(params, model, nn.CrossEntropyLoss(), loader, "auto", False)
    assert optimizer.defaults["diagonal_scaling"] and optimizer._kronecker_factors is None
    with pytest.raises(ValueError, match="collate_fn of its own"):
        default_optimizer(params, model, nn.CrossEntropyLoss(), loader, "kronecker", False)
    assert len(quiet_fit(model, nn.CrossEntropyLoss(), loader, max_iter=3)) == 3


def test_auto_chooses_the_diagonal_h0_where_the_factors_cannot_draw_the_inputs():
    model, (x, y) = classifier_problem()

    class KeyedDataset(torch.utils.data.Dataset):
        """Items by key, not by position: a DataLoader with a sampler of keys streams it; the factors' draw by
        position raises KeyError."""

        def __init__(self):
            self.items = {f"sample{i}": (x[i], y[i]) for i in range(len(y))}

        def __len__(self):
            return len(self.items)

        def __getitem__(self, key):
            return self.items[key]

    dataset = KeyedDataset()
    loader = torch.utils.data.DataLoader(dataset, sampler=list(dataset.items), batch_size=16)
    optimizer = default_optimizer(list(model.parameters()), model, nn.CrossEntropyLoss(), loader, "auto", False)
    assert optimizer.defaults["diagonal_scaling"] and optimizer.kronecker_factors is None
    history = quiet_fit(model, nn.CrossEntropyLoss(), loader, max_iter=6)
    assert len(history) == 6 and history["loss"][-1] < history["loss"][0]


def test_a_checkpoint_of_the_scalar_h0_resumed_under_the_default_names_the_preconditioner_to_pass(tmp_path):
    from moller_scg.checkpoint import CheckpointError

    path = tmp_path / "run.pt"
    model, data = classifier_problem()
    quiet_fit(model, nn.CrossEntropyLoss(), data, max_iter=4, preconditioner="scalar", checkpoint=path)
    with pytest.raises(CheckpointError, match="kronecker_factors=none.*preconditioner='scalar'"):
        quiet_fit(model, nn.CrossEntropyLoss(), data, max_iter=8, checkpoint=path, resume=True)
    resumed = quiet_fit(
        model, nn.CrossEntropyLoss(), data, max_iter=8, preconditioner="scalar", checkpoint=path, resume=True
    )
    assert len(resumed) == 8


def test_a_checkpoint_of_the_scalar_h0_resumed_where_auto_picks_the_diagonal_names_the_preconditioner(tmp_path):
    from moller_scg.checkpoint import CheckpointError

    path = tmp_path / "run.pt"
    model, data = regression_problem()
    model = nn.Sequential(model[0], nn.LayerNorm(8).double(), nn.Tanh(), model[2])  # outside the factored layers
    quiet_fit(model, nn.MSELoss(), data, max_iter=4, preconditioner="scalar", checkpoint=path)
    with pytest.raises(CheckpointError, match="diagonal_scaling=False.*preconditioner='scalar'"):
        quiet_fit(model, nn.MSELoss(), data, max_iter=8, checkpoint=path, resume=True)
    assert (
        len(quiet_fit(model, nn.MSELoss(), data, max_iter=8, preconditioner="scalar", checkpoint=path, resume=True))
        == 8
    )


def test_numpy_inputs_reach_the_factors_row_by_row_without_a_second_copy():
    model, (x, y) = classifier_problem()
    inputs = x.float().numpy()  # float32 rows for a float64 model: the accumulator converts its own copy
    optimizer = default_optimizer(
        list(model.parameters()), model, nn.CrossEntropyLoss(), (inputs, y.numpy()), "kronecker", False
    )
    drawn = optimizer.kronecker_factors.inputs
    assert drawn.array is inputs and len(drawn) == len(inputs)
    assert torch.equal(drawn[3], x.float()[3].double()) and drawn[3].dtype == torch.float64


def test_secant_optimizer_refuses_memory_0_by_name():
    from moller_scg.default_optimizer import secant_optimizer

    model, data = regression_problem()
    with pytest.raises(ValueError, match="memory=m must be an int ≥ 1, got 0"):
        secant_optimizer(list(model.parameters()), model, nn.MSELoss(), data, "auto", memory=0)


def test_a_kronecker_run_resumed_from_its_checkpoint_ends_bit_identical(tmp_path):
    path = tmp_path / "run.pt"
    reference_model, data = classifier_problem()
    quiet_fit(reference_model, nn.CrossEntropyLoss(), data, max_iter=24, preconditioner="kronecker")

    model, data = classifier_problem()
    first = quiet_fit(
        model, nn.CrossEntropyLoss(), data, max_iter=11, preconditioner="kronecker", checkpoint=path, checkpoint_every=4
    )
    assert first.stop_reason == "max_iter"
    fresh_model, _ = classifier_problem(seed=99)  # other initial weights: all come from the checkpoint
    resumed = quiet_fit(
        fresh_model, nn.CrossEntropyLoss(), data, max_iter=24, preconditioner="kronecker", checkpoint=path, resume=True
    )
    assert len(resumed) == 24
    for p, q in zip(fresh_model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)


def test_a_preconditioner_fit_cannot_serve_is_refused_by_name_before_any_data_is_touched():
    model, data = regression_problem()
    untouched = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Invalid preconditioner 'kfac'.*'auto'"):
        quiet_fit(model, nn.MSELoss(), data, preconditioner="kfac")
    with pytest.raises(ValueError, match="an optimizer was given"):
        quiet_fit(model, nn.MSELoss(), data, preconditioner="diagonal", optimizer=SCG(model.parameters(), memory=5))
    with pytest.raises(ValueError, match="curvature_fraction < 1 or hvp_method"):
        quiet_fit(model, nn.MSELoss(), data, preconditioner="diagonal", curvature_fraction=0.5)
    with pytest.raises(ValueError, match="curvature_fraction < 1 or hvp_method"):
        quiet_fit(model, nn.MSELoss(), data, preconditioner="kronecker", hvp_method="gauss-newton")
    with pytest.raises(ValueError, match="needs a loss whose distribution.*L1Loss"):
        quiet_fit(model, nn.L1Loss(), data, preconditioner="kronecker")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), untouched))


def test_auto_chooses_the_diagonal_h0_for_a_physics_informed_model_under_the_squared_error():
    from test_kronecker import SecondDerivative

    torch.manual_seed(0)
    model = SecondDerivative()
    x = torch.rand(30, 1, dtype=torch.float64)
    data = (x, (1 - torch.pi**2) * torch.sin(torch.pi * x))
    optimizer = default_optimizer(list(model.parameters()), model, nn.MSELoss(), data, "auto", False)
    assert optimizer.defaults["diagonal_scaling"] and optimizer._kronecker_factors is None
    history = quiet_fit(model, nn.MSELoss(), data, preconditioner="auto", max_iter=5)
    assert history["loss"][-1] < history["loss"][0]


def test_numpy_training_data_gives_the_factors_the_converted_inputs():
    model, (x, y) = regression_problem()
    history = quiet_fit(model, nn.MSELoss(), (x.numpy(), y.numpy()), preconditioner="kronecker", max_iter=8)
    twin, _ = regression_problem()
    reference = quiet_fit(twin, nn.MSELoss(), (x, y), optimizer=by_hand(twin, (x, y), "mse", "kronecker"), max_iter=8)
    assert history["loss"] == reference["loss"]


def test_a_dataloaders_dataset_gives_the_factors_the_same_inputs_as_its_tensors():
    model, (x, y) = classifier_problem()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    history = quiet_fit(model, nn.CrossEntropyLoss(), loader, preconditioner="kronecker", max_iter=8)
    twin, _ = classifier_problem()
    optimizer = by_hand(twin, (x, y), "cross_entropy", "kronecker")
    reference = quiet_fit(twin, nn.CrossEntropyLoss(), loader, optimizer=optimizer, max_iter=8)
    assert history["loss"] == reference["loss"]


def test_auto_leaves_a_factor_too_wide_to_invert_at_each_refresh_to_the_diagonal_h0():
    from moller_scg.default_optimizer import AUTO_FACTOR_WIDTH_MAX

    torch.manual_seed(0)
    classes = AUTO_FACTOR_WIDTH_MAX + 1  # the head's output factor G would be (C × C), formed and inverted whole
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, classes)).double()
    data = (torch.randn(40, 5, dtype=torch.float64), torch.randint(classes, (40,)))
    params = list(model.parameters())
    optimizer = default_optimizer(params, model, nn.CrossEntropyLoss(), data, "auto", False)
    assert optimizer.defaults["diagonal_scaling"] and optimizer.kronecker_factors is None
    narrower = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, AUTO_FACTOR_WIDTH_MAX)).double()
    labels = torch.randint(AUTO_FACTOR_WIDTH_MAX, (40,))
    kept = default_optimizer(
        list(narrower.parameters()), narrower, nn.CrossEntropyLoss(), (data[0], labels), "auto", False
    )
    assert kept.kronecker_factors is not None  # at the bound, K-FAC's H₀
    forced = default_optimizer(params, model, nn.CrossEntropyLoss(), data, "kronecker", False)
    assert forced.kronecker_factors is not None  # named outright, whatever the width


def test_a_forward_that_raises_anything_is_a_refusal_and_auto_chooses_the_diagonal_h0():
    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 3).double()

        def forward(self, x):
            assert x.shape[0] > 8, "this model wants more than 8 samples a batch"
            return self.layer(x)

    torch.manual_seed(0)
    model = Checked()
    data = (torch.randn(40, 5, dtype=torch.float64), torch.randint(3, (40,)))
    params = list(model.parameters())
    factors = KroneckerFactors(model, data[0], loss="cross_entropy")
    assert "AssertionError" in factors.refusal(params)
    optimizer = default_optimizer(params, model, nn.CrossEntropyLoss(), data, "auto", False)
    assert optimizer.defaults["diagonal_scaling"] and optimizer.kronecker_factors is None
