"""Research variants of the preconditioned SCG step that ``benchmarks/levers.py`` races, kept out of the library.

``SCG(params, memory=m)`` (moller_scg/scg.py) is what won; the variants here are the levers that lost or did not
clearly win (issue #14), written on one flat vector so that each differs from the library's mode by one rule:

* ``direction="pcg"``: Møller's conjugate update in preconditioned form, p₊ = H r₊ + βp with the
  preconditioned Polak–Ribière β = (H r₊)ᵀ(r₊ − r) / (H r)ᵀr, clipped at 0 (Buckley & LeNir 1983; Morales &
  Nocedal 2000), instead of the quasi-Newton direction p₊ = H r₊;
* ``cubic=True``: after a rejected trial, λ is set so that the next α is the minimiser of the cubic through
  E(w), E'(w)ᵀp, E(w + αp), E'(w + αp)ᵀp (clipped to [0.1α, 0.5α]), instead of Møller's λ + δ(1 − Δ)/|p|²;
* ``reject_pairs=True``: a rejected trial's secant pair is kept too, and the direction recomputed from it;
* ``decrease``: the divisor of λ after a good step (Møller: 4).

Curvature: ``"secant"`` (δ = μ, as the library), ``"finite-difference"`` or ``"hvp"`` (the closure's ``hvp``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moller_scg.quasi_newton import SecantPairs


class FlatSCG:
    """One SCG variant on the parameters as one flat vector (see the module docstring for the options)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        memory: int = 20,
        direction: str = "qn",
        curvature: str = "secant",
        cubic: bool = False,
        reject_pairs: bool = False,
        decrease: float = 4.0,
        sigma: float = 5e-5,
        lambd: float = 5e-7,
    ) -> None:
        self.params = list(params)
        flat_params = [self._flat()]
        self.pairs = SecantPairs(flat_params, memory)
        self.direction_rule, self.curvature = direction, curvature
        self.cubic, self.reject_pairs, self.decrease = cubic, reject_pairs, decrease
        self.sigma, self.lambd = sigma, lambd
        self.lambd_bar, self.delta, self.success = 0.0, 0.0, True
        self.loss = math.nan
        self.steps = 0
        self.rejected = 0
        self.started = False

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _set(self, x: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.copy_(x[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def _evaluate(self, closure: Any) -> tuple[float, torch.Tensor]:
        with torch.enable_grad():
            loss = closure()
        gradient = torch.cat(
            [(torch.zeros_like(p) if p.grad is None else p.grad).detach().reshape(-1) for p in self.params]
        )
        return float(loss), gradient.clone()

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        return self.pairs.inverse_product([r])[0]

    @torch.no_grad()
    def step(self, closure: Any) -> float:
        if not self.started:
            self.loss, gradient = self._evaluate(closure)
            self.r = -gradient
            self.p = self.r.clone()
            self.z = self.r.clone()
            self.started = True
        r, p, w = self.r, self.p, self._flat()
        mu, p_sq = float(p @ r), float(p @ p)
        if mu <= 0.0:
            self.pairs.clear()
            self.p = p = self.z = r.clone()
            mu, p_sq, self.success, self.lambd_bar = float(r @ r), float(r @ r), True, 0.0
        lambd, lambd_bar = self.lambd, self.lambd_bar
        if self.success:
            if self.curvature == "secant" and len(self.pairs) and self.direction_rule == "qn":
                delta = mu
            elif self.curvature == "hvp":
                product = closure.hvp(self._split(p))
                delta = float(p @ torch.cat([t.reshape(-1) for t in product]))
            else:
                sigma_k = self.sigma / math.sqrt(p_sq)
                self._set(w + sigma_k * p)
                _, shifted = self._evaluate(closure)
                self._set(w)
                delta = float(p @ (shifted + r)) / sigma_k
            self.raw_delta = delta
        else:
            delta = self.delta
        delta += (lambd - lambd_bar) * p_sq
        if delta <= 0.0:
            lambd_bar = 2.0 * (lambd - delta / p_sq)
            delta = -delta + lambd * p_sq
            lambd = lambd_bar
        alpha = mu / delta
        self._set(w + alpha * p)
        trial_loss, trial_gradient = self._evaluate(closure)
        new_r = -trial_gradient
        finite = math.isfinite(trial_loss) and bool(torch.isfinite(new_r).all())
        comparison = 2.0 * delta * (self.loss - trial_loss) / mu**2 if finite else math.nan
        self.steps += 1
        cubic_lambda = None
        if finite and comparison >= 0.0:
            self.pairs.push([alpha * p], [r - new_r])
            new_z = self._precondition(new_r)
            if self.direction_rule == "qn":
                new_p = new_z
            else:
                beta = max(float(new_z @ (new_r - r)) / float(self.z @ r), 0.0)
                new_p = new_z + beta * p
            self.r, self.p, self.z, self.loss = new_r, new_p, new_z, trial_loss
            lambd_bar, self.success = 0.0, True
            if comparison >= 0.75:
                lambd /= self.decrease
        else:
            self._set(w)
            lambd_bar, self.success = lambd, False
            self.rejected += 1
            if finite and self.cubic:
                cubic_lambda = self._cubic_lambda(mu, alpha, trial_loss, float(new_r @ p), p_sq)
            if finite and self.reject_pairs and self.pairs.push([alpha * p], [r - new_r]):
                self.p = self.z = self._precondition(r)
                self.success, lambd_bar = True, 0.0
        effective = comparison if finite else -2.0
        if cubic_lambda is not None:
            lambd = max(cubic_lambda, lambd)
        elif effective < 0.25:
            lambd = min(lambd + delta * (1.0 - effective) / p_sq, 1e100)
        self.lambd, self.lambd_bar, self.delta = lambd, lambd_bar, delta
        return self.loss

    def _cubic_lambda(self, mu: float, alpha: float, trial_loss: float, trial_slope_neg: float, p_sq: float):
        """λ that makes the next α the minimiser of the cubic interpolant along p (None if it has none)."""
        slope0, slope1 = -mu, -trial_slope_neg
        z = 3.0 * (self.loss - trial_loss) / alpha + slope0 + slope1
        discriminant = z * z - slope0 * slope1
        if discriminant < 0.0:
            return None
        root = math.sqrt(discriminant)
        denominator = slope1 - slope0 + 2.0 * root
        t = alpha * (1.0 - (slope1 + root - z) / denominator) if denominator != 0.0 else 0.5 * alpha
        t = min(max(t, 0.1 * alpha), 0.5 * alpha)
        return (mu / t - self.raw_delta) / p_sq

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        pieces, offset = [], 0
        for p in self.params:
            pieces.append(v[offset : offset + p.numel()].view_as(p).clone())
            offset += p.numel()
        return pieces
