"""NumPy float64 transcriptions of the Adam-family variants, written from their papers and documentation, not from
the library's code: SCGAdam, SCGAMSGrad and SCGRMSProp (Sato, Izumi & Iiduka 2024; ``reference_scg_adaptive``) and
CoBA (Kobayashi & Iiduka 2020; ``reference_beta``, ``reference_coba``), each run on the minibatch least-squares problem
defined here (``regression_data``, ``numpy_gradient``). They share no code with ``moller_scg``, so that
``test_scg_adam.py`` and ``test_coba.py`` can check the optimizers against them, as ``reference_scg.py`` does for SCG.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------------
# A stochastic problem: least squares y ≈ Wx + b over four fixed minibatches, visited in turn (step n uses batch
# (n − 1) mod 4). Two parameter tensors, so that per-tensor quantities are exercised.

BATCHES, BATCH_SIZE, INPUTS, OUTPUTS = 4, 8, 4, 3


def regression_data() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCHES * BATCH_SIZE, INPUTS))
    y = rng.standard_normal((BATCHES * BATCH_SIZE, OUTPUTS))
    start = [rng.standard_normal((OUTPUTS, INPUTS)), rng.standard_normal(OUTPUTS)]
    return x, y, start


def batch(n: int) -> slice:
    first = ((n - 1) % BATCHES) * BATCH_SIZE
    return slice(first, first + BATCH_SIZE)


def numpy_gradient(params: list[np.ndarray], n: int) -> list[np.ndarray]:
    """∇ of mean((XWᵀ + b − Y)²) over minibatch n, by hand."""
    x, y, _ = regression_data()
    xb, yb = x[batch(n)], y[batch(n)]
    weight, bias = params
    residual = xb @ weight.T + bias - yb
    scale = 2.0 / residual.size
    return [scale * residual.T @ xb, scale * residual.sum(axis=0)]


def flat(params) -> np.ndarray:
    arrays = [p.detach().numpy() if isinstance(p, torch.Tensor) else p for p in params]
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def value_at(schedule, n: int) -> float:
    return schedule(n) if callable(schedule) else schedule


# ---------------------------------------------------------------------------------------------------------------
# The reference: NumPy float64 transcriptions of the two published forms of the update, written from their text,
# not from the library's code. direction_form="paper" transcribes Sato, Izumi & Iiduka (2024) in their notation:
# a gradient-like Gₙ = (1 + γₙ)gₙ − δₙGₙ₋₁ (G₁ = g₁), moments of G, and a step x ← x − α·(…); "authors-code"
# transcribes the authors' public SCGAdam code: dₙ = −(1 + γₙ)gₙ + δₙdₙ₋₁, moments of d, and x ← x + α·(…).
# RMSProp has no published SCG form; its reference is the library's own construction (documented in
# scg_adam.SCGRMSProp), transcribed in each notation.


def starting_state() -> tuple[list[np.ndarray], ...]:
    """x at the regression problem's start, and zeroed m, v, v_max and d (the moments and the direction) of its
    shapes: where every Adam-family transcription below begins."""
    _, _, start = regression_data()
    x = [value.copy() for value in start]
    return (x, *([np.zeros_like(value) for value in x] for _ in range(4)))


def reference_scg_adaptive(
    kind: str,
    steps: int,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    gamma=0.1,
    delta=0.1,
    bias_correction: bool = False,
    diminishing: bool = False,
    direction_form: str = "paper",
) -> list[np.ndarray]:
    """kind: "adam", "amsgrad" or "rmsprop". Every operation elementwise, per tensor."""
    paper = direction_form == "paper"
    assert paper or direction_form == "authors-code"
    # The paper moves along −(its moment ratio); the code along +(its moment ratio).
    step_sign = -1.0 if paper else 1.0
    x, m, v, v_max, d = starting_state()
    beta1, beta2 = betas
    trajectory = []
    for n in range(1, steps + 1):
        g = [gi + weight_decay * xi for gi, xi in zip(numpy_gradient(x, n), x)]
        lr_n = lr / math.sqrt(n) if diminishing else lr
        for i in range(len(x)):
            # d holds Gₙ for the paper, dₙ for the authors' code.
            if n == 1:
                d[i] = g[i] if paper else -g[i]
            elif paper:
                d[i] = (1 + value_at(gamma, n)) * g[i] - value_at(delta, n) * d[i]
            else:
                d[i] = -(1 + value_at(gamma, n)) * g[i] + value_at(delta, n) * d[i]
            if kind == "rmsprop":
                v[i] = alpha * v[i] + (1 - alpha) * g[i] ** 2
                x[i] = x[i] + step_sign * lr_n * d[i] / (np.sqrt(v[i]) + eps)
                continue
            m[i] = beta1 * m[i] + (1 - beta1) * d[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            if kind == "adam":
                x[i] = x[i] + step_sign * lr_n / (1 - beta1**n) * m[i] / (np.sqrt(v[i] / (1 - beta2**n)) + eps)
            else:
                v_max[i] = np.maximum(v_max[i], v[i])
                if bias_correction:
                    x[i] = x[i] + step_sign * lr_n / (1 - beta1**n) * m[i] / (np.sqrt(v_max[i] / (1 - beta2**n)) + eps)
                else:
                    x[i] = x[i] + step_sign * lr_n * m[i] / (np.sqrt(v_max[i]) + eps)
        trajectory.append(flat(x))
    return trajectory


# ---------------------------------------------------------------------------------------------------------------
# CoBA. Its documented constants, written out so that the reference does not read them from the code under test.

EPSILON = 1e-8  # keeps the denominators of β away from zero, with their sign
ETA = 0.01  # Hager–Zhang's truncation constant


# ---------------------------------------------------------------------------------------------------------------
# The reference: a NumPy float64 transcription of the paper's update with the documented choices; one β for the
# whole parameter vector (both tensors of the problem) or, with beta_scope="per-tensor", one per tensor.


def reference_beta(rule: str, g: np.ndarray, g_prev: np.ndarray, d: np.ndarray, hz_lambda: float = 2.0) -> float:
    """β of the vectors g = gₙ, g_prev = gₙ₋₁, d = dₙ₋₁ (each flat, or any shape: sums run over all elements)."""
    y = g - g_prev

    def inner(u, v):
        return float(np.sum(u * v))

    def away_from_zero(value):
        return value + EPSILON if value >= 0 else value - EPSILON

    if rule == "HS":
        return inner(g, y) / away_from_zero(inner(d, y))
    if rule == "FR":
        return inner(g, g) / (inner(g_prev, g_prev) + EPSILON)
    if rule == "PRP":
        return inner(g, y) / (inner(g_prev, g_prev) + EPSILON)
    if rule == "DY":
        return inner(g, g) / away_from_zero(inner(d, y))
    assert rule == "HZ"
    dy = away_from_zero(inner(d, y))
    beta = inner(g, y) / dy - hz_lambda * inner(y, y) * inner(g, d) / dy**2
    eta = -1.0 / (math.sqrt(inner(d, d)) * min(ETA, math.sqrt(inner(g_prev, g_prev))))
    return max(beta, eta)


def reference_coba(
    steps: int,
    *,
    cg_rule: str = "HS",
    amsgrad: bool = True,
    bias_correction: bool | None = None,
    beta_scope: str = "global",
    second_moment: str = "gradient",
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    M=1e-3,
    a: float = 1 + 1e-8,
    hz_lambda: float = 2.0,
) -> list[np.ndarray]:
    correct = (not amsgrad) if bias_correction is None else bias_correction
    x, m, v, v_max, d = starting_state()
    g_prev = [np.zeros_like(value) for value in x]
    beta1, beta2 = betas
    trajectory = []
    for n in range(1, steps + 1):
        g = [gi + weight_decay * xi for gi, xi in zip(numpy_gradient(x, n), x)]
        if n > 1 and beta_scope == "global":
            whole = [np.concatenate([t.ravel() for t in vectors]) for vectors in (g, g_prev, d)]
            beta_global = reference_beta(cg_rule, *whole, hz_lambda)
        for i in range(len(x)):
            if n == 1:
                d[i] = -g[i]
            else:
                if beta_scope == "global":
                    beta = beta_global
                else:
                    assert beta_scope == "per-tensor"
                    beta = reference_beta(cg_rule, g[i], g_prev[i], d[i], hz_lambda)
                d[i] = -g[i] + value_at(M, n) / n**a * beta * d[i]
            g_prev[i] = g[i]
            m[i] = beta1 * m[i] + (1 - beta1) * d[i]
            squared = d[i] if second_moment == "direction" else g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * squared**2
            v_max[i] = np.maximum(v_max[i], v[i])
            second = v_max[i] if amsgrad else v[i]
            if correct:
                x[i] = x[i] + lr / (1 - beta1**n) * m[i] / (np.sqrt(second / (1 - beta2**n)) + eps)
            else:
                x[i] = x[i] + lr * m[i] / (np.sqrt(second) + eps)
        trajectory.append(flat(x))
    return trajectory
