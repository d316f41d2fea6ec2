"""moller_scg: full-batch training with Møller's Scaled Conjugate Gradient (SCG) in PyTorch.

- :class:`SCG` — Møller's algorithm as a ``torch.optim.Optimizer`` driven by ``step(closure)``.
- :class:`KroneckerFactors` — K-FAC's curvature of a network as the initial inverse of ``SCG(memory=m)``'s
  quasi-Newton preconditioner.
- :class:`GradientAccumulator` — the exact full-batch loss, gradient and Hessian-vector product, streamed in
  minibatches; the closure ``SCG.step`` calls.
- :func:`fit` — training with stopping rules, validation early stopping, checkpoints and a :class:`History`.
- :func:`minimize` — SCG on a function of a tensor or of a pytree of tensors, returning an :class:`OptimizeResult`.
- :class:`Objective` — what an optimizer asks of E(w): value and gradient, Hessian-vector products, counts
  (:mod:`moller_scg.objective`).
- :class:`SCGAdam`, :class:`SCGAMSGrad`, :class:`SCGRMSProp`, :class:`CoBA` — stochastic conjugate-gradient-flavoured
  Adam variants from the seed papers, for minibatch training.
"""

__version__ = "0.1.0"

from moller_scg.accumulate import GradientAccumulator, StochasticObjectiveWarning
from moller_scg.annealing import AnnealingRestarts
from moller_scg.coba import CoBA
from moller_scg.history import History
from moller_scg.kronecker import KroneckerFactors
from moller_scg.objective import (
    AccumulatorObjective,
    ClosureObjective,
    EvaluationCounts,
    FunctionObjective,
    Objective,
    as_objective,
)
from moller_scg.optimize import OptimizeResult, minimize
from moller_scg.scg import SCG, SCGStalledWarning, SCGTrace
from moller_scg.scg_adam import SCGAdam, SCGAMSGrad, SCGRMSProp, diminishing_lr
from moller_scg.train import accuracy, fit

__all__ = [
    "SCG",
    "SCGTrace",
    "SCGStalledWarning",
    "KroneckerFactors",
    "GradientAccumulator",
    "StochasticObjectiveWarning",
    "History",
    "fit",
    "accuracy",
    "minimize",
    "OptimizeResult",
    "Objective",
    "EvaluationCounts",
    "ClosureObjective",
    "AccumulatorObjective",
    "FunctionObjective",
    "as_objective",
    "AnnealingRestarts",
    "SCGAdam",
    "SCGAMSGrad",
    "SCGRMSProp",
    "CoBA",
    "diminishing_lr",
    "__version__",
]
