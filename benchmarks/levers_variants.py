"""Research variants of the preconditioned SCG step that ``benchmarks/levers.py`` races, kept out of the library.

``SCG(params, memory=m)`` (moller_scg/scg.py) is what won; the variants here are the levers that lost or did not
clearly win (issue #14), written on one flat vector so that each differs from the library's mode by one rule
(``FlatSCG()`` with no option is the library's mode: the same passes to each target, up to rounding):

* ``direction="pcg"``: Møller's conjugate update in preconditioned form, p₊ = H r₊ + βp with the
  preconditioned Polak–Ribière β = (H r₊)ᵀ(r₊ − r) / (H r)ᵀr, clipped at 0 (Buckley & LeNir 1983; Morales &
  Nocedal 2000), instead of the quasi-Newton direction p₊ = H r₊;
* ``retry``, what a rejected trial (Δ < 0) changes:

  - ``"moller"`` (the library): λ ← λ + δ(1 − Δ)/|p|², and the next trial is along the same p with that λ;
  - ``"cubic-lambda"``: λ is set so that the next α is the minimiser t of the cubic through E(w), E'(w)ᵀp,
    E(w + αp), E'(w + αp)ᵀp (clipped to [0.1α, 0.5α]), instead of Møller's raise; λ keeps that value afterwards
    (the row ``cubic λ``);
  - ``"interpolate"``: the next trial is at α = t along the same p (a backtracking step from information already
    paid for), λ is left as it was: the rejection does not raise it;
  - ``"interpolate-raise"``: the next trial is at α = t as well, and λ is raised by Møller's rule for the steps
    after it;

* ``reject_pairs=True``: a rejected trial's secant pair is kept too, and the direction recomputed from it;
* ``decrease``: the divisor of λ after a good step (the library's secant mode: 2; Møller: 4); ``lambd``: λ₁;
* ``decrease_by_fit=True`` (lever 21): after a good step (Δ ≥ 0.75) λ is multiplied by max(1/3, 1 − (2Δ − 1)³)
  instead of divided by ``decrease`` — the Levenberg–Marquardt update of Nielsen (1999; also in Madsen, Nielsen &
  Tingleff 2004) on the accepted side: ÷ 1.14 at Δ = 0.75, ÷ 2 at Δ = 0.9, ÷ 3 from Δ ≈ 0.94, so that a step the
  model predicted well widens the trust region faster than one it predicted barely well enough;
* ``decrease_to_fit=True`` (lever 49): after a good step (Δ ≥ 0.75) λ ← min(λ / ``decrease``, max(λ_fit, 0)), where
  λ_fit = λ − (Δ − 1) δ / |p|² is the λ at which δ would have equalled the curvature the trial observed along p: on
  a quadratic along p, Δ = 2 − c/δ for the curvature c = pᵀE''p, so c = (2 − Δ)δ. A step damped by a large λ
  that decreased E by far more than the model predicted (Δ near 2) then takes λ down to what the decrease supports
  in one step, instead of halving it step after step;
* ``hold_after_rejection=True``: λ is not divided after a good step that retries a rejected one (a trust region
  that does not widen again right after it was narrowed);
* ``raise_accepted=False`` (lever 13): λ is raised only after a rejected trial, not after an accepted one with
  0 ≤ Δ < 0.25 — the pair that step leaves already corrects the quasi-Newton model along it;
* ``first_step``, the very first step, before any secant pair is held: ``"scaled"`` (the library: no curvature
  pass, δ is set so that α = min(1, 1/|r|₁), the first step of torch.optim.LBFGS, before λ's share) or
  ``"finite-difference"`` (the library's previous mode: δ by Møller's σ, one more pass), or ``"scaled-l2"``
  (lever 26: α = min(1, 1/|r|₂), L-BFGS-B's first step, a step of length at most 1 where LBFGS's 1/|r|₁ is
  shorter by |r|₂/|r|₁), or ``"probe"`` (lever 31: the trial at torch LBFGS's α₀ is first a probe — its loss
  alone, a forward, fits the quadratic E(w) − tμ + ½t²δ along p = r, and when the fit is convex with a minimiser
  α* = μ/δ beyond ``PROBE_MIN_RATIO`` α₀ the probe's backward is never made and the first trial is taken at α*
  instead, as Møller's step with that δ; otherwise the probe is the trial, as ``"scaled"``; only where the run
  defers the backward and ``loss_first``), or ``"diagonal"`` (lever 42, with ``diagonal_beta``: p₁ = D r₁, the
  diagonal H₀ of the first gradient alone, at α = min(1, 1/|p₁|₁): a first step of the same L1 length as torch
  LBFGS's, along the preconditioned direction; otherwise as ``"scaled"``); later steps without a pair (after a
  restart or when the pairs were dropped) take the finite difference either way;
* ``gamma_window``, ``gamma_pick``: H's initial scaling γ = the largest (``"max"``) or smallest (``"min"``)
  sᵢᵀyᵢ / yᵢᵀyᵢ over the newest ``gamma_window`` pairs (``None``: all pairs held, the library's; 1: the newest
  pair's, L-BFGS's usual choice and the library's previous one), or (``"bb1"``) the largest sᵢᵀsᵢ / sᵢᵀyᵢ (the
  longer Barzilai–Borwein step);
* ``gamma_scale``: γ multiplied by this factor (1: the library's);
* ``layerwise=True``: H₀ diagonal with one γₗ per parameter tensor (:class:`LayerwisePairs`) instead of γI;
* ``nonmonotone``: K, a trial is accepted when its loss is below the largest of the last K accepted losses
  (Grippo, Lampariello & Lucidi 1986; 1: Møller's test), Δ and λ still compare with E(w);
* ``growth``: the step is capped at |αp| ≤ growth · |s| of the last accepted step (α cut, λ left alone);
* ``angle``: a pair is kept only if sᵀy > angle · |s||y| as well (0: only the library's sᵀy > 10⁻¹⁰ yᵀy);
* ``restart``: N, the pairs are dropped and p ← r₊ after every N-th step (None: never within these budgets, as
  the library's N = number of weights).
* ``stretch_max`` τₘₐₓ (with ``stretch_factor`` f, ``stretch_above`` Δ₊): δ = μ/τ instead of μ, so that α ≈ τ while λ
  is small — a step longer than the quasi-Newton model's minimiser; τ is multiplied by f after an accepted step
  whose Δ > Δ₊ (the model underestimated the decrease), up to τₘₐₓ, divided by f after one with Δ < 0.75, and reset
  to 1 after a rejection (1: the library's δ = μ);
* ``powell_damping`` c (lever 43; 0: off): an accepted step's pair with sᵀy < c sᵀBs is kept as (s, θy + (1 − θ)Bs),
  θ = (1 − c)sᵀBs / (sᵀBs − sᵀy), so that sᵀy = c sᵀBs (Powell 1978; Nocedal & Wright 2006, procedure 18.2) instead
  of as it is (or dropped, when sᵀy ≤ 10⁻¹⁰ yᵀy); free, since p = H r gives Bs = αr and sᵀBs = α²μ;
* ``value_secant`` c (lever 68; ``None``: off): an accepted step's pair is kept as (s, ỹ) with
  ỹ = y + (θ / sᵀs) s, θ = 6(E(w) − E(w₊)) + 3(g + g₊)ᵀs, so that sᵀỹ = sᵀy + θ is the curvature E''(w₊) along s
  exactly where E is cubic along s (the function-value secant equation of Zhang, Deng & Chen 1999; Wei, Li & Qi
  2006), where sᵀy is the curvature averaged over the step; θ is clipped to θ ≥ (c − 1) sᵀy, so that sᵀỹ ≥ c sᵀy
  (a pair with sᵀy ≤ 0 is left as it is, and dropped by the pairs as the library's); free: E(w₊) is the trial's loss;
* ``log_loss=True`` (lever 69): the variant minimises log E(w) in place of E(w) — the same minimisers where E > 0, the
  same accept test (log E₊ ≤ log E exactly when E₊ ≤ E), gradient ∇E / E at no pass — so that a cross-entropy whose
  decrease is geometric late in a run (E ≈ Σ exp(−margin)) looks to the secant model like a function of slowly
  changing slope; ``reported_loss`` gives E back (``log``'s losses are log E); not with Hessian products
  (``curvature="hvp"``, ``nystrom_rank``: they are E's) nor the probed first step (it fits E);
* ``multistep=True`` (lever 70): an accepted step's pair is the two-step pair (ŝ, ŷ) = (s − ω s₋, y − ω y₋) of Ford &
  Moghrabi (1994), the derivatives at the newest point of the quadratic curves through the last three iterates and
  their gradients, with ω = α² / (1 + 2α), α = |s| / |s₋| (their "accumulative" parametrisation by the steps'
  lengths), s₋, y₋ the previous accepted step's plain pair; (s, y) itself for the first pair, after the pairs were
  cleared, after a zero step, or where ŝᵀŷ ≤ 10⁻¹⁰ ŷᵀŷ (``CURVATURE_CONDITION``); no pass, two more weight-sized
  buffers (s₋, y₋); not with the other rewrites of the pair (``powell_damping``, ``value_secant``) nor with
  ``reject_pairs``;
* ``loss_first`` (lever 12): as the library, a trial whose loss rose is rejected without its gradient, so that a
  run that defers the backward (``Run.value_then_grad`` over one batch) charges it the forward alone; only where no
  rule of the variant reads a rejected trial's gradient (False: every trial a gradient pass, as the tables measured
  before lever 12);
* ``nystrom_rank`` k, ``nystrom_every`` N (lever 3 of issue #14): H₀ of the quasi-Newton inverse is no longer γI but
  U (Λ + 1/γ)⁻¹ Uᵀ + γ(I − UUᵀ), with U Λ Uᵀ a rank-k randomized Nyström approximation of the Hessian
  (:class:`NystromPairs`: k exact Hessian-vector products, charged as such, at the start and after every N-th
  step) — the top of the spectrum from the sketch, the rest from the pairs' γ (Frangella, Tropp & Udell 2023;
  Rathore, Lei, Frangella, Lu & Udell 2024 precondition PINNs this way);
* ``secant_diagonal`` c (lever 66; ``None``: off): H₀ diagonal from the pairs held, coordinate by coordinate,
  dⱼ = Σᵢ sᵢⱼ yᵢⱼ / Σᵢ yᵢⱼ², the least-squares fit of H₀ yᵢ ≈ sᵢ in each coordinate (related to the diagonal
  quasi-Newton updates of Zhu, Nazareth & Wolkowicz 1999, which satisfy one pair's weak secant condition), clipped to
  [γ/c, γc] around the library's γ and γ where the fit is not positive (:class:`SecantDiagonalPairs`) — no pass and
  no state beyond the pairs (``diagonal_beta`` keeps n more numbers);
* ``diagonal_beta`` β, ``diagonal_power`` κ, ``diagonal_refresh`` T (lever 14; T: lever 15): H₀ = γ_D D, D from the
  accepted gradients' second moment (:class:`DiagonalPairs`), D formed afresh at every T-th accepted gradient
  (1: at every one, as the library's lever 14); ``gamma_window`` then takes γ_D over the newest pairs only.

Curvature: ``"secant"`` (δ = μ, as the library), ``"finite-difference"`` or ``"hvp"`` (the closure's ``hvp``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moller_scg.quasi_newton import CURVATURE_CONDITION, SecantPairs
from moller_scg.step_arithmetic import scaled_curvature

RETRY_RULES = ("moller", "cubic-lambda", "interpolate", "interpolate-raise")
FIRST_STEPS = ("finite-difference", "scaled", "scaled-l2", "probe", "diagonal")
PROBE_MIN_RATIO = 2.0
"""``first_step="probe"``: the fitted α* must exceed this many α₀ for the trial at α₀ to serve as a probe only."""


class WindowedPairs(SecantPairs):
    """:class:`SecantPairs` whose γ is the largest (``pick=max``) or smallest (``min``) sᵢᵀyᵢ / yᵢᵀyᵢ over the
    newest ``window`` pairs."""

    def __init__(
        self, params: list[torch.Tensor], memory: int, window: int = 1, pick: str = "max", scale: float = 1.0
    ) -> None:
        super().__init__(params, memory)
        self.window, self.pick, self.scale = window, pick, scale
        self.ss = [0.0] * memory  # sᵢᵀsᵢ per slot (for pick="bb1")

    def is_identity(self) -> bool:
        """Whether H = I: no pair held (and, in :class:`NystromPairs`, no sketch)."""
        return not self.slots

    def push(self, step: Any, change: Any) -> bool:
        kept = super().push(step, change)
        if kept:
            self.ss[self.slots[-1]] = float(step[0] @ step[0])
        return kept

    @property
    def gamma(self) -> float:
        recent = self.slots[-self.window :]
        if self.pick == "bb1":  # the longer Barzilai–Borwein step sᵀs / sᵀy
            return max(self.ss[i] / float(self.sy[i, i]) for i in recent)
        ratios = [float(self.sy[i, i] / self.yy[i, i]) for i in recent]
        return self.scale * (max(ratios) if self.pick == "max" else min(ratios))


class TwoLoopPairs(WindowedPairs):
    """:class:`WindowedPairs` whose H v is formed by the two-loop recursion (Nocedal 1980), which takes any positive
    definite H₀: a subclass says what H₀ q is (:meth:`_initial_inverse`) and whether H is still I
    (:meth:`is_identity`)."""

    def _initial_inverse(self, q: torch.Tensor) -> torch.Tensor:
        return self.gamma * q

    def inverse_product(self, vector: Any) -> list[torch.Tensor]:
        (v,) = vector
        if self.is_identity():
            return [v.clone()]
        (block,) = self.blocks
        q = v.clone()
        alphas = []
        for i in reversed(self.slots):
            rho = 1.0 / float(self.sy[i, i])
            a = rho * float(block[0, i] @ q)
            alphas.append(a)
            q -= a * block[1, i]
        q = self._initial_inverse(q)
        for i, a in zip(self.slots, reversed(alphas)):
            rho = 1.0 / float(self.sy[i, i])
            b = rho * float(block[1, i] @ q)
            q += (a - b) * block[0, i]
        return [q]


class LayerwisePairs(TwoLoopPairs):
    """:class:`WindowedPairs` whose H₀ is diagonal with one scale per parameter tensor (layer) l:
    γₗ = maxᵢ sᵢₗᵀyᵢₗ / yᵢₗᵀyᵢₗ over the pairs held, the parts sᵢₗ, yᵢₗ of the pair on that tensor (the global γ where
    no pair has sᵢₗᵀyᵢₗ > 0), times ``scale``, in the two-loop recursion."""

    def __init__(self, params: list[torch.Tensor], memory: int, sizes: list[int], scale: float = 1.0) -> None:
        super().__init__(params, memory, window=memory, pick="max", scale=scale)
        self.sizes = sizes

    def layer_scales(self) -> torch.Tensor:
        (block,) = self.blocks
        global_gamma = self.gamma
        scales = []
        for s_part, y_part in zip(block[0].split(self.sizes, dim=-1), block[1].split(self.sizes, dim=-1)):
            ratios = [
                float(s_part[i] @ y_part[i]) / float(y_part[i] @ y_part[i])
                for i in self.slots
                if float(y_part[i] @ y_part[i]) > 0.0
            ]
            positive = [ratio for ratio in ratios if ratio > 0.0]
            scales.append(self.scale * max(positive) if positive else global_gamma)
        pieces = [
            torch.full((size,), scale, dtype=block.dtype, device=block.device)
            for size, scale in zip(self.sizes, scales)
        ]
        return torch.cat(pieces)

    def _initial_inverse(self, q: torch.Tensor) -> torch.Tensor:
        return q * self.layer_scales()


class DiagonalPairs(TwoLoopPairs):
    """:class:`WindowedPairs` whose H₀ is the diagonal γ_D · D of an Adam-like second moment of the accepted
    gradients: v ← β v + (1 − β) g² (bias-corrected v̂ = v / (1 − βᵗ)), D = 1 / (v̂ᵏ + ε · mean v̂ᵏ) with the
    power κ = ``power`` (½: Adam's √v̂), and
    γ_D = maxᵢ sᵢᵀyᵢ / yᵢᵀ D yᵢ over the pairs held, or the newest ``window`` of them (the secant scaling in D's
    metric), in the two-loop recursion.
    With ``refresh`` = T > 1, D is formed from v at the first observed gradient and then only at every T-th, and
    held in between (v itself takes every gradient)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        memory: int,
        beta: float,
        power: float = 0.5,
        epsilon: float = 1e-8,
        refresh: int = 1,
        window: int | None = None,
    ) -> None:
        super().__init__(params, memory, window=memory if window is None else window, pick="max")
        self.beta, self.power, self.epsilon, self.refresh = beta, power, epsilon, refresh
        self.second_moment: torch.Tensor | None = None
        self.observed = 0
        self._held: torch.Tensor | None = None

    def observe(self, gradient: torch.Tensor) -> None:
        """Add an accepted gradient g (or −g: only g² is used) to v."""
        self.observed += 1
        squared = gradient * gradient
        if self.second_moment is None:
            self.second_moment = (1.0 - self.beta) * squared
        else:
            self.second_moment.mul_(self.beta).add_(squared, alpha=1.0 - self.beta)

    def diagonal(self) -> torch.Tensor:
        assert self.second_moment is not None
        if self.refresh > 1 and self._held is not None and (self.observed - 1) % self.refresh != 0:
            return self._held
        root = (self.second_moment / (1.0 - self.beta**self.observed)).pow(self.power)
        self._held = 1.0 / (root + self.epsilon * root.mean())
        return self._held

    def _initial_inverse(self, q: torch.Tensor) -> torch.Tensor:
        (block,) = self.blocks
        diagonal = self.diagonal()
        recent = self.slots[-self.window :]
        ratios = [float(self.sy[i, i]) / float(block[1, i] @ (diagonal * block[1, i])) for i in recent]
        return max(ratios) * diagonal * q


class SecantDiagonalPairs(TwoLoopPairs):
    """:class:`WindowedPairs` whose H₀ is diagonal, fitted to the pairs held coordinate by coordinate:
    dⱼ = Σᵢ sᵢⱼ yᵢⱼ / Σᵢ yᵢⱼ² (the least-squares H₀ yᵢ ≈ sᵢ in coordinate j), clipped to [γ/c, γc] with γ the
    library's maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ and c = ``clip``, and γ where the fit is not positive, in the two-loop recursion."""

    def __init__(self, params: list[torch.Tensor], memory: int, clip: float) -> None:
        if not clip >= 1.0:
            raise ValueError(f"secant_diagonal's clip c must be ≥ 1 (1: γI), got {clip}")
        super().__init__(params, memory, window=memory, pick="max")
        self.clip = clip

    def diagonal(self) -> torch.Tensor:
        """d: the clipped coordinate-wise fit over the pairs held (at least one)."""
        assert self.slots, "the fitted H₀ needs a pair"
        (block,) = self.blocks
        held = block[:, self.slots]  # (2, k, n): the steps sᵢ and the changes yᵢ held
        fitted = (held[0] * held[1]).sum(dim=0) / (held[1] * held[1]).sum(dim=0)
        gamma = self.gamma
        fitted = torch.where(fitted > 0.0, fitted, torch.full_like(fitted, gamma))  # (0/0 = NaN is not > 0)
        return fitted.clamp(gamma / self.clip, gamma * self.clip)

    def _initial_inverse(self, q: torch.Tensor) -> torch.Tensor:
        return self.diagonal() * q


class NystromPairs(TwoLoopPairs):
    """:class:`WindowedPairs` whose H₀ = U (Λ + 1/γ)⁻¹ Uᵀ + γ(I − UUᵀ) once :meth:`refresh` has sketched the Hessian
    (γ the pairs' max ratio, or 1/λ_k, the smallest eigenvalue kept, while no pair is held), in the two-loop
    recursion."""

    def __init__(self, params: list[torch.Tensor], memory: int, rank: int, seed: int = 0) -> None:
        super().__init__(params, memory, window=memory, pick="max")
        self.rank = rank
        self.generator = torch.Generator().manual_seed(seed)
        self.basis: torch.Tensor | None = None  # U, n × k' (k' ≤ k: the positive part of the sketch)
        self.eigenvalues: torch.Tensor | None = None  # Λ, k'

    def refresh(self, hessian_product: Any, n: int, dtype: torch.dtype) -> None:
        """Sketch E''(w) with ``rank`` products along an orthonormal random basis Q (``hessian_product(v)`` = E''v).

        Nyström: E'' ≈ Y (QᵀY)⁺ Yᵀ with Y = E''Q; QᵀY is symmetrised and only its positive eigenvalues kept (the
        Hessian of a non-convex loss may be indefinite), so the approximation B Bᵀ, B = Y W₊ Θ₊^(−1/2), is positive
        semi-definite and U, Λ = svd(B) with Λ = σ².
        """
        omega = torch.randn(n, self.rank, generator=self.generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(omega)
        q = q.to(dtype)
        y = torch.stack([hessian_product(q[:, j]) for j in range(self.rank)], dim=1).to(torch.float64)
        q64 = q.to(torch.float64)
        core = q64.T @ y
        theta, w = torch.linalg.eigh(0.5 * (core + core.T))
        keep = theta > 1e-12 * float(theta.abs().max())
        if not bool(keep.any()):
            self.basis = self.eigenvalues = None
            return
        b = y @ (w[:, keep] / theta[keep].sqrt())
        u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
        self.basis, self.eigenvalues = u.to(dtype), (sigma**2).to(dtype)

    def _initial_inverse(self, q: torch.Tensor) -> torch.Tensor:
        if self.basis is None or self.eigenvalues is None:
            return (self.gamma if self.slots else 1.0) * q
        gamma = self.gamma if self.slots else 1.0 / float(self.eigenvalues.min())
        coefficients = self.basis.T @ q
        inside = self.basis @ (coefficients / (self.eigenvalues + 1.0 / gamma))
        return inside + gamma * (q - self.basis @ coefficients)

    def is_identity(self) -> bool:
        return not self.slots and self.basis is None


class FlatSCG:
    """One SCG variant on the parameters as one flat vector (see the module docstring for the options)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        memory: int = 20,
        direction: str = "qn",
        curvature: str = "secant",
        cubic: bool = False,
        retry: str = "moller",
        reject_pairs: bool = False,
        decrease: float = 2.0,
        decrease_by_fit: bool = False,
        decrease_to_fit: bool = False,
        first_step: str = "scaled",
        gamma_window: int | None = None,
        gamma_pick: str = "max",
        gamma_scale: float = 1.0,
        growth: float | None = None,
        angle: float = 0.0,
        restart: int | None = None,
        nonmonotone: int = 1,
        layerwise: bool = False,
        hold_after_rejection: bool = False,
        raise_accepted: bool = True,
        nystrom_rank: int = 0,
        diagonal_beta: float | None = None,
        diagonal_power: float = 0.5,
        diagonal_refresh: int = 1,
        secant_diagonal: float | None = None,
        nystrom_every: int = 50,
        stretch_max: float = 1.0,
        stretch_factor: float = 1.5,
        stretch_above: float = 1.1,
        loss_first: bool = False,
        powell_damping: float = 0.0,
        value_secant: float | None = None,
        log_loss: bool = False,
        multistep: bool = False,
        sigma: float = 5e-5,
        lambd: float = 5e-7,
    ) -> None:
        retry = "cubic-lambda" if cubic else retry
        if retry not in RETRY_RULES or first_step not in FIRST_STEPS:
            raise ValueError(f"retry must be one of {RETRY_RULES} and first_step one of {FIRST_STEPS}")
        if reject_pairs and retry != "moller":
            raise ValueError("reject_pairs recomputes p after a rejection; it does not combine with a retry along p")
        self.params = list(params)
        flat_params = [self._flat()]
        self.nystrom_every = nystrom_every
        self.stretch, self.stretch_max = 1.0, stretch_max  # τ and its cap (1: the library's δ = μ)
        self.stretch_factor, self.stretch_above = stretch_factor, stretch_above
        self.loss_first = loss_first  # a trial whose loss rose is rejected without its gradient (lever 12)
        if not 0.0 <= powell_damping < 1.0 or (
            powell_damping and (first_step == "diagonal" or direction != "qn" or nystrom_rank)
        ):
            # (after the μ ≤ 0 fallback p = r, while a Nyström sketch outlives the pairs' clear(): p ≠ H r)
            raise ValueError(
                "powell_damping c needs 0 ≤ c < 1 and p = H r "
                "(direction 'qn', not first_step 'diagonal', no Nyström H₀)"
            )
        self.powell_damping = powell_damping  # c of Powell's damping (lever 43; 0: off)
        if value_secant is not None and not 0.0 < value_secant <= 1.0:
            raise ValueError(f"value_secant c needs 0 < c ≤ 1 (sᵀỹ ≥ c sᵀy), got {value_secant}")
        if value_secant is not None and powell_damping:
            raise ValueError("value_secant and powell_damping each rewrite y: not both")
        self.value_secant = value_secant  # c of the function-value secant pair (lever 68; None: off)
        if log_loss and (first_step == "probe" or curvature == "hvp" or nystrom_rank):
            raise ValueError(
                "log_loss minimises log E: not with the probed first step or Hessian products "
                "(curvature 'hvp', nystrom_rank), which are E's"
            )
        self.log_loss = log_loss  # minimise log E (lever 69)
        if multistep and (powell_damping or value_secant is not None or reject_pairs):
            raise ValueError("multistep rewrites the pair: not with powell_damping, value_secant or reject_pairs")
        self.multistep = multistep  # Ford & Moghrabi's two-step pair (lever 70)
        self.previous_pair: tuple[torch.Tensor, torch.Tensor] | None = None  # s₋, y₋ (multistep)
        if secant_diagonal is not None and (nystrom_rank or diagonal_beta is not None or first_step == "diagonal"):
            raise ValueError(
                "secant_diagonal is an H₀ of its own: not with nystrom_rank, diagonal_beta or first_step 'diagonal'"
            )
        if nystrom_rank:
            self.pairs: WindowedPairs = NystromPairs(flat_params, memory, nystrom_rank)
        elif diagonal_beta is not None:
            if gamma_pick != "max":
                raise ValueError("the diagonal H₀'s γ_D is the largest ratio of its window: gamma_pick must be 'max'")
            self.pairs = DiagonalPairs(
                flat_params, memory, diagonal_beta, diagonal_power, refresh=diagonal_refresh, window=gamma_window
            )
        elif secant_diagonal is not None:
            if layerwise or gamma_pick != "max" or gamma_window is not None or gamma_scale != 1.0:
                raise ValueError("secant_diagonal fits its own H₀: no layerwise or gamma_* options beside it")
            self.pairs = SecantDiagonalPairs(flat_params, memory, secant_diagonal)
        elif layerwise:
            sizes = [p.numel() for p in self.params]
            self.pairs = LayerwisePairs(flat_params, memory, sizes, gamma_scale)
        else:
            self.pairs = WindowedPairs(
                flat_params, memory, memory if gamma_window is None else gamma_window, gamma_pick, gamma_scale
            )
        self.direction_rule, self.curvature = direction, curvature
        self.retry, self.reject_pairs, self.decrease = retry, reject_pairs, decrease
        self.decrease_by_fit = decrease_by_fit
        self.decrease_to_fit = decrease_to_fit
        self.hold_after_rejection = hold_after_rejection
        self.raise_accepted = raise_accepted
        self.first_step, self.angle, self.restart, self.growth = first_step, angle, restart, growth
        if nonmonotone < 1:
            raise ValueError(f"nonmonotone must be ≥ 1 (1: Møller's test), got {nonmonotone}")
        self.nonmonotone = nonmonotone
        self.accepted_losses: list[float] = []  # the last `nonmonotone` accepted losses, newest last
        self.last_step_sq = math.inf  # |s|² of the last accepted step (growth cap)
        self.sigma, self.lambd = sigma, lambd
        self.lambd_bar, self.delta, self.success = 0.0, 0.0, True
        self.retry_alpha: float | None = None
        self.raw_delta = 0.0
        self.loss = math.nan
        self.steps = 0
        self.rejected = 0
        self.started = False
        self.log: list[dict[str, float]] | None = None  # set to a list to record each step's scalars

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _set(self, x: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.copy_(x[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def _rejects_on_loss(self, closure: Any) -> bool:
        """Whether a trial may be rejected on its loss alone, as the library's: the run defers the backward, and no
        rule of this variant reads a rejected trial's gradient (Møller's retry, no rejected pairs, monotone)."""
        return (
            self.loss_first
            and hasattr(closure, "value_then_grad")
            and self.retry == "moller"
            and not self.reject_pairs
            and self.nonmonotone == 1
        )

    def _evaluate_trial(self, closure: Any) -> tuple[float, torch.Tensor | None]:
        """The trial's loss and gradient; no gradient (``None``) when its loss alone rejects it and the run lets
        the backward be skipped (:meth:`_rejects_on_loss`)."""
        if not self._rejects_on_loss(closure):
            return self._evaluate(closure)
        with torch.enable_grad():
            loss, gradient = closure.value_then_grad()
        return self._completed_trial(float(loss), gradient)

    def _completed_trial(self, trial_loss: float, gradient: Any) -> tuple[float, torch.Tensor | None]:
        """A deferred trial's loss and flat gradient, the backward (``gradient()``) made only when the loss does not
        reject the trial (``None`` then)."""
        objective = self._objective(trial_loss)
        if not objective <= self.loss:
            return objective, None
        flat = torch.cat([g.detach().reshape(-1) for g in gradient()]).clone()
        return objective, flat / trial_loss if self.log_loss else flat

    def _evaluate(self, closure: Any) -> tuple[float, torch.Tensor]:
        with torch.enable_grad():
            loss = float(closure())
        gradient = torch.cat(
            [(torch.zeros_like(p) if p.grad is None else p.grad).detach().reshape(-1) for p in self.params]
        )
        return self._objective(loss), gradient / loss if self.log_loss else gradient.clone()

    def _objective(self, loss: float) -> float:
        """What the variant minimises at a point whose closure returned ``loss``: E, or log E (``log_loss``; −∞ at
        E = 0; NaN for a NaN E, which rejects a trial).

        Raises:
            ValueError: ``log_loss`` and a negative E, whose logarithm is not defined.
        """
        if not self.log_loss:
            return loss
        if loss < 0.0:
            raise ValueError(f"log_loss needs E ≥ 0, and the closure returned {loss}")
        return math.log(loss) if loss > 0.0 else (-math.inf if loss == 0.0 else math.nan)

    @property
    def reported_loss(self) -> float:
        """E at the weights held (exp of what the variant minimises when ``log_loss``)."""
        return math.exp(self.loss) if self.log_loss else self.loss

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        return self.pairs.inverse_product([r])[0]

    def _curvature_along(self, closure: Any, w: torch.Tensor, r: torch.Tensor, p: torch.Tensor, mu: float) -> float:
        """Step 2 after a success: δ, unscaled by λ."""
        p_sq = float(p @ p)
        no_pairs = self.pairs.is_identity()
        if self.curvature == "secant" and not no_pairs and self.direction_rule == "qn":
            return mu / self.stretch  # δ = pᵀBp / τ: α ≈ τ while λ is small
        if self.curvature == "secant" and self.steps == 0 and self.first_step != "finite-difference":
            if self.first_step == "scaled-l2":
                norm = float(r.norm())  # |r|₂
            elif self.first_step == "diagonal":
                norm = float(p.abs().sum())  # |p₁|₁ of p₁ = D r₁: a first step of L1 length min(1, |p₁|₁)
            else:
                norm = float(r.abs().sum())  # |r|₁
            return mu / min(1.0, 1.0 / norm)
        if self.curvature == "hvp":
            product = closure.hvp(self._split(p))
            return float(p @ torch.cat([t.reshape(-1) for t in product]))
        sigma_k = self.sigma / math.sqrt(p_sq)
        self._set(w + sigma_k * p)
        _, shifted = self._evaluate(closure)
        self._set(w)
        return float(p @ (shifted + r)) / sigma_k

    def _damped(
        self, step: torch.Tensor, change: torch.Tensor, model_change: torch.Tensor, step_model_step: float
    ) -> torch.Tensor:
        """Powell's damping (``powell_damping`` = c > 0): y ← θy + (1 − θ)Bs with θ = (1 − c)sᵀBs / (sᵀBs − sᵀy)
        when sᵀy < c sᵀBs, so that the pair keeps sᵀy = c sᵀBs (Powell 1978; Nocedal & Wright 2006, procedure
        18.2). Free here: p = H r with the pairs held, so Bs = αBp = αr (``model_change``) and sᵀBs = α²μ
        (``step_model_step``)."""
        step_change = float(step @ change)
        if step_change >= self.powell_damping * step_model_step:
            return change
        theta = (1.0 - self.powell_damping) * step_model_step / (step_model_step - step_change)
        return theta * change + (1.0 - theta) * model_change

    def _value_secant_change(
        self, step: torch.Tensor, change: torch.Tensor, r: torch.Tensor, new_r: torch.Tensor, trial_loss: float
    ) -> torch.Tensor:
        """ỹ = y + (θ / sᵀs) s with θ = 6(E(w) − E(w₊)) + 3(g + g₊)ᵀs = 6(E(w) − E(w₊)) − 3(r + r₊)ᵀs, clipped to
        θ ≥ (c − 1) sᵀy (``value_secant`` = c); y itself where sᵀy ≤ 0. On a cubic along s, sᵀỹ = sᵀE''(w₊)s."""
        assert self.value_secant is not None
        step_change = float(step @ change)
        if not step_change > 0.0:
            return change
        theta = 6.0 * (self.loss - trial_loss) - 3.0 * float((r + new_r) @ step)
        theta = max(theta, (self.value_secant - 1.0) * step_change)
        return change + (theta / float(step @ step)) * step

    def _two_step_pair(self, step: torch.Tensor, change: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ŝ, ŷ) = (s − ω s₋, y − ω y₋), ω = α² / (1 + 2α), α = |s| / |s₋| (Ford & Moghrabi 1994); (s, y) with no
        previous pair, after a zero step s₋, or where ŝᵀŷ ≤ ``CURVATURE_CONDITION`` ŷᵀŷ."""
        if self.previous_pair is None:
            return step, change
        previous_step, previous_change = self.previous_pair
        previous_length = float(previous_step.norm())
        if previous_length == 0.0:
            return step, change
        ratio = float(step.norm()) / previous_length
        weight = ratio * ratio / (1.0 + 2.0 * ratio)  # ω
        two_step, two_change = step - weight * previous_step, change - weight * previous_change
        if not float(two_step @ two_change) > CURVATURE_CONDITION * float(two_change @ two_change):
            return step, change
        return two_step, two_change

    def _keeps(self, step: torch.Tensor, change: torch.Tensor) -> bool:
        """The variant's extra curvature condition sᵀy > angle · |s||y| (the library's is checked by ``push``)."""
        return self.angle == 0.0 or float(step @ change) > self.angle * float(step.norm() * change.norm())

    @torch.no_grad()
    def step(self, closure: Any) -> float:
        if not self.started:
            self.loss, gradient = self._evaluate(closure)
            self.r = -gradient
            self.p = self.r.clone()
            self.z = self.r.clone()
            self.started = True
            self.accepted_losses = [self.loss]
            if isinstance(self.pairs, DiagonalPairs):
                self.pairs.observe(self.r)
                if self.first_step == "diagonal":  # p₁ = D r₁: the diagonal H₀ before any pair (γ_D needs one)
                    self.p = self.z = self.pairs.diagonal() * self.r
            if self._sketch(closure):
                self.p = self.z = self._precondition(self.r)
        r, p, w = self.r, self.p, self._flat()
        mu, p_sq = float(p @ r), float(p @ p)
        if mu <= 0.0:
            self.pairs.clear()
            self.previous_pair = None
            self.p = p = self.z = r.clone()
            mu, p_sq, self.success, self.lambd_bar = float(r @ r), float(r @ r), True, 0.0
            self.retry_alpha = None
        lambd, lambd_bar = self.lambd, self.lambd_bar
        if self.retry_alpha is not None:  # an interpolated retry along the same p: δ is what gives that α
            alpha = self.retry_alpha
            delta = mu / alpha
        else:
            if self.success:
                self.raw_delta = self._curvature_along(closure, w, r, p, mu)
                delta = self.raw_delta
            else:
                delta = self.delta
            delta, lambd, lambd_bar = scaled_curvature(delta, lambd, lambd_bar, p_sq)
            if self.growth is not None and (mu / delta) ** 2 * p_sq > self.growth**2 * self.last_step_sq:
                delta = mu / (self.growth * math.sqrt(self.last_step_sq / p_sq))  # |αp| = growth · |s_last|
            alpha = mu / delta
        self.retry_alpha = None
        self._set(w + alpha * p)
        if self.steps == 0 and self.first_step == "probe" and self._rejects_on_loss(closure):
            trial_loss, trial_gradient, fitted = self._probe(closure, mu, alpha)
            if fitted is not None:  # the probe's minimiser is far beyond α₀: the first trial is at α* instead
                self.raw_delta = fitted
                delta = fitted + (lambd - lambd_bar) * p_sq
                alpha = mu / delta
                self._set(w + alpha * p)
                trial_loss, trial_gradient = self._evaluate_trial(closure)
        else:
            trial_loss, trial_gradient = self._evaluate_trial(closure)
        if trial_gradient is None:  # rejected on its loss alone, as the library does: r₊ is never formed
            new_r, finite = r, math.isfinite(trial_loss)  # new_r unread: the rules that read it are off here
        else:
            new_r = -trial_gradient
            finite = math.isfinite(trial_loss) and bool(torch.isfinite(new_r).all())
        comparison = 2.0 * delta * (self.loss - trial_loss) / mu**2 if finite else math.nan
        self.steps += 1
        retrying = not self.success  # this trial is along the p of a rejected one
        cubic_lambda = None
        # Non-monotone acceptance (Grippo, Lampariello & Lucidi 1986): accept when the trial loss is below the
        # largest of the last `nonmonotone` accepted losses; Δ, and with it λ, still compares with E(w).
        reference = max(self.accepted_losses[-self.nonmonotone :])
        if finite and (comparison >= 0.0 or trial_loss <= reference):
            self.accepted_losses = [*self.accepted_losses[-self.nonmonotone :], trial_loss]
            step, change = alpha * p, r - new_r
            if self.powell_damping:
                change = self._damped(step, change, alpha * r, alpha * alpha * mu)
            if self.value_secant is not None:
                change = self._value_secant_change(step, change, r, new_r, trial_loss)
            plain_pair = (step, change)
            if self.multistep:
                step, change = self._two_step_pair(step, change)
            if isinstance(self.pairs, DiagonalPairs):
                self.pairs.observe(new_r)
            self.last_step_sq = alpha * alpha * p_sq
            if self._keeps(step, change):
                self.pairs.push([step], [change])
            if self.multistep:
                self.previous_pair = plain_pair  # the next two-step pair reaches back to this step
            if self.restart is not None and self.steps % self.restart == 0:
                self.pairs.clear()
                self.previous_pair = None
            if self.steps % self.nystrom_every == 0:
                self._sketch(closure)  # at the accepted w + αp, which the parameters hold
            new_z = self._precondition(new_r)
            if self.direction_rule == "qn":
                new_p = new_z
            else:
                beta = max(float(new_z @ (new_r - r)) / float(self.z @ r), 0.0)
                new_p = new_z + beta * p
            self.r, self.p, self.z, self.loss = new_r, new_p, new_z, trial_loss
            lambd_bar, self.success = 0.0, True
            if comparison >= 0.75 and not (self.hold_after_rejection and retrying):
                if self.decrease_by_fit:
                    lambd *= max(1.0 / 3.0, 1.0 - (2.0 * comparison - 1.0) ** 3)
                elif self.decrease_to_fit:  # λ at which δ = (2 − Δ)δ, the curvature the trial observed
                    lambd = min(lambd / self.decrease, max(lambd - (comparison - 1.0) * delta / p_sq, 0.0))
                else:
                    lambd /= self.decrease
        else:
            self._set(w)
            lambd_bar, self.success = lambd, False
            self.rejected += 1
            if finite and self.retry != "moller":
                t = self._interpolated_step(mu, alpha, trial_loss, float(new_r @ p))
                if self.retry != "cubic-lambda":
                    self.retry_alpha = t if t is not None else self._quadratic_step(mu, alpha, trial_loss)
                elif t is not None:
                    cubic_lambda = (mu / t - self.raw_delta) / p_sq
            if finite and self.reject_pairs and self.pairs.push([alpha * p], [r - new_r]):
                self.p = self.z = self._precondition(r)
                self.success, lambd_bar = True, 0.0
        if self.log is not None:
            self.log.append(
                dict(
                    alpha=alpha,
                    mu=mu,
                    delta=delta,
                    p_sq=p_sq,
                    comparison=comparison,
                    lambd=lambd,
                    trial_loss=trial_loss,
                    loss=self.loss,
                    pairs=len(self.pairs),
                )
            )
        if self.stretch_max > 1.0:  # τ grows while the model underestimates the decrease, and shrinks back
            if finite and self.success and comparison > self.stretch_above:
                self.stretch = min(self.stretch * self.stretch_factor, self.stretch_max)
            elif not (finite and self.success) or comparison < 0.75:
                self.stretch = max(self.stretch / self.stretch_factor, 1.0) if finite and self.success else 1.0
        effective = comparison if finite else -2.0
        if cubic_lambda is not None:
            lambd = max(cubic_lambda, lambd)
        elif (
            effective < 0.25
            and not (self.retry == "interpolate" and self.retry_alpha is not None)
            and (self.raise_accepted or not self.success)
        ):
            lambd = min(lambd + delta * (1.0 - effective) / p_sq, 1e100)
        self.lambd, self.lambd_bar, self.delta = lambd, lambd_bar, delta
        return self.loss

    def _sketch(self, closure: Any) -> bool:
        """Refresh a :class:`NystromPairs` H₀ at the weights the parameters hold (k products ``closure.hvp``);
        whether there was one to refresh."""
        if not isinstance(self.pairs, NystromPairs):
            return False
        flat = self._flat()

        def hessian_product(v: torch.Tensor) -> torch.Tensor:
            return torch.cat([t.reshape(-1) for t in closure.hvp(self._split(v))])

        self.pairs.refresh(hessian_product, flat.numel(), flat.dtype)
        return True

    def _probe(self, closure: Any, mu: float, alpha: float) -> tuple[float, torch.Tensor | None, float | None]:
        """The first trial at w + α₀p as a probe (``first_step="probe"``): its loss from a forward; δ of the quadratic
        through E(w), the slope −μ and that loss, when it is positive and its α* = μ/δ > ``PROBE_MIN_RATIO`` α₀
        (the probe's backward is then never made; a loss that is not finite never qualifies); otherwise the trial's
        loss and gradient as :meth:`_evaluate_trial` gives them, and ``None``."""
        with torch.enable_grad():
            loss, gradient = closure.value_then_grad()
        trial_loss = float(loss)
        fitted = 2.0 * (trial_loss - self.loss + alpha * mu) / (alpha * alpha)
        if fitted > 0.0 and mu / fitted > PROBE_MIN_RATIO * alpha:
            return trial_loss, None, fitted
        return (*self._completed_trial(trial_loss, gradient), None)

    def _interpolated_step(self, mu: float, alpha: float, trial_loss: float, trial_slope_neg: float) -> float | None:
        """t in [0.1α, 0.5α]: the minimiser of the cubic through E(w), E'(w)ᵀp = −μ, E(w + αp), E'(w + αp)ᵀp
        (Nocedal & Wright 2006, eq. 3.59), or None if the cubic has none."""
        slope0, slope1 = -mu, -trial_slope_neg
        z = 3.0 * (self.loss - trial_loss) / alpha + slope0 + slope1
        discriminant = z * z - slope0 * slope1
        if discriminant < 0.0:
            return None
        root = math.sqrt(discriminant)
        denominator = slope1 - slope0 + 2.0 * root
        t = alpha * (1.0 - (slope1 + root - z) / denominator) if denominator != 0.0 else 0.5 * alpha
        return min(max(t, 0.1 * alpha), 0.5 * alpha)

    def _quadratic_step(self, mu: float, alpha: float, trial_loss: float) -> float:
        """t in [0.1α, 0.5α]: the minimiser of the quadratic through E(w), E'(w)ᵀp = −μ and E(w + αp) (eq. 3.57)."""
        curvature = trial_loss - self.loss + mu * alpha
        t = mu * alpha * alpha / (2.0 * curvature) if curvature > 0.0 else 0.5 * alpha
        return min(max(t, 0.1 * alpha), 0.5 * alpha)

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        pieces, offset = [], 0
        for p in self.params:
            pieces.append(v[offset : offset + p.numel()].view_as(p).clone())
            offset += p.numel()
        return pieces
