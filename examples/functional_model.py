"""SCG on a functional model: the parameters in a dict, the loss a pure function of them (``torch.func`` style).

    python examples/functional_model.py

SCG asks little of its closure: calling it returns E(w) and sets each parameter's ``.grad`` to E'(w), and if
the closure also has an ``hvp(vectors)`` method SCG asks it for the exact curvature s = E''(w)p instead of
differentiating the closure's autograd graph. Here both come from ``torch.func``: ``grad_and_value`` for E and
E', and forward-over-reverse (``jvp`` of ``grad``, :func:`moller_scg.curvature.functional_hvp`) for s. No
``backward`` call, no ``create_graph``: the model is a stateless function of its parameters, evaluated with
``torch.func.functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from moller_scg import SCG
from moller_scg.curvature import functional_hvp


class FunctionalObjective:
    """A closure for ``SCG.step`` built from a loss that is a pure function of a dict of parameters.

    Args:
        loss_of_params: E as a function of a name → tensor dict (for example through ``functional_call``).
        named_params: the tensors SCG optimizes, by name (leaf tensors; SCG writes them in place).
    """

    def __init__(
        self, loss_of_params: Callable[[dict[str, torch.Tensor]], torch.Tensor], named_params: dict[str, torch.Tensor]
    ) -> None:
        self.loss_of_params = loss_of_params
        self.named_params = named_params
        self.hvp_calls = 0

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters in the order :meth:`hvp` takes and returns vectors; SCG checks they are its own."""
        return list(self.named_params.values())

    def __call__(self) -> torch.Tensor:
        """E(w), with each parameter's ``.grad`` set to E'(w)."""
        gradients, loss = torch.func.grad_and_value(self.loss_of_params)(self._weights())
        for name, p in self.named_params.items():
            p.grad = gradients[name]
        return loss

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """s = E''(w)v, exactly, by forward-over-reverse; ``vectors`` in the order of :attr:`params`."""
        self.hvp_calls += 1
        products = functional_hvp(self.loss_of_params, self._weights(), dict(zip(self.named_params, vectors)))
        return [products[name] for name in self.named_params]

    def _weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_params.items()}


def main(iterations: int = 100) -> float:
    torch.manual_seed(0)
    x = torch.randn(256, 3, dtype=torch.float64)
    y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64))
    # The module only describes the computation; its weights live in `params`, outside it.
    module = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    params = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}

    def loss_of_params(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        prediction = torch.func.functional_call(module, weights, (x,))
        return ((prediction - y) ** 2).mean()  # F.mse_loss has no forward-over-reverse rule in torch 2.14

    objective = FunctionalObjective(loss_of_params, params)
    optimizer = SCG(params.values())  # default hvp="double-backward": SCG calls objective.hvp
    for _ in range(iterations):
        loss = optimizer.step(objective)
    hvps = objective.hvp_calls
    print(f"loss {float(loss):.3e} after {iterations} SCG iterations, {hvps} exact Hessian-vector products")
    return float(loss)


if __name__ == "__main__":
    main()
