"""K-FAC's premise on the race's problems: the loss reaches each layer's weight W only through the layer's outputs,
so that ∇_W ℓ = Σₙₜ gₙₜ aₙₜᵀ (docs/performance.md, lever 73).

For each problem of ``benchmarks/peers.py`` and each of its ``nn.Linear`` / ``nn.Conv2d`` layers, one backward of
the sampled loss that :class:`~moller_scg.KroneckerFactors` forms (labels drawn from the model, over the first
``--samples`` training inputs, at the initial weights) gives both the gradient with respect to W and the rows a, g
the factors are formed from; printed is |∇_W ℓ − Σ g aᵀ| over the larger of the two norms
(:func:`~moller_scg.kronecker.identity_gap`, the library's own measure). ``KroneckerFactors`` refuses a layer above
:data:`~moller_scg.kronecker.GRADIENT_IDENTITY_TOLERANCE` at its first refresh, and ``fit(preconditioner="auto")``
then chooses the diagonal H₀: rounding is far below it, a physics-informed net's loss (Δu by autograd) far above.

Usage:
    python benchmarks/kronecker_identity.py            # the race's five problems, a few seconds
    python benchmarks/kronecker_identity.py --quick    # their small versions
"""

from __future__ import annotations

import argparse
import sys

import torch
from peers_problems import PROBLEMS
from torch import nn

from moller_scg import kronecker

LOSSES = {
    "mnist": "cross_entropy",
    "regression": "mse",
    "logistic": "cross_entropy",
    "pinn": "mse",
    "autoencoder": "binary_cross_entropy",
}
"""The distribution each problem's labels are drawn from (the physics-informed net's squared error as the others')."""


def relative_differences(model: nn.Module, inputs: torch.Tensor, loss: str, seed: int = 0) -> list[float]:
    """|∇_W ℓ − Σ g aᵀ| over the larger norm for each factored layer of ``model``, in ``model.modules()``'s order
    (:meth:`~moller_scg.KroneckerFactors.identity_gaps`, labels drawn by a generator seeded with ``seed``)."""
    factors = kronecker.KroneckerFactors(model, inputs, loss=loss, seed=seed)
    return factors.identity_gaps(list(model.parameters()), inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the problems' small versions")
    parser.add_argument("--samples", type=int, default=100, help="training inputs of the backward (default 100)")
    args = parser.parse_args(argv)
    tolerance = kronecker.GRADIENT_IDENTITY_TOLERANCE
    print(f"|∇_W ℓ − Σ g aᵀ| / the larger norm, per factored layer; refused above {tolerance:g}")
    for name, loss in LOSSES.items():
        problem = PROBLEMS[name](args.quick, 0)
        model = problem.make_model()
        differences = relative_differences(model, problem.train[0][: args.samples], loss)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        cells = " ".join(f"{d:.2g}" for d in differences)
        verdict = "refused" if max(differences) > tolerance else "factored"
        print(f"{name:<12} {dtype:<8} {cells}  → {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
