"""Lever 67 of issue #14, a research variant kept out of the library: a limited-memory SR1 model, damped by Møller's λ.

The library's secant mode (``SCG(params, memory=m)``) steps along the L-BFGS direction p = H r and lets λ shorten the
step along it (α = μ / (μ + λ|p|²)). Its model B is positive definite by construction, so on a non-convex loss it
never holds the negative curvature the pairs measured. :class:`FlatSR1` keeps the same pairs, the same one pass a
step and Møller's accept test and λ rules, and changes the model and what λ does:

* B is the limited-memory symmetric rank-one matrix of the pairs held (Byrd, Nocedal & Schnabel 1994, compact form):
  B = b₀I + Ψ M⁻¹ Ψᵀ with Ψ = Y − b₀S and M = D + L + Lᵀ − b₀SᵀS, where SᵀY = L + D + U (L strictly lower, D
  diagonal, in the pairs' time order). Before a pair, b₀ = max(1, |r|₁) (the library's first step: α = min(1, 1/|r|₁)).
  With pairs, ``initial="ratio"``: b₀ = 1/γ, the library's γ = maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ — which makes B singular after one
  pair (sᵀ(y − b₀s) = sᵀy(1 − 1/cos²∠(s, y)) ≤ 0) — or ``initial="pencil"``: b₀ = 0.9 θ_min, θ_min the smallest
  eigenvalue of the pencil (D + L + Lᵀ, SᵀS), so that M ≻ 0 and B ⪰ b₀I ≻ 0 (M = (D + L + Lᵀ) − b₀SᵀS is positive
  definite exactly when b₀ < θ_min), the ratio's b₀ where θ_min ≤ 0. B may be indefinite.
* λ damps the direction itself, as Levenberg–Marquardt damping or a trust region does: p solves (B + λ_e I)p = r,
  with λ_e = max(λ, −1.5 λ_min(B)) so that B + λ_e I is positive definite (λ_min(B) from a k × k eigenproblem:
  the non-zero eigenvalues of Ψ M⁻¹ Ψᵀ are those of T M⁻¹ Tᵀ, TᵀT = ΨᵀΨ; not formed where b₀ certifies B ⪰ b₀I).
  By Sherman–Morrison–Woodbury, p = (r − Ψ (cM + ΨᵀΨ)⁻¹ Ψᵀ r) / c with c = b₀ + λ_e: k × k algebra and four
  products with the pairs.
* The trial is w + p (α = 1). Møller's scalars follow from it: μ = pᵀr, δ = pᵀ(B + λ_e I)p = μ and
  Δ = 2(E(w) − E(w + p))/μ.
  A trial with Δ < 0 is rejected (on its loss alone, as the library's, where the run defers the backward), and the
  next one is at the same w with the raised λ, so along a different, shorter p (the library retries along the same p).
  After Δ ≥ 0.75, λ ← λ / 2 (the library's secant rule); after Δ < 0.25, λ ← λ_e + δ(1 − Δ)/|p|² (Møller's raise).
* An accepted step's pair (s, y) = (p, r − r₊) is kept only if |sᵀ(y − Bs)| > 10⁻⁸ |s| |y − Bs| (the SR1 skip rule;
  Bs = r − λ_e s is free), whatever the sign of sᵀy. When M of the pairs held is singular or its condition number
  exceeds 10¹², the oldest pairs are dropped until it is not.

Nothing here is in the library; ``benchmarks/levers.py`` races it as the row ``L-SR1 m=20, loss first``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from levers_variants import FlatSCG

SKIP = 1e-8
"""ε of the SR1 skip rule: a pair is dropped when |sᵀ(y − Bs)| ≤ ε |s| |y − Bs| (Nocedal & Wright 2006, eq. 6.26)."""
CONDITIONING = 1e12
"""The largest condition number of M that the pairs held may give before the oldest are dropped."""
INITIAL_RULES = ("ratio", "pencil")
PENCIL_FRACTION = 0.9
"""``initial="pencil"``: b₀ = 0.9 θ_min of the pencil (D + L + Lᵀ, SᵀS) when θ_min > 0 (then B is positive definite)."""
INDEFINITE_MARGIN = 1.5
"""λ_e ≥ −1.5 λ_min(B) when B has a negative eigenvalue: B + λ_e I then has eigenvalues ≥ ½|λ_min(B)|."""


class FlatSR1(FlatSCG):
    """Møller's SCG with an L-SR1 model, λ as damping of the direction (see the module docstring).

    Args:
        params: the parameters, real, of one dtype and device.
        memory: m, the pairs held.
        lambd: λ₁, as the library's.
        decrease: the divisor of λ after a good step (the library's secant mode: 2).
        initial: b₀'s rule, ``"ratio"`` (1/γ) or ``"pencil"`` (0.9 θ_min of (D + L + Lᵀ, SᵀS)).
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        memory: int = 20,
        lambd: float = 5e-7,
        decrease: float = 2.0,
        initial: str = "ratio",
    ):
        if initial not in INITIAL_RULES:
            raise ValueError(f"initial must be one of {INITIAL_RULES}, got {initial!r}")
        super().__init__(params, memory=memory, lambd=lambd, decrease=decrease, loss_first=True)
        self.initial = initial
        flat = self._flat()
        self.memory = memory
        self.held_steps = torch.zeros(memory, flat.numel(), dtype=flat.dtype, device=flat.device)  # rows sᵢ
        self.held_changes = torch.zeros_like(self.held_steps)  # rows yᵢ
        self.slots: list[int] = []  # rows in use, oldest first
        self.ss = np.zeros((memory, memory))  # sᵢᵀsⱼ
        self.sy = np.zeros((memory, memory))  # sᵢᵀyⱼ
        self.yy = np.zeros((memory, memory))  # yᵢᵀyⱼ
        self.skipped = 0
        self.dropped = 0

    # --- the pairs and the compact SR1 model -------------------------------------------------------------------

    def push(self, step: torch.Tensor, change: torch.Tensor) -> None:
        """Hold the pair (s, y), replacing the oldest when all m rows are in use."""
        if len(self.slots) == self.memory:
            row = self.slots.pop(0)
        else:
            row = next(i for i in range(self.memory) if i not in self.slots)
        self.held_steps[row], self.held_changes[row] = step, change
        self.slots.append(row)
        held = self.slots
        steps, changes = self.held_steps[held].double(), self.held_changes[held].double()  # float64 products
        step64, change64 = step.double(), change.double()
        s_against = (steps @ step64).cpu().numpy()  # sᵢᵀs
        y_against = (changes @ step64).cpu().numpy()  # yᵢᵀs
        s_change = (steps @ change64).cpu().numpy()  # sᵢᵀy
        y_change = (changes @ change64).cpu().numpy()  # yᵢᵀy
        self.ss[held, row] = self.ss[row, held] = s_against
        self.yy[held, row] = self.yy[row, held] = y_change
        self.sy[held, row] = s_change  # sᵢᵀy, column of the new y
        self.sy[row, held] = y_against  # sᵀyᵢ, row of the new s

    @staticmethod
    def informative(step: torch.Tensor, residual: torch.Tensor) -> bool:
        """The SR1 skip rule: whether |sᵀ(y − Bs)| > ``SKIP`` |s| |y − Bs| (``residual`` = y − Bs), without which the
        rank-one update (y − Bs)(y − Bs)ᵀ / sᵀ(y − Bs) is undefined or unbounded."""
        return abs(float(step @ residual)) > SKIP * float(step.norm() * residual.norm())

    def initial_curvature(self, r: torch.Tensor) -> tuple[float, bool]:
        """b₀ of B₀ = b₀I, and whether it makes B ⪰ b₀I ≻ 0 by construction.

        ``initial="pencil"`` with θ_min > 0: b₀ = 0.9 θ_min (:meth:`pencil_smallest`), and then M ≻ 0, so B ⪰ b₀I.
        Otherwise 1/γ with the library's γ = maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ over the pairs with sᵢᵀyᵢ > 0 (the smallest
        |yᵢ|² / |sᵢᵀyᵢ| when none has); max(1, |r|₁) before any pair (certified: B = b₀I) or when every sᵢᵀyᵢ is 0.
        """
        if not self.slots:
            return max(1.0, float(r.abs().sum())), True
        if self.initial == "pencil":
            smallest = self.pencil_smallest()
            if smallest > 0.0:
                return PENCIL_FRACTION * smallest, True
        curvatures = [self.yy[i, i] / self.sy[i, i] for i in self.slots if self.sy[i, i] > 0.0]
        if curvatures:
            return float(min(curvatures)), False
        others = [self.yy[i, i] / abs(self.sy[i, i]) for i in self.slots if self.sy[i, i] != 0.0]
        return (float(min(others)), False) if others else (max(1.0, float(r.abs().sum())), False)

    def held_products(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SᵀY, SᵀS and D + L + Lᵀ over the pairs held, in time order (SᵀY = L + D + U: L strictly lower, the
        products sᵢᵀyⱼ of a newer sᵢ with an older yⱼ)."""
        order = np.array(self.slots, dtype=np.intp)
        sy = self.sy[np.ix_(order, order)]
        lower = np.tril(sy, -1)
        return sy, self.ss[np.ix_(order, order)], np.diag(np.diag(sy)) + lower + lower.T

    def pencil_smallest(self) -> float:
        """The smallest eigenvalue θ of (D + L + Lᵀ) u = θ SᵀS u over the pairs held: below it, M = D + L + Lᵀ − b₀SᵀS
        is positive definite and so is B ⪰ b₀I (over the range of SᵀS: eigenvalues below 10⁻¹² of its largest are
        dropped, as steps that are nearly parallel leave)."""
        _, ss, symmetric_part = self.held_products()
        e, v = np.linalg.eigh(ss)
        keep = e > 1e-12 * float(e.max())
        whitening = v[:, keep] / np.sqrt(e[keep])  # SᵀS restricted to its range, whitened
        pencil = whitening.T @ symmetric_part @ whitening
        return float(np.linalg.eigvalsh(0.5 * (pencil + pencil.T)).min())

    def middle_and_gram(self, b0: float) -> tuple[np.ndarray, np.ndarray]:
        """M = D + L + Lᵀ − b₀SᵀS and ΨᵀΨ = YᵀY − b₀(SᵀY + YᵀS) + b₀²SᵀS over the pairs held, in time order."""
        sy, ss, symmetric_part = self.held_products()
        order = np.array(self.slots, dtype=np.intp)
        middle = symmetric_part - b0 * ss
        gram = self.yy[np.ix_(order, order)] - b0 * (sy + sy.T) + b0 * b0 * ss
        return middle, gram

    def fitted_model(self, r: torch.Tensor) -> tuple[float, bool, np.ndarray, np.ndarray]:
        """b₀ and whether it certifies B ⪰ b₀I (:meth:`initial_curvature`), M and ΨᵀΨ of the pairs held, after the
        oldest pairs are dropped while M is singular or worse conditioned than ``CONDITIONING`` (b₀ formed afresh
        after each drop)."""
        while True:
            b0, certified = self.initial_curvature(r)
            middle, gram = self.middle_and_gram(b0)
            if not self.slots or np.linalg.cond(middle) <= CONDITIONING:
                return b0, certified, middle, gram
            self.slots.pop(0)
            self.dropped += 1

    @staticmethod
    def smallest_eigenvalue(b0: float, middle: np.ndarray, gram: np.ndarray) -> float:
        """λ_min(B) for B = b₀I + Ψ M⁻¹ Ψᵀ (n > k): b₀ plus the smallest non-positive eigenvalue of T M⁻¹ Tᵀ, where
        ΨᵀΨ = V diag(e) Vᵀ and T = diag(√e) Vᵀ over e > 10⁻¹² max e."""
        if middle.size == 0:
            return b0
        e, v = np.linalg.eigh(0.5 * (gram + gram.T))
        keep = e > 1e-12 * max(float(e.max()), 0.0)
        if not keep.any():
            return b0
        t = np.sqrt(e[keep])[:, None] * v[:, keep].T
        inner = t @ np.linalg.solve(middle, t.T)
        return b0 + min(float(np.linalg.eigvalsh(0.5 * (inner + inner.T)).min()), 0.0)

    def damped_direction(
        self, r: torch.Tensor, b0: float, lambd: float, middle: np.ndarray, gram: np.ndarray
    ) -> torch.Tensor:
        """p = (B + λI)⁻¹ r = (r − Ψ (cM + ΨᵀΨ)⁻¹ Ψᵀ r) / c, c = b₀ + λ (Sherman–Morrison–Woodbury)."""
        c = b0 + lambd
        if not self.slots:
            return r / c
        steps, changes = self.held_steps[self.slots], self.held_changes[self.slots]
        against = (changes @ r).double().cpu().numpy() - b0 * (steps @ r).double().cpu().numpy()  # Ψᵀr
        z = torch.as_tensor(np.linalg.solve(c * middle + gram, against), dtype=r.dtype, device=r.device)
        return (r - (changes.T @ z - b0 * (steps.T @ z))) / c

    def dense_model(self, b0: float) -> torch.Tensor:
        """B as an n × n matrix over the pairs held, none dropped (for the tests: small n only)."""
        middle, _ = self.middle_and_gram(b0)
        steps, changes = self.held_steps[self.slots].double(), self.held_changes[self.slots].double()
        psi = (changes - b0 * steps).T
        n = steps.shape[1]
        eye = torch.eye(n, dtype=torch.float64)
        if not self.slots:
            return b0 * eye
        return b0 * eye + psi @ torch.as_tensor(np.linalg.solve(middle, psi.T.numpy()))

    # --- the step ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any) -> float:
        if not self.started:
            self.loss, gradient = self._evaluate(closure)
            self.r = -gradient
            self.started = True
        r, w = self.r, self._flat()
        b0, certified, middle, gram = self.fitted_model(r)
        # λ_min(B): B ⪰ b₀I where b₀ certifies it (there the eigenproblem would only add rounding)
        smallest = b0 if certified else self.smallest_eigenvalue(b0, middle, gram)
        lambd_e = max(self.lambd, -INDEFINITE_MARGIN * smallest) if smallest < 0.0 else self.lambd
        p = self.damped_direction(r, b0, lambd_e, middle, gram)
        mu, p_sq = float(p @ r), float(p @ p)
        if not (mu > 0.0 and math.isfinite(mu)):  # rounding in the k × k algebra: start again from B₀
            self.slots.clear()
            b0, _ = self.initial_curvature(r)
            smallest, lambd_e = b0, self.lambd
            p = r / (b0 + lambd_e)
            mu, p_sq = float(p @ r), float(p @ p)
            if not mu > 0.0:  # r = 0: a stationary point, where the step leaves w as it is
                return self.loss
        self._set(w + p)
        trial_loss, trial_gradient = self._evaluate_trial(closure)
        finite = math.isfinite(trial_loss) and (trial_gradient is None or bool(torch.isfinite(trial_gradient).all()))
        comparison = 2.0 * (self.loss - trial_loss) / mu if finite else math.nan  # Δ with δ = μ, α = 1
        self.steps += 1
        trust = self.lambd  # λ, the trust parameter; λ_e ≥ λ only bridges B's negative curvature
        if finite and trial_gradient is not None and comparison >= 0.0:
            new_r = -trial_gradient
            change = r - new_r  # y
            residual = lambd_e * p - new_r  # y − Bs, with Bs = r − λ_e s
            if self.informative(p, residual):
                self.push(p, change)
            else:
                self.skipped += 1
            self.r, self.loss = new_r, trial_loss
            if comparison >= 0.75:
                trust /= self.decrease
        else:
            self._set(w)
            self.rejected += 1
        effective = comparison if finite else -2.0
        if effective < 0.25:  # Møller's raise, from the λ_e this trial used, with δ = μ
            trust = min(lambd_e + mu * (1.0 - effective) / p_sq, 1e100)
        if self.log is not None:
            self.log.append(
                dict(
                    mu=mu,
                    p_sq=p_sq,
                    comparison=comparison,
                    lambd=lambd_e,
                    next_lambd=trust,
                    b0=b0,
                    smallest=smallest,
                    trial_loss=trial_loss,
                    loss=self.loss,
                    pairs=len(self.slots),
                )
            )
        self.lambd = trust
        return self.loss
