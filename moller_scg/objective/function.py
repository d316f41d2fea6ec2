"""An :class:`~moller_scg.objective.Objective` for a function of a tensor or of a pytree of tensors.

For curve fitting, system identification and physics-informed losses there is no ``nn.Module`` and no dataset,
only a function ``fun(x)`` returning a scalar, and a starting point x0: a tensor, or a dict, list or tuple of
tensors (nested as deep as wanted; ``torch.utils._pytree`` flattens it). The objective optimizes its own copies
of x0's tensors (:attr:`params`), so x0 itself is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from moller_scg.objective.closure import ClosureObjective
from moller_scg.objective.protocol import DEFAULT_SIGMA, ValueThenGrad, scalar_loss


class FunctionObjective(ClosureObjective):
    """E(w) = fun(x), where x has x0's structure and its tensors are the leaves w.

    Args:
        fun: ``fun(x) → scalar tensor``, differentiable by autograd (twice, for ``hvp_mode="double-backward"``).
        x0: a floating-point or complex tensor, or a dict/list/tuple pytree of them: the starting point.
        hvp_mode: ``"double-backward"`` (exact s = E''(w)v) or ``"finite-difference"``.
        sigma: σ of the finite difference (σₖ = σ/|v|).

    Raises:
        TypeError: ``fun`` is not callable, or a leaf of x0 is not a floating-point or complex tensor.
        ValueError: x0 holds no tensor.

    Example:
        >>> import torch
        >>> from moller_scg.objective import FunctionObjective
        >>> x0 = {"a": torch.tensor(2.0, dtype=torch.float64), "b": torch.tensor([1.0, 3.0], dtype=torch.float64)}
        >>> objective = FunctionObjective(lambda x: x["a"] ** 2 * x["b"].sum(), x0)
        >>> loss, (grad_a, grad_b) = objective.value_and_grad()
        >>> float(loss), float(grad_a), grad_b.tolist()  # a²Σb, 2aΣb, a²
        (16.0, 16.0, [4.0, 4.0])
    """

    def __init__(
        self,
        fun: Callable[[Any], Any],
        x0: Any,
        hvp_mode: str = "double-backward",
        sigma: float = DEFAULT_SIGMA,
    ) -> None:
        if not callable(fun):
            raise TypeError(f"fun must be callable as fun(x) → scalar tensor, got {type(fun).__name__}")
        self.fun = fun
        leaves, self._spec = flatten_x0(x0)
        params = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
        super().__init__(self._evaluate, params, hvp_mode, sigma)
        self._require_graph = False  # a fun linear in x has no graph in its gradient: E'' = 0, not a mistake

    def structured(self, tensors: list[torch.Tensor]) -> Any:
        """One tensor per parameter, arranged in x0's structure (a tensor, dict, list or tuple)."""
        return pytree.tree_unflatten(tensors, self._spec)

    def loss(self) -> float | torch.Tensor:
        """E(w) = fun(x): one call of ``fun``, counted in nfev only, its graph freed on return.

        Autograd stays on, since ``fun`` may differentiate inside (a physics-informed loss holds derivatives of a
        network); no gradient with respect to w is formed."""
        with torch.enable_grad():
            value = self.fun(self.structured(self.params))
        self._counts.nfev += 1
        return scalar_loss(value, "fun")

    def release_graph(self) -> None:
        """Let go of the last evaluation's gradients and their graph (each ``.grad`` too).

        In double-backward mode a gradient holds its graph, and the graph holds the parameters whose ``.grad`` it
        is: a cycle through autograd's C++ objects that Python's garbage collector cannot free. ``minimize`` calls
        this when it returns, so that nothing of a run outlives it."""
        self._last_gradients = None
        for p in self.params:
            p.grad = None

    def value_then_grad(self) -> ValueThenGrad:
        """fun(x) now (counted in nfev), and a function that forms ∂fun/∂w from that call's graph when asked
        (counted in ngev; ``.grad`` is set, with its graph in double-backward mode so that :meth:`hvp` can use it).
        A point rejected on its value alone never pays for the backward pass."""
        self._last_gradients = None  # the old graph goes before the new one is built
        with torch.enable_grad():
            value = self._value()

        def form_gradients() -> list[torch.Tensor | None]:
            with torch.enable_grad():
                return self._set_gradients(value)

        return self._value_then_grad(scalar_loss(value, "fun"), form_gradients)

    def _evaluate(self) -> torch.Tensor:
        """The closure: fun(x), and each parameter's ``.grad`` set to ∂fun/∂w (with its graph for double-backward)."""
        value = self._value()
        self._set_gradients(value)
        return value

    def _value(self) -> torch.Tensor:
        """fun(x) with its graph, or a ``TypeError``/``ValueError`` naming what is wrong with the value."""
        value = self.fun(self.structured(self.params))
        scalar_loss(value, "fun")  # a clear TypeError for a non-scalar or non-tensor value
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            raise ValueError(
                "fun(x) does not depend on x through autograd (its value carries no graph): compute it from x with "
                "torch operations, without .item(), .detach(), .numpy() or torch.no_grad()"
            )
        return value

    def _set_gradients(self, value: torch.Tensor) -> list[torch.Tensor | None]:
        """∂fun/∂w from the graph of ``value`` (kept for double-backward), written into each ``.grad``."""
        create_graph = self.hvp_mode == "double-backward"
        gradients = torch.autograd.grad(value, self.params, create_graph=create_graph, allow_unused=True)
        if all(gradient is None for gradient in gradients):
            raise ValueError(
                "fun(x) does not depend on x through autograd: its value carries a graph, but the graph does not reach "
                "x (is fun computed from another tensor that requires grad, or from a detached copy of x?)"
            )
        for p, gradient in zip(self.params, gradients):
            p.grad = gradient
        return list(gradients)


def flatten_x0(x0: Any) -> tuple[list[torch.Tensor], Any]:
    """x0's tensors and its structure, or a ``TypeError``/``ValueError`` naming the leaf that is not usable."""
    leaves_with_paths, spec = pytree.tree_flatten_with_path(x0)
    if not leaves_with_paths:
        raise ValueError(f"x0 holds no tensor ({x0!r:.80}): pass a tensor, or a dict/list/tuple of tensors")
    leaves = []
    for path, leaf in leaves_with_paths:
        where = "x0" + pytree.keystr(path)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{where} is a {type(leaf).__module__}.{type(leaf).__name__}, not a torch.Tensor: x0 must be a tensor "
                f"or a dict/list/tuple of tensors (convert with torch.as_tensor(..., dtype=torch.float64))"
            )
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"{where} has dtype {leaf.dtype}, but only floating-point or complex tensors can be optimized: "
                f"convert it with .double() (or .float())"
            )
        if leaf.is_sparse:
            raise TypeError(f"{where} is a sparse tensor, which cannot be optimized: pass .to_dense()")
        leaves.append(leaf)
    return leaves, spec
