"""A plain float64 implementation of Møller's SCG (1993, steps 1–9) on one flat vector, written from the paper.

It shares no code with ``moller_scg`` so that the optimizer can be checked against it: no parameter groups, no
closures, no safeguards beyond the paper — just the steps, on ``torch.float64`` vectors — except one, which
``resolve_rounding`` switches off: a loss decrease of 0 to 4 float64 ulps of E(w) in step 6 is replaced by the
trapezoid estimate α(pᵀr + pᵀr₊)/2 from the slopes at both ends, unless the trial reproduced E(w) and E'(w).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Vector = torch.Tensor


def dot(x: Vector, y: Vector) -> float:
    """xᵀy as the sum of the elementwise products."""
    return float(torch.sum(x * y))


@dataclass
class Problem:
    """E(w), E'(w) and E''(w)v of a problem on a flat float64 vector w."""

    loss: Callable[[Vector], float]
    gradient: Callable[[Vector], Vector]
    hessian_vector: Callable[[Vector, Vector], Vector]


def problem_from_function(function: Callable[[Vector], torch.Tensor]) -> Problem:
    """E, E' and E''v of a differentiable function of a flat vector, by plain autograd."""

    def loss(w: Vector) -> float:
        return float(function(w.detach()))

    def gradient(w: Vector) -> Vector:
        w = w.detach().requires_grad_(True)
        return torch.autograd.grad(function(w), w)[0].detach()

    def hessian_vector(w: Vector, v: Vector) -> Vector:
        w = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(function(w), w, create_graph=True)
        return torch.autograd.grad(torch.sum(g * v), w)[0].detach()

    return Problem(loss, gradient, hessian_vector)


def reference_scg(
    problem: Problem,
    w1: Vector,
    iterations: int,
    *,
    sigma: float = 5e-5,
    lambd1: float = 5e-7,
    restart: int | None = None,
    finite_difference: bool = False,
    resolve_rounding: bool = True,
    memory: int = 0,
    secant: bool = False,
    diagonal_scaling: bool = False,
) -> list[Vector]:
    """The weights w after each of ``iterations`` iterations (the accepted point after a failed trial).

    With ``memory`` = m ≥ 1, the direction after a success is p = H r₊, H the L-BFGS inverse of the last m pairs
    (s, y) = (αp, r − r₊) by the two-loop recursion (Nocedal & Wright, Algorithm 7.4); with ``secant``, δ = μ once a
    pair is kept (Møller's finite difference before, except at the very first step: δ = μ/α₀ with LBFGS's first step
    length α₀ = min(1, 1/|r|₁)), and λ is divided by 2 after a good step instead of Møller's 4. With
    ``diagonal_scaling``, H₀ = γ_D Λ: v = 0.01 g₁² at the start, v ← 0.99 v + 0.01 g² at every accepted step,
    Λ = diag(1 / (v^¼ + 10⁻⁸ mean v^¼)), γ_D = maxᵢ sᵢᵀyᵢ / yᵢᵀΛyᵢ.
    """
    n = restart if restart is not None else w1.numel()
    pairs: list[tuple[Vector, Vector]] = []
    # Step 1.
    w = w1.clone()
    loss = problem.loss(w)
    r = -problem.gradient(w)
    p = r.clone()
    second_moment = 0.01 * r * r
    lambd, lambd_bar, success = lambd1, 0.0, True
    delta = 0.0
    weights = []
    for k in range(1, iterations + 1):
        if dot(r, r) == 0.0:
            weights.append(w.clone())
            continue
        p_sq = dot(p, p)
        # Step 2.
        if success and secant and pairs:
            delta = dot(p, r)
        elif success and secant and k == 1:
            # The first step: LBFGS's first step length α₀ = min(1, 1/|r|₁) along p = r, as δ = μ/α₀.
            delta = dot(p, r) / min(1.0, 1.0 / float(r.abs().sum()))
        elif success:
            if finite_difference or secant:
                sigma_k = sigma / math.sqrt(p_sq)
                s = (problem.gradient(torch.add(w, p, alpha=sigma_k)) - problem.gradient(w)) / sigma_k
            else:
                s = problem.hessian_vector(w, p)
            delta = dot(p, s)
        # Step 3.
        delta = delta + (lambd - lambd_bar) * p_sq
        # Step 4.
        if delta <= 0:
            lambd_bar = 2 * (lambd - delta / p_sq)
            delta = -delta + lambd * p_sq
            lambd = lambd_bar
        # Step 5.
        mu = dot(p, r)
        alpha = mu / delta
        # Step 6.
        w_trial = torch.add(w, p, alpha=alpha)
        loss_trial = problem.loss(w_trial)
        r_new = -problem.gradient(w_trial)
        decrease = loss - loss_trial
        drowned = 0 <= decrease <= 4 * torch.finfo(torch.float64).eps * abs(loss)
        if resolve_rounding and drowned and not (loss_trial == loss and torch.equal(r_new, r)):
            decrease = alpha * (dot(p, r) + dot(p, r_new)) / 2
        comparison = 2 * delta * decrease / mu**2
        # Step 7.
        if comparison >= 0:
            lambd_bar, success = 0.0, True
            second_moment = 0.99 * second_moment + 0.01 * r_new * r_new
            scale = None
            if diagonal_scaling:
                root = second_moment**0.25
                scale = 1.0 / (root + 1e-8 * float(root.mean()))
            if k % n == 0:
                p_new = r_new.clone()
                pairs.clear()
            elif memory:
                step, change = alpha * p, r - r_new
                if dot(step, change) > 1e-10 * dot(change, change) > 0:
                    pairs = (pairs + [(step, change)])[-memory:]
                p_new = two_loop(pairs, r_new, scale)
            else:
                beta = (dot(r_new, r_new) - dot(r_new, r)) / mu
                p_new = r_new + beta * p
            w, loss, r, p = w_trial, loss_trial, r_new, p_new
            if comparison >= 0.75:
                lambd = lambd / (2 if secant else 4)  # the secant mode divides by 2, Møller by 4
        else:
            lambd_bar, success = lambd, False
        # Step 8.
        if comparison < 0.25:
            lambd = lambd + delta * (1 - comparison) / p_sq
        weights.append(w.clone())
    return weights


def two_loop(
    pairs: list[tuple[Vector, Vector]],
    v: Vector,
    scale: Vector | None = None,
    initial_inverse: Callable[[Vector], Vector] | None = None,
) -> Vector:
    """H v of L-BFGS from the pairs (oldest first) by the two-loop recursion, H₀ = γI with γ the largest sᵀy / yᵀy
    of the pairs (the library's choice; L-BFGS's usual one is the newest pair's), or, given the diagonal Λ as
    ``scale``, H₀ = γ_D Λ with γ_D the largest sᵀy / yᵀΛy, or, given a symmetric positive definite M as the function
    ``initial_inverse`` (v ↦ Mv), H₀ = γ M with γ the largest sᵀy / yᵀMy."""
    if not pairs:
        return v.clone()
    q = v.clone()
    alphas = []
    for s, y in reversed(pairs):
        a = dot(s, q) / dot(s, y)
        alphas.append(a)
        q = q - a * y
    if initial_inverse is not None:
        q = max(dot(s, y) / dot(y, initial_inverse(y)) for s, y in pairs) * initial_inverse(q)
    elif scale is None:
        q = q * max(dot(s, y) / dot(y, y) for s, y in pairs)
    else:
        q = q * scale * max(dot(s, y) / dot(y, scale * y) for s, y in pairs)
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = dot(y, q) / dot(s, y)
        q = q + (a - b) * s
    return q
