"""benchmarks/levers_kfac.py: lever 71's research variant, the secant mode with a Kronecker-factored H₀ (K-FAC)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as functional
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import levers_kfac  # noqa: E402
import test_kronecker as kronecker_tests  # noqa: E402  (the library's K-FAC tests: the model, the factors' definitions)
from levers_kfac import FlatKFAC, KfacPairs, KroneckerFactors  # noqa: E402
from levers_variants import FlatSCG  # noqa: E402
from test_kronecker import SmallCNN, as_matrix, small_problem  # noqa: E402


def factors_by_definition(
    model, inputs: torch.Tensor, targets: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A and G of each layer by their definitions at the true labels (the empirical Fisher)."""
    return kronecker_tests.factors_by_definition(model, inputs, "cross_entropy", labels=targets)


@pytest.mark.parametrize("low_rank", [False, True])
def test_the_inverse_is_each_layers_damped_kronecker_factors_inverted(monkeypatch, low_rank):
    """K⁻¹v undone by (G + ε_G I) V (A + ε_A I) with A and G formed by their definitions, sample by sample, and
    ε = κ · tr / dim of each factor; the same through Woodbury's low-rank form (the hidden layer's A: 51 rows, 7
    samples)."""
    if low_rank:
        monkeypatch.setattr(levers_kfac, "LOW_RANK_ABOVE", 20)
    model, inputs, targets = small_problem()
    params = list(model.parameters())
    factors = KroneckerFactors(model, params, damping=0.3, fisher="empirical")
    factors.refresh(inputs, targets, torch.Generator().manual_seed(0))
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solved = factors.inverse_product(v)
    offset = 0
    for layer, (a, g) in zip((model.conv, model.hidden, model.output), factors_by_definition(model, inputs, targets)):
        damped_a = a + 0.3 * a.diagonal().mean() * torch.eye(a.shape[0], dtype=torch.float64)
        damped_g = g + 0.3 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=torch.float64)
        undone = damped_g @ as_matrix(solved, offset, layer) @ damped_a
        expected = as_matrix(v, offset, layer)
        torch.testing.assert_close(undone, expected, rtol=1e-9, atol=1e-9)
        offset += layer.weight.numel() + layer.bias.numel()


class ClassifierClosure:
    """The cross-entropy of :class:`SmallCNN` over 24 random images (float64), with what ``peers_metering.Run``
    gives :class:`~levers_kfac.FlatKFAC`: ``model``, ``problem.train`` and ``charge``; counts gradient passes."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(24, 1, 5, 5, generator=generator, dtype=torch.float64)
        targets = torch.randint(0, 3, (24,), generator=generator)
        torch.manual_seed(seed)
        self.model = SmallCNN().double()
        self.problem = SimpleNamespace(train=(inputs, targets))
        self.passes = 0
        self.charged: list[tuple[str, float | None]] = []
        self.calls = {"gradient": 0}

    def __call__(self) -> torch.Tensor:
        self.passes += 1
        self.model.zero_grad()
        inputs, targets = self.problem.train
        loss = functional.cross_entropy(self.model(inputs), targets)
        loss.backward()
        return loss.detach()

    def charge(self, kind: str, cost: float | None = None) -> None:
        self.charged.append((kind, cost))
        self.calls[kind] += 1  # as peers_metering.Run counts a call


def test_global_damping_is_one_tikhonov_term_split_between_the_factors_by_pi():
    """The "global" damping: ε_A ε_G = η = κ · (K's mean diagonal over all weights) and ε_A / ε_G = π² = a / g for
    every layer; the "layer" damping: κ times each factor's mean diagonal."""
    model, inputs, targets = small_problem()
    factors = KroneckerFactors(model, list(model.parameters()), damping=0.2, damping_mode="global")
    by_definition = [(a.detach(), g.detach()) for a, g in factors_by_definition(model, inputs, targets)]
    dampings = factors._dampings(by_definition)
    means = [(float(a.diagonal().mean()), float(g.diagonal().mean())) for a, g in by_definition]
    sizes = [(a.shape[0], g.shape[0]) for a, g in by_definition]
    eta = 0.2 * sum(a * g * da * dg for (a, g), (da, dg) in zip(means, sizes)) / sum(da * dg for da, dg in sizes)
    for (epsilon_a, epsilon_g), (a, g) in zip(dampings, means):
        assert epsilon_a * epsilon_g == pytest.approx(eta, rel=1e-12)
        assert epsilon_a / epsilon_g == pytest.approx(a / g, rel=1e-12)
    layer = KroneckerFactors(model, list(model.parameters()), damping=0.2, damping_mode="layer")
    flat = [epsilon for pair in layer._dampings(by_definition) for epsilon in pair]
    assert flat == pytest.approx([0.2 * mean for pair in means for mean in pair], rel=1e-12)


def test_the_sampled_fisher_draws_the_labels_from_the_models_softmax():
    """With the output's softmax all but one-hot on class 2, the labels drawn are 2: the sampled Fisher's factors are
    the empirical Fisher's for targets 2 (and not the true targets')."""
    model, inputs, targets = small_problem()
    with torch.no_grad():
        model.output.bias.copy_(torch.tensor([0.0, 0.0, 60.0], dtype=torch.float64))
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solved = {}
    for name, fisher, labels in [
        ("sampled", "sampled", targets),
        ("twos", "empirical", torch.full_like(targets, 2)),
        ("true", "empirical", targets),
    ]:
        factors = KroneckerFactors(model, params, damping=0.1, fisher=fisher)
        factors.refresh(inputs, labels, torch.Generator().manual_seed(0))
        solved[name] = factors.inverse_product(v)
    torch.testing.assert_close(solved["sampled"], solved["twos"])
    assert not torch.allclose(solved["sampled"], solved["true"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"damping": 0.0}, "damping"),
        ({"damping": 0.1, "fisher": "true"}, "fisher"),
        ({"damping": 0.1, "damping_mode": "per-weight"}, "damping_mode"),
        ({"damping": 0.1, "distribution": "gaussian"}, "distribution"),
        ({"damping": 0.1, "rank": 0}, "rank"),
    ],
)
def test_bad_settings_are_refused_by_name(arguments, message):
    model, _, _ = small_problem()
    with pytest.raises(ValueError, match=message):
        KroneckerFactors(model, list(model.parameters()), **arguments)


def test_a_model_with_a_layer_it_cannot_factor_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="nn.Linear and nn.Conv2d layers only"):
        KroneckerFactors(model, list(model.parameters()), damping=0.1)


def test_h0_is_the_largest_secant_ratio_in_k_metric_times_k_inverse_and_follows_a_refresh():
    """γ_K K⁻¹q with γ_K = maxᵢ sᵢᵀyᵢ / yᵢᵀK⁻¹yᵢ over the pairs held, recomputed after the factors are refreshed at
    other weights (the cached yᵢᵀK⁻¹yᵢ belong to the old factors)."""
    model, inputs, targets = small_problem()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    factors = KroneckerFactors(model, params, damping=0.1, fisher="empirical")
    factors.refresh(inputs, targets, torch.Generator().manual_seed(0))
    pairs = KfacPairs([torch.zeros(n, dtype=torch.float64)], 4, factors)
    generator = torch.Generator().manual_seed(2)
    held = []
    for _ in range(3):
        step = torch.randn(n, dtype=torch.float64, generator=generator)
        change = step + 0.3 * torch.randn(n, dtype=torch.float64, generator=generator)
        assert pairs.push([step], [change])
        held.append((step, change))
    q = torch.randn(n, dtype=torch.float64, generator=generator)

    def expected() -> torch.Tensor:
        gamma = max(float(s @ y) / float(y @ factors.inverse_product(y)) for s, y in held)
        return gamma * factors.inverse_product(q)

    torch.testing.assert_close(pairs._initial_inverse(q), expected())
    with torch.no_grad():
        for p in params:
            p.mul_(1.5)
    factors.refresh(inputs, targets, torch.Generator().manual_seed(0))
    torch.testing.assert_close(pairs._initial_inverse(q), expected())


def test_the_first_step_is_the_library_modes_and_the_factors_are_refreshed_every_t_accepted_steps():
    """Before any pair H = I: the first step is FlatSCG's. The factors are formed at the first accepted point
    and after every ``refresh`` accepted steps, each time charged ``fraction`` of a gradient pass (over that many
    samples); with ``charge=False``, never charged."""
    plain, kfac_closure, free_closure = ClassifierClosure(), ClassifierClosure(), ClassifierClosure()
    plain_variant = FlatSCG(list(plain.model.parameters()), memory=5)
    variant = FlatKFAC(list(kfac_closure.model.parameters()), memory=5, damping=0.1, refresh=3, fraction=0.5)
    free = FlatKFAC(list(free_closure.model.parameters()), memory=5, damping=0.1, charge=False)
    assert variant.step(kfac_closure) == plain_variant.step(plain)
    assert variant.rejected == 0  # the first trial was accepted: its pair is held, and p₂ = H r₂ formed the factors
    assert variant.factors.refreshes == 1
    accepted = 1
    for _ in range(12):
        before = variant.rejected
        variant.step(kfac_closure)
        free.step(free_closure)
        accepted += variant.rejected == before
    assert variant.factors.refreshes == 1 + (accepted - 1) // 3
    assert kfac_closure.charged == [("gradient", 0.5)] * variant.factors.refreshes
    assert (
        kfac_closure.calls["gradient"] == 0
    )  # the budget pays for the factors; the accumulator's calls do not count them
    assert free.factors.refreshes > variant.factors.refreshes and free_closure.charged == []


def test_the_loss_never_rises_and_a_rejected_trial_leaves_the_accepted_weights():
    closure = ClassifierClosure(seed=3)
    params = list(closure.model.parameters())
    variant = FlatKFAC(params, memory=5, damping=0.01, fisher="empirical")
    losses = [variant.step(closure) for _ in range(25)]
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]
    assert variant.rejected > 0
    closure.model.zero_grad()
    assert float(closure()) == losses[-1]  # the parameters hold the point whose loss the step returned


def test_a_rank_k_input_factor_keeps_as_largest_eigenpairs_and_all_of_them_is_woodbury(monkeypatch):
    """``rank`` = k: (A_k + εI)⁻¹ with A_k the k largest eigenpairs of A (dense, here); k ≥ the samples: Woodbury's
    exact (A + εI)⁻¹."""
    monkeypatch.setattr(levers_kfac, "LOW_RANK_ABOVE", 20)
    model, inputs, targets = small_problem()
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solved = {}
    for rank in (None, 7, 3):
        factors = KroneckerFactors(model, params, damping=0.3, fisher="empirical", rank=rank)
        factors.refresh(inputs, targets, torch.Generator().manual_seed(0))
        solved[rank] = factors.inverse_product(v)
    torch.testing.assert_close(solved[7], solved[None], rtol=1e-9, atol=1e-9)
    (_, (a, g), _) = [(a.detach(), g.detach()) for a, g in factors_by_definition(model, inputs, targets)]
    eigenvalues, vectors = torch.linalg.eigh(a)
    top = vectors[:, -3:] @ torch.diag(eigenvalues[-3:]) @ vectors[:, -3:].T
    epsilon_a = 0.3 * float(a.diagonal().mean())
    damped_g = g + 0.3 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=torch.float64)
    offset = model.conv.weight.numel() + model.conv.bias.numel()
    undone = damped_g @ as_matrix(solved[3], offset, model.hidden) @ (top + epsilon_a * torch.eye(51, dtype=a.dtype))
    torch.testing.assert_close(undone, as_matrix(v, offset, model.hidden), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(solved[3], solved[None])


def test_without_recompute_each_pairs_metric_keeps_the_factors_it_came_with():
    model, inputs, targets = small_problem()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    factors = KroneckerFactors(model, params, damping=0.1, fisher="empirical")
    factors.refresh(inputs, targets, torch.Generator().manual_seed(0))
    pairs = KfacPairs([torch.zeros(n, dtype=torch.float64)], 4, factors, recompute=False)
    generator = torch.Generator().manual_seed(2)
    step = torch.randn(n, dtype=torch.float64, generator=generator)
    change = step + 0.3 * torch.randn(n, dtype=torch.float64, generator=generator)
    pairs.push([step], [change])
    q = torch.randn(n, dtype=torch.float64, generator=generator)
    gamma = float(step @ change) / float(change @ factors.inverse_product(change))  # the first factors' γ_K
    pairs._initial_inverse(q)
    with torch.no_grad():
        for p in params:
            p.mul_(1.5)
    factors.refresh(inputs, targets, torch.Generator().manual_seed(0))
    torch.testing.assert_close(pairs._initial_inverse(q), gamma * factors.inverse_product(q))
    fresh = float(step @ change) / float(change @ factors.inverse_product(change))
    assert fresh != pytest.approx(gamma, rel=1e-3)


def test_a_charged_row_races_in_levers_py_and_pays_for_its_factors(monkeypatch, tmp_path):
    """``levers.py --quick --problems mnist --rows …``: the K-FAC row runs in the race's harness (its model, its
    training data, its budget), and its passes include ``fraction`` of a pass for each refresh of the factors."""
    from scripts import load_script

    levers = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "levers.py", monkeypatch)
    row = "K-FAC H₀ global κ=10, 25 % every 5, rank 64"
    made = []
    original = levers.FlatKFAC

    class Recorded(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(levers, "FlatKFAC", Recorded)
    arguments = ["--quick", "--problems", "mnist", "--rows", "torch LBFGS", row, "--stem", "kfac", "--out"]
    assert levers.main([*arguments, str(tmp_path)]) == 0
    text = (tmp_path / "kfac.txt").read_text(encoding="utf-8")
    assert row in text
    (variant,) = made
    assert variant.factors.refreshes >= 2 and variant.factor_passes == 0.25 * variant.factors.refreshes


def test_the_bernoulli_fisher_draws_each_output_from_its_sigmoid_and_averages_over_the_outputs():
    """An autoencoder-like model under the binary cross-entropy. With every sigmoid all but 0 or 1, the labels drawn
    are those: the sampled Fisher's factors are the empirical Fisher's for them. Its G is that of ℓₙ, the BCE
    averaged over the sample's outputs (here at random bits as labels, the sigmoids away from 0 and 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6)).double()
    params = list(model.parameters())
    inputs = torch.rand(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bits = torch.randint(0, 2, (5, 6), generator=torch.Generator().manual_seed(4)).double()
    factors = KroneckerFactors(model, params, damping=0.1, fisher="empirical", distribution="bernoulli")
    factors.refresh(inputs, bits, torch.Generator().manual_seed(0))
    logits = model(inputs)
    loss = functional.binary_cross_entropy_with_logits(logits, bits, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, logits)
    per_sample = gradient.detach() / 6  # each ℓₙ averages its 6 outputs
    g = per_sample.T @ per_sample / 5
    damped = g + 0.1 * g.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(factors.inverses[1][1], torch.linalg.inv(damped))

    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([40.0, -40.0, 40.0, -40.0, 40.0, -40.0], dtype=torch.float64))
    drawn = (model[2].bias > 0).double().expand(5, 6)
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solved = {}
    for name, fisher, labels in [
        ("sampled", "sampled", bits),
        ("drawn", "empirical", drawn),
        ("bits", "empirical", bits),
    ]:
        factors = KroneckerFactors(model, params, damping=0.1, fisher=fisher, distribution="bernoulli")
        factors.refresh(inputs, labels, torch.Generator().manual_seed(0))
        solved[name] = factors.inverse_product(v)
    torch.testing.assert_close(solved["sampled"], solved["drawn"])
    assert not torch.allclose(solved["sampled"], solved["bits"])


def test_the_sampled_labels_are_drawn_not_picked_the_output_layers_g_is_the_softmaxs_covariance():
    """Over 4,000 copies of one image the output layer's G (gradients p − e_y, y drawn from p) is diag(p) − ppᵀ up to
    sampling error: the labels are drawn from p, not its argmax."""
    model, inputs, _ = small_problem()
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.copy_(torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)))
    copies = inputs[:1].expand(4000, 1, 5, 5)
    factors = KroneckerFactors(model, list(model.parameters()), damping=0.1)
    factors.refresh(copies, torch.zeros(4000, dtype=torch.int64), torch.Generator().manual_seed(0))
    damped = torch.linalg.inv(factors.inverses[2][1])  # G + 0.1 · mean diag(G) · I
    g = damped - 0.1 / 1.1 * damped.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    torch.testing.assert_close(g, torch.diag(p) - torch.outer(p, p), rtol=0.0, atol=0.03)


def test_layers_it_would_factor_wrongly_are_refused():
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(18, 3))
    with pytest.raises(ValueError, match="one group"):
        KroneckerFactors(grouped, list(grouped.parameters()), damping=0.1)
    reflected = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(50, 3))
    with pytest.raises(ValueError, match="zero padding"):
        KroneckerFactors(reflected, list(reflected.parameters()), damping=0.1)
    sequence = nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.Linear(6, 3))
    factors = KroneckerFactors(sequence, list(sequence.parameters()), damping=0.1)
    with pytest.raises(ValueError, match=r"\(N, features\)"):
        factors.refresh(torch.randn(5, 2, 4), torch.zeros(5, dtype=torch.int64), torch.Generator())


def test_the_variant_refuses_bad_settings_when_made_not_at_its_first_step():
    params = list(SmallCNN().parameters())
    with pytest.raises(ValueError, match="damping"):
        FlatKFAC(params, damping=-1.0)
    with pytest.raises(ValueError, match="distribution"):
        FlatKFAC(params, distribution="poisson")
    with pytest.raises(ValueError, match="reject_pairs"):
        FlatKFAC(params, reject_pairs=True)


def test_the_factors_are_formed_over_the_share_of_the_samples_asked_for(monkeypatch):
    closure = ClassifierClosure()
    variant = FlatKFAC(list(closure.model.parameters()), memory=5, damping=0.1, fraction=0.25, refresh=2)
    sizes = []
    original = KroneckerFactors.refresh

    def recorded(self, inputs, targets, generator):
        sizes.append((inputs.shape[0], targets.shape[0]))
        original(self, inputs, targets, generator)

    monkeypatch.setattr(KroneckerFactors, "refresh", recorded)
    for _ in range(6):
        variant.step(closure)
    assert len(sizes) >= 2 and set(sizes) == {(6, 6)}  # 25 % of 24


def test_a_refresh_the_budget_cannot_pay_for_keeps_the_factors_and_lets_the_step_end():
    """The last accepted step must still return (so that the race records its point); the factors held serve it.
    Before any factors are formed, the budget's refusal ends the run as any evaluation's does."""

    budget_spent = levers_kfac.BudgetSpent
    closure = ClassifierClosure()
    variant = FlatKFAC(list(closure.model.parameters()), memory=5, damping=0.1, refresh=1)
    variant.step(closure)
    assert variant.factors.refreshes == 1
    refusals = []

    def refuse(kind, cost=None):
        refusals.append(kind)
        raise budget_spent

    closure.charge = refuse
    for _ in range(10):  # until an accepted step asks for a refresh
        loss = variant.step(closure)
        if refusals:
            break
    assert refusals and variant.factors.refreshes == 1
    assert loss == variant.loss  # the step returned its accepted point
    fresh_closure = ClassifierClosure()
    fresh_closure.charge = refuse
    fresh = FlatKFAC(list(fresh_closure.model.parameters()), memory=5, damping=0.1)
    with pytest.raises(budget_spent):
        fresh.step(fresh_closure)
