"""Lever 71 of issue #14, a research variant kept out of the library: the secant mode with a Kronecker-factored H₀.

The quasi-Newton models measured on the MNIST CNN (γI, the diagonal H₀, the others of levers 14, 15 and 65–70) use
nothing of the network's structure. K-FAC (Martens & Grosse 2015; for convolutions, KFC: Grosse & Martens 2016)
does: for each layer l with weights and bias V (out × in + 1), the Fisher's block is approximated by A ⊗ G,

* A = (1/N) Σₙ Σₜ aₙₜ aₙₜᵀ, the layer's inputs with a 1 appended (t: the positions of a convolution's patches, one
  for a linear layer),
* G = (1/(N T)) Σₙ Σₜ gₙₜ gₙₜᵀ, the gradients of sample n's loss ℓₙ with respect to the layer's outputs at position t
  (T positions; labels drawn from the model's own distribution, ``fisher="sampled"`` — a categorical over the softmax
  for the cross-entropy, Bernoullis over the sigmoids for the binary cross-entropy, ``distribution`` — or the true
  ones, ``fisher="empirical"``),

and the block's inverse applied to V is (G + ε_G I)⁻¹ V (A + ε_A I)⁻¹. The damping (κ = ``damping``):
``damping_mode="layer"``, ε = κ · tr(F) / dim F for each factor F; ``"global"``, one Tikhonov term η = κ × (K's mean
diagonal over all weights) split between each layer's factors by π = √(a/g) (Martens & Grosse 2015, §6.3).
:class:`KfacPairs` makes H₀ = γ_K K⁻¹ of the secant mode's two-loop recursion, γ_K = maxᵢ sᵢᵀyᵢ / yᵢᵀK⁻¹yᵢ over the
pairs held (the secant scaling in K's metric, as the diagonal H₀'s γ_D). Between refreshes, every ``refresh``
accepted steps, the factors are held.

A factor of more than ``LOW_RANK_ABOVE`` rows (the MNIST CNN's hidden layer: 4,609) is kept as its samples' inputs
Z = X / √N (A = ZᵀZ, of rank ≤ the samples used) and inverted by Woodbury, (ZᵀZ + εI)⁻¹ = (I − Zᵀ(εI + ZZᵀ)⁻¹Z) / ε,
or, with ``rank`` = k, by A's k largest eigenpairs and ε on the rest (:func:`_input_inverse`).

What it costs: the factors take a forward and a backward over ``fraction`` of the training samples, charged to the
run as ``fraction`` of a gradient pass when ``charge`` (off: the upper bound, what K-FAC's direction is worth if its
statistics were free), plus products that no gradient pass makes (for the hidden layer, ZZᵀ: samples² × 4,609
multiply-adds, its eigenpairs, and K⁻¹ applied to r and to each new pair), in the row's time and not in its passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as functional
from levers_variants import FlatSCG, TwoLoopPairs
from peers_metering import BudgetSpent
from torch import nn

LOW_RANK_ABOVE = 1024
"""A factor with more rows than this is kept as Z (A = ZᵀZ) and inverted by Woodbury."""


def check_settings(damping: float, fisher: str, damping_mode: str, rank: int | None, distribution: str) -> None:
    """Refuse, by name, a setting :class:`KroneckerFactors` does not have."""
    if not damping > 0.0:
        raise ValueError(f"damping κ must be > 0, got {damping}")
    if fisher not in ("sampled", "empirical"):
        raise ValueError(f"fisher must be 'sampled' or 'empirical', got {fisher!r}")
    if damping_mode not in ("layer", "global"):
        raise ValueError(f"damping_mode must be 'layer' or 'global', got {damping_mode!r}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be ≥ 1 (None: every direction of A's samples), got {rank}")
    if distribution not in ("categorical", "bernoulli"):
        raise ValueError(f"distribution must be 'categorical' or 'bernoulli', got {distribution!r}")


class KroneckerFactors:
    """The K-FAC factors A, G of a model's ``nn.Linear`` and ``nn.Conv2d`` layers, and the product K⁻¹v.

    ``layers``: (module, offset) pairs, offset the position of the module's weight in the flat vector (its bias, if
    any, follows the weight)."""

    def __init__(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        damping: float,
        fisher: str = "sampled",
        damping_mode: str = "layer",
        rank: int | None = None,
        distribution: str = "categorical",
    ) -> None:
        check_settings(damping, fisher, damping_mode, rank, distribution)
        self.model, self.damping, self.fisher = model, damping, fisher
        self.damping_mode, self.rank, self.distribution = damping_mode, rank, distribution
        offsets, offset = {}, 0
        for p in params:
            offsets[id(p)] = offset
            offset += p.numel()
        self.size = offset
        self.layers: list[tuple[nn.Module, int]] = []
        covered = 0
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if isinstance(module, nn.Conv2d) and (
                    module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
                ):
                    raise ValueError("KroneckerFactors takes convolutions of one group, zero padding given in numbers")
                if module.bias is None:
                    raise ValueError("KroneckerFactors expects every layer to have a bias")
                start = offsets[id(module.weight)]
                if offsets[id(module.bias)] != start + module.weight.numel():
                    raise ValueError("KroneckerFactors expects each layer's bias right after its weight")
                self.layers.append((module, start))
                covered += module.weight.numel() + module.bias.numel()
        if covered != self.size:
            raise ValueError("KroneckerFactors covers nn.Linear and nn.Conv2d layers only; the model has others")
        self.inverses: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = []
        """Per layer: V ↦ V (A + ε_A I)⁻¹ (in float64), and (G + ε_G I)⁻¹."""
        self.refreshes = 0

    @torch.no_grad()
    def refresh(self, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> None:
        """A and G at the weights the model holds, over ``inputs`` (targets: the true labels, for the empirical
        Fisher), and their damped inverses."""
        captured: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured[module] = (args[0].detach(), output)

        handles = [module.register_forward_hook(keep) for module, _ in self.layers]
        try:
            with torch.enable_grad():
                logits = self.model(inputs)
                loss = self._sample_loss(logits, targets, generator)
                outputs = [captured[module][1] for module, _ in self.layers]
                gradients = torch.autograd.grad(loss, outputs)
        finally:
            for handle in handles:
                handle.remove()
        samples = inputs.shape[0]
        factors = []  # per layer: (A as a matrix, or Z with A = ZᵀZ; G)
        for (module, _), gradient in zip(self.layers, gradients):
            layer_input = captured[module][0]
            if isinstance(module, nn.Conv2d):
                patches = functional.unfold(
                    layer_input, module.kernel_size, module.dilation, module.padding, module.stride
                )  # (N, C·kh·kw, T)
                positions = patches.shape[-1]
                rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
                output_rows = gradient.flatten(2).transpose(1, 2).reshape(-1, gradient.shape[1]).double()
                g_factor = output_rows.T @ output_rows / (samples * positions)
            else:
                if layer_input.dim() != 2:
                    raise ValueError(
                        f"KroneckerFactors takes a linear layer's input as (N, features): {tuple(layer_input.shape)}"
                    )
                rows = layer_input
                g_factor = gradient.T.double() @ gradient.double() / samples
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
            if rows.shape[1] > LOW_RANK_ABOVE:
                a_factor: Any = rows / math.sqrt(samples)  # Z (float32: the products with it are the large ones)
            else:
                a_factor = rows.T.double() @ rows.double() / samples
            factors.append((a_factor, g_factor))
        self.inverses = [
            (_input_inverse(a_factor, a_damping, self.rank), _damped_inverse(g_factor, g_damping))
            for (a_factor, g_factor), (a_damping, g_damping) in zip(factors, self._dampings(factors))
        ]
        self.refreshes += 1

    def _sample_loss(self, logits: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Σₙ ℓₙ over the samples (so that g is each sample's loss gradient), ℓₙ the sample's loss at labels drawn from
        the model's distribution (``fisher="sampled"``) or at ``targets``: a categorical over the softmax with the
        cross-entropy, or independent Bernoullis over the sigmoids with the binary cross-entropy averaged over the
        outputs (``nn.BCEWithLogitsLoss``'s mean, as the autoencoder's loss)."""
        if self.distribution == "categorical":
            if self.fisher == "sampled":
                probabilities = torch.softmax(logits.detach().double(), 1)
                targets = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
            return functional.cross_entropy(logits, targets, reduction="sum")
        if self.fisher == "sampled":
            targets = torch.bernoulli(torch.sigmoid(logits.detach()), generator=generator)
        outputs = logits[0].numel()
        return functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / outputs

    def _dampings(self, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[float, float]]:
        """(ε_A, ε_G) per layer from the factors' mean diagonals a = tr(A)/dim A, g = tr(G)/dim G:
        ``"layer"``: (κa, κg); ``"global"``: Tikhonov damping η = κ · (the mean diagonal of K over all weights) split
        between the factors by π = √(a/g) as Martens & Grosse (2015, §6.3): (π√η, √η/π)."""
        means = [(_mean_diagonal(a_factor), float(g_factor.diagonal().mean())) for a_factor, g_factor in factors]
        if self.damping_mode == "layer":
            return [(self.damping * a, self.damping * g) for a, g in means]
        sizes = [(a_factor.shape[1], g_factor.shape[0]) for a_factor, g_factor in factors]
        weighted = sum(a * g * width * height for (a, g), (width, height) in zip(means, sizes))
        eta = self.damping * weighted / sum(width * height for width, height in sizes)
        dampings = []
        for a, g in means:
            pi = math.sqrt(a / g) if a > 0.0 and g > 0.0 else 1.0
            dampings.append((pi * math.sqrt(eta), math.sqrt(eta) / pi))
        return dampings

    def inverse_product(self, v: torch.Tensor) -> torch.Tensor:
        """K⁻¹v, layer by layer: (G + ε_G I)⁻¹ V (A + ε_A I)⁻¹ with V = [W | b] the layer's part of v."""
        if not self.inverses:
            raise RuntimeError("KroneckerFactors.inverse_product before refresh")
        out = torch.empty_like(v)
        for (module, start), (times_a_inverse, g_inverse) in zip(self.layers, self.inverses):
            outputs = module.weight.shape[0]
            weights = module.weight.numel()
            width = weights // outputs
            block = torch.cat(
                [v[start : start + weights].view(outputs, width), v[start + weights : start + weights + outputs, None]],
                dim=1,
            )
            result = (g_inverse @ times_a_inverse(block)).to(v.dtype)
            out[start : start + weights] = result[:, :width].reshape(-1)
            out[start + weights : start + weights + outputs] = result[:, width]
        return out


def _mean_diagonal(a_factor: torch.Tensor) -> float:
    """tr(A) / dim A, for A a matrix or A = ZᵀZ given as Z (more columns than ``LOW_RANK_ABOVE``)."""
    if a_factor.shape[1] > LOW_RANK_ABOVE:
        return float((a_factor.double() ** 2).sum()) / a_factor.shape[1]
    return float(a_factor.diagonal().mean())


def _input_inverse(
    a_factor: torch.Tensor, epsilon: float, rank: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """V ↦ V (A + εI)⁻¹ (float64), for A a matrix or, with more columns than ``LOW_RANK_ABOVE``, A = ZᵀZ given as Z:
    by Woodbury, V(A + εI)⁻¹ = (V − ((εI + ZZᵀ)⁻¹ Z Vᵀ)ᵀ Z) / ε; or with ``rank`` k by A's k largest eigenpairs U, Λ
    (from ZZᵀ's), V(A + εI)⁻¹ ≈ V/ε + (VU) c Uᵀ with c = 1/(Λ + ε) − 1/ε (the rest of A's spectrum taken as 0)."""
    if a_factor.shape[1] <= LOW_RANK_ABOVE:
        inverse = _damped_inverse(a_factor, epsilon)
        return lambda block: block.double() @ inverse
    z = a_factor
    inner = (z @ z.T).double()
    if rank is None:
        inner.diagonal().add_(epsilon)
        factor = torch.linalg.cholesky(inner)

        def woodbury(block: torch.Tensor) -> torch.Tensor:
            projected = torch.cholesky_solve((block @ z.T).T.double(), factor).to(z.dtype)  # (εI + ZZᵀ)⁻¹ Z Vᵀ
            return ((block - projected.T @ z) / epsilon).double()

        return woodbury
    eigenvalues, vectors = torch.linalg.eigh(inner)
    eigenvalues, vectors = eigenvalues[-rank:].clamp_min(0.0), vectors[:, -rank:]
    kept = eigenvalues > 0.0
    basis = (z.T.double() @ (vectors[:, kept] / eigenvalues[kept].sqrt())).to(z.dtype)  # U = ZᵀQΛ^-½
    coefficients = (1.0 / (eigenvalues[kept] + epsilon) - 1.0 / epsilon).to(z.dtype)
    return lambda block: (block / epsilon + ((block @ basis) * coefficients) @ basis.T).double()


def _damped_inverse(factor: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(F + εI)⁻¹ of a symmetric positive semi-definite F (float64); ε > 0."""
    damped = factor + max(epsilon, 1e-30) * torch.eye(factor.shape[0], dtype=factor.dtype)
    return torch.cholesky_inverse(torch.linalg.cholesky(damped))


class KfacPairs(TwoLoopPairs):
    """The secant pairs with H₀ = γ_K K⁻¹ (:class:`KroneckerFactors`), γ_K = maxᵢ sᵢᵀyᵢ / yᵢᵀK⁻¹yᵢ over the pairs
    held, in the two-loop recursion; H = I while no pair is held (the library's first step). Each yᵢᵀK⁻¹yᵢ is
    computed once per pair and factors; with ``recompute=False`` once per pair, with the factors held when it came
    (no product for the pairs held at a refresh)."""

    def __init__(
        self, params: list[torch.Tensor], memory: int, factors: KroneckerFactors, recompute: bool = True
    ) -> None:
        super().__init__(params, memory, window=memory, pick="max")
        self.factors, self.recompute = factors, recompute
        self._metric: dict[int, tuple[float, float]] = {}  # slot i → (sᵢᵀyᵢ, yᵢᵀK⁻¹yᵢ) for the factors held
        self._version = -1  # the factors' refresh count when _metric was filled

    def _initial_inverse(self, q: torch.Tensor) -> torch.Tensor:
        if self.recompute and self._version != self.factors.refreshes:
            self._metric, self._version = {}, self.factors.refreshes
        (block,) = self.blocks
        ratios = []
        for i in self.slots:
            curvature = float(self.sy[i, i])
            if self._metric.get(i, (math.nan, 0.0))[0] != curvature:  # a new pair in slot i, or new factors
                change = block[1, i]
                self._metric[i] = (curvature, float(change @ self.factors.inverse_product(change)))
            ratios.append(curvature / self._metric[i][1])
        return max(ratios) * self.factors.inverse_product(q)


class FlatKFAC(FlatSCG):
    """:class:`levers_variants.FlatSCG` with :class:`KfacPairs`: the library's secant mode (loss first) whose H₀ is
    γ_K K⁻¹, the factors formed at the first accepted point (for the first preconditioned direction) and then after
    every ``refresh`` accepted steps, over ``fraction`` of the training samples (drawn afresh at each refresh,
    ``seed``); ``rank``: A's largest eigenpairs kept for the large factors (:func:`_input_inverse`); ``recompute``:
    :class:`KfacPairs`'s."""

    def __init__(
        self,
        params: list[torch.Tensor],
        memory: int = 20,
        damping: float = 1e-2,
        refresh: int = 1,
        fraction: float = 1.0,
        fisher: str = "sampled",
        damping_mode: str = "layer",
        rank: int | None = None,
        distribution: str = "categorical",
        recompute: bool = True,
        charge: bool = True,
        seed: int = 0,
        **options: Any,
    ) -> None:
        if options.get("reject_pairs"):
            raise ValueError("FlatKFAC counts accepted steps in _precondition: not with reject_pairs")
        check_settings(damping, fisher, damping_mode, rank, distribution)
        super().__init__(params, memory=memory, **options)
        if refresh < 1 or not 0.0 < fraction <= 1.0:
            raise ValueError(f"refresh must be ≥ 1 and 0 < fraction ≤ 1, got {refresh} and {fraction}")
        self.memory, self.damping, self.fisher, self.damping_mode = memory, damping, fisher, damping_mode
        self.refresh, self.fraction, self.charge = refresh, fraction, charge
        self.rank, self.recompute, self.distribution = rank, recompute, distribution
        self.generator = torch.Generator().manual_seed(seed)
        self.factors: KroneckerFactors | None = None
        self.closure: Any = None
        self.accepted_since_refresh = 0
        self.factor_passes = 0.0

    def step(self, closure: Any) -> float:
        if self.factors is None:
            self.closure = closure
            self.factors = KroneckerFactors(
                closure.model, self.params, self.damping, self.fisher, self.damping_mode, self.rank, self.distribution
            )
            self.pairs = KfacPairs([self._flat()], self.memory, self.factors, self.recompute)
        return super().step(closure)

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        assert self.factors is not None
        if not self.pairs.is_identity():
            self.accepted_since_refresh += 1
            if self.factors.refreshes == 0 or self.accepted_since_refresh >= self.refresh:
                self._refresh_factors()
        return super()._precondition(r)

    def _refresh_factors(self) -> None:
        """The factors at the weights the parameters hold (the accepted point), charged as ``fraction`` of a
        gradient pass when ``charge``."""
        assert self.factors is not None
        inputs, targets = self.closure.problem.train
        count = max(1, round(self.fraction * inputs.shape[0]))
        if count < inputs.shape[0]:
            chosen = torch.randperm(inputs.shape[0], generator=self.generator)[:count]
            inputs, targets = inputs[chosen], targets[chosen]
        if self.charge:
            share = count / self.closure.problem.train[0].shape[0]
            try:
                self.closure.charge("gradient", cost=share)
            except BudgetSpent:
                if self.factors.refreshes == 0:
                    raise
                return  # the factors held serve this last step; the run ends at its next evaluation, after the
                # accepted point this step reached is recorded (levers.py records it when step returns)
            self.closure.calls["gradient"] -= 1  # charged to the budget, not a call of the accumulator's
            self.factor_passes += share
        self.factors.refresh(inputs, targets, self.generator)
        self.accepted_since_refresh = 0
