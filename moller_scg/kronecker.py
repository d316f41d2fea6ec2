"""K-FAC's Kronecker-factored curvature K of a network, as the initial inverse H₀ = γ_K K⁻¹ of ``SCG(memory=m)``.

The secant mode's H₀ = γI (and the diagonal H₀) use nothing of the network's structure. K-FAC (Martens & Grosse
2015; for convolutions, KFC: Grosse & Martens 2016) does: for each ``nn.Linear`` or ``nn.Conv2d`` layer with weights
and bias V (out × in + 1), the block of the Fisher F = E[∇ℓ ∇ℓᵀ] that belongs to V is approximated by A ⊗ G,

* A = (1/N) Σₙ Σₜ aₙₜ aₙₜᵀ (summed over positions, as KFC's Ω), the layer's inputs aₙₜ with a 1 appended for the
  bias (t: the positions of a convolution's patches, or of a linear layer's leading dimensions beyond the batch's;
  one for a 2-D input),
* G = (1/(N T)) Σₙ Σₜ gₙₜ gₙₜᵀ, the gradients of sample n's loss ℓₙ with respect to the layer's outputs at
  position t (T positions), at labels drawn from the model's own predictive distribution — the *sampled* Fisher:
  a categorical over the softmax for ``loss="cross_entropy"``, independent Bernoullis over the sigmoids for
  ``"binary_cross_entropy"`` (with logits), a unit Gaussian around the output for ``"mse"``,

and the block's damped inverse applied to V is (G + ε_G I)⁻¹ V (A + ε_A I)⁻¹. The damping is Tikhonov's: one
η = κ · (the mean diagonal of K over all the weights), κ = ``damping``, split between each layer's factors by
π = √(a/g), with a and g the factors' mean diagonals (Martens & Grosse 2015, §6.3): ε_A = π√η, ε_G = √η/π.

The secant pairs set K⁻¹'s scale: γ_K = maxᵢ sᵢᵀyᵢ / yᵢᵀK⁻¹yᵢ over the pairs held
(:mod:`moller_scg.quasi_newton`), as γ = maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ sets H₀ = γI's. So K's own scale (a sum or a mean over
outputs in ℓ) does not matter.

An input factor wider than :data:`LOW_RANK_ABOVE` (the MNIST CNN's hidden layer, 4,609 wide) whose rows (samples
× positions) are fewer than its width is never formed: it is kept as its rows Z = X/√N (A = ZᵀZ, of rank at most
the rows), and with ``rank`` = k its k largest eigenpairs U, Λ come from the rows' Gram matrix ZZᵀ, so that
V(A + εI)⁻¹ ≈ V/ε + (VU)(1/(Λ + ε) − 1/ε)Uᵀ (the rest of A's spectrum taken as 0); with ``rank=None``, by Woodbury,
V(A + εI)⁻¹ = (V − ((εI + ZZᵀ)⁻¹ZVᵀ)ᵀZ)/ε exactly. With as many rows as its width or more (a wide convolution), A
is formed and inverted whole, as the narrow ones are.

What it costs: each refresh, a forward and a backward over ``samples`` of the training inputs (not counted in the
objective's evaluations), the factors' inverses (a narrow factor is inverted whole; a wide one held as rows costs
rows² × width multiply-adds for their Gram matrix, and its eigenpairs), and then K⁻¹ applied about twice a step (to
the direction and to each new pair's y) and to every pair held at each refresh. Everything is held in float64:
the inverses of the narrow factors, and width × k numbers (``rank`` k) or the rows Z (``rank=None``) for a wide one;
a refresh holds the layers' rows of one batch and the factors besides.

Measured (docs/performance.md, lever 71, as a research variant): on the MNIST CNN of ``benchmarks/peers.py``,
``SCG(memory=20)`` with this H₀ over 5 % of the digits every 5 accepted steps, κ = 10, rank 64, reached the 99 % and
99.9 % targets in about 0.7 of LBFGS(100)'s gradient passes and time, where γI takes 0.83.

References:
    Martens, J., Grosse, R. (2015). Optimizing neural networks with Kronecker-factored approximate curvature.
    ICML.
    Grosse, R., Martens, J. (2016). A Kronecker-factored approximate Fisher matrix for convolution layers. ICML.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn
from torch.utils.data import default_collate

from moller_scg import distributed as _dist

LOW_RANK_ABOVE = 1024
"""An input factor A wider than this is kept as its samples' rows Z (A = ZᵀZ) and never formed."""

HOST_FACTORS_MAX = 1 << 17
"""The most numbers the factors' inverses may hold, all whole matrices on the CPU, for K⁻¹ to be applied in NumPy
(:meth:`KroneckerFactors._host_product`); larger ones, or a wide factor's eigen or Woodbury form, stay in torch."""

HOST_DTYPES = (torch.float32, torch.float64)

CHECK_SAMPLES = 8
"""How many of the first training inputs :meth:`KroneckerFactors.refusal` runs the model on."""

GRADIENT_IDENTITY_TOLERANCE = 1e-2
"""The largest gap |∇_W ℓ − Σ g aᵀ| (over the larger of the two norms, :func:`identity_gap`) a layer may show at the
first refresh of its factors. On the race's models rounding gives at most 9.1e-7 in float32 (the MNIST CNN, the
autoencoder) and 0 in float64; the physics-informed net's layers show 0.60–0.82 (``python
benchmarks/kronecker_identity.py``). 10⁻² leaves room for coarser arithmetic (TF32 convolutions on a GPU, half
precision) without coming near the physics-informed net's."""

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
"""The losses whose predictive distribution the factors sample labels from: a categorical over the softmax of the
model's (N, C) logits, independent Bernoullis over the sigmoids of its logits, a unit Gaussian around its output."""


@dataclasses.dataclass
class _InputInverse:
    """V ↦ V(A + εI)⁻¹ for one layer's input factor A, as data (what a ``state_dict`` saves), every tensor float64.

    ``kind``: ``"matrix"`` (``tensors`` = [(A + εI)⁻¹]), ``"eigen"`` ([U, c] with c = 1/(Λ + ε) − 1/ε, the k largest
    eigenpairs of A) or ``"woodbury"`` ([Z, L], L the Cholesky factor of εI + ZZᵀ).
    """

    kind: str
    tensors: list[torch.Tensor]
    epsilon: float

    def apply(self, block: torch.Tensor) -> torch.Tensor:
        """V(A + εI)⁻¹, V the layer's (out × in + 1) part of a vector, computed and returned in float64 (in float32
        the eigen form's V/ε + VUcUᵀ would cancel along A's largest directions)."""
        block = block.double()
        if self.kind == "matrix":
            (inverse,) = self.tensors
            return block @ inverse
        if self.kind == "eigen":
            basis, coefficients = self.tensors
            return block / self.epsilon + ((block @ basis) * coefficients) @ basis.T
        rows, cholesky = self.tensors
        projected = torch.cholesky_solve((block @ rows.T).T, cholesky)  # (εI + ZZᵀ)⁻¹ZVᵀ
        return (block - projected.T @ rows) / self.epsilon

    def to(self, device: torch.device) -> _InputInverse:
        return _InputInverse(self.kind, [t.to(device=device, dtype=torch.float64) for t in self.tensors], self.epsilon)


@dataclasses.dataclass
class _Layer:
    """A factored layer: its module, where its weight (and bias) sit in the flat vector of the parameters."""

    module: nn.Linear | nn.Conv2d
    weight_offset: int
    bias_offset: int | None


@dataclasses.dataclass
class _Sums:
    """What a refresh adds up for one layer over its batches: Σaaᵀ (or, for a wide A while the rows are fewer than
    its width, the rows a themselves), Σggᵀ and the positions T per sample."""

    a_sum: torch.Tensor | None = None
    a_rows: list[torch.Tensor] = dataclasses.field(default_factory=list)
    g_sum: torch.Tensor | None = None
    positions: int = 1

    def add(self, rows: torch.Tensor, output_rows: torch.Tensor, positions: int) -> None:
        """Add one batch's input rows a (with the bias's 1) and output-gradient rows g (float64)."""
        self.positions = positions
        self.g_sum = _plus(self.g_sum, output_rows.T @ output_rows)
        width = rows.shape[1]
        held = sum(r.shape[0] for r in self.a_rows)
        if width > LOW_RANK_ABOVE and self.a_sum is None and held + rows.shape[0] < width:
            self.a_rows.append(rows)  # A = ZᵀZ of rank < its width: keep the rows
            return
        if self.a_rows:  # more rows than the width: A is formed after all
            rows = torch.cat([*self.a_rows, rows])
            self.a_rows = []
        self.a_sum = _plus(self.a_sum, rows.T @ rows)

    def factors(self, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, or Z with A = ZᵀZ; G) over ``samples`` samples."""
        assert self.g_sum is not None
        g_factor = self.g_sum / (samples * self.positions)
        if self.a_rows:
            return torch.cat(self.a_rows) / math.sqrt(samples), g_factor
        assert self.a_sum is not None
        return self.a_sum / samples, g_factor


def _plus(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


class KroneckerFactors:
    """K-FAC's factors of a model's ``nn.Linear`` and ``nn.Conv2d`` layers, formed every few accepted steps over a
    random share of the training inputs, for ``SCG(params, memory=m, kronecker_factors=…)``.

    Args:
        model: the network; every parameter the optimizer is given must be the weight or bias of one of its
            ``nn.Linear`` or ``nn.Conv2d`` layers (a convolution of one group, with zero padding given in numbers).
        inputs: the training inputs, a tensor whose first dimension counts the samples, or a
            ``torch.utils.data.Dataset`` (of inputs, or of tuples whose first element is the input). No labels are
            needed: they are drawn from the model.
        loss: which predictive distribution labels are drawn from (:data:`LOSSES`): ``"cross_entropy"`` (the model
            returns (N, C) logits), ``"binary_cross_entropy"`` (logits of independent Bernoullis), ``"mse"``.
        fraction: the share of the samples each refresh uses (drawn afresh each time), 0 < fraction ≤ 1. Default
            0.05.
        max_samples: the most samples a refresh uses, whatever ``fraction`` gives (``None``: no bound). Default 512:
            the factors are second moments, which a few hundred samples estimate (lever 71 measured 100 of the MNIST
            CNN's 2,000 digits), and a wide input factor costs rows² × width multiply-adds, which on full MNIST's
            3,000 rows of 5 % would outweigh a gradient pass.
        every: T, the number of accepted quasi-Newton steps between refreshes (the first comes at the first
            accepted step). Default 5.
        damping: κ, the Tikhonov damping relative to K's mean diagonal (the module's docstring). Default 10.
        rank: k, the eigenpairs kept of an input factor wider than :data:`LOW_RANK_ABOVE`; ``None``: all of them,
            by Woodbury. Default 64.
        batch_size: the most samples one forward of a refresh takes (the factors are sums over such batches).
            Default 1024.
        seed: the seed of the generator that picks the samples and draws the labels. Default 0.
        distributed: whether the factors are formed alike on every rank of a ``torch.distributed`` process group
            and held as rank 0's bits (``None``: when a process group is initialised, as for
            :class:`~moller_scg.GradientAccumulator`). Every rank must then give the same model, weights and
            ``inputs`` (all of them, not its shard) and refresh at the same steps, as the ranks of one SCG do; each
            forms the factors over the whole draw, then takes rank 0's by one broadcast, so the inverses, the damping
            and every decision taken from them agree bitwise. ``False`` for factors of one rank's own model.

    Attributes:
        refreshes: how many times the factors were formed.
        samples: the number of samples a refresh uses, max(1, round(fraction · N)), at most ``max_samples``.

    A refresh runs the model as it is, in its current mode (``train()`` or ``eval()``): dropout draws from torch's
    global generator, and a frozen ``BatchNorm`` in training mode updates its running statistics, as in any forward.
    What the factors cannot precondition is refused when SCG is built (parameters outside ``nn.Linear`` and
    ``nn.Conv2d`` layers, mixed dtypes or devices, grouped or non-zero-padded convolutions); a forward that does not
    call a factored layer, calls one twice, or returns no (N, C) logits for the cross-entropy is refused at the first
    refresh, by name, and so is a loss that reaches a layer's weight other than through the layer's outputs (the
    gradient identity ∇_W ℓ = Σ g aᵀ the factors rest on, checked on the first refresh's first batch: a
    physics-informed net's Δu breaks it). :meth:`refusal` asks all of this beforehand.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from moller_scg import SCG, KroneckerFactors
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        >>> x, labels = torch.randn(200, 4, dtype=torch.float64), torch.randint(3, (200,))
        >>> factors = KroneckerFactors(model, x, loss="cross_entropy", fraction=0.25)
        >>> optimizer = SCG(model.parameters(), memory=10, kronecker_factors=factors)
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = nn.functional.cross_entropy(model(x), labels)
        ...     loss.backward()
        ...     return loss
        >>> first = float(closure().detach())
        >>> for _ in range(30):
        ...     loss = optimizer.step(closure)
        >>> bool(loss < first) and factors.refreshes > 1
        True
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | torch.utils.data.Dataset,
        loss: str = "cross_entropy",
        fraction: float = 0.05,
        max_samples: int | None = 512,
        every: int = 5,
        damping: float = 10.0,
        rank: int | None = 64,
        batch_size: int = 1024,
        seed: int = 0,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"Invalid loss {loss!r}: choose one of {', '.join(map(repr, LOSSES))}")
        if not _is_real(fraction) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"Invalid fraction {fraction!r}: the share of samples must be in (0, 1]")
        if not _is_int(every) or every < 1:
            raise ValueError(f"Invalid every (T) {every!r}: refresh after T ≥ 1 accepted steps")
        if not _is_real(damping) or not 0.0 < damping < math.inf:
            raise ValueError(f"Invalid damping (κ) {damping!r}: it must be positive and finite")
        if rank is not None and (not _is_int(rank) or rank < 1):
            raise ValueError(f"Invalid rank {rank!r}: keep k ≥ 1 eigenpairs, or None for all of them (Woodbury)")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"Invalid batch_size {batch_size!r}: it must be ≥ 1")
        if max_samples is not None and (not _is_int(max_samples) or max_samples < 1):
            raise ValueError(f"Invalid max_samples {max_samples!r}: it must be ≥ 1, or None")
        if not _is_int(seed):
            raise ValueError(f"Invalid seed {seed!r}: it must be an int")
        count = _sample_count(inputs)
        self.distributed = _dist.resolve_distributed(distributed, inputs)
        self.model, self.inputs, self.loss = model, inputs, loss
        self.fraction, self.every, self.damping, self.rank = float(fraction), int(every), float(damping), rank
        self.batch_size = int(batch_size)
        self.samples = max(1, round(self.fraction * count))
        if max_samples is not None:
            self.samples = min(self.samples, int(max_samples))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.refreshes = 0
        self.steps_since_refresh = 0
        self._layers: list[_Layer] = []
        self._size = 0
        self._input_inverses: list[_InputInverse] = []  # per layer: V ↦ V(A + ε_A I)⁻¹
        self._output_inverses: list[torch.Tensor] = []  # per layer: (G + ε_G I)⁻¹
        self._host_inverses: list[tuple[np.ndarray, np.ndarray]] | None = None  # NumPy views, small CPU factors

    # ----------------------------------------------------------------------------------------------------------
    # What SCG asks

    def bind(self, params: Sequence[torch.Tensor]) -> None:
        """Map the optimizer's parameters (in its order, flattened one after the other) to the model's layers, or
        raise a ``ValueError`` that names what the factors cannot precondition."""
        layers, size = self._layers_of(params)
        if [(id(layer.module), layer.weight_offset, layer.bias_offset) for layer in layers] != [
            (id(layer.module), layer.weight_offset, layer.bias_offset) for layer in self._layers
        ]:  # other layers (a parameter group added): the inverses held belong to the old ones
            self._set_inverses([], [])
        self._layers, self._size = layers, size

    def refusal(self, params: Sequence[torch.Tensor]) -> str | None:
        """Why the factors cannot precondition ``params`` — what :meth:`bind` would refuse, or what the first
        :meth:`refresh` would (the forward's refusals, the gradient identity ∇_W ℓ = Σ g aᵀ, non-finite outputs),
        tried on the first :data:`CHECK_SAMPLES` inputs — or ``None`` if they can. Binds nothing, and leaves the
        factors' generator, torch's global generators and the model's buffers (BatchNorm's running statistics) as
        they were: ``fit(preconditioner="auto")`` asks it before it chooses."""
        try:
            layers, _ = self._layers_of(params)
        except ValueError as error:
            return str(error)
        device = layers[0].module.weight.device
        samples = min(CHECK_SAMPLES, _sample_count(self.inputs))
        buffers = [buffer.clone() for buffer in self.model.buffers()]
        try:
            with _forked_generators(device):
                batch = _gather(self.inputs, torch.arange(samples)).to(device)
                generator = torch.Generator().manual_seed(0)
                _check_gradient_identity(
                    layers, *self._layer_inputs_and_output_gradients(batch, layers, generator, with_weights=True)
                )
        except (ValueError, FloatingPointError) as error:
            return str(error)
        except Exception as error:  # a probe: whatever stops the trial is the answer, not an error of the caller's
            # the factors cannot draw the inputs, or the model cannot run on them as the factors take them
            return f"KroneckerFactors: drawing {samples} training inputs and the forward on them raised {error!r}"
        finally:
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
        return None

    def _layers_of(self, params: Sequence[torch.Tensor]) -> tuple[list[_Layer], int]:
        """The factored layers that hold ``params`` and the parameters' total size, or a ``ValueError`` naming what
        the factors cannot precondition."""
        if not params:
            raise ValueError("KroneckerFactors: the optimizer has no parameters")
        first = params[0]
        for index, p in enumerate(params):
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(
                    f"KroneckerFactors takes real floating-point parameters; parameter {index} is {p.dtype}"
                )
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    "KroneckerFactors takes parameters of one dtype and device, got "
                    f"{first.dtype} on {first.device} and {p.dtype} on {p.device}"
                )
        offsets, offset = {}, 0
        for p in params:
            offsets[id(p)] = offset
            offset += p.numel()
        layers, covered = [], set()
        names = {id(p): name for name, p in self.model.named_parameters()}
        for name, module in self.model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if id(module.weight) not in offsets:
                if module.bias is not None and id(module.bias) in offsets:
                    raise ValueError(
                        f"layer {name!r}: its bias is optimized but not its weight; give SCG both or neither"
                    )
                continue
            if isinstance(module, nn.Conv2d) and (
                module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
            ):
                raise ValueError(
                    f"KroneckerFactors takes convolutions of one group with zero padding given in numbers; "
                    f"layer {name!r} has groups={module.groups}, padding={module.padding!r}, "
                    f"padding_mode={module.padding_mode!r}"
                )
            bias = module.bias
            if bias is not None and id(bias) not in offsets:
                raise ValueError(f"layer {name!r}: its weight is optimized but not its bias; give SCG both or neither")
            layers.append(_Layer(module, offsets[id(module.weight)], None if bias is None else offsets[id(bias)]))
            covered.update({id(module.weight)} | (set() if bias is None else {id(bias)}))
        missing = [names.get(id(p), f"#{index}") for index, p in enumerate(params) if id(p) not in covered]
        if missing:
            raise ValueError(
                f"KroneckerFactors covers the weights and biases of the model's nn.Linear and nn.Conv2d layers only, "
                f"but the optimizer also has {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}: use "
                f"SCG(memory=m) or diagonal_scaling=True for such a model"
            )
        return layers, offset

    def count_accepted_step(self) -> bool:
        """Count one accepted quasi-Newton step, and return whether the factors are to be formed at it: at the first
        one (or the first since :meth:`bind` changed the layers), then after every T."""
        self.steps_since_refresh += 1
        return not self._input_inverses or self.steps_since_refresh >= self.every

    @torch.no_grad()
    def refresh(self) -> None:
        """Form A and G at the weights the model holds, over a fresh draw of ``samples`` inputs, and their damped
        inverses. The model's ``.grad`` tensors are not touched (the gradients are taken with respect to the layers'
        outputs). If anything raises, the factors held before stay, whole.

        Raises:
            FloatingPointError: the factors are not finite (the model's outputs or their gradients are not).
        """
        if not self._layers:
            raise RuntimeError("KroneckerFactors.refresh before bind: pass the factors to SCG(kronecker_factors=…)")
        chosen = torch.randperm(_sample_count(self.inputs), generator=self.generator)[: self.samples]
        sums = [_Sums() for _ in self._layers]
        failure: Exception | None = None
        try:
            for start in range(0, len(chosen), self.batch_size):
                batch = _gather(self.inputs, chosen[start : start + self.batch_size]).to(self.model_device())
                self._accumulate(batch, sums, check_weights=not self._input_inverses and start == 0)
        except Exception as error:  # (re-raised below, after the ranks agree)
            failure = error
        if self.distributed:  # a rank that raises alone would leave the others waiting in the broadcast below
            failure = _agreed_failure(failure)
        if failure is not None:
            raise failure
        factors = [layer_sums.factors(len(chosen)) for layer_sums in sums]
        if self.distributed:  # every rank formed them from the same draw; all now hold rank 0's bits
            _dist.broadcast_from_main([f for pair in factors for f in pair], "K-FAC factors' numbers")
        if not bool(torch.isfinite(torch.cat([f.reshape(-1) for pair in factors for f in pair])).all()):
            raise FloatingPointError(
                "KroneckerFactors: the factors at these weights are not finite (the model's outputs or their "
                "gradients are not); the factors held before are kept"
            )
        dampings = self._dampings(factors)
        input_inverses = [_input_inverse(a, a_damping, self.rank) for (a, _), (a_damping, _) in zip(factors, dampings)]
        output_inverses = [_damped_inverse(g, g_damping) for (_, g), (_, g_damping) in zip(factors, dampings)]
        self._set_inverses(input_inverses, output_inverses)
        self.refreshes += 1
        self.steps_since_refresh = 0

    def inverse_product(self, vector: torch.Tensor) -> torch.Tensor:
        """K⁻¹v for v a flat vector of the parameters (in :meth:`bind`'s order), layer by layer:
        (G + ε_G I)⁻¹ V (A + ε_A I)⁻¹ with V = [W | b] the layer's part of v, as a new tensor of v's dtype."""
        if not self._input_inverses or len(self._input_inverses) != len(self._layers):
            raise RuntimeError("KroneckerFactors.inverse_product before the first refresh of these layers")
        if vector.shape != (self._size,):
            raise ValueError(
                f"KroneckerFactors.inverse_product takes a flat vector of {self._size}, got {tuple(vector.shape)}"
            )
        if self._host_inverses is not None and vector.device.type == "cpu" and vector.dtype in HOST_DTYPES:
            return self._host_product(vector)
        out = torch.empty_like(vector)
        for layer, input_inverse, output_inverse in zip(self._layers, self._input_inverses, self._output_inverses):
            weight = layer.module.weight
            outputs, weights = weight.shape[0], weight.numel()
            width = weights // outputs
            parts = [vector[layer.weight_offset : layer.weight_offset + weights].view(outputs, width)]
            if layer.bias_offset is not None:
                parts.append(vector[layer.bias_offset : layer.bias_offset + outputs, None])
            result = (output_inverse @ input_inverse.apply(torch.cat(parts, dim=1))).to(vector.dtype)
            out[layer.weight_offset : layer.weight_offset + weights] = result[:, :width].reshape(-1)
            if layer.bias_offset is not None:
                out[layer.bias_offset : layer.bias_offset + outputs] = result[:, width]
        return out

    def _host_product(self, vector: torch.Tensor) -> torch.Tensor:
        """:meth:`inverse_product` in NumPy, through views of the tensors (small factors on the CPU, all held whole):
        a handful of NumPy calls per layer, at 1–2 µs each where torch's take 3–7 µs, on models whose gradient pass
        takes a millisecond (the pairs' arithmetic does the same: :mod:`moller_scg.pair_arithmetic`)."""
        assert self._host_inverses is not None
        flat = vector.detach().numpy()
        out = np.empty_like(flat)
        for layer, (input_inverse, output_inverse) in zip(self._layers, self._host_inverses):
            outputs, weights = layer.module.weight.shape[0], layer.module.weight.numel()
            width = weights // outputs
            block = flat[layer.weight_offset : layer.weight_offset + weights].reshape(outputs, width)
            if layer.bias_offset is not None:
                bias = flat[layer.bias_offset : layer.bias_offset + outputs, None]
                block = np.concatenate([block, bias], axis=1)
            result = output_inverse @ (block @ input_inverse)  # float64: the inverses are
            out[layer.weight_offset : layer.weight_offset + weights] = result[:, :width].reshape(-1)
            if layer.bias_offset is not None:
                out[layer.bias_offset : layer.bias_offset + outputs] = result[:, width]
        return torch.from_numpy(out)

    def _set_inverses(self, input_inverses: list[_InputInverse], output_inverses: list[torch.Tensor]) -> None:
        """Hold these inverses, with NumPy views of them when they are small CPU matrices (:meth:`_host_product`)."""
        self._input_inverses, self._output_inverses = input_inverses, output_inverses
        tensors = [t for inverse in input_inverses for t in inverse.tensors] + output_inverses
        host = (
            bool(input_inverses)
            and all(inverse.kind == "matrix" for inverse in input_inverses)
            and all(t.device.type == "cpu" for t in tensors)
            and sum(t.numel() for t in tensors) <= HOST_FACTORS_MAX
        )
        self._host_inverses = (
            [(inverse.tensors[0].numpy(), output.numpy()) for inverse, output in zip(input_inverses, output_inverses)]
            if host
            else None
        )

    def model_device(self) -> torch.device:
        """The device of the model's factored layers (where a refresh runs and the factors live)."""
        return self._layers[0].module.weight.device

    # ----------------------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The factors' inverses, the refresh counters and the generator's state: what a resume needs to go on bit
        for bit (tensors, strings and numbers only, for ``torch.load(weights_only=True)``)."""
        return {
            "refreshes": self.refreshes,
            "steps_since_refresh": self.steps_since_refresh,
            "generator": self.generator.get_state(),
            "inverses": [
                {
                    "kind": input_inverse.kind,
                    "tensors": [t.clone() for t in input_inverse.tensors],
                    "epsilon": input_inverse.epsilon,
                    "output": output_inverse.clone(),
                }
                for input_inverse, output_inverse in zip(self._input_inverses, self._output_inverses)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after :meth:`bind`), the factors moved to the model's device; a
        ``ValueError`` if it belongs to other layers. Nothing is changed unless all of it loads."""
        inverses = state.get("inverses") if isinstance(state, dict) else None
        if not isinstance(inverses, list) or (inverses and len(inverses) != len(self._layers)):
            raise ValueError(
                "the 'kronecker_factors' entry of this SCG state_dict does not belong to these layers: build the "
                "KroneckerFactors over the model it was saved with"
            )
        device = self.model_device()
        input_inverses, output_inverses = [], []
        for layer, saved in zip(self._layers, inverses):
            input_inverse = _saved_input_inverse(saved, layer)
            output = saved.get("output")
            outputs = layer.module.weight.shape[0]
            if not isinstance(output, torch.Tensor) or output.shape != (outputs, outputs):
                raise ValueError(f"the saved factors have another shape than layer {layer.module!r}'s")
            input_inverses.append(input_inverse.to(device))
            output_inverses.append(output.to(device=device, dtype=torch.float64))
        generator = torch.Generator().set_state(state["generator"])
        self._set_inverses(input_inverses, output_inverses)
        self.refreshes = int(state["refreshes"])
        self.steps_since_refresh = int(state["steps_since_refresh"])
        self.generator = generator

    # ----------------------------------------------------------------------------------------------------------
    # Forming the factors

    def identity_gaps(self, params: Sequence[torch.Tensor], batch: torch.Tensor) -> list[float]:
        """:func:`identity_gap` of each factored layer that holds ``params`` (in the model's order), over one forward
        and backward of ``batch`` with labels drawn by the factors' generator (``nan`` for a weight that does not
        require grad); what the first refresh checks, measured and not judged (``benchmarks/kronecker_identity.py``).
        Binds nothing."""
        layers, _ = self._layers_of(params)
        gradients = self._layer_inputs_and_output_gradients(batch, layers, self.generator, with_weights=True)
        return [
            math.nan if weight_gradient is None else identity_gap(layer.module, layer_input, gradient, weight_gradient)
            for layer, layer_input, gradient, weight_gradient in zip(layers, *gradients)
        ]

    def _accumulate(self, batch: torch.Tensor, sums: list[_Sums], check_weights: bool = False) -> None:
        """Add one batch's rows of each layer to ``sums``, with labels drawn from the model (``check_weights``: and
        check the gradient identity on it, :func:`_check_gradient_identity`)."""
        inputs, gradients, weight_gradients = self._layer_inputs_and_output_gradients(
            batch, self._layers, self.generator, with_weights=check_weights
        )
        if check_weights:
            _check_gradient_identity(self._layers, inputs, gradients, weight_gradients)
        for layer, layer_input, gradient, layer_sums in zip(self._layers, inputs, gradients, sums):
            rows, output_rows = _layer_rows(layer.module, layer_input, gradient)
            if layer.bias_offset is not None:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            layer_sums.add(rows.double(), output_rows.double(), positions=rows.shape[0] // batch.shape[0])

    def _layer_inputs_and_output_gradients(
        self, batch: torch.Tensor, layers: list[_Layer], generator: torch.Generator, with_weights: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
        """Each of ``layers``' input and the gradient of Σₙ ℓₙ (labels drawn from the model by ``generator``) with
        respect to its output, from one forward and one backward. The hooks hand on a copy of each output, so that an
        in-place operation after the layer (``nn.ReLU(inplace=True)``) cannot change what the gradient is taken with
        respect to; a layer called twice in one forward is refused. ``with_weights``: the same backward also takes the
        gradient with respect to each layer's weight that requires grad (the third list; ``None`` elsewhere)."""
        captured: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if module in captured:
                raise ValueError(
                    f"KroneckerFactors: {module!r} is called more than once in one forward; its factors would be "
                    f"those of one call (weights shared between calls are not supported)"
                )
            captured[module] = (args[0].detach(), output)
            return output.clone()  # what the rest of the forward gets, and may change in place

        handles = [layer.module.register_forward_hook(keep) for layer in layers]
        wanted = [with_weights and layer.module.weight.requires_grad for layer in layers]
        weights = [layer.module.weight for layer, want in zip(layers, wanted) if want]
        try:
            with torch.enable_grad():
                sampled = self._sampled_loss(self.model(batch), generator)
                missing = [layer.module for layer in layers if layer.module not in captured]
                if missing:
                    raise ValueError(f"KroneckerFactors: the model's forward did not call {missing[0]!r}")
                outputs = [captured[layer.module][1] for layer in layers]
                gradients = torch.autograd.grad(sampled, [*outputs, *weights], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        output_gradients = list(gradients[: len(layers)])
        unused = [layer.module for layer, gradient in zip(layers, output_gradients) if gradient is None]
        if unused:
            raise ValueError(f"KroneckerFactors: the output of {unused[0]!r} does not reach the model's output")
        taken = iter(gradients[len(layers) :])
        weight_gradients = [next(taken) if want else None for want in wanted]
        return [captured[layer.module][0] for layer in layers], output_gradients, weight_gradients

    def _sampled_loss(self, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Σₙ ℓₙ at labels drawn from the model's predictive distribution (so that each sample's gradient is one
        draw of the sampled Fisher's ∇ℓ)."""
        detached = output.detach()
        if not bool(torch.isfinite(detached).all()):
            raise FloatingPointError(
                "KroneckerFactors: the model's outputs at these weights are not finite, so the factors are not; the "
                "factors held before are kept"
            )
        if self.loss == "cross_entropy":
            if output.dim() != 2:
                raise ValueError(f"loss='cross_entropy' takes (N, C) logits, the model returned {tuple(output.shape)}")
            labels = torch.multinomial(torch.softmax(detached.double(), 1).cpu(), 1, generator=generator)
            return functional.cross_entropy(output, labels.squeeze(1).to(output.device), reduction="sum")
        if self.loss == "binary_cross_entropy":
            draws = torch.rand(output.shape, generator=generator, dtype=torch.float64).to(output.device)
            labels = (draws < torch.sigmoid(detached.double())).to(output.dtype)
            return functional.binary_cross_entropy_with_logits(output, labels, reduction="sum")
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output.device)
        return 0.5 * ((output - (detached + noise.to(output.dtype))) ** 2).sum()

    def _dampings(self, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[float, float]]:
        """(ε_A, ε_G) per layer: η = κ · (K's mean diagonal over all the weights), split by π = √(a/g)."""
        means = [(_mean_diagonal(a_factor), float(g_factor.diagonal().mean())) for a_factor, g_factor in factors]
        sizes = [(a_factor.shape[1], g_factor.shape[0]) for a_factor, g_factor in factors]
        weighted = sum(a * g * width * height for (a, g), (width, height) in zip(means, sizes))
        eta = self.damping * weighted / sum(width * height for width, height in sizes)
        eta = eta if eta > 0.0 else 1.0  # K = 0 (every sampled gradient zero): K⁻¹ is then a multiple of I
        dampings = []
        for a, g in means:
            pi = math.sqrt(a / g) if a > 0.0 and g > 0.0 else 1.0
            dampings.append((pi * math.sqrt(eta), math.sqrt(eta) / pi))
        return dampings


def _check_gradient_identity(
    layers: list[_Layer],
    inputs: list[torch.Tensor],
    gradients: list[torch.Tensor],
    weight_gradients: list[torch.Tensor | None],
) -> None:
    """K-FAC's premise for a layer: the loss reaches its weight W only through its outputs, so that
    ∇_W ℓ = Σₙₜ gₙₜ aₙₜᵀ, from which A and G are formed. A ``ValueError`` naming the layer where the gradient the
    backward took differs from that sum by more than :data:`GRADIENT_IDENTITY_TOLERANCE` (:func:`identity_gap`): the
    loss holds derivatives of the network with respect to its inputs (a physics-informed net's Δu), whose own
    dependence on W the factors do not model. A layer whose weight gradient is ``None`` (not taken: a frozen weight)
    is not checked."""
    for layer, layer_input, gradient, weight_gradient in zip(layers, inputs, gradients, weight_gradients):
        if weight_gradient is None:
            continue
        gap = identity_gap(layer.module, layer_input, gradient, weight_gradient)
        if gap > GRADIENT_IDENTITY_TOLERANCE:
            raise ValueError(
                f"KroneckerFactors: the loss reaches the weight of {layer.module!r} other than through the layer's "
                f"outputs (|∇_W ℓ − Σ g aᵀ| = {gap:.2g} of the larger norm), as when the model's output holds "
                f"derivatives of the network with respect to its inputs (a physics-informed net); K-FAC's factors do "
                f"not model such a loss: use SCG(memory=m) or diagonal_scaling=True"
            )


def identity_gap(
    module: nn.Module, layer_input: torch.Tensor, gradient: torch.Tensor, weight_gradient: torch.Tensor
) -> float:
    """|∇_W ℓ − Σₙₜ gₙₜ aₙₜᵀ| over the larger of the two norms (0 when both are 0): how far the gradient a backward
    took with respect to the layer's weight is from the one its input rows a and output-gradient rows g imply."""
    rows, output_rows = _layer_rows(module, layer_input, gradient)
    implied = output_rows.double().T @ rows.double()
    taken = weight_gradient.reshape(weight_gradient.shape[0], -1).double()
    scale = max(float(taken.norm()), float(implied.norm()))
    return float((taken - implied).norm()) / scale if scale > 0.0 else 0.0


def _forked_generators(device: torch.device) -> Any:
    """``torch.random.fork_rng`` over the CPU's generator and, for a model on an accelerator, that device's."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _layer_rows(module: nn.Module, layer_input: torch.Tensor, gradient: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The layer's input rows aₙₜ (one per sample and position) and output-gradient rows gₙₜ."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        assert not isinstance(padding, str)  # refused by bind
        patches = functional.unfold(layer_input, module.kernel_size, module.dilation, padding, module.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·T, C·kh·kw)
        return rows, gradient.flatten(2).transpose(1, 2).reshape(-1, gradient.shape[1])
    return layer_input.reshape(-1, layer_input.shape[-1]), gradient.reshape(-1, gradient.shape[-1])


def _mean_diagonal(a_factor: torch.Tensor) -> float:
    """tr(A) / dim A, for A a (square) matrix or A = ZᵀZ given as Z (fewer rows than columns)."""
    if _is_rows(a_factor):
        return float((a_factor.double() ** 2).sum()) / a_factor.shape[1]
    return float(a_factor.diagonal().mean())


def _is_rows(a_factor: torch.Tensor) -> bool:
    """Whether an input factor is given as its rows Z (A = ZᵀZ: fewer rows than its width), not as A."""
    return a_factor.shape[0] != a_factor.shape[1]


def _input_inverse(a_factor: torch.Tensor, epsilon: float, rank: int | None) -> _InputInverse:
    """V ↦ V(A + εI)⁻¹, for A a matrix or A = ZᵀZ given as Z (the module's docstring)."""
    if not _is_rows(a_factor):
        return _InputInverse("matrix", [_damped_inverse(a_factor, epsilon)], epsilon)
    rows = a_factor.double()
    gram = rows @ rows.T
    if rank is None:
        gram.diagonal().add_(epsilon)
        return _InputInverse("woodbury", [rows, torch.linalg.cholesky(gram)], epsilon)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues[-rank:].clamp_min(0.0), vectors[:, -rank:]
    kept = eigenvalues > 0.0
    basis = rows.T @ (vectors[:, kept] / eigenvalues[kept].sqrt())  # U = ZᵀQΛ^-½
    coefficients = 1.0 / (eigenvalues[kept] + epsilon) - 1.0 / epsilon
    return _InputInverse("eigen", [basis, coefficients], epsilon)


def _saved_input_inverse(saved: Any, layer: _Layer) -> _InputInverse:
    """A layer's saved input-side inverse, checked against the layer's width, or a ``ValueError``."""
    width = layer.module.weight[0].numel() + (layer.bias_offset is not None)
    if not isinstance(saved, dict):
        raise ValueError(f"the saved factors do not belong to layer {layer.module!r}: got {type(saved).__name__}")
    kind, tensors = saved.get("kind"), saved.get("tensors")
    shapes: dict[str, list[tuple[int | None, ...]]] = {
        "matrix": [(width, width)],
        "eigen": [(width, None), (None,)],
        "woodbury": [(None, width), (None, None)],
    }
    expected = shapes.get(kind) if isinstance(kind, str) else None
    if (
        not isinstance(kind, str)
        or expected is None
        or not isinstance(tensors, list)
        or len(tensors) != len(expected)
        or not all(_has_shape(t, shape) for t, shape in zip(tensors, expected))
    ):
        raise ValueError(f"the saved factors do not belong to layer {layer.module!r} (input width {width})")
    return _InputInverse(kind, list(tensors), float(saved["epsilon"]))


def _has_shape(value: Any, shape: tuple[int | None, ...]) -> bool:
    """Whether ``value`` is a tensor of ``shape`` (``None``: any length along that axis)."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == len(shape)
        and all(d is None or d == n for d, n in zip(shape, value.shape))
    )


def _damped_inverse(factor: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(F + εI)⁻¹ of a symmetric positive semi-definite F, in float64, symmetric; ε > 0. In NumPy on the CPU (one call
    for a small factor, where torch's Cholesky and its inverse took about 50 µs), by torch's Cholesky elsewhere."""
    if factor.device.type != "cpu":
        damped = factor.double() + epsilon * torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device)
        return torch.cholesky_inverse(torch.linalg.cholesky(damped))
    damped = factor.double().numpy().copy()
    damped.flat[:: damped.shape[0] + 1] += epsilon
    inverse = np.linalg.inv(damped)
    return torch.from_numpy(0.5 * (inverse + inverse.T))


_FAILURES: tuple[type[Exception], ...] = (ValueError, FloatingPointError, RuntimeError)
"""The kinds of failure the ranks agree on, by code 1, 2, 3: a refusal by name, non-finite factors, anything else
(an out-of-memory error, say)."""


def _agreed_failure(failure: Exception | None) -> Exception | None:
    """The failure every rank raises when any rank's refresh failed (one tiny all-reduce of its kind): its own, or
    one of the agreed kind that says another rank's refresh raised."""
    if failure is None:
        code = 0
    elif isinstance(failure, FloatingPointError):
        code = 2
    elif isinstance(failure, ValueError):
        code = 1
    else:
        code = 3
    agreed = _dist.agree_on_max(code, "a K-FAC refresh's failure")
    if agreed == 0 or (failure is not None and code == agreed):
        return failure
    return _FAILURES[agreed - 1](
        f"KroneckerFactors: another rank's refresh raised {_FAILURES[agreed - 1].__name__} (its traceback says why); "
        "the factors held before are kept"
    )


def _sample_count(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError(f"KroneckerFactors needs at least one input sample, got a tensor of shape {inputs.shape}")
        return inputs.shape[0]
    try:
        count = len(inputs)
    except TypeError:
        raise TypeError(
            f"inputs must be a tensor of samples or a map-style Dataset, got {type(inputs).__name__}"
        ) from None
    if count == 0:
        raise ValueError("KroneckerFactors needs at least one input sample, got an empty dataset")
    return count


def _gather(inputs: Any, indices: torch.Tensor) -> torch.Tensor:
    """The inputs at ``indices`` as one batch (a dataset's items, or their first elements, stacked)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[indices]
    items = [inputs[int(i)] for i in indices]
    return default_collate([item[0] if isinstance(item, (tuple, list)) else item for item in items])


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
