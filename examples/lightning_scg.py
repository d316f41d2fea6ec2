"""SCG in PyTorch Lightning's automatic optimization, the way Lightning runs ``torch.optim.LBFGS``.

    pip install lightning
    python examples/lightning_scg.py                          # Møller's finite-difference curvature
    python examples/lightning_scg.py --hvp double-backward    # exact curvature, through the backward hook

``configure_optimizers`` returns an :class:`~moller_scg.SCG`, and the Trainer calls ``optimizer.step(closure)``
with a closure that runs ``training_step``, ``zero_grad`` and ``backward`` — as for LBFGS. Two things follow:

* **Curvature.** Lightning's closure back-propagates with ``LightningModule.backward``, which calls
  ``loss.backward()`` without ``create_graph=True``. The gradients then carry no graph, so SCG's default exact
  curvature (``hvp="double-backward"``) has nothing to differentiate and its first step raises a
  ``RuntimeError`` that says so. Either use ``hvp="finite-difference"`` (Møller's original, needs only gradients)
  or override ``backward`` to pass ``create_graph=True``, as :class:`FullBatchRegression` does when asked for
  exact curvature.
* **Full batch.** SCG is a full-batch method: the DataLoader yields the whole training set as one batch, so one
  training step is one SCG iteration on the exact objective, and ``max_steps`` counts SCG iterations. The
  closure is called once or twice per step (trial point, finite-difference point); the loss that Lightning
  records from ``training_step`` is that of the last call, so the example logs SCG's own trace instead.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from moller_scg import SCG


class FullBatchRegression(pl.LightningModule):
    """A small tanh network fitted by full-batch SCG.

    Args:
        hvp: SCG's curvature mode; with ``"double-backward"`` :meth:`backward` keeps the graph of the gradient.
    """

    def __init__(self, hvp: str = "finite-difference") -> None:
        super().__init__()
        self.hvp = hvp
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        # Exact curvature needs the graph of the gradient: SCG differentiates gᵀp once more.
        loss.backward(*args, create_graph=self.hvp == "double-backward", **kwargs)

    def configure_optimizers(self) -> SCG:
        self.scg = SCG(self.parameters(), hvp=self.hvp)
        return self.scg

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        trace = self.scg.trace  # E at the accepted weights, λ, success, … of the iteration just done
        self.log_dict({"scg_loss": trace.loss, "scg_lambda": trace.lambd, "scg_success": float(trace.success)})


def full_batch_loader(samples: int = 128) -> DataLoader:
    """The whole training set as one batch: every training step sees the exact full-batch objective."""
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(-3, 3, samples).unsqueeze(1)
    y = torch.sin(x) + 0.05 * torch.randn(x.shape, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=samples)


def train(hvp: str = "finite-difference", iterations: int = 100, progress: bool = False) -> FullBatchRegression:
    """Fit :class:`FullBatchRegression` for ``iterations`` SCG iterations and return it."""
    torch.manual_seed(0)
    model = FullBatchRegression(hvp)
    trainer = pl.Trainer(
        max_steps=iterations,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )
    trainer.fit(model, full_batch_loader())
    return model


def main(argv: list[str] | None = None) -> FullBatchRegression:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hvp", choices=["finite-difference", "double-backward"], default="finite-difference")
    parser.add_argument("--iterations", type=int, default=100, help="SCG iterations (Trainer max_steps)")
    args = parser.parse_args(argv)
    model = train(args.hvp, args.iterations)
    trace = model.scg.trace
    print(
        f"hvp={args.hvp}: loss {trace.loss:.5f} after {trace.k} SCG iterations, "
        f"{trace.closure_calls} closure calls (training_step), {trace.hvp_calls} curvature evaluations"
    )
    return model


if __name__ == "__main__":
    main()
