"""benchmarks/levers_variants.py: the flat research copy of SCG(memory=m) and the rule variants raced for passes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moller_scg import SCG

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from levers_variants import DiagonalPairs, FlatSCG, LayerwisePairs, NystromPairs, SecantDiagonalPairs  # noqa: E402

from moller_scg.quasi_newton import SecantPairs  # noqa: E402


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

    def hvp(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """E''(w)v by double-backward; counted in ``hvps``."""
        self.hvps = getattr(self, "hvps", 0) + 1
        params = list(self.model.parameters())
        with torch.enable_grad():
            loss = nn.functional.mse_loss(self.model(self.x), self.y)
            gradients = torch.autograd.grad(loss, params, create_graph=True)
            products = torch.autograd.grad(gradients, params, vectors)
        return [product.detach() for product in products]


@pytest.mark.parametrize(
    ("library_options", "variant_options", "rel"),
    [
        ({}, {}, 1e-9),  # the flat default is the library's mode
        # The research rows "diagonal H₀ …, v^¼" and SCG(memory=m, diagonal_scaling=True) are one rule (the flat
        # variant corrects v's bias, which γ_D cancels; the two-loop recursion and the compact form differ in
        # rounding only).
        ({"diagonal_scaling": True, "restart": 10**6}, {"diagonal_beta": 0.99, "diagonal_power": 0.25}, 1e-8),
    ],
    ids=["default", "diagonal-fourth-root"],
)
def test_the_flat_variant_takes_the_librarys_steps(library_options, variant_options, rel):
    library, flat = CountingClosure(), CountingClosure()
    scg = SCG(library.model.parameters(), memory=5, **library_options)
    variant = FlatSCG(list(flat.model.parameters()), memory=5, **variant_options)
    for _ in range(25):
        scg.step(library)
        variant.step(flat)
        assert variant.loss == pytest.approx(scg.trace.loss, rel=rel)
    assert flat.passes == library.passes


def test_a_diagonal_refreshed_every_t_gradients_is_held_in_between():
    pairs = DiagonalPairs([torch.zeros(4, dtype=torch.float64)], memory=2, beta=0.9, power=0.25, refresh=3)
    formed = []
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):  # gradients 1 … 5: D is formed at the 1st and the 4th
        pairs.observe(torch.full((4,), value, dtype=torch.float64))
        formed.append(pairs.diagonal().clone())
    assert torch.equal(formed[0], formed[1]) and torch.equal(formed[1], formed[2])
    assert not torch.equal(formed[2], formed[3]) and torch.equal(formed[3], formed[4])
    every_time = DiagonalPairs([torch.zeros(4, dtype=torch.float64)], memory=2, beta=0.9, power=0.25)
    for value in (1.0, 2.0, 3.0, 4.0):
        every_time.observe(torch.full((4,), value, dtype=torch.float64))
    assert torch.equal(every_time.diagonal(), formed[3])


def test_the_diagonal_h0_takes_gamma_d_over_its_window_of_newest_pairs():
    closure = CountingClosure(seed=2)
    variant = FlatSCG(list(closure.model.parameters()), memory=5, diagonal_beta=0.99, diagonal_power=0.25)
    for _ in range(12):
        variant.step(closure)
    pairs = variant.pairs
    (block,) = pairs.blocks
    diagonal = pairs.diagonal()
    ratios = [float(pairs.sy[i, i]) / float(block[1, i] @ (diagonal * block[1, i])) for i in pairs.slots]
    assert len(ratios) == 5 and max(ratios) != ratios[-1]  # the newest pair's ratio is not the largest here
    q = torch.ones_like(diagonal)
    assert torch.allclose(pairs._initial_inverse(q), max(ratios) * diagonal)
    pairs.window = 1
    assert torch.allclose(pairs._initial_inverse(q), ratios[-1] * diagonal)
    with pytest.raises(ValueError, match="gamma_pick"):
        FlatSCG(list(closure.model.parameters()), memory=5, diagonal_beta=0.99, gamma_pick="min")


@pytest.mark.parametrize(
    "options",
    [
        {"first_step": "scaled"},
        {"first_step": "scaled-l2"},
        {"gamma_window": 5},
        {"gamma_window": 5, "first_step": "scaled", "retry": "interpolate-raise"},
        {"retry": "interpolate"},
        {"gamma_pick": "bb1"},
        {"growth": 2.0},
        {"gamma_scale": 2.0},
        {"layerwise": True},
        {"nystrom_rank": 4, "nystrom_every": 20},
        {"stretch_max": 4.0},
        {"raise_accepted": False},
        {"decrease_by_fit": True},
        {"decrease_to_fit": True},
        {"decrease_to_fit": True, "diagonal_beta": 0.99, "diagonal_power": 0.25},
        {"diagonal_beta": 0.99},
        {"diagonal_beta": 0.99, "diagonal_power": 0.25, "diagonal_refresh": 5},
        {"diagonal_beta": 0.99, "diagonal_power": 0.25, "gamma_window": 1},
        {"diagonal_beta": 0.99, "diagonal_power": 0.25, "first_step": "diagonal"},
        {"powell_damping": 0.2},
        {"powell_damping": 0.2, "diagonal_beta": 0.99, "diagonal_power": 0.25},
        {"secant_diagonal": 10.0},
    ],
)
def test_variants_never_accept_a_higher_loss(options):
    closure = CountingClosure(seed=1)
    variant = FlatSCG(list(closure.model.parameters()), memory=5, **options)
    losses = [variant.step(closure) for _ in range(60)]
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def _good_steps(**options):
    """60 steps of ``FlatSCG(memory=5, **options)``: (λ before the step, its log entry) for each good accepted step
    (Δ ≥ 0.75), and the whole log."""
    closure = CountingClosure(seed=1)
    variant = FlatSCG(list(closure.model.parameters()), memory=5, **options)
    variant.log = []
    lambdas_before = []
    for _ in range(60):
        lambdas_before.append(variant.lambd)
        variant.step(closure)
    good = [
        (before, entry)
        for before, entry in zip(lambdas_before, variant.log)
        if entry["comparison"] >= 0.75 and entry["trial_loss"] == entry["loss"]
    ]
    return good, variant.log


def test_decrease_by_fit_multiplies_lambda_by_nielsens_factor_after_each_good_step():
    good, log = _good_steps(decrease_by_fit=True)
    for before, entry in good:
        assert entry["lambd"] == pytest.approx(before * _nielsen(entry["comparison"]), rel=1e-12)
    assert len(good) >= 10
    assert any(_nielsen(entry["comparison"]) == 1.0 / 3.0 for entry in log)  # Δ ≥ 0.94: λ ÷ 3
    assert any(1.0 / 3.0 < _nielsen(entry["comparison"]) < 1.0 for entry in log if entry["comparison"] >= 0.75)


def test_decrease_to_fit_lowers_lambda_to_the_observed_curvature_after_a_good_step():
    # λ_fit = λ − (Δ − 1)δ/|p|² is the λ at which δ = (2 − Δ)δ, the curvature a quadratic along p shows; after a good
    # step λ ← min(λ / 2, max(λ_fit, 0)): at least halved, lowered further when the decrease beat the model's.
    good, _ = _good_steps(decrease_to_fit=True)
    halved = fitted = 0
    for before, entry in good:
        fit = before - (entry["comparison"] - 1.0) * entry["delta"] / entry["p_sq"]
        assert entry["lambd"] == pytest.approx(min(before / 2.0, max(fit, 0.0)), rel=1e-12, abs=1e-300)
        halved += entry["lambd"] == pytest.approx(before / 2.0, rel=1e-12)
        fitted += entry["lambd"] < 0.5 * before * (1 - 1e-9)
    assert halved >= 1 and fitted >= 1  # both branches of the min are taken on this problem


def _nielsen(comparison: float) -> float:
    """max(1/3, 1 − (2Δ − 1)³): Nielsen's λ factor after a step with comparison ratio Δ."""
    return max(1.0 / 3.0, 1.0 - (2.0 * comparison - 1.0) ** 3)


class LossFirstClosure(CountingClosure):
    """:class:`CountingClosure` with ``value_then_grad``: a forward counted in ``forwards``, its backward (when
    asked) in ``passes``, as ``peers_metering.Run`` charges them."""

    forwards = 0

    def value_then_grad(self):
        self.forwards += 1
        self.model.zero_grad()
        with torch.enable_grad():
            loss = nn.functional.mse_loss(self.model(self.x), self.y)

        def gradient() -> list[torch.Tensor]:
            self.passes += 1
            loss.backward()
            return [p.grad for p in self.model.parameters()]

        return loss.detach(), gradient


def test_loss_first_takes_the_same_steps_and_skips_the_backward_of_rejected_trials():
    full, loss_first = CountingClosure(seed=1), LossFirstClosure(seed=1)
    variants = [FlatSCG(list(c.model.parameters()), memory=5, gamma_scale=3.0) for c in (full, loss_first)]
    variants[1].loss_first = True
    losses = [[variant.step(closure) for _ in range(60)] for variant, closure in zip(variants, (full, loss_first))]
    assert losses[0] == losses[1]
    rejected = variants[1].rejected
    assert rejected > 0 and variants[0].rejected == rejected
    assert loss_first.forwards == full.passes - 1  # every trial; the start is one closure call
    assert loss_first.passes == full.passes - rejected


def test_scaled_first_step_takes_no_curvature_pass():
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=5, first_step="scaled")
    variant.step(closure)
    assert closure.passes == 2  # E(w₁) and the trial; Møller's σ would add E'(w₁ + σp₁)


@pytest.mark.parametrize(("first_step", "norm"), [("scaled", 1), ("scaled-l2", 2)])
def test_the_scaled_first_trials_step_along_r_by_lbfgs_or_lbfgsbs_alpha0(first_step, norm):
    closure = CountingClosure()
    params = list(closure.model.parameters())
    closure()
    residual = -torch.cat([p.grad.reshape(-1) for p in params])  # r₁ = −E'(w₁)
    points = []

    def recording_closure() -> torch.Tensor:
        points.append(torch.cat([p.detach().reshape(-1) for p in params]))
        return closure()

    lambd = 1e-3
    FlatSCG(params, memory=5, first_step=first_step, lambd=lambd).step(recording_closure)
    start, trial = points[0], points[1]  # E(w₁), then the first trial
    alpha0 = min(1.0, 1.0 / float(residual.norm(p=norm)))  # 1/|r₁|₁ torch LBFGS's, 1/|r₁|₂ L-BFGS-B's
    mu = float(residual @ residual)  # p₁ = r₁: δ = μ/α₀ + λ₁|p₁|² and α = μ/δ
    alpha = mu / (mu / alpha0 + lambd * mu)
    torch.testing.assert_close(trial - start, alpha * residual, rtol=1e-9, atol=1e-15)


def test_the_diagonal_first_trial_steps_along_d_r_with_lbfgs_l1_length():
    # first_step="diagonal" (lever 42): p₁ = D r₁, D = 1 / (v̂^κ + ε mean v̂^κ) of the first gradient alone
    # (v̂ = g₁²), at α₀ = min(1, 1/|p₁|₁), δ = μ/α₀ + λ₁|p₁|²
    closure = CountingClosure()
    params = list(closure.model.parameters())
    closure()
    residual = -torch.cat([p.grad.reshape(-1) for p in params]).double()
    points = []

    def recording_closure() -> torch.Tensor:
        points.append(torch.cat([p.detach().reshape(-1) for p in params]))
        return closure()

    lambd, power = 1e-3, 0.25
    variant = FlatSCG(params, memory=5, first_step="diagonal", diagonal_beta=0.99, diagonal_power=power, lambd=lambd)
    variant.step(recording_closure)
    root = (residual * residual).pow(power)
    direction = residual / (root + 1e-8 * root.mean())
    alpha0 = min(1.0, 1.0 / float(direction.abs().sum()))
    mu, direction_sq = float(direction @ residual), float(direction @ direction)
    alpha = mu / (mu / alpha0 + lambd * direction_sq)
    start, trial = points[0], points[1]
    torch.testing.assert_close((trial - start).double(), alpha * direction, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(direction / direction.norm(), residual / residual.norm())  # not along r₁


def test_powell_damping_keeps_s_y_at_c_times_s_b_s_where_the_curvature_is_weak():
    # Lever 43: with p = H r, Bs = αr and sᵀBs = α²μ; a pair with sᵀy < c sᵀBs becomes θy + (1 − θ)Bs, sᵀ of which
    # is c sᵀBs exactly, and a pair with more curvature is kept as it is.
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=5, powell_damping=0.2)
    generator = torch.Generator().manual_seed(3)
    step, noise = torch.randn(6, generator=generator, dtype=torch.float64).split(3)
    residual = 2.0 * step + 0.1 * noise  # sᵀr > 0, as for a descent direction p = H r
    model_change = 0.5 * residual  # Bs = αr with α = 0.5
    step_model_step = float(step @ model_change)  # sᵀBs
    assert step_model_step > 0.0
    weak = -step  # sᵀy < 0
    damped = variant._damped(step, weak, model_change, step_model_step)
    assert float(step @ damped) == pytest.approx(0.2 * step_model_step, rel=1e-12)
    strong = step * (step_model_step / float(step @ step))  # sᵀy = sᵀBs ≥ c sᵀBs
    assert variant._damped(step, strong, model_change, step_model_step) is strong
    with pytest.raises(ValueError, match="powell_damping"):
        FlatSCG(
            list(closure.model.parameters()), memory=5, powell_damping=0.2, first_step="diagonal", diagonal_beta=0.9
        )


@pytest.mark.parametrize("options", [{}, {"diagonal_beta": 0.99, "diagonal_power": 0.25}])
def test_powell_damping_is_handed_b_s_equal_to_alpha_r_and_fires(options):
    # The free Bs = αr rests on p = H r with the pairs held when the step was taken: H(αr) must be s = αp at every
    # call of _damped (before the pair is pushed), and with c = 0.9 some pairs of this non-convex MLP are damped.
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=3, powell_damping=0.9, **options)
    calls = []
    damped = variant._damped

    def checked(step, change, model_change, step_model_step):
        torch.testing.assert_close(variant.pairs.inverse_product([model_change])[0], step, rtol=1e-9, atol=1e-12)
        assert step_model_step == pytest.approx(float(step @ model_change), rel=1e-12)
        kept = damped(step, change, model_change, step_model_step)
        assert float(step @ kept) >= 0.9 * step_model_step * (1 - 1e-12)
        calls.append(kept is not change)
        return kept

    variant._damped = checked
    for _ in range(25):
        variant.step(closure)
    assert len(calls) >= 10 and any(calls)
    with pytest.raises(ValueError, match="Nyström"):
        FlatSCG(list(closure.model.parameters()), memory=3, powell_damping=0.2, nystrom_rank=2)


def test_gamma_max_uses_the_largest_ratio_of_the_window():
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=5, gamma_window=5)
    for _ in range(8):
        variant.step(closure)
    pairs = variant.pairs
    ratios = [pairs.sy[i, i] / pairs.yy[i, i] for i in pairs.slots]
    assert len(ratios) >= 2 and max(ratios) > ratios[-1]
    assert pairs.gamma == pytest.approx(max(ratios))


def _curved_pairs(pairs: list[SecantPairs], n: int, count: int) -> None:
    """Push the same ``count`` pairs (s, As) of a positive definite A into every object of ``pairs``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    a = a @ a.T + torch.diag(torch.linspace(1.0, 50.0, n, dtype=torch.float64))
    for _ in range(count):
        s = torch.randn(n, generator=generator, dtype=torch.float64)
        for held in pairs:
            held.push([s], [a @ s])


def test_layerwise_h0_over_one_layer_is_the_librarys_h():
    params = [torch.zeros(7, dtype=torch.float64)]
    layerwise, library = LayerwisePairs(params, 5, [7]), SecantPairs(params, 5)
    _curved_pairs([layerwise, library], 7, 6)
    v = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(layerwise.inverse_product([v])[0], library.inverse_product([v])[0])


def test_layerwise_h0_takes_each_layers_largest_curvature_ratio():
    params = [torch.zeros(7, dtype=torch.float64)]
    pairs = LayerwisePairs(params, 5, [3, 4])
    _curved_pairs([pairs], 7, 6)
    scales = pairs.layer_scales()
    (block,) = pairs.blocks
    for part, (start, stop) in enumerate([(0, 3), (3, 7)]):
        ratios = [
            float(block[0, i, start:stop] @ block[1, i, start:stop] / block[1, i, start:stop].square().sum())
            for i in pairs.slots
        ]
        assert torch.all(scales[start:stop] == max(r for r in ratios if r > 0)), part
    # H is still the inverse of a model that reproduces the newest pair: H yₘ = sₘ.
    newest = pairs.slots[-1]
    torch.testing.assert_close(pairs.inverse_product([block[1, newest].clone()])[0], block[0, newest])


def test_secant_diagonal_h0_with_no_room_to_move_is_the_librarys_h():
    # c = 1 clips every coordinate's fit to γ: H₀ = γI, the library's.
    params = [torch.zeros(7, dtype=torch.float64)]
    secant_diagonal, library = SecantDiagonalPairs(params, 5, clip=1.0), SecantPairs(params, 5)
    _curved_pairs([secant_diagonal, library], 7, 6)
    v = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(secant_diagonal.inverse_product([v])[0], library.inverse_product([v])[0])


def test_secant_diagonal_h0_is_each_coordinates_fit_to_the_pairs_clipped_around_gamma():
    params = [torch.zeros(7, dtype=torch.float64)]
    pairs = SecantDiagonalPairs(params, 5, clip=3.0)
    _curved_pairs([pairs], 7, 8)  # more pairs than the memory: only the 5 held count
    (block,) = pairs.blocks
    steps = torch.stack([block[0, i] for i in pairs.slots])
    changes = torch.stack([block[1, i] for i in pairs.slots])
    gamma = max(float(steps[k] @ changes[k] / (changes[k] @ changes[k])) for k in range(len(pairs.slots)))
    assert pairs.gamma == pytest.approx(gamma)
    diagonal = pairs.diagonal()
    for j in range(7):
        fit = float((steps[:, j] * changes[:, j]).sum() / changes[:, j].square().sum())
        expected = min(max(fit, gamma / 3.0), gamma * 3.0) if fit > 0.0 else gamma
        assert float(diagonal[j]) == pytest.approx(expected, rel=1e-12), j
    assert len(set(diagonal.tolist())) > 1  # not γI in disguise
    # H is still the inverse of a model that reproduces the newest pair: H yₘ = sₘ.
    newest = pairs.slots[-1]
    torch.testing.assert_close(pairs.inverse_product([block[1, newest].clone()])[0], block[0, newest])


def test_secant_diagonal_h0_reads_only_the_pairs_held_and_falls_back_to_gamma():
    # Pairs held before clear() must not count; a coordinate whose fit is negative, or 0/0, takes γ; one whose fit
    # is far above γ is clipped to γc.
    params = [torch.zeros(4, dtype=torch.float64)]
    pairs = SecantDiagonalPairs(params, 5, clip=3.0)
    _curved_pairs([pairs], 4, 6)
    pairs.clear()
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    pairs.push([as_tensor([1.0, 1.0, 1.0, 0.0])], [as_tensor([1.0, -0.1, 0.001, 0.0])])  # sᵀy/yᵀy = 0.901/1.010001
    pairs.push([as_tensor([1.0, 0.5, 0.0, 0.0])], [as_tensor([2.0, -0.2, 0.0, 0.0])])  # sᵀy/yᵀy = 1.9/4.04
    assert len(pairs.slots) == 2
    gamma = 0.901 / 1.010001
    expected = [
        3.0 / 5.0,  # (1·1 + 1·2) / (1 + 4), within [γ/3, 3γ]
        gamma,  # (−0.1 − 0.1) / 0.05 < 0
        3.0 * gamma,  # 0.001 / 10⁻⁶ = 1000, clipped
        gamma,  # 0 / 0
    ]
    torch.testing.assert_close(pairs.diagonal(), as_tensor(expected), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(
    "options",
    [
        {"diagonal_beta": 0.99},
        {"nystrom_rank": 2},
        {"layerwise": True},
        {"gamma_window": 3},
        {"gamma_scale": 2.0},
        {"gamma_pick": "min"},
        {"first_step": "diagonal"},
    ],
)
def test_secant_diagonal_refuses_another_h0_beside_it(options):
    closure = CountingClosure()
    with pytest.raises(ValueError, match="secant_diagonal"):
        FlatSCG(list(closure.model.parameters()), memory=5, secant_diagonal=10.0, **options)


def test_secant_diagonal_clip_below_one_is_refused():
    with pytest.raises(ValueError, match="clip"):
        SecantDiagonalPairs([torch.zeros(3, dtype=torch.float64)], 5, clip=0.5)


def test_nystrom_h0_of_a_full_rank_sketch_is_the_damped_inverse_hessian():
    # k = n: the sketch sees all of E'' (positive definite here), so with no pair H₀ = U (Λ + λ_min)⁻¹ Uᵀ is
    # (E'' + λ_min I)⁻¹ and nothing is left for the complement.
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    hessian = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    pairs = NystromPairs([torch.zeros(6, dtype=torch.float64)], memory=3, rank=6)
    pairs.refresh(lambda v: hessian @ v, 6, torch.float64)
    smallest = float(torch.linalg.eigvalsh(hessian).min())
    v = torch.randn(6, generator=generator, dtype=torch.float64)
    expected = torch.linalg.solve(hessian + smallest * torch.eye(6, dtype=torch.float64), v)
    torch.testing.assert_close(pairs.inverse_product([v])[0], expected, rtol=1e-9, atol=1e-12)


def test_nystrom_sketch_costs_rank_products_at_the_start_and_every_n_steps():
    closure = CountingClosure(seed=2)
    variant = FlatSCG(list(closure.model.parameters()), memory=5, nystrom_rank=3, nystrom_every=10)
    sketched_at = []
    sketch = variant._sketch

    def recording_sketch(objective):
        sketched_at.append(variant.steps)
        return sketch(objective)

    variant._sketch = recording_sketch
    for _ in range(25):
        variant.step(closure)
    assert sketched_at[0] == 0 and all(steps % 10 == 0 for steps in sketched_at[1:]) and len(sketched_at) >= 2
    assert closure.hvps == 3 * len(sketched_at)


def test_stretch_lengthens_the_step_while_the_model_underestimates_the_decrease():
    # τ multiplies α (δ = μ/τ): it grows by the factor after a step with Δ > Δ₊, up to its cap, shrinks after one
    # with Δ < 0.75 and is 1 again after a rejection; τ_max = 1 is the library's δ = μ.
    closure = CountingClosure(seed=3)
    variant = FlatSCG(list(closure.model.parameters()), memory=5, stretch_max=2.0)
    variant.log = []
    stretches = []
    for _ in range(40):
        before = variant.stretch
        variant.step(closure)
        step = variant.log[-1]
        if not variant.success:
            assert variant.stretch == 1.0
        elif step["comparison"] > 1.1:
            assert variant.stretch == min(1.5 * before, 2.0)
        elif step["comparison"] < 0.75:
            assert variant.stretch == max(before / 1.5, 1.0)
        stretches.append(variant.stretch)
    assert max(stretches) > 1.0


class DeferringClosure:
    """E(w) = cross-entropy of a linear softmax classifier (32 features, 5 classes, 200 random samples; float64),
    whose first trial at torch LBFGS's α₀ = 1/|r₁|₁ falls far short of the minimiser along r₁, as on the race's
    logistic problem. ``value_then_grad`` gives E(w) from a forward and E'(w) only when asked for, as the race's run
    over one batch, its loss raised by ``offset`` (0: none); the forwards and the backwards it made are counted."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(200, 32, generator=generator, dtype=torch.float64)
        self.y = torch.randint(0, 5, (200,), generator=generator)
        torch.manual_seed(0)
        self.model = nn.Linear(32, 5).double()
        self.passes = self.forwards = self.backwards = 0
        self.offset = 0.0

    def loss(self) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(self.x), self.y)

    def __call__(self) -> torch.Tensor:
        self.passes += 1
        self.model.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss.detach()

    def value_then_grad(self):
        self.forwards += 1
        params = list(self.model.parameters())
        with torch.enable_grad():
            loss = self.loss()

        def gradient() -> list[torch.Tensor]:
            self.backwards += 1
            return list(torch.autograd.grad(loss, params))

        return loss.detach() + self.offset, gradient


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _probed_first_step(closure: DeferringClosure) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, float]:
    """The points the first step of ``first_step="probe"`` (λ₁ = 10⁻³) evaluates after E(w₁), w₁, r₁ and E(w₁)."""
    params = list(closure.model.parameters())
    variant = FlatSCG(params, memory=5, first_step="probe", loss_first=True, lambd=1e-3)
    start, start_loss = _flat(params), float(closure())
    residual = -torch.cat([p.grad.reshape(-1) for p in params])
    points = []
    value_then_grad = closure.value_then_grad

    def recording_value_then_grad():
        points.append(_flat(params))
        return value_then_grad()

    closure.value_then_grad = recording_value_then_grad  # type: ignore[method-assign]
    closure.passes = 0
    variant.step(closure)  # evaluates E(w₁) again: a gradient pass
    return points, start, residual, start_loss


def test_the_probed_first_step_moves_its_trial_to_the_fitted_minimiser():
    closure = DeferringClosure()
    points, start, residual, start_loss = _probed_first_step(closure)
    probe, trial = points  # the probe (a forward), then the trial
    mu = float(residual @ residual)  # p₁ = r₁
    alpha0 = min(1.0, 1.0 / float(residual.abs().sum()))
    probe_alpha = mu / (mu / alpha0 + 1e-3 * mu)  # δ = μ/α₀ + λ₁|p₁|², α = μ/δ, as the "scaled" first step
    torch.testing.assert_close(probe - start, probe_alpha * residual, rtol=1e-9, atol=1e-15)
    # The quadratic E(w₁) − tμ + ½t²δ through E at the probe gives δ, and the trial is at α* = μ/(δ + λ₁|p₁|²).
    with torch.no_grad():
        for p, value in zip(closure.model.parameters(), probe.split([p.numel() for p in closure.model.parameters()])):
            p.copy_(value.view_as(p))
        probe_loss = float(closure.loss())
    fitted = 2.0 * (probe_loss - start_loss + probe_alpha * mu) / probe_alpha**2
    alpha = mu / (fitted + 1e-3 * mu)
    assert fitted > 0.0 and alpha > 10.0 * probe_alpha  # the fit qualified, far beyond α₀
    torch.testing.assert_close(trial - start, alpha * residual, rtol=1e-9, atol=1e-15)
    assert closure.forwards == 2 and closure.backwards == 1  # the probe's backward was never made
    assert closure.passes == 1  # E(w₁), and no other gradient pass


def test_a_probe_whose_fit_does_not_qualify_is_the_first_trial(monkeypatch):
    import levers_variants

    monkeypatch.setattr(levers_variants, "PROBE_MIN_RATIO", 1e12)  # no fitted α* is that far beyond α₀
    closure = DeferringClosure()
    points, _, _, _ = _probed_first_step(closure)
    assert len(points) == 1 and closure.backwards == 1  # the probe is the trial, accepted with its gradient
    scaled = DeferringClosure()
    FlatSCG(list(scaled.model.parameters()), memory=5, first_step="scaled", loss_first=True, lambd=1e-3).step(scaled)
    torch.testing.assert_close(_flat(list(closure.model.parameters())), _flat(list(scaled.model.parameters())))


@pytest.mark.parametrize("offset", [10.0, float("nan")], ids=["rose", "not-finite"])
def test_a_probe_whose_loss_rose_or_is_not_finite_is_a_trial_rejected_on_its_loss(offset):
    closure = DeferringClosure()
    closure.offset = offset  # every forward's loss above E(w₁) (or NaN); the gradient pass gives E(w₁) without it
    params = list(closure.model.parameters())
    start = _flat(params)
    variant = FlatSCG(params, memory=5, first_step="probe", loss_first=True, lambd=1e-3)
    variant.step(closure)
    assert closure.forwards == 1 and closure.backwards == 0  # the probe, rejected without its gradient
    assert variant.rejected == 1 and not variant.success
    torch.testing.assert_close(_flat(params), start, rtol=0, atol=0)  # back at w₁


def test_the_function_value_secant_pair_has_the_curvature_at_the_new_point_on_a_cubic():
    # E(w) = Σ aⱼwⱼ² + dⱼwⱼ³ is a cubic along any s, so sᵀỹ = sᵀE''(w₊)s exactly (Zhang, Deng & Chen 1999), where the
    # plain pair's sᵀy is the curvature averaged over the step.
    generator = torch.Generator().manual_seed(3)
    a, d = (
        torch.rand(6, generator=generator, dtype=torch.float64),
        torch.randn(6, generator=generator, dtype=torch.float64),
    )
    w = torch.randn(6, generator=generator, dtype=torch.float64)
    s = 0.3 * torch.randn(6, generator=generator, dtype=torch.float64)

    def value(x):
        return float((a * x * x + d * x**3).sum())

    def gradient(x):
        return 2 * a * x + 3 * d * x * x

    variant = FlatSCG([torch.zeros(6, dtype=torch.float64)], memory=3, value_secant=1e-9)
    variant.loss = value(w)
    r, new_r = -gradient(w), -gradient(w + s)
    change = r - new_r
    modified = variant._value_secant_change(s, change, r, new_r, value(w + s))
    curvature_at_new_point = float(s @ ((2 * a + 6 * d * (w + s)) * s))
    assert float(s @ change) != pytest.approx(curvature_at_new_point, rel=1e-3)
    assert float(s @ modified) == pytest.approx(curvature_at_new_point, rel=1e-10)
    torch.testing.assert_close(modified - change, (float(s @ modified - s @ change) / float(s @ s)) * s)


def test_the_function_value_secant_is_clipped_at_c_and_leaves_a_pair_without_curvature_alone():
    variant = FlatSCG([torch.zeros(2, dtype=torch.float64)], memory=3, value_secant=0.25)
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    change = torch.tensor([2.0, 1.0], dtype=torch.float64)  # sᵀy = 2
    r = torch.tensor([0.0, 0.0], dtype=torch.float64)
    variant.loss = 0.0
    # θ = 6(0 − 10) − 0 = −60 would make sᵀỹ negative: it is clipped to sᵀỹ = c sᵀy = 0.5.
    modified = variant._value_secant_change(s, change, r, r, trial_loss=10.0)
    assert float(s @ modified) == pytest.approx(0.5, rel=1e-12)
    assert float(modified[1]) == 1.0  # ỹ − y is along s
    negative = torch.tensor([-1.0, 3.0], dtype=torch.float64)
    assert variant._value_secant_change(s, negative, r, r, trial_loss=-10.0) is negative


def test_the_step_pushes_the_function_value_secant_pair():
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=5, value_secant=0.1, loss_first=True)
    variant.step(closure)
    pushed = 0
    for _ in range(12):
        w, r, loss = variant._flat(), variant.r.clone(), variant.loss
        slots_before = list(variant.pairs.slots)
        variant.step(closure)
        if variant.loss == loss:  # rejected: nothing pushed
            continue
        s, new_r = variant._flat() - w, variant.r
        change = r - new_r
        theta = 6.0 * (loss - variant.loss) - 3.0 * float((r + new_r) @ s)
        theta = max(theta, -0.9 * float(s @ change))
        expected = change + (theta / float(s @ s)) * s
        (block,) = variant.pairs.blocks
        newest = variant.pairs.slots[-1]
        assert variant.pairs.slots != slots_before
        torch.testing.assert_close(block[1, newest], expected, rtol=1e-9, atol=1e-12)
        pushed += 1
    assert pushed >= 8


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"value_secant": 0.0}, "0 < c ≤ 1"),
        ({"value_secant": 1.5}, "0 < c ≤ 1"),
        ({"value_secant": 0.1, "powell_damping": 0.2}, "not both"),
    ],
)
def test_function_value_secant_refusals(options, message):
    with pytest.raises(ValueError, match=message):
        FlatSCG([torch.zeros(2, dtype=torch.float64)], memory=3, **options)


def test_log_loss_minimises_log_e_with_gradient_over_e_and_reports_e():
    closure = CountingClosure()
    params = list(closure.model.parameters())
    variant = FlatSCG(params, memory=5, log_loss=True, loss_first=True)
    reported = []
    for _ in range(15):
        variant.step(closure)
        reported.append(variant.reported_loss)
        closure.model.zero_grad()
        with torch.enable_grad():
            loss = torch.nn.functional.mse_loss(closure.model(closure.x), closure.y)
            loss.backward()
        gradient = torch.cat([p.grad.reshape(-1) for p in params])
        assert variant.loss == pytest.approx(math.log(float(loss)), rel=1e-12)
        assert variant.reported_loss == pytest.approx(float(loss), rel=1e-12)
        torch.testing.assert_close(variant.r, -gradient / float(loss), rtol=1e-10, atol=1e-14)
    assert all(later <= earlier for earlier, later in zip(reported, reported[1:]))
    assert reported[-1] < reported[0]


def test_log_loss_rejects_on_log_e_and_defers_the_backward_as_the_full_run_steps():
    """The race's path: a loss-first run (``_completed_trial``) takes the same steps in log space as a full one, and
    skips the backward of the trials its loss rejects."""
    full, loss_first = CountingClosure(seed=1), LossFirstClosure(seed=1)
    variants = [
        FlatSCG(list(c.model.parameters()), memory=5, gamma_scale=3.0, log_loss=True, loss_first=True)
        for c in (full, loss_first)
    ]
    losses = [[variant.step(closure) for _ in range(40)] for variant, closure in zip(variants, (full, loss_first))]
    assert losses[0] == losses[1]
    torch.testing.assert_close(variants[0].r, variants[1].r, rtol=0, atol=0)
    rejected = variants[1].rejected
    assert rejected > 0 and variants[0].rejected == rejected
    assert loss_first.passes == full.passes - rejected


@pytest.mark.parametrize("options", [{"first_step": "probe"}, {"curvature": "hvp"}, {"nystrom_rank": 2}])
def test_log_loss_refuses_what_reads_e_itself(options):
    with pytest.raises(ValueError, match="log_loss"):
        FlatSCG([torch.zeros(2, dtype=torch.float64)], memory=3, log_loss=True, **options)


def test_log_loss_refuses_a_negative_loss():
    variant = FlatSCG([torch.zeros(2, dtype=torch.float64)], memory=3, log_loss=True)
    with pytest.raises(ValueError, match="E ≥ 0"):
        variant._objective(-1.0)
    assert variant._objective(0.0) == -math.inf


def test_the_two_step_pair_is_ford_and_moghrabis_and_a_secant_pair_of_a_quadratic():
    # On a quadratic y = As for every step, so w = y − δy₋ = A(s − δs₋) = Ar: the two-step pair is a secant pair too.
    generator = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 4.0, 9.0], dtype=torch.float64)) @ basis.T
    variant = FlatSCG([torch.zeros(5, dtype=torch.float64)], memory=3, multistep=True)
    previous, step = (torch.randn(5, generator=generator, dtype=torch.float64) for _ in range(2))
    step = 0.3 * step
    plain = variant._two_step_pair(step, matrix @ step)  # no previous pair yet
    assert plain[0] is step
    variant.previous_pair = (previous, matrix @ previous)
    two_step, two_change = variant._two_step_pair(step, matrix @ step)
    ratio = float(step.norm() / previous.norm())
    weight = ratio**2 / (1 + 2 * ratio)
    torch.testing.assert_close(two_step, step - weight * previous)
    torch.testing.assert_close(two_change, matrix @ two_step)
    # s₋ = −s (α = 1, ω = ⅓) and y₋ = 6As: ŝ = (4/3)s, ŷ = −As, ŝᵀŷ < 0: the plain pair is kept.
    variant.previous_pair = (-step, 6.0 * (matrix @ step))
    kept_step, kept_change = variant._two_step_pair(step, matrix @ step)
    assert kept_step is step
    variant.previous_pair = (torch.zeros(5, dtype=torch.float64), matrix @ step)
    assert variant._two_step_pair(step, matrix @ step)[0] is step  # a zero s₋: the plain pair


def test_the_step_pushes_two_step_pairs_and_forgets_the_previous_step_at_a_restart():
    closure = CountingClosure()
    variant = FlatSCG(
        list(closure.model.parameters()), memory=5, multistep=True, loss_first=True, restart=6, gamma_scale=3.0
    )
    variant.step(closure)
    previous = variant.previous_pair  # the first step's plain pair (its start is not at hand here)
    assert previous is not None
    two_step_pushes = rejected = 0
    for _ in range(14):
        w, r, loss = variant._flat(), variant.r.clone(), variant.loss
        held_before = list(variant.pairs.slots)
        variant.step(closure)
        if variant.loss == loss:  # rejected: the previous step is still the last accepted one
            assert variant.previous_pair is not None or previous is None
            if previous is not None:
                torch.testing.assert_close(variant.previous_pair[0], previous[0], rtol=1e-9, atol=1e-12)
            rejected += 1
            continue
        step, change = variant._flat() - w, r - variant.r
        restarted = variant.steps % 6 == 0
        if not restarted and variant.pairs.slots != held_before:
            (block,) = variant.pairs.blocks
            newest = variant.pairs.slots[-1]
            expected_step, expected_change = step, change
            if previous is not None:
                ratio = float(step.norm() / previous[0].norm())
                delta = ratio**2 / (1 + 2 * ratio)
                candidate = (step - delta * previous[0], change - delta * previous[1])
                if float(candidate[0] @ candidate[1]) > 1e-10 * float(candidate[1] @ candidate[1]):
                    expected_step, expected_change = candidate
                    two_step_pushes += 1
            torch.testing.assert_close(block[0, newest], expected_step, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(block[1, newest], expected_change, rtol=1e-9, atol=1e-12)
        previous = None if restarted else (step, change)
        assert (variant.previous_pair is None) == restarted
        if not restarted:
            torch.testing.assert_close(variant.previous_pair[0], step, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(variant.previous_pair[1], change, rtol=1e-9, atol=1e-12)
    assert two_step_pushes >= 5
    assert rejected >= 1


def test_a_fallback_to_the_gradient_forgets_the_previous_step():
    # μ = pᵀr ≤ 0 clears the pairs and steps along r: the pair it leaves is plain, not reaching back across the clear.
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=5, multistep=True, loss_first=True)
    for _ in range(4):
        variant.step(closure)
    assert variant.previous_pair is not None
    variant.p = -variant.r  # μ < 0
    w, r = variant._flat(), variant.r.clone()
    seen = []
    two_step_pair = variant._two_step_pair

    def recording(step, change):
        seen.append(variant.previous_pair)
        return two_step_pair(step, change)

    variant._two_step_pair = recording
    variant.step(closure)
    assert seen == [None]
    assert len(variant.pairs) == 1  # the gradient step was accepted and its plain pair pushed
    (block,) = variant.pairs.blocks
    torch.testing.assert_close(block[0, variant.pairs.slots[-1]], variant._flat() - w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(block[1, variant.pairs.slots[-1]], r - variant.r, rtol=1e-9, atol=1e-12)


def test_without_multistep_no_previous_step_is_kept():
    closure = CountingClosure()
    variant = FlatSCG(list(closure.model.parameters()), memory=5, loss_first=True)
    for _ in range(5):
        variant.step(closure)
    assert variant.previous_pair is None


def test_multistep_refuses_another_rewrite_of_the_pair():
    for options in ({"powell_damping": 0.2}, {"value_secant": 0.1}, {"reject_pairs": True}):
        with pytest.raises(ValueError, match="multistep"):
            FlatSCG([torch.zeros(2, dtype=torch.float64)], memory=3, multistep=True, **options)
