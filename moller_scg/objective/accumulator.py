"""An :class:`~moller_scg.objective.Objective` around a :class:`~moller_scg.GradientAccumulator`.

The accumulator already streams the exact full-batch E(w), E'(w) and E''(w)v and counts its passes over the data;
this adapter gives it the objective's interface. Its counts are read from the accumulator's ``passes`` (the
finite-difference products, which are gradient passes, are added to nhev), so they are never kept twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moller_scg.accumulate import GradientAccumulator, PassCounts
from moller_scg.objective.finite_difference import shifted_gradient_product
from moller_scg.objective.protocol import (
    DEFAULT_SIGMA,
    EvaluationCounts,
    ValueThenGrad,
    check_vectors,
    read_gradients,
    validate_hvp_mode,
    validate_sigma,
)
from moller_scg.subsampling import CurvatureCursor, upgraded_cursor_state


class AccumulatorObjective:
    """E(w) as the exact full-batch loss a :class:`~moller_scg.GradientAccumulator` streams.

    Args:
        accumulator: the accumulator; its :attr:`~moller_scg.GradientAccumulator.params` are w.
        hvp_mode: ``"double-backward"``: s from :meth:`GradientAccumulator.hvp` (one pass; exact, or over the
            curvature subset when the accumulator has ``curvature_fraction`` < 1). ``"finite-difference"``:
            s ≈ (E'(w + σₖv) − E'(w))/σₖ from one more gradient pass.
        sigma: σ of the finite difference (σₖ = σ/|v|).

    Counts: nfev = gradient passes + loss passes, ngev = gradient passes, nhev = ``hvp`` passes + finite-difference
    products. :meth:`hvp` is taken at the values the parameters hold, which are the weights of the last
    :meth:`value_and_grad` as long as the caller leaves them there. Passes made by calling the accumulator directly
    count too: they are its own counters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from moller_scg import GradientAccumulator
        >>> from moller_scg.objective import AccumulatorObjective
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
        >>> objective = AccumulatorObjective(GradientAccumulator(model, nn.MSELoss(), (x, y), batch_size=4))
        >>> loss, gradients = objective.value_and_grad()
        >>> products = objective.hvp(gradients)
        >>> objective.counts
        EvaluationCounts(nfev=1, ngev=1, nhev=1)
    """

    def __init__(
        self, accumulator: GradientAccumulator, hvp_mode: str = "double-backward", sigma: float = DEFAULT_SIGMA
    ) -> None:
        if not isinstance(accumulator, GradientAccumulator):
            raise TypeError(f"accumulator must be a moller_scg.GradientAccumulator, got {type(accumulator).__name__}")
        self.accumulator = accumulator
        self.hvp_mode = validate_hvp_mode(hvp_mode)
        self.sigma = validate_sigma(sigma)
        self._finite_difference_products = 0
        # The ``.grad`` tensors the last gradient pass set, and the parameters' versions then: E'(w) for a
        # finite-difference product while the versions are unchanged.
        self._last_gradients: list[torch.Tensor | None] | None = None
        self._last_versions: list[int] | None = None

    @property
    def params(self) -> list[torch.Tensor]:
        """w: the accumulator's parameters, in its order."""
        return self.accumulator.params

    @property
    def counts(self) -> EvaluationCounts:
        """Derived from the accumulator's passes (see the class docstring)."""
        passes = self.accumulator.passes
        return EvaluationCounts(
            nfev=passes.gradient + passes.loss,
            ngev=passes.gradient,
            nhev=passes.hvp + self._finite_difference_products,
        )

    def __call__(self) -> torch.Tensor:
        """One gradient pass: E(w), with ``.grad`` set to E'(w) (the accumulator as a ``torch.optim`` closure)."""
        loss, _ = self._gradient_pass()
        return loss

    def _gradient_pass(self) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """One gradient pass: E(w) and the ``.grad`` tensors it set (kept, with the versions, for :meth:`hvp`)."""
        loss = self.accumulator()
        gradients = [p.grad for p in self.params]
        self._last_gradients = gradients
        self._last_versions = [p._version for p in self.params]
        return loss, gradients

    def value_and_grad(self, *, copy: bool = True) -> tuple[float | torch.Tensor, list[torch.Tensor]]:
        """E(w) (a detached 0-dim float64 tensor) and E'(w) from one gradient pass: new tensors, or with ``copy=False``
        the ``.grad`` tensors the pass set (valid until the next pass)."""
        loss, gradients = self._gradient_pass()
        return loss, read_gradients(self.params, gradients, copy=copy)

    def value_then_grad(self) -> ValueThenGrad:
        """E(w) now and E'(w) when asked (:meth:`GradientAccumulator.value_then_gradient`): with one batch on one
        process the backward is paid only if the function is called; otherwise this is one gradient pass. The
        gradients are the ``.grad`` tensors (``copy=False``), valid until the next pass."""
        loss, accumulator_gradient = self.accumulator.value_then_gradient()

        def gradient() -> list[torch.Tensor]:
            gradients = accumulator_gradient()
            self._last_gradients = list(gradients)
            self._last_versions = [p._version for p in self.params]
            return read_gradients(self.params, gradients, copy=False)

        return loss, gradient

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """s = E''(w)v at the values the parameters hold (one pass, or two with finite differences).

        The finite difference takes E'(w) from the last gradient pass when the parameters have not been written to
        since, and makes one more gradient pass otherwise.
        """
        checked = check_vectors(vectors, self.params)
        if self.hvp_mode == "double-backward":
            return self.accumulator.hvp(checked)
        self._finite_difference_products += 1
        if self._last_gradients is None or self._last_versions != [p._version for p in self.params]:
            self()
        gradients = self._last_gradients or []  # set by the pass just checked or made
        gradient_at_w = [
            torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(self.params, gradients)
        ]
        return shifted_gradient_product(self.params, gradient_at_w, checked, self._gradient_here, self.sigma)

    def loss(self) -> torch.Tensor:
        """E(w) by one pass without autograd (``.grad`` untouched)."""
        return self.accumulator.loss()

    def state_dict(self) -> dict[str, Any]:
        """The accumulator's passes, the finite-difference products, and the state of its curvature cursor (the
        next curvature window, :meth:`~moller_scg.subsampling.CurvatureCursor.state_dict`)."""
        passes = self.accumulator.passes
        return {
            "passes": {"gradient": passes.gradient, "hvp": passes.hvp, "loss": passes.loss},
            "finite_difference_products": self._finite_difference_products,
            "curvature_window": self.accumulator.curvature_cursor.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, so that counts and rotating curvature subsets go on."""
        expected = {"passes", "finite_difference_products", "curvature_window"}
        if not isinstance(state_dict, dict) or set(state_dict) != expected:
            raise ValueError(
                f"not an AccumulatorObjective state_dict (expected keys {sorted(expected)}): {state_dict!r:.120}"
            )
        passes = state_dict["passes"]
        if not isinstance(passes, dict) or set(passes) != {"gradient", "hvp", "loss"}:
            raise ValueError(f"the saved passes must have the keys gradient, hvp, loss, got {passes!r:.120}")
        for name, value in {**passes, "finite_difference_products": state_dict["finite_difference_products"]}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the saved {name} = {value!r} is not an int ≥ 0")
        cursor = CurvatureCursor()
        cursor.load_state_dict(upgraded_cursor_state(state_dict["curvature_window"]))  # checked before any change
        self.accumulator.passes = PassCounts(**passes)
        self._finite_difference_products = state_dict["finite_difference_products"]
        self.accumulator.curvature_cursor.load_state_dict(cursor.state_dict())

    def _gradient_here(self) -> list[torch.Tensor]:
        self()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self.params]
