"""CoBA: Adam and AMSGrad whose first moment averages a nonlinear conjugate-gradient direction.

Kobayashi & Iiduka (2020) feed Adam/AMSGrad, in place of the stochastic gradient gₙ, the direction

    d₁ = −g₁,    dₙ = −gₙ + (M/nᵃ) βₙ dₙ₋₁    (n ≥ 2),

where βₙ is one of the classical nonlinear conjugate-gradient parameters and the factor M/nᵃ (a > 1 in their
analysis) makes the memory of past directions fade; with it the paper bounds dₙ and proves a regret bound like
AMSGrad's (their Lemma A.1 and Theorem 3.1). The second moment stays on the raw gradient gₙ². Inner products are
taken over a whole parameter tensor: one βₙ per tensor.

References:
    Kobayashi, Y. & Iiduka, H. (2020). Conjugate-gradient-based Adam for stochastic optimization and its application
    to deep learning. arXiv:2003.00231.

    Hestenes, M. R. & Stiefel, E. (1952). Methods of conjugate gradients for solving linear systems. J. Res. Natl.
    Bur. Stand. 49(6), 409–436. (HS)

    Fletcher, R. & Reeves, C. M. (1964). Function minimization by conjugate gradients. Comput. J. 7(2), 149–154. (FR)

    Polak, E. & Ribière, G. (1969), Rev. Fr. Inform. Rech. Oper. 3(16), 35–43; Polyak, B. T. (1969), USSR Comput.
    Math. Math. Phys. 9(4), 94–112. (PRP)

    Dai, Y. H. & Yuan, Y. (1999). A nonlinear conjugate gradient method with a strong global convergence property.
    SIAM J. Optim. 10(1), 177–182. (DY)

    Hager, W. W. & Zhang, H. (2005). A new conjugate gradient method with guaranteed descent and an efficient line
    search. SIAM J. Optim. 16(1), 170–192. (HZ, and its truncation ηₙ)

    Hager, W. W. & Zhang, H. (2006). A survey of nonlinear conjugate gradient methods. Pacific J. Optim. 2(1),
    35–58. (the bound λ > 1/4)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from moller_scg.scg_adam import (
    DEFAULT_BETAS,
    DEFAULT_EPS,
    DEFAULT_LR,
    ConjugateAdaptiveOptimizer,
    Params,
    Schedule,
    adaptive_moment_step,
    check_adam_hyperparameters,
    check_flag,
    check_nonnegative,
    check_schedule,
    schedule_value,
)

__all__ = ["CoBA", "CG_RULES"]

# Defaults of Kobayashi & Iiduka (2020) and of the authors' code.
DEFAULT_M = 1e-3
DEFAULT_A = 1.0 + 1e-8
DEFAULT_HZ_LAMBDA = 2.0
"""λ of Hager–Zhang's βᴴᶻ (their paper's choice)."""

HZ_LAMBDA_MIN = 0.25
"""λ must exceed 1/4: then gᵀd ≤ −(1 − 1/(4λ))|g|² for the new direction (Hager & Zhang 2005, Theorem 1.1, for
λ = 2; Hager & Zhang 2006, for any λ > 1/4)."""

HZ_ETA = 0.01
"""η of Hager–Zhang's truncation ηₙ = −1/(|dₙ₋₁| min(η, |gₙ₋₁|)) (Hager & Zhang 2005, the value of their tests)."""

DENOMINATOR_EPS = 1e-8
"""ε that keeps the denominators of βₙ away from zero, keeping their sign (dᵀy ± ε, |gₙ₋₁|² + ε).

The authors' code uses Adam's ε = 1e-8 here; a separate constant keeps ``eps`` (the preconditioner's) from changing
βₙ."""


def _inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """xᵀy over the whole tensor, summed in float64, as a 0-dim tensor on the tensors' device (no host sync)."""
    return torch.sum(x * y, dtype=torch.float64)


def _away_from_zero(denominator: torch.Tensor) -> torch.Tensor:
    """denominator ± ε, with the denominator's sign (+ε at zero)."""
    return torch.where(denominator >= 0, denominator + DENOMINATOR_EPS, denominator - DENOMINATOR_EPS)


def beta_hestenes_stiefel(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᴴˢ = gᵀy / dᵀy, y = g − gₙ₋₁."""
    y = g - g_prev
    return _inner(g, y) / _away_from_zero(_inner(d, y))


def beta_fletcher_reeves(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᶠᴿ = |g|² / |gₙ₋₁|²."""
    return _inner(g, g) / (_inner(g_prev, g_prev) + DENOMINATOR_EPS)


def beta_polak_ribiere_polyak(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᴾᴿᴾ = gᵀy / |gₙ₋₁|²."""
    return _inner(g, g - g_prev) / (_inner(g_prev, g_prev) + DENOMINATOR_EPS)


def beta_dai_yuan(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᴰʸ = |g|² / dᵀy."""
    return _inner(g, g) / _away_from_zero(_inner(d, g - g_prev))


def beta_hager_zhang(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᴴᶻ = max(gᵀy/dᵀy − λ|y|²(gᵀd)/(dᵀy)², ηₙ), ηₙ = −1/(|d| min(η, |gₙ₋₁|)).

    The truncation at ηₙ is Hager & Zhang's own (their β̄ₖ): where dᵀy is small the untruncated βᴴᶻ can be large
    and negative and turn the new direction back along the old one. |ηₙ| grows once |gₙ₋₁| < η, so the floor
    stops binding near a stationary point; with it, Hager and Zhang prove global convergence on nonconvex
    functions.
    """
    y = g - g_prev
    dy = _away_from_zero(_inner(d, y))
    beta = _inner(g, y) / dy - hz_lambda * _inner(y, y) * _inner(g, d) / dy**2
    eta = -1.0 / (torch.sqrt(_inner(d, d)) * torch.clamp(torch.sqrt(_inner(g_prev, g_prev)), max=HZ_ETA))
    return torch.maximum(beta, eta)


BetaRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

CG_RULES: dict[str, BetaRule] = {
    "HS": beta_hestenes_stiefel,
    "FR": beta_fletcher_reeves,
    "PRP": beta_polak_ribiere_polyak,
    "DY": beta_dai_yuan,
    "HZ": beta_hager_zhang,
}
"""The conjugate-gradient parameters βₙ CoBA offers, by the name ``cg_rule`` takes."""


def conjugate_direction(
    direction: torch.Tensor, previous_grad: torch.Tensor, grad: torch.Tensor, n: int, group: dict[str, Any]
) -> torch.Tensor:
    """dₙ = −gₙ + (Mₙ/nᵃ)βₙdₙ₋₁, written over ``direction`` (which holds dₙ₋₁); d₁ = −g₁.

    ``previous_grad`` ← gₙ afterwards.
    """
    if n == 1:
        direction.copy_(grad).neg_()
    else:
        beta = CG_RULES[group["cg_rule"]](grad, previous_grad, direction, group["hz_lambda"])
        coefficient = schedule_value(group, "M", n) / n ** group["a"]
        direction.mul_(beta * coefficient).sub_(grad)
    previous_grad.copy_(grad)
    return direction


class CoBA(ConjugateAdaptiveOptimizer):
    r"""Conjugate-gradient-based Adam/AMSGrad (Kobayashi & Iiduka 2020).

    For each parameter tensor x with stochastic gradient gₙ at its n-th step (plus ``weight_decay``·x when set):

        d₁ = −g₁,    dₙ = −gₙ + (Mₙ/nᵃ) βₙ dₙ₋₁
        mₙ = β₁mₙ₋₁ + (1 − β₁)dₙ,    vₙ = β₂vₙ₋₁ + (1 − β₂)gₙ²,    v̂ₙ = max(v̂ₙ₋₁, vₙ) (AMSGrad form)
        xₙ₊₁ = xₙ + (α/(1 − β₁ⁿ)) · mₙ / (√(vₙ/(1 − β₂ⁿ)) + ε)     Adam form (``amsgrad=False``)
        xₙ₊₁ = xₙ + α · mₙ / (√v̂ₙ + ε)                             AMSGrad form (``amsgrad=True``)

    with, for y = gₙ − gₙ₋₁ and d = dₙ₋₁ (``cg_rule``):

        HS  βₙ = gₙᵀy / dᵀy                     FR  βₙ = |gₙ|² / |gₙ₋₁|²
        PRP βₙ = gₙᵀy / |gₙ₋₁|²                 DY  βₙ = |gₙ|² / dᵀy
        HZ  βₙ = max(gₙᵀy/dᵀy − λ|y|²(gₙᵀd)/(dᵀy)²,  −1/(|d| min(η, |gₙ₋₁|))),   η = 0.01

    Each denominator is moved ε = 1e-8 away from zero with its sign (:data:`DENOMINATOR_EPS`). The inner products
    run over the whole parameter tensor, one βₙ per tensor, as the paper's vectors are; the authors' code reduces
    over the last axis only (one β per row of a weight matrix), which we take for an artefact of its
    implementation. With M = 0, dₙ = −gₙ and CoBA is ``torch.optim.Adam(amsgrad=...)`` — bit for bit in the Adam
    form, and in the AMSGrad form with ``bias_correction=True``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: α, the learning rate (the paper's experiments use αₙ = α/√n: :func:`~moller_scg.scg_adam.diminishing_lr`).
        betas: (β₁, β₂), the moments' smoothing constants.
        eps: ε of the preconditioner's denominator.
        weight_decay: L2 penalty λ; gₙ ← gₙ + λxₙ.
        amsgrad: the AMSGrad form (running maximum v̂ₙ) instead of the Adam form.
        bias_correction: whether to divide by 1 − β₁ⁿ and 1 − β₂ⁿ. ``None`` (default) takes each form's own: yes
            for Adam, no for AMSGrad (as the paper and the authors' code); ``torch.optim.Adam(amsgrad=True)``
            corresponds to ``amsgrad=True, bias_correction=True``.
        cg_rule: βₙ: ``"HS"`` (default, as the authors' code), ``"FR"``, ``"PRP"``, ``"DY"`` or ``"HZ"``.
        M: the scale Mₙ of the conjugate term: a number ≥ 0 or a callable n ↦ Mₙ.
        a: the exponent of n in Mₙ/nᵃ (≥ 0; the paper's analysis needs a > 1).
        hz_lambda: λ of βᴴᶻ (> 1/4); used only with ``cg_rule="HZ"``.

    State per parameter: ``step`` (n), ``direction`` (dₙ), ``previous_grad`` (gₙ), ``exp_avg`` (mₙ),
    ``exp_avg_sq`` (vₙ) and, in the AMSGrad form, ``max_exp_avg_sq`` (v̂ₙ).

    Example:
        >>> import torch
        >>> from moller_scg.coba import CoBA
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> optimizer = CoBA([w], lr=0.05, cg_rule="HZ", amsgrad=True)
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = (w**2).sum()
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(300):
        ...     loss = optimizer.step(closure)
        >>> bool(loss < 1e-3)
        True

    References:
        Kobayashi, Y. & Iiduka, H. (2020). Conjugate-gradient-based Adam for stochastic optimization and its
        application to deep learning. arXiv:2003.00231.

        Hager, W. W. & Zhang, H. (2005). A new conjugate gradient method with guaranteed descent and an efficient
        line search. SIAM J. Optim. 16(1), 170–192.
    """

    _schedule_keys = ("M",)

    def __init__(
        self,
        params: Params,
        lr: float = DEFAULT_LR,
        betas: tuple[float, float] = DEFAULT_BETAS,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        bias_correction: bool | None = None,
        cg_rule: str = "HS",
        M: Schedule = DEFAULT_M,  # noqa: N803 - the paper's symbol
        a: float = DEFAULT_A,
        hz_lambda: float = DEFAULT_HZ_LAMBDA,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "bias_correction": bias_correction,
            "cg_rule": cg_rule,
            "M": M,
            "a": a,
            "hz_lambda": hz_lambda,
        }
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)
        check_flag(group, "amsgrad")
        if group["bias_correction"] is None:
            group["bias_correction"] = not group["amsgrad"]
        check_flag(group, "bias_correction")
        if group["cg_rule"] not in CG_RULES:
            choices = ", ".join(map(repr, CG_RULES))
            raise ValueError(f"Invalid cg_rule value: {group['cg_rule']!r}; choose one of {choices}")
        check_schedule(group, "M", "M")
        check_nonnegative(group, "a", "a (the exponent in M/nᵃ)")
        hz_lambda = group["hz_lambda"]
        is_number = isinstance(hz_lambda, numbers.Real) and not isinstance(hz_lambda, bool)
        if not is_number or not HZ_LAMBDA_MIN < hz_lambda < math.inf:
            raise ValueError(
                f"Invalid hz_lambda (λ) value: {hz_lambda!r}; it must be finite and > {HZ_LAMBDA_MIN} (Hager–Zhang's "
                f"descent bound; they use 2)"
            )
        group["hz_lambda"] = float(hz_lambda)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        names = ("direction", "previous_grad", "exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if group["amsgrad"] else names

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], n: int, group: dict[str, Any]
    ) -> None:
        direction = conjugate_direction(state["direction"], state["previous_grad"], grad, n, group)
        adaptive_moment_step(
            param, direction, grad, state, n, group, amsgrad=group["amsgrad"], bias_correction=group["bias_correction"]
        )
