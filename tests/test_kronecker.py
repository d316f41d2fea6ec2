"""moller_scg.kronecker and SCG(memory=m, kronecker_factors=…): K-FAC's factors as the secant mode's H₀."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as functional
from reference_scg import two_loop
from torch import nn

from moller_scg import SCG, KroneckerFactors, kronecker
from moller_scg.quasi_newton import SecantPairs


class SmallCNN(nn.Module):
    """A convolution (2 filters, 3 × 3, padding 1), tanh, a hidden linear layer and a linear output of 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.hidden = nn.Linear(2 * 5 * 5, 6)
        self.output = nn.Linear(6, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(images))
        return self.output(torch.tanh(self.hidden(x.flatten(1))))


def small_problem(samples: int = 7) -> tuple[SmallCNN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN().double()
    inputs = torch.randn(samples, 1, 5, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (samples,))
    return model, inputs, targets


def drawn_labels(output: torch.Tensor, loss: str, generator: torch.Generator) -> torch.Tensor:
    """The labels the factors draw, replayed from the same generator (after its permutation of the samples)."""
    if loss == "cross_entropy":
        return torch.multinomial(torch.softmax(output.double(), 1), 1, generator=generator).squeeze(1)
    if loss == "binary_cross_entropy":
        return (torch.rand(output.shape, generator=generator, dtype=torch.float64) < torch.sigmoid(output)).double()
    return output + torch.randn(output.shape, generator=generator, dtype=torch.float64)


def sample_loss(output: torch.Tensor, label: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return functional.cross_entropy(output, label, reduction="sum")
    if loss == "binary_cross_entropy":
        return functional.binary_cross_entropy_with_logits(output, label, reduction="sum")
    return 0.5 * ((output - label) ** 2).sum()


def factors_by_definition(
    model: SmallCNN,
    inputs: torch.Tensor,
    loss: str,
    seed: int = 0,
    batch_size: int = 1024,
    labels: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A = (1/N) Σₙ Σₜ aaᵀ and G = (1/(NT)) Σₙ Σₜ ggᵀ of each layer, sample by sample and position by position, at the
    labels the factors draw, batch by batch (all N samples: fraction 1), or at ``labels`` (the empirical Fisher of
    ``benchmarks/levers_kfac.py``'s research variant)."""
    if labels is None:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(inputs.shape[0], generator=generator)
        inputs = inputs[order]
        with torch.no_grad():
            labels = torch.cat(
                [
                    drawn_labels(model(inputs[start : start + batch_size]), loss, generator)
                    for start in range(0, len(inputs), batch_size)
                ]
            )
    n = inputs.shape[0]
    result = []
    for layer in (model.conv, model.hidden, model.output):
        a_sum, g_sum, positions = 0.0, 0.0, 1
        for i in range(n):
            seen: dict[str, torch.Tensor] = {}
            handle = layer.register_forward_hook(lambda m, args, out, seen=seen: seen.update(a=args[0], s=out))
            output = model(inputs[i : i + 1])
            handle.remove()
            (gradient,) = torch.autograd.grad(sample_loss(output, labels[i : i + 1], loss), [seen["s"]])
            seen["a"] = seen["a"].detach()
            if layer is model.conv:
                patches = functional.unfold(seen["a"], 3, padding=1)[0].T  # (T, 9)
                positions = patches.shape[0]
                a_rows = torch.cat([patches, torch.ones(positions, 1, dtype=torch.float64)], dim=1)
                g_rows = gradient[0].flatten(1).T  # (T, 2)
            else:
                a_rows = torch.cat([seen["a"], torch.ones(1, 1, dtype=torch.float64)], dim=1)
                g_rows = gradient
            a_sum = a_sum + a_rows.T @ a_rows
            g_sum = g_sum + g_rows.T @ g_rows
        result.append((a_sum / n, g_sum / (n * positions)))
    return result


def global_dampings(factors: list[tuple[torch.Tensor, torch.Tensor]], kappa: float) -> list[tuple[float, float]]:
    """ε_A = π√η, ε_G = √η/π with η = κ · (K's mean diagonal over all the weights) and π = √(a/g)."""
    diagonal_sum = sum(float(a.diagonal().sum() * g.diagonal().sum()) for a, g in factors)
    eta = kappa * diagonal_sum / sum(a.shape[0] * g.shape[0] for a, g in factors)
    result = []
    for a, g in factors:
        pi = math.sqrt(float(a.diagonal().mean()) / float(g.diagonal().mean()))
        result.append((pi * math.sqrt(eta), math.sqrt(eta) / pi))
    return result


def as_matrix(v: torch.Tensor, offset: int, layer: nn.Module) -> torch.Tensor:
    """The layer's part of the flat v as V = [W | b] (out × in + 1)."""
    outputs, weights = layer.weight.shape[0], layer.weight.numel()
    return torch.cat(
        [v[offset : offset + weights].view(outputs, -1), v[offset + weights : offset + weights + outputs, None]], 1
    )


def bound_factors(model: nn.Module, inputs: torch.Tensor, **options) -> KroneckerFactors:
    factors = KroneckerFactors(model, inputs, **{"fraction": 1.0, **options})
    factors.bind(list(model.parameters()))
    return factors


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
@pytest.mark.parametrize("wide_above", [1024, 20, 5])
def test_the_inverse_is_each_layers_damped_kronecker_factors_inverted(monkeypatch, loss, wide_above):
    """K⁻¹v undone by (G + ε_G I) V (A + ε_A I), with A and G formed by their definitions at the labels the factors
    draw from each loss's distribution and the global damping's ε. With wide factors above 20 the hidden layer's A
    (51 wide, 7 samples) is held as its rows: through Woodbury's form and through its eigenpairs when all are kept.
    Above 5, the convolution's (10 wide, 175 rows) and the output layer's (7 wide, 7 rows) are wide but formed
    whole, also when their rows come in batches of 3 that pass the width only in the third."""
    monkeypatch.setattr(kronecker, "LOW_RANK_ABOVE", wide_above)
    model, inputs, _ = small_problem()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    settings = [(None, 1024)] if wide_above == 1024 else [(None, 1024), (7, 1024), (None, 3)]
    for rank, batch_size in settings:
        expected_factors = factors_by_definition(model, inputs, loss, seed=3, batch_size=batch_size)
        dampings = global_dampings(expected_factors, 0.3)
        factors = bound_factors(model, inputs, loss=loss, damping=0.3, rank=rank, seed=3, batch_size=batch_size)
        factors.refresh()
        solved = factors.inverse_product(v)
        offset = 0
        layers = (model.conv, model.hidden, model.output)
        for layer, (a, g), (a_damping, g_damping) in zip(layers, expected_factors, dampings):
            damped_a = a + a_damping * torch.eye(a.shape[0], dtype=torch.float64)
            damped_g = g + g_damping * torch.eye(g.shape[0], dtype=torch.float64)
            undone = damped_g @ as_matrix(solved, offset, layer) @ damped_a
            torch.testing.assert_close(undone, as_matrix(v, offset, layer), rtol=1e-8, atol=1e-8)
            offset += layer.weight.numel() + layer.bias.numel()


def test_a_rank_k_input_factor_keeps_as_largest_eigenpairs(monkeypatch):
    """With k below A's rank, V(A + εI)⁻¹ ≈ V/ε + (VU)(1/(Λ + ε) − 1/ε)Uᵀ over A's k largest eigenpairs U, Λ."""
    monkeypatch.setattr(kronecker, "LOW_RANK_ABOVE", 20)
    model, inputs, _ = small_problem()
    (_, _), (a, _), _ = factors_by_definition(model, inputs, "cross_entropy", seed=0)
    factors = bound_factors(model, inputs, damping=0.3, rank=3)
    factors.refresh()
    input_inverse = factors._input_inverses[1]
    assert input_inverse.kind == "eigen" and input_inverse.tensors[0].dtype == torch.float64
    epsilon = input_inverse.epsilon
    values, vectors = torch.linalg.eigh(a)
    top, basis = values[-3:], vectors[:, -3:]
    block = torch.randn(6, a.shape[0], dtype=torch.float64)
    expected = block / epsilon + ((block @ basis) * (1.0 / (top + epsilon) - 1.0 / epsilon)) @ basis.T
    torch.testing.assert_close(input_inverse.apply(block), expected, rtol=1e-8, atol=1e-10)


def test_a_dataset_of_pairs_gives_the_factors_of_its_inputs():
    """A map-style dataset whose items are (input, target) tuples: the factors of the inputs, as from the tensor."""
    model, inputs, targets = small_problem()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    results = []
    for source in (inputs, torch.utils.data.TensorDataset(inputs, targets)):
        factors = bound_factors(model, source, seed=2, batch_size=3)  # three batches of at most 3
        factors.refresh()
        results.append(factors.inverse_product(v))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_a_share_of_the_samples_is_drawn_afresh_at_each_refresh_and_grads_are_left_alone():
    model, inputs, _ = small_problem(samples=40)
    factors = bound_factors(model, inputs, fraction=0.1, seed=0)
    assert factors.samples == 4
    seen: list[int] = []
    handle = model.conv.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    grads = []
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
        grads.append(p.grad)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    factors.refresh()
    first = factors.inverse_product(v)
    factors.refresh()
    handle.remove()
    assert seen == [4, 4]
    assert not torch.equal(first, factors.inverse_product(v))  # other samples, other labels
    assert factors.refreshes == 2
    for p, grad in zip(model.parameters(), grads):
        assert p.grad is grad and bool((grad == 7.0).all())


@pytest.mark.parametrize("host", [True, False])
def test_the_compact_form_with_k_inverse_is_the_two_loop_recursion_and_refreshes_every_t_steps(monkeypatch, host):
    """SecantPairs' H r₊ with the factors equals the two-loop recursion with H₀ = γ_K K⁻¹ over the same pairs, with
    the factors formed at the first accepted step and then every T = 2, more steps than m = 3 (the oldest pairs
    leave), in NumPy and in torch."""
    from moller_scg import pair_arithmetic

    if not host:
        monkeypatch.setattr(pair_arithmetic, "HOST_ARITHMETIC_MAX", 0)
    model, inputs, _ = small_problem(samples=20)
    params = list(model.parameters())
    factors = bound_factors(model, inputs, fraction=0.5, every=2, damping=1.0)
    pairs = SecantPairs(params, 3, kronecker_factors=factors)
    assert pairs.on_host == host
    n = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(4)
    root = torch.randn(n, n, generator=generator, dtype=torch.float64)
    hessian = root @ root.T / n + torch.eye(n, dtype=torch.float64)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    refreshes = []
    for _ in range(7):
        direction, residual = (torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(2))
        new_residual = residual - hessian @ (0.5 * direction)
        pairs.refresh_factors_when_due()  # as SCG does before it commits an accepted step
        result = pairs.advance(split(direction, params), 0.5, split(residual, params), split(new_residual, params))
        refreshes.append(factors.refreshes)
        kept = (kept + [(0.5 * direction, residual - new_residual)])[-3:]
        expected = two_loop(kept, new_residual, initial_inverse=factors.inverse_product)
        torch.testing.assert_close(torch.cat([r.reshape(-1) for r in result]), expected, rtol=1e-10, atol=1e-12)
    assert refreshes == [1, 1, 2, 2, 3, 3, 4]


def split(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [piece.view_as(p) for piece, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


class Classification:
    """The cross-entropy of :class:`SmallCNN` over 40 random images (float64), as a closure."""

    def __init__(self, model: SmallCNN | None = None, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(40, 1, 5, 5, generator=generator, dtype=torch.float64)
        self.targets = torch.randint(0, 3, (40,), generator=generator)
        if model is None:
            torch.manual_seed(seed)
            model = SmallCNN().double()
        self.model = model
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        self.model.zero_grad()
        loss = functional.cross_entropy(self.model(self.inputs), self.targets)
        loss.backward()
        return loss

    def optimizer(self, **options) -> SCG:
        factors = KroneckerFactors(self.model, self.inputs, **{"fraction": 0.25, "every": 3, "damping": 1.0, **options})
        return SCG(self.model.parameters(), memory=4, kronecker_factors=factors)


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_training_lowers_the_loss_and_never_leaves_a_rejected_trial():
    problem = Classification()
    optimizer = problem.optimizer()
    losses = [float(problem().detach())]
    for _ in range(25):
        before = flat_weights(problem.model)
        loss = float(optimizer.step(problem))
        if not optimizer.trace.success:
            assert torch.equal(flat_weights(problem.model), before)
        assert loss <= losses[-1]
        losses.append(loss)
    assert losses[-1] < 0.5 * losses[0]
    assert optimizer._kronecker_factors.refreshes >= 5


def test_a_saved_state_resumes_bit_for_bit_with_new_factors_of_the_same_settings():
    """Save after 8 steps (through torch.save and torch.load(weights_only=True)), rebuild the model, the factors and
    SCG, load, and the next 12 steps — which refresh the factors — take the bits of the run that went on."""
    problem = Classification()
    optimizer = problem.optimizer()
    for _ in range(8):
        optimizer.step(problem)
    buffer = io.BytesIO()
    torch.save({"model": problem.model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for _ in range(12):
        optimizer.step(problem)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Classification(model=SmallCNN().double())
    resumed.model.load_state_dict(saved["model"])
    resumed_optimizer = resumed.optimizer()
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for _ in range(12):
        resumed_optimizer.step(resumed)
    assert torch.equal(flat_weights(resumed.model), flat_weights(problem.model))
    assert resumed_optimizer._kronecker_factors.refreshes == optimizer._kronecker_factors.refreshes


def test_a_state_saved_with_or_without_factors_is_refused_by_the_other():
    problem = Classification()
    with_factors = problem.optimizer()
    without = SCG(problem.model.parameters(), memory=4)
    for optimizer in (with_factors, without):
        for _ in range(3):
            optimizer.step(problem)
    with pytest.raises(ValueError, match="kronecker_factors"):
        copy.deepcopy(problem).optimizer().load_state_dict(without.state_dict())
    with pytest.raises(ValueError, match="kronecker_factors"):
        SCG(problem.model.parameters(), memory=4).load_state_dict(with_factors.state_dict())


def test_a_refresh_that_raises_leaves_the_accepted_weights_and_the_state():
    """The factors are formed at the accepted trial point, before SCG commits the step: if the model raises there, SCG
    puts the weights back to the point the step started from, its k and the pairs are as they were, and once the
    model works again the next steps go on."""
    problem = Classification()
    optimizer = problem.optimizer(every=1)
    optimizer.step(problem)
    optimizer.step(problem)
    pairs = optimizer._secant_pairs
    held = list(pairs.slots)
    before = flat_weights(problem.model)
    original_forward = problem.model.forward

    def forward_that_fails_outside_the_closure(images):
        if images.shape[0] != 40:  # the factors' 10 samples, not the closure's 40
            raise RuntimeError("out of memory in the factors' forward")
        return original_forward(images)

    problem.model.forward = forward_that_fails_outside_the_closure
    with pytest.raises(RuntimeError, match="factors' forward"):
        for _ in range(5):  # until a step is accepted
            before = flat_weights(problem.model)
            held = list(pairs.slots)
            k = optimizer.state_dict()["scg"]["scalars"]["k"]
            optimizer.step(problem)
    assert torch.equal(flat_weights(problem.model), before)
    assert pairs.slots == held
    assert optimizer.state_dict()["scg"]["scalars"]["k"] == k
    problem.model.forward = original_forward
    losses = [float(optimizer.step(problem)) for _ in range(4)]
    assert optimizer.state_dict()["scg"]["scalars"]["k"] == k + 4 and losses[-1] < losses[0]


def test_factors_that_are_not_finite_are_refused_and_the_ones_held_stay():
    model, inputs, _ = small_problem()
    factors = bound_factors(model, inputs)
    factors.refresh()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    held = factors.inverse_product(v)
    with torch.no_grad():
        model.hidden.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        factors.refresh()
    assert factors.refreshes == 1 and torch.equal(factors.inverse_product(v), held)


@pytest.mark.parametrize("with_factors", [False, True])
def test_a_deep_copy_of_scg_with_memory_restarts_and_steps_as_the_original(with_factors):
    """SCG(memory=m) deep-copied with its problem (the factors with it, whose model is the copy's), then restarted:
    both step alike, bit for bit."""
    problem = Classification()
    optimizer = problem.optimizer() if with_factors else SCG(problem.model.parameters(), memory=4)
    for _ in range(4):
        optimizer.step(problem)
    twin_problem, twin = copy.deepcopy((problem, optimizer))
    if with_factors:
        assert twin._kronecker_factors.model is twin_problem.model
    for each, each_problem in ((optimizer, problem), (twin, twin_problem)):
        each.restart()
        for _ in range(6):
            each.step(each_problem)
    assert torch.equal(flat_weights(twin_problem.model), flat_weights(problem.model))


def test_an_in_place_activation_after_a_layer_does_not_change_its_factors():
    """With nn.ReLU(inplace=True) after the hidden layer, G is still taken with respect to the layer's output."""
    torch.manual_seed(2)
    inputs = torch.randn(30, 4, dtype=torch.float64)
    results = []
    for inplace in (False, True):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3)).double()
        factors = bound_factors(model, inputs)
        factors.refresh()
        results.append(factors.inverse_product(torch.linspace(-1, 1, 4 * 6 + 6 + 6 * 3 + 3, dtype=torch.float64)))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_a_layer_called_twice_or_not_at_all_is_refused_at_the_first_refresh():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.tanh(self.layer(x)))

    twice = Twice().double()
    factors = bound_factors(twice, torch.randn(8, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than once"):
        factors.refresh()

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    skips = Skips().double()
    factors = bound_factors(skips, torch.randn(8, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="did not call"):
        factors.refresh()


def test_float32_factors_give_k_inverse_within_float32s_rounding_of_float64s(monkeypatch):
    """The same model and inputs in float32 and float64: K⁻¹v agrees to float32's precision, through the narrow
    inverses and the eigen form of a wide one (its basis and products in float64)."""
    monkeypatch.setattr(kronecker, "LOW_RANK_ABOVE", 20)
    model, inputs, _ = small_problem(samples=12)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.float32):
        copy_ = copy.deepcopy(model).to(dtype)
        factors = bound_factors(copy_, inputs.to(dtype), damping=0.01, rank=6, seed=5)
        factors.refresh()
        results.append(factors.inverse_product(v.to(dtype)).double())
    torch.testing.assert_close(results[1], results[0], rtol=2e-3, atol=1e-4 * float(results[0].abs().max()))


def test_a_parameter_group_added_later_is_factored_from_the_next_step():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    inputs, targets = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    factors = KroneckerFactors(model, inputs, fraction=0.5, every=100)
    optimizer = SCG(model[2].parameters(), memory=3, kronecker_factors=factors)

    def closure():
        optimizer.zero_grad()
        loss = functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    assert len(factors._layers) == 1 and factors.refreshes == 1
    optimizer.add_param_group({"params": list(model[0].parameters())})
    for _ in range(4):
        optimizer.step(closure)
    assert len(factors._layers) == 2 and factors.refreshes == 2  # formed anew for both layers, not after T = 100
    assert len(factors._input_inverses) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda entry: entry["inverses"][0].update(kind="cholesky"), "do not belong"),
        (lambda entry: entry["inverses"][2]["tensors"].__setitem__(0, torch.eye(5, dtype=torch.float64)), "do not"),
        (lambda entry: entry["inverses"][2].update(output=torch.eye(2, dtype=torch.float64)), "another shape"),
        (lambda entry: entry["inverses"].pop(), "these layers"),
    ],
)
def test_saved_factors_of_other_layers_are_refused_and_nothing_is_loaded(change, message):
    model, inputs, _ = small_problem()
    factors = bound_factors(model, inputs, seed=1)
    factors.refresh()
    entry = copy.deepcopy(factors.state_dict())
    change(entry)
    other = bound_factors(model, inputs, seed=2)
    other.refresh()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    held = other.inverse_product(v)
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(entry)
    assert torch.equal(other.inverse_product(v), held)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "nll"}, "loss"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"every": 0}, "every"),
        ({"damping": 0.0}, "damping"),
        ({"damping": math.inf}, "damping"),
        ({"rank": 0}, "rank"),
        ({"batch_size": 0}, "batch_size"),
        ({"every": 2.5}, "every"),
        ({"rank": True}, "rank"),
        ({"max_samples": 0}, "max_samples"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_settings_are_refused_by_name(options, message):
    model, inputs, _ = small_problem()
    with pytest.raises(ValueError, match=message):
        KroneckerFactors(model, inputs, **options)


def test_what_scg_cannot_use_is_refused_by_name():
    model, inputs, _ = small_problem()
    factors = KroneckerFactors(model, inputs)
    with pytest.raises(ValueError, match="memory=m"):
        SCG(model.parameters(), kronecker_factors=factors)
    with pytest.raises(ValueError, match="diagonal"):
        SCG(model.parameters(), memory=3, diagonal_scaling=True, kronecker_factors=factors)
    with pytest.raises(TypeError, match="KroneckerFactors"):
        SCG(model.parameters(), memory=3, kronecker_factors={"fraction": 0.1})
    with pytest.raises(TypeError, match="model"):
        KroneckerFactors(lambda x: x, inputs)
    with pytest.raises(ValueError, match="at least one"):
        KroneckerFactors(model, inputs[:0])


def test_parameters_outside_the_layers_it_factors_are_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    with pytest.raises(ValueError, match=r"1\.weight, 1\.bias"):
        SCG(model.parameters(), memory=3, kronecker_factors=KroneckerFactors(model, torch.randn(8, 4)))
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)).double()
    with pytest.raises(ValueError, match="groups=2"):
        SCG(grouped.parameters(), memory=3, kronecker_factors=KroneckerFactors(grouped, torch.randn(8, 2, 5, 5)))
    mixed = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2).double())
    with pytest.raises(ValueError, match="one dtype"):
        SCG(mixed.parameters(), memory=3, kronecker_factors=KroneckerFactors(mixed, torch.randn(8, 4)))
    linear = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="bias"):
        SCG([linear.weight], memory=3, kronecker_factors=KroneckerFactors(linear, torch.randn(8, 4)))


def test_frozen_layers_and_layers_without_bias_are_handled():
    """A layer whose weights SCG is not given is not factored; a layer without a bias has A without the ones
    column. Training a model of both lowers its loss."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
    model[0].requires_grad_(False)
    inputs, targets = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    factors = KroneckerFactors(model, inputs, fraction=0.5, every=2)
    optimizer = SCG([model[2].weight], memory=3, kronecker_factors=factors)

    def closure():
        optimizer.zero_grad()
        loss = functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(15):
        loss = float(optimizer.step(closure))
    assert loss < first
    assert len(factors._layers) == 1 and factors._input_inverses[0].tensors[0].shape == (6, 6)


def test_a_cross_entropy_model_that_does_not_return_logits_is_told_so():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)).double()
    factors = KroneckerFactors(model, torch.randn(8, 4, dtype=torch.float64))
    factors.bind(list(model.parameters()))
    with pytest.raises(ValueError, match=r"\(N, C\) logits"):
        factors.refresh()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_factors_are_applied_in_numpy_as_torch_applies_them(monkeypatch, dtype):
    """Whole factors on the CPU under HOST_FACTORS_MAX numbers take the NumPy path; K⁻¹v is torch's to rounding."""
    model, inputs, _ = small_problem()
    model = model.to(dtype)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=dtype)
    results = []
    for host_max in (kronecker.HOST_FACTORS_MAX, 0):
        monkeypatch.setattr(kronecker, "HOST_FACTORS_MAX", host_max)
        factors = bound_factors(model, inputs.to(dtype), seed=4)
        factors.refresh()
        assert (factors._host_inverses is not None) == (host_max > 0)
        results.append(factors.inverse_product(v))
    assert results[0].dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(results[0], results[1], rtol=tolerance, atol=tolerance * float(results[1].abs().max()))


def test_refusal_says_why_bind_would_refuse_and_binds_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    factors = KroneckerFactors(model, torch.randn(20, 3, dtype=torch.float64))
    linear = [*model[0].parameters(), *model[2].parameters()]
    assert factors.refusal(linear) is None
    everything = list(model.parameters())
    reason = factors.refusal(everything)
    assert reason is not None and "1.weight" in reason
    with pytest.raises(ValueError) as refused:
        factors.bind(everything)
    assert str(refused.value) == reason
    assert factors._layers == [] and factors._size == 0  # refusal bound nothing, nor did the refused bind
    factors.bind(linear)
    assert factors.refusal(everything) is not None and len(factors._layers) == 2  # a refusal leaves the binding


class SecondDerivative(nn.Module):
    """A physics-informed model in one dimension: its output is u''(x) + u(x) of a tanh MLP u, u'' by autograd (so
    the loss reaches the weights through the network's derivatives too, not through the layers' outputs alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            u = self.net(x)
            (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
            (ddu,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        return ddu + u


def test_a_loss_that_reaches_the_weights_through_the_networks_derivatives_is_refused_at_the_first_refresh():
    torch.manual_seed(0)
    model = SecondDerivative()
    factors = KroneckerFactors(model, torch.rand(40, 1, dtype=torch.float64), loss="mse", fraction=0.5)
    factors.bind(list(model.parameters()))
    with pytest.raises(ValueError, match=r"reaches the weight of Linear\(.*other than through the layer's outputs"):
        factors.refresh()
    assert factors.refreshes == 0 and factors._input_inverses == []
    reason = factors.refusal(list(model.parameters()))
    assert reason is not None and "physics-informed" in reason


def test_refusal_tries_the_forward_and_leaves_every_generator_and_buffer_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6, affine=False), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)
    ).double()
    factors = KroneckerFactors(model, torch.randn(30, 3, dtype=torch.float64), loss="cross_entropy")
    params = list(model.parameters())
    generator, global_rng = factors.generator.get_state(), torch.get_rng_state()
    statistics = [buffer.clone() for buffer in model.buffers()]
    assert factors.refusal(params) is None
    assert torch.equal(factors.generator.get_state(), generator) and torch.equal(torch.get_rng_state(), global_rng)
    assert all(torch.equal(buffer, saved) for buffer, saved in zip(model.buffers(), statistics))
    # What only a forward shows is found too: a layer the forward never calls.
    unused = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    unused.forward = lambda x: unused["used"](x)
    factors = KroneckerFactors(unused, torch.randn(30, 3, dtype=torch.float64), loss="mse")
    assert "did not call" in factors.refusal(list(unused.parameters()))


def test_the_identity_check_changes_no_bit_of_the_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    batch = torch.randn(12, 1, 6, 6)
    formed = []
    for check in (False, True):
        factors = KroneckerFactors(model, batch, loss="cross_entropy", seed=3)
        factors.bind(list(model.parameters()))
        sums = [kronecker._Sums() for _ in factors._layers]
        factors._accumulate(batch, sums, check_weights=check)
        formed.append([f for layer_sums in sums for f in layer_sums.factors(len(batch))])
    assert all(torch.equal(a, b) for a, b in zip(*formed))


def test_a_frozen_weight_in_the_optimizer_is_not_checked_and_the_refresh_goes_on():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    factors = KroneckerFactors(model, torch.randn(30, 3, dtype=torch.float64), loss="mse", fraction=0.5)
    factors.bind(list(model.parameters()))
    assert factors.refusal(list(model.parameters())) is None
    factors.refresh()
    assert factors.refreshes == 1
    gaps = factors.identity_gaps(list(model.parameters()), torch.randn(10, 3, dtype=torch.float64))
    assert math.isnan(gaps[0]) and gaps[1] == 0.0  # the frozen weight is not measured; float64 closes the identity


def test_a_dataset_of_numpy_inputs_gives_the_factors_of_the_same_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    arrays = [(row.numpy(), 0) for row in x]  # a map-style dataset: a list of (input, label) items
    products = []
    for inputs in (x, arrays):
        factors = KroneckerFactors(model, inputs, loss="cross_entropy", fraction=0.5)
        factors.bind(list(model.parameters()))
        factors.refresh()
        products.append(factors.inverse_product(torch.arange(26, dtype=torch.float64)))
    assert torch.equal(*products)
