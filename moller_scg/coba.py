"""CoBA: Adam and AMSGrad whose first moment averages a nonlinear conjugate-gradient direction.

Kobayashi & Iiduka (2020) feed Adam/AMSGrad, in place of the stochastic gradient gₙ, the direction

    d₁ = −g₁,    dₙ = −gₙ + (M/nᵃ) βₙ dₙ₋₁    (n ≥ 2),

where βₙ is one of the classical nonlinear conjugate-gradient parameters and the factor M/nᵃ (a > 1 in their
analysis) makes the memory of past directions fade; with it the paper bounds dₙ and proves a regret bound like
AMSGrad's (their Lemma A.1 and Theorem 3.1). The paper builds CoBA on AMSGrad (no bias correction), which is the
default here; the Adam form is an option. βₙ is one number for the whole parameter vector, as in the paper
(``beta_scope="global"``, per parameter group); ``"per-tensor"`` is an option. The second moment averages gₙ², as
the authors' code does; the paper's text can also be read as averaging dₙ² (``second_moment="direction"``).

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

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from moller_scg.adaptive_moments import AdaptiveMoments
from moller_scg.conjugate_adaptive import (
    ConjugateAdaptiveOptimizer,
    Params,
    Schedule,
    check_adam_hyperparameters,
    check_choice,
    check_flag,
    check_nonnegative,
    check_schedule,
    schedule_value,
)
from moller_scg.scg_adam import DEFAULT_BETAS, DEFAULT_EPS, DEFAULT_LR

__all__ = ["CoBA", "CG_RULES", "InnerProducts"]

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


BETA_SCOPES = ("global", "per-tensor")
"""Over what the inner products of βₙ run (``beta_scope``): ``"global"``, all parameters of a parameter group at
once, one βₙ for the whole vector as in the paper (with one group, the whole parameter vector); ``"per-tensor"``,
each parameter tensor on its own, one βₙ per tensor (this class before the option existed)."""

SECOND_MOMENTS = ("gradient", "direction")
"""What the second moment vₙ averages the square of (``second_moment``): ``"gradient"``, gₙ² (the authors' code);
``"direction"``, dₙ² (a reading of the paper, which says it replaces AMSGrad's stochastic gradients by the
conjugate directions)."""


class InnerProducts(NamedTuple):
    """The inner products βₙ is made of, with y = gₙ − gₙ₋₁ and d = dₙ₋₁: 0-dim float64 tensors, summed over one
    tensor or over a whole parameter group (``beta_scope``)."""

    g_y: torch.Tensor
    """gₙᵀy"""
    d_y: torch.Tensor
    """dᵀy"""
    g_g: torch.Tensor
    """|gₙ|²"""
    g_prev_g_prev: torch.Tensor
    """|gₙ₋₁|²"""
    g_d: torch.Tensor
    """gₙᵀd"""
    y_y: torch.Tensor
    """|y|²"""
    d_d: torch.Tensor
    """|d|²"""


def _inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """xᵀy over the whole tensor, summed in float64, as a 0-dim tensor on the tensors' device (no host sync).

    Half-precision tensors are multiplied in float64 too: float16's products overflow above 65504, i.e. at
    gradient entries of about 256."""
    if x.element_size() < 4:
        x, y = x.double(), y.double()
    return torch.sum(x * y, dtype=torch.float64)


def inner_products(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor) -> InnerProducts:
    """The :class:`InnerProducts` of one tensor's gₙ, gₙ₋₁ and d = dₙ₋₁."""
    y = g - g_prev
    return InnerProducts(
        g_y=_inner(g, y),
        d_y=_inner(d, y),
        g_g=_inner(g, g),
        g_prev_g_prev=_inner(g_prev, g_prev),
        g_d=_inner(g, d),
        y_y=_inner(y, y),
        d_d=_inner(d, d),
    )


def sum_inner_products(parts: list[InnerProducts]) -> InnerProducts:
    """The inner products of the concatenation of the vectors whose parts are given (at least one)."""
    return InnerProducts(*(torch.stack(list(column)).sum() for column in zip(*parts)))


def _away_from_zero(denominator: torch.Tensor) -> torch.Tensor:
    """denominator ± ε, with the denominator's sign (+ε at zero)."""
    return torch.where(denominator >= 0, denominator + DENOMINATOR_EPS, denominator - DENOMINATOR_EPS)


def hestenes_stiefel(p: InnerProducts, hz_lambda: float) -> torch.Tensor:
    """βᴴˢ = gᵀy / dᵀy."""
    return p.g_y / _away_from_zero(p.d_y)


def fletcher_reeves(p: InnerProducts, hz_lambda: float) -> torch.Tensor:
    """βᶠᴿ = |g|² / |gₙ₋₁|²."""
    return p.g_g / (p.g_prev_g_prev + DENOMINATOR_EPS)


def polak_ribiere_polyak(p: InnerProducts, hz_lambda: float) -> torch.Tensor:
    """βᴾᴿᴾ = gᵀy / |gₙ₋₁|²."""
    return p.g_y / (p.g_prev_g_prev + DENOMINATOR_EPS)


def dai_yuan(p: InnerProducts, hz_lambda: float) -> torch.Tensor:
    """βᴰʸ = |g|² / dᵀy."""
    return p.g_g / _away_from_zero(p.d_y)


def hager_zhang(p: InnerProducts, hz_lambda: float) -> torch.Tensor:
    """βᴴᶻ = max(gᵀy/dᵀy − λ|y|²(gᵀd)/(dᵀy)², ηₙ), ηₙ = −1/(|d| min(η, |gₙ₋₁|)).

    The truncation at ηₙ is Hager & Zhang's own (their β̄ₖ): where dᵀy is small the untruncated βᴴᶻ can be large
    and negative and turn the new direction back along the old one. |ηₙ| grows once |gₙ₋₁| < η, so the floor
    stops binding near a stationary point; with it, Hager and Zhang prove global convergence on nonconvex
    functions.
    """
    dy = _away_from_zero(p.d_y)
    beta = p.g_y / dy - hz_lambda * p.y_y * p.g_d / dy**2
    eta = -1.0 / (torch.sqrt(p.d_d) * torch.clamp(torch.sqrt(p.g_prev_g_prev), max=HZ_ETA))
    return torch.maximum(beta, eta)


BetaRule = Callable[[InnerProducts, float], torch.Tensor]

CG_RULES: dict[str, BetaRule] = {
    "HS": hestenes_stiefel,
    "FR": fletcher_reeves,
    "PRP": polak_ribiere_polyak,
    "DY": dai_yuan,
    "HZ": hager_zhang,
}
"""The conjugate-gradient parameters βₙ CoBA offers, by the name ``cg_rule`` takes, as functions of the
:class:`InnerProducts` and Hager–Zhang's λ."""


def beta_hestenes_stiefel(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᴴˢ of one tensor's gₙ, gₙ₋₁ and d = dₙ₋₁ (:func:`hestenes_stiefel`)."""
    return hestenes_stiefel(inner_products(g, g_prev, d), hz_lambda)


def beta_fletcher_reeves(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᶠᴿ of one tensor's gₙ, gₙ₋₁ and d = dₙ₋₁ (:func:`fletcher_reeves`)."""
    return fletcher_reeves(inner_products(g, g_prev, d), hz_lambda)


def beta_polak_ribiere_polyak(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᴾᴿᴾ of one tensor's gₙ, gₙ₋₁ and d = dₙ₋₁ (:func:`polak_ribiere_polyak`)."""
    return polak_ribiere_polyak(inner_products(g, g_prev, d), hz_lambda)


def beta_dai_yuan(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᴰʸ of one tensor's gₙ, gₙ₋₁ and d = dₙ₋₁ (:func:`dai_yuan`)."""
    return dai_yuan(inner_products(g, g_prev, d), hz_lambda)


def beta_hager_zhang(g: torch.Tensor, g_prev: torch.Tensor, d: torch.Tensor, hz_lambda: float) -> torch.Tensor:
    """βᴴᶻ of one tensor's gₙ, gₙ₋₁ and d = dₙ₋₁ (:func:`hager_zhang`)."""
    return hager_zhang(inner_products(g, g_prev, d), hz_lambda)


class ConjugateGradientState(NamedTuple):
    direction: torch.Tensor
    """dₙ₋₁ before a step, dₙ after it"""
    previous_grad: torch.Tensor
    """gₙ₋₁ before a step, gₙ after it"""


@dataclasses.dataclass(frozen=True)
class NonlinearConjugateDirection:
    """dₙ = −gₙ + (Mₙ/nᵃ)βₙdₙ₋₁, d₁ = −g₁, with βₙ = ``beta_rule`` of the :class:`InnerProducts` and Mₙ, a the
    group's ``M`` (a number or a schedule) and ``a``.

    ``group_wide`` (``beta_scope="global"``): one βₙ from the inner products summed over every parameter of the group
    that has had a previous step (those at their first step take d₁ = −g₁); otherwise each tensor's own βₙ.
    """

    beta_rule: BetaRule
    hz_lambda: float
    group_wide: bool
    State = ConjugateGradientState

    def group_context(
        self, group: dict[str, Any], inputs: list[tuple[torch.Tensor, ConjugateGradientState | None]]
    ) -> torch.Tensor | None:
        """The global βₙ (``None`` when no parameter has a previous step)."""
        parts = [inner_products(grad, memory.previous_grad, memory.direction) for grad, memory in inputs if memory]
        return self.beta_rule(sum_inner_products(parts), self.hz_lambda) if parts else None

    def direction(
        self, grad: torch.Tensor, state: ConjugateGradientState, n: int, group: dict[str, Any], context: Any
    ) -> torch.Tensor:
        direction, previous_grad = state
        if n == 1:
            direction.copy_(grad).neg_()
        else:
            beta = context if self.group_wide else None
            if beta is None:
                beta = self.beta_rule(inner_products(grad, previous_grad, direction), self.hz_lambda)
            coefficient = schedule_value(group, "M", n) / n ** group["a"]
            direction.mul_(beta * coefficient).sub_(grad)
        previous_grad.copy_(grad)
        return direction


class CoBA(ConjugateAdaptiveOptimizer):
    r"""Conjugate-gradient-based Adam/AMSGrad (Kobayashi & Iiduka 2020).

    For each parameter tensor x with stochastic gradient gₙ at its n-th step (plus ``weight_decay``·x when set):

        d₁ = −g₁,    dₙ = −gₙ + (Mₙ/nᵃ) βₙ dₙ₋₁
        mₙ = β₁mₙ₋₁ + (1 − β₁)dₙ,    vₙ = β₂vₙ₋₁ + (1 − β₂)gₙ²,    v̂ₙ = max(v̂ₙ₋₁, vₙ) (AMSGrad form)
        xₙ₊₁ = xₙ + α · mₙ / (√v̂ₙ + ε)                             AMSGrad form (``amsgrad=True``, default)
        xₙ₊₁ = xₙ + (α/(1 − β₁ⁿ)) · mₙ / (√(vₙ/(1 − β₂ⁿ)) + ε)     Adam form (``amsgrad=False``)

    (with ``second_moment="direction"``, vₙ averages dₙ² instead of gₙ²)

    with, for y = gₙ − gₙ₋₁ and d = dₙ₋₁ (``cg_rule``):

        HS  βₙ = gₙᵀy / dᵀy                     FR  βₙ = |gₙ|² / |gₙ₋₁|²
        PRP βₙ = gₙᵀy / |gₙ₋₁|²                 DY  βₙ = |gₙ|² / dᵀy
        HZ  βₙ = max(gₙᵀy/dᵀy − λ|y|²(gₙᵀd)/(dᵀy)²,  −1/(|d| min(η, |gₙ₋₁|))),   η = 0.01

    Each denominator is moved ε = 1e-8 away from zero with its sign (:data:`DENOMINATOR_EPS`). The inner products
    run over all parameters of the group that have had a previous step, one βₙ for the whole vector as in the
    paper (``beta_scope="global"``), or over each tensor alone (``"per-tensor"``); the authors' code reduces over
    the last axis only (one β per row of a weight matrix), which neither option reproduces. With M = 0,
    dₙ = −gₙ and CoBA is ``torch.optim.Adam(amsgrad=...)`` — bit for bit in the Adam form, and in the AMSGrad form
    with ``bias_correction=True``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: α, the learning rate (the paper's experiments use αₙ = α/√n: :func:`~moller_scg.scg_adam.diminishing_lr`).
        betas: (β₁, β₂), the moments' smoothing constants.
        eps: ε of the preconditioner's denominator.
        weight_decay: L2 penalty λ; gₙ ← gₙ + λxₙ.
        amsgrad: the AMSGrad form (running maximum v̂ₙ; default, as the paper's Algorithm 1) or, with ``False``,
            the Adam form (this class's default before, and the form the docs' measured comparison ran).
        bias_correction: whether to divide by 1 − β₁ⁿ and 1 − β₂ⁿ. ``None`` (default) takes each form's own: yes
            for Adam, no for AMSGrad (as the paper and the authors' code); ``torch.optim.Adam(amsgrad=True)``
            corresponds to ``amsgrad=True, bias_correction=True``.
        beta_scope: ``"global"`` (default): one βₙ from inner products over all parameters of the group, as the
            paper's βₙ of the whole vector; ``"per-tensor"``: one βₙ per parameter tensor.
        second_moment: ``"gradient"`` (default, the authors' code): vₙ averages gₙ²; ``"direction"``: vₙ averages
            dₙ².
        cg_rule: βₙ: ``"HS"`` (default, as the authors' code), ``"FR"``, ``"PRP"``, ``"DY"`` or ``"HZ"``.
        M: the scale Mₙ of the conjugate term: a number ≥ 0 or a callable n ↦ Mₙ (default 1e-3, the authors'
            code's).
        a: the exponent of n in Mₙ/nᵃ (≥ 0; the paper's analysis needs a > 1; default 1 + 1e-8, the authors'
            code's).
        hz_lambda: λ of βᴴᶻ (> 1/4); used only with ``cg_rule="HZ"``.

    State per parameter: ``step`` (n), ``direction`` (dₙ), ``previous_grad`` (gₙ), ``exp_avg`` (mₙ),
    ``exp_avg_sq`` (vₙ) and, in the AMSGrad form, ``max_exp_avg_sq`` (v̂ₙ). A state saved before ``beta_scope``
    and ``second_moment`` existed loads with ``"per-tensor"`` and ``"gradient"``, as it ran.

    Example:
        >>> import torch
        >>> from moller_scg.coba import CoBA
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> optimizer = CoBA([w], lr=0.05, cg_rule="HZ")
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
    _keys_added_later = {"beta_scope": "per-tensor", "second_moment": "gradient"}

    def __init__(
        self,
        params: Params,
        lr: float = DEFAULT_LR,
        betas: tuple[float, float] = DEFAULT_BETAS,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.0,
        amsgrad: bool = True,
        bias_correction: bool | None = None,
        cg_rule: str = "HS",
        M: Schedule = DEFAULT_M,  # noqa: N803 - the paper's symbol
        a: float = DEFAULT_A,
        hz_lambda: float = DEFAULT_HZ_LAMBDA,
        beta_scope: str = "global",
        second_moment: str = "gradient",
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
            "beta_scope": beta_scope,
            "second_moment": second_moment,
        }
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)
        check_flag(group, "amsgrad")
        if group["bias_correction"] is None:
            group["bias_correction"] = not group["amsgrad"]
        check_flag(group, "bias_correction")
        check_choice(group, "cg_rule", CG_RULES)
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
        check_choice(group, "beta_scope", BETA_SCOPES)
        check_choice(group, "second_moment", SECOND_MOMENTS)

    def _rules(self, group: dict[str, Any]) -> tuple[NonlinearConjugateDirection, AdaptiveMoments]:
        direction_rule = NonlinearConjugateDirection(
            beta_rule=CG_RULES[group["cg_rule"]],
            hz_lambda=group["hz_lambda"],
            group_wide=group["beta_scope"] == "global",
        )
        moment_rule = AdaptiveMoments(
            amsgrad=group["amsgrad"],
            bias_correction=group["bias_correction"],
            of_direction=group["second_moment"] == "direction",
        )
        return direction_rule, moment_rule
