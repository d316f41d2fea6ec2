"""A plain PyTorch training script written for ``torch.optim.LBFGS``, with SCG swapped in: one line and the import.

    python examples/swap_lbfgs.py

The script below is what a user of ``torch.optim.LBFGS`` already has: a closure that zeroes the gradients,
evaluates the loss, calls ``loss.backward()`` and returns the loss, and a loop of ``optimizer.step(closure)``.
Only the line that builds the optimizer differs from the LBFGS version, besides the import of SCG
(``tests/test_integrations.py`` checks that, and runs both).

``memory=20``: SCG keeps 20 secant pairs, like an LBFGS with ``history_size=20``, preconditions its direction with
them and takes its curvature from them (``hvp="secant"``), so a plain ``loss.backward()`` closure is all it needs and
a step costs one closure call (``diagonal_scaling=True`` shapes the preconditioner's H₀ by the gradients' second
moments, at two more weight-sized buffers). ``SCG(model.parameters(), hvp="finite-difference")`` is Møller's SCG
with the same closure (one more closure call per successful step, 4 weight-sized buffers instead of 2 × 20 + 5).
One ``SCG.step`` is one iteration, whereas one ``LBFGS.step`` runs up to ``max_iter=20``.
"""

from __future__ import annotations

import torch
from torch import nn

from moller_scg import SCG

STEPS = 300


def main() -> float:
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 200).unsqueeze(1)
    y = torch.sin(x) + 0.05 * torch.randn_like(x)
    model = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1))
    loss_fn = nn.MSELoss()
    optimizer = SCG(model.parameters(), memory=20)  # was: torch.optim.LBFGS(model.parameters())

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(STEPS):
        optimizer.step(closure)
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    print(f"{type(optimizer).__name__}: training loss {final:.5f} after {STEPS} steps")
    return final


if __name__ == "__main__":
    main()
