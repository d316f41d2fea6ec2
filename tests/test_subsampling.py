"""Subsampled curvature (issue #7): E''(w)v over a fraction of the samples, loss and gradient still exact.

The reference for a subsampled product is plain autograd on exactly the chosen samples, in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moller_scg import SCG, GradientAccumulator, fit
from moller_scg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moller_scg.subsampling import CurvatureCursor, CurvatureSubsets, subset_size
from tests.test_accumulate import (
    CLASSES,
    EXACT,
    OUTPUTS,
    SAMPLES,
    PairDataset,
    classification_data,
    full_batch,
    random_vectors,
    regression_data,
    relative_error,
    tanh_mlp,
)

# ------------------------------------------------------------------------------------------------------------------
# Which samples


def test_rotating_windows_cover_every_sample_once_per_cycle_and_are_sorted():
    subsets = CurvatureSubsets(SAMPLES, 0.1, "rotating", seed=3)
    assert subsets.size == 13  # ⌈0.1 · 130⌉
    windows = [subsets.indices(call) for call in range(10)]  # 10 × 13 = 130: one cycle
    assert all(torch.equal(w, torch.sort(w).values) for w in windows)
    assert torch.equal(torch.sort(torch.cat(windows)).values, torch.arange(SAMPLES))
    assert not torch.equal(windows[0], windows[1])
    assert torch.equal(subsets.indices(10), windows[0])  # the cycle repeats


def test_a_window_that_wraps_around_the_permutation_has_m_distinct_samples():
    subsets = CurvatureSubsets(10, 0.3, "rotating")  # m = 3: windows start at 0, 3, 6, 9 (wraps)
    window = subsets.indices(3)
    assert window.numel() == 3 and torch.unique(window).numel() == 3


def test_fixed_subset_is_always_the_same_and_the_seed_decides_it():
    fixed = CurvatureSubsets(SAMPLES, 0.2, "fixed", seed=0)
    assert all(torch.equal(fixed.indices(call), fixed.indices(0)) for call in range(5))
    assert torch.equal(CurvatureSubsets(SAMPLES, 0.2, "fixed", seed=0).indices(0), fixed.indices(0))
    assert not torch.equal(CurvatureSubsets(SAMPLES, 0.2, "fixed", seed=1).indices(0), fixed.indices(0))


def test_subset_size_rounds_up_and_an_empty_shard_has_none():
    assert subset_size(130, 0.1) == 13 and subset_size(131, 0.1) == 14 and subset_size(5, 0.01) == 1
    assert subset_size(0, 0.5) == 0 and subset_size(7, 1.0) == 7
    assert 0.07 * 100 > 7 and subset_size(100, 0.07) == 7  # ⌈f·n⌉ of the decimal f, not of the float product
    assert subset_size(3, 1 / 3) == 1 and subset_size(100, 0.1) == 10
    assert CurvatureSubsets(0, 0.5).indices(4).numel() == 0


@pytest.mark.parametrize("fraction", [0.1, "float32", "float64", "fraction"])
def test_a_numpy_or_fraction_share_is_the_decimal_it_shows(fraction):
    """np.float32(0.1) is 0.10000000149011612 as a float64: its share of 100 samples used to be 11."""
    numpy = pytest.importorskip("numpy")
    from fractions import Fraction

    given = {"float32": numpy.float32(0.1), "float64": numpy.float64(0.1), "fraction": Fraction(1, 10)}.get(
        fraction, fraction
    )
    assert CurvatureSubsets(100, given).size == 10
    assert CurvatureSubsets(3, Fraction(1, 3)).size == 1


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_fraction_is_an_error_that_names_it(fraction):
    with pytest.raises(ValueError, match="curvature_fraction"):
        GradientAccumulator(tanh_mlp(OUTPUTS), nn.MSELoss(), regression_data(), curvature_fraction=fraction)


def test_bad_subset_mode_and_seed_are_errors_that_name_them():
    with pytest.raises(ValueError, match="curvature_subset 'random'"):
        GradientAccumulator(tanh_mlp(OUTPUTS), nn.MSELoss(), regression_data(), curvature_subset="random")
    with pytest.raises(TypeError, match="curvature_seed"):
        GradientAccumulator(tanh_mlp(OUTPUTS), nn.MSELoss(), regression_data(), curvature_seed=0.5)  # even at f = 1


def test_a_dataloader_cannot_be_subsampled_and_the_error_says_what_to_pass():
    inputs, targets = regression_data()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=8)
    with pytest.raises(TypeError, match="loader.dataset"):
        GradientAccumulator(tanh_mlp(OUTPUTS), nn.MSELoss(), loader, curvature_fraction=0.5)


# ------------------------------------------------------------------------------------------------------------------
# What the accumulator returns


def subset_reference(model, loss_fn, inputs, targets, indices, vectors):
    """E''v on exactly the chosen samples, whole subset at once."""
    _, _, product = full_batch(model, loss_fn, inputs[indices], targets[indices], vectors)
    return product


@pytest.mark.parametrize("batch_size", [1, 4, SAMPLES])
@pytest.mark.parametrize("mode", ["rotating", "fixed"])
@pytest.mark.parametrize("problem", ["mse-mean", "cross-entropy", "weighted-cross-entropy"])
def test_subsampled_product_is_the_mean_over_the_chosen_samples(problem, mode, batch_size):
    if problem == "mse-mean":
        (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    else:
        (inputs, targets), model = classification_data(), tanh_mlp(CLASSES)
        weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64) if problem.startswith("weighted") else None
        loss_fn = nn.CrossEntropyLoss(weight=weight)
    acc = GradientAccumulator(
        model, loss_fn, (inputs, targets), batch_size=batch_size, curvature_fraction=0.25, curvature_subset=mode
    )
    chooser = CurvatureSubsets(SAMPLES, 0.25, mode, seed=0)
    vectors = random_vectors(acc.params)
    for call in range(3):
        expected = subset_reference(model, loss_fn, inputs, targets, chooser.indices(call), vectors)
        assert relative_error(acc.hvp(vectors), expected) <= EXACT
    assert acc.curvature_window == (3 if mode == "rotating" else 1)
    assert acc.passes.hvp == 3


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_forward_over_reverse_products_are_subsampled_alike():
    (inputs, targets), model, loss_fn = classification_data(), tanh_mlp(CLASSES), nn.CrossEntropyLoss()
    acc = GradientAccumulator(
        model, loss_fn, (inputs, targets), batch_size=8, curvature_fraction=0.25, hvp_method="forward-over-reverse"
    )
    vectors = random_vectors(acc.params)
    expected = subset_reference(model, loss_fn, inputs, targets, CurvatureSubsets(SAMPLES, 0.25).indices(0), vectors)
    assert relative_error(acc.hvp(vectors), expected) <= EXACT
    assert acc.hvp_method == "forward-over-reverse"  # torch.func handled it: no fallback to double-backward


def test_a_sum_is_scaled_by_n_over_m_so_it_estimates_the_full_sum():
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss(reduction="sum")
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7, curvature_fraction=0.1)
    vectors = random_vectors(acc.params)
    indices = CurvatureSubsets(SAMPLES, 0.1).indices(0)
    expected = [SAMPLES / 13 * s for s in subset_reference(model, loss_fn, inputs, targets, indices, vectors)]
    assert relative_error(acc.hvp(vectors), expected) <= EXACT


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rotating_windows_of_one_cycle_average_to_the_exact_product(reduction):
    inputs, targets = regression_data(samples=120)
    model, loss_fn = tanh_mlp(OUTPUTS), nn.MSELoss(reduction=reduction)
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=16, curvature_fraction=0.25)
    vectors = random_vectors(acc.params)
    windows = [acc.hvp(vectors) for _ in range(4)]  # m = 30 divides n = 120: the 4 windows partition the data
    average = [sum(products) / 4 for products in zip(*windows)]
    _, _, exact = full_batch(model, loss_fn, inputs, targets, vectors)
    assert relative_error(average, exact) <= EXACT


def test_loss_and_gradient_stay_exact_and_a_fraction_of_one_is_the_exact_product():
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    exact = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7)
    subsampled = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7, curvature_fraction=0.3)
    whole = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=7, curvature_fraction=1.0)
    vectors = random_vectors(exact.params)
    loss = exact()
    gradient = [p.grad.clone() for p in exact.params]
    assert torch.equal(subsampled(), loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(exact.params, gradient))
    assert torch.equal(subsampled.loss(), exact.loss())
    assert all(torch.equal(a, b) for a, b in zip(whole.hvp(vectors), exact.hvp(vectors)))
    assert not all(torch.equal(a, b) for a, b in zip(subsampled.hvp(vectors), exact.hvp(vectors)))


def test_a_map_style_dataset_gives_the_same_subsampled_product_as_tensors():
    (inputs, targets), model, loss_fn = classification_data(), tanh_mlp(CLASSES), nn.CrossEntropyLoss()
    vectors = random_vectors(list(model.parameters()))
    from_tensors = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=5, curvature_fraction=0.2)
    from_dataset = GradientAccumulator(
        model, loss_fn, PairDataset(inputs, targets), batch_size=5, curvature_fraction=0.2
    )
    for _ in range(2):
        assert relative_error(from_dataset.hvp(vectors), from_tensors.hvp(vectors)) <= EXACT


def test_repr_names_the_subsampling():
    acc = GradientAccumulator(tanh_mlp(OUTPUTS), nn.MSELoss(), regression_data(), curvature_fraction=0.5)
    assert "fraction=0.5" in repr(acc) and "rotating" in repr(acc)


# ------------------------------------------------------------------------------------------------------------------
# SCG on a subsampled curvature


def scg_losses(fraction: float, steps: int = 40) -> list[float]:
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=32, curvature_fraction=fraction)
    optimizer = SCG(acc.params)
    return [float(optimizer.step(acc)) for _ in range(steps)]


def test_scg_with_subsampled_curvature_never_accepts_a_worse_point_and_is_deterministic():
    losses = scg_losses(0.2)
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))  # Δ ≥ 0 uses the exact loss
    assert losses[-1] < 0.9 * losses[0]
    assert scg_losses(0.2) == losses
    assert scg_losses(0.2) != scg_losses(1.0)


def test_fit_resumes_a_subsampled_run_bitwise_from_its_checkpoint(tmp_path):
    inputs, targets = regression_data()

    def run(max_iter: int, resume: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = tanh_mlp(OUTPUTS)
        history = fit(
            model,
            nn.MSELoss(),
            (inputs, targets),
            batch_size=32,
            max_iter=max_iter,
            curvature_fraction=0.2,
            checkpoint=tmp_path / "run.pt",
            checkpoint_every=1,
            resume=resume,
            progress=False,
        )
        return history["loss"], model.state_dict()

    uninterrupted, final = run(12, resume=False)
    (tmp_path / "run.pt").unlink()
    run(5, resume=False)
    resumed, resumed_final = run(12, resume=True)
    assert resumed == uninterrupted
    assert all(torch.equal(final[name], resumed_final[name]) for name in final)


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda params: SCG(params, hvp="finite-difference"), lambda params: torch.optim.LBFGS(params)],
    ids=["scg-finite-difference", "lbfgs"],
)
def test_fit_refuses_a_curvature_fraction_its_optimizer_would_never_use(make_optimizer):
    model = tanh_mlp(OUTPUTS)
    with pytest.raises(ValueError, match="curvature_fraction=0.5 subsamples"):
        fit(
            model,
            nn.MSELoss(),
            regression_data(),
            optimizer=make_optimizer(model.parameters()),
            max_iter=1,
            curvature_fraction=0.5,
            progress=False,
        )


def test_a_non_finite_batch_of_a_curvature_subset_is_named_as_such():
    inputs, targets = regression_data()
    inputs = inputs.clone()
    inputs[:, 0] = float("nan")  # every sample: whichever the subset holds
    acc = GradientAccumulator(tanh_mlp(OUTPUTS), nn.MSELoss(), (inputs, targets), batch_size=8, curvature_fraction=0.1)
    with pytest.raises(FloatingPointError, match="curvature subset"):
        acc.hvp(random_vectors(acc.params))


# ------------------------------------------------------------------------------------------------------------------
# The cursor: which window comes next, saved by its own state_dict


def test_curvature_cursor_state_dict_round_trips_and_refuses_bad_windows():
    cursor = CurvatureCursor()
    assert [cursor.take(), cursor.take()] == [0, 1]
    assert cursor.state_dict() == {"window": 2}
    restored = CurvatureCursor()
    restored.load_state_dict(cursor.state_dict())
    assert restored.take() == 2
    for bad in ({"window": -1}, {"window": True}, {"window": 1.5}, {"position": 1}, 3):
        with pytest.raises(ValueError, match="window"):
            restored.load_state_dict(bad)
    assert restored.window == 3  # a refused state leaves the cursor where it was


def test_curvature_window_attribute_moves_the_cursor_and_the_next_product_takes_that_window():
    (inputs, targets), model, loss_fn = regression_data(), tanh_mlp(OUTPUTS), nn.MSELoss()
    acc = GradientAccumulator(model, loss_fn, (inputs, targets), batch_size=16, curvature_fraction=0.25)
    acc.curvature_window = 5
    assert acc.curvature_cursor.state_dict() == {"window": 5}
    vectors = random_vectors(acc.params)
    expected = subset_reference(model, loss_fn, inputs, targets, CurvatureSubsets(SAMPLES, 0.25).indices(5), vectors)
    assert relative_error(acc.hvp(vectors), expected) <= EXACT
    assert acc.curvature_window == 6
    with pytest.raises(ValueError, match="-1"):
        acc.curvature_window = -1


def test_fit_checkpoints_the_cursor_state_dict_and_resumes_an_int_window_of_older_checkpoints(tmp_path):
    inputs, targets = regression_data()
    path = tmp_path / "run.pt"

    def run(max_iter: int, resume: bool) -> list[float]:
        history = fit(
            tanh_mlp(OUTPUTS),
            nn.MSELoss(),
            (inputs, targets),
            batch_size=32,
            max_iter=max_iter,
            curvature_fraction=0.2,
            checkpoint=path,
            checkpoint_every=1,
            resume=resume,
            overwrite=not resume,
            progress=False,
        )
        return history["loss"]

    uninterrupted = run(8, resume=False)
    run(4, resume=False)
    state = load_checkpoint(path)
    saved = state["extra"]["curvature_window"]
    assert set(saved) == {"window"} and saved["window"] >= 4  # one rotating window per HVP, at least one a step
    state["extra"]["curvature_window"] = saved["window"]  # the plain int that checkpoints held before
    save_checkpoint(path, state)
    assert run(8, resume=True) == uninterrupted  # the same windows, so the same losses

    state = load_checkpoint(path)
    state["extra"]["curvature_window"] = {"window": -3}
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="curvature_window"):
        run(9, resume=True)


def test_fit_refuses_the_optimizer_before_it_builds_an_accumulator():
    model = tanh_mlp(OUTPUTS)
    loader = DataLoader(TensorDataset(*regression_data()), batch_size=16)  # an accumulator would refuse it with f < 1
    with pytest.raises(ValueError, match="curvature_fraction=0.5 subsamples"):
        fit(
            model,
            nn.MSELoss(),
            loader,
            optimizer=torch.optim.LBFGS(model.parameters()),
            max_iter=1,
            curvature_fraction=0.5,
            progress=False,
        )


def test_fit_passes_curvature_subset_and_seed_to_its_accumulator():
    def losses(subset: str, seed: int) -> list[float]:
        history = fit(
            tanh_mlp(OUTPUTS),
            nn.MSELoss(),
            regression_data(),
            batch_size=32,
            max_iter=6,
            curvature_fraction=0.2,
            curvature_subset=subset,
            curvature_seed=seed,
            progress=False,
        )
        return history["loss"]

    fixed = losses("fixed", 3)
    assert fixed == losses("fixed", 3)  # deterministic
    assert fixed != losses("fixed", 4)  # the seed picks the subset
    assert fixed != losses("rotating", 3)  # the mode is used
    with pytest.raises(ValueError, match="curvature_subset 'random'"):
        losses("random", 3)
    with pytest.raises(TypeError, match="curvature_seed"):
        losses("fixed", 0.5)  # type: ignore[arg-type]
