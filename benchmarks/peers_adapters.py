"""The optimizers of ``benchmarks/peers.py``, each driven through a ``Run``: torch.optim.LBFGS, SCG, torchmin,
paramz's netlab SCG and minibatch Adam; ``optimizers`` is the table of the rows of the report."""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from peers_metering import CURVATURE_FRACTION, BudgetSpent, Run, reachable_numbers
from peers_problems import Problem, make_accumulator
from torch import nn

from moller_scg.accumulate import GradientAccumulator
from moller_scg.kronecker import KroneckerFactors
from moller_scg.objective import ClosureWithHvpObjective
from moller_scg.objective.protocol import ValueThenGrad
from moller_scg.scg import DEFAULT_MEMORY, SCG

REFERENCE = "torch LBFGS"
"""The reference row: torch.optim.LBFGS at its default history of 100 pairs; every ratio in the report is to it."""
REFERENCE_HISTORY = 100
LBFGS_HISTORIES = (2, 5, 20, 40)
"""Shorter torch.optim.LBFGS histories, for comparisons at (nearly) equal optimizer memory: LBFGS holds 2 × history
weight-sized vectors plus a few, SCG 3 (4 at the peak)."""
SUBSAMPLED = f"SCG exact, {CURVATURE_FRACTION:.0%} curv."
NETLAB = "paramz SCG (netlab)"
PRECONDITIONED = f"SCG m={DEFAULT_MEMORY}"
"""The default mode of fit and moller-scg mnist: SCG(params, memory=20), δ from the secant model (issue #14)."""
KRONECKER = f"SCG m={DEFAULT_MEMORY} K-FAC"
"""SCG(params, memory=20, kronecker_factors=KroneckerFactors(model, inputs, …)): H₀ = γ_K K⁻¹ from K-FAC's factors
(lever 71), on the problems of :data:`KRONECKER_LOSSES`; on the others, which have no factors, ``SCG(params,
memory=20)``, as a user of the mode would fall back to it."""
DIAGONAL = f"SCG m={DEFAULT_MEMORY} diag"
"""SCG(params, memory=20, diagonal_scaling=True): H₀ = γ_D Λ from the gradients' second moments (lever 14)."""
KRONECKER_OR_DIAGONAL = f"SCG m={DEFAULT_MEMORY} K-FAC/diag"
"""K-FAC's H₀ where the problem has factors (:data:`KRONECKER_LOSSES`: the row :data:`KRONECKER`), the diagonal H₀
where it has none (the row :data:`DIAGONAL`): the physics-informed net and the autoencoder. One row for the mode
lever 72 read off two rows (docs/performance.md, lever 73); what ``fit`` builds by default (``preconditioner="auto"``,
lever 74)."""
SCG_FAMILY, LBFGS_FAMILY, PEER_FAMILY, ADAM_FAMILY = "SCG", "torch LBFGS", "peer", "Adam"
"""Which kind of optimizer a row is: the report judges every SCG row by the goals, and pairs it with the LBFGS row
of nearest memory."""
DEFAULT_LBFGS_FAMILY = "torch LBFGS, no line search"
"""torch.optim.LBFGS as a user first writes it (``line_search_fn=None``: after the first step every step has length
lr = 1): the family of every :func:`lbfgs` row with ``line_search_fn=None`` (``levers.py``'s, and those that
``peers.py --default-lbfgs`` adds). The report pairs each SCG row with one of them by the equal-memory rule, apart
from the goals, which keep the issue's strong-Wolfe reference (docs/performance.md, lever 40)."""
DEFAULT_LBFGS_ROWS = {"LBFGS no LS": REFERENCE_HISTORY, "LBFGS h=20 no LS": 20}
"""The rows of ``--default-lbfgs``, by name: their histories."""
MISSING_HINT = "pip install pytorch-minimize paramz scikit-learn  (setup.cfg extra: benchmarks)"


def require_peers() -> tuple[types.ModuleType, Callable[..., Any]]:
    """torchmin and paramz's SCG, or ImportError naming what to install."""
    try:
        with warnings.catch_warnings():
            # torchmin 0.1 compiles a helper with torch.jit.script at import, which torch now deprecates.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            import torchmin
        from paramz.optimization.scg import SCG as netlab_scg
    except ImportError as error:
        raise ImportError(f"benchmarks/peers.py needs pytorch-minimize and paramz: {MISSING_HINT} ({error})") from error
    return torchmin, netlab_scg


# ------------------------------------------------------------------------------------------------------------------
# The optimizers


LBFGS_UNBOUNDED = 10**9
"""LBFGS's ``max_iter`` and ``max_eval`` in the race: more than any budget holds."""

USER_LOOP_MAX_ITER = 20
"""torch's default ``max_iter``: what LBFGS takes in a user's loop of ``step`` calls (``benchmarks/plain_loop.py``)."""


def torch_lbfgs(
    params: Any,
    history_size: int = REFERENCE_HISTORY,
    line_search_fn: str | None = "strong_wolfe",
    max_iter: int = LBFGS_UNBOUNDED,
) -> torch.optim.LBFGS:
    """torch.optim.LBFGS as the race runs it: strong-Wolfe line search, lr 1, no stop rules, and one ``step`` for
    the whole run (``max_iter`` and ``max_eval`` without a bound: the budget ends it; a user's loop of ``step`` calls
    passes torch's default ``max_iter=20``, and ``max_eval`` is then torch's 25). With torch's ``max_iter=20``
    each ``step`` starts by evaluating again the point the last one ended at, and caps a late line search at what is
    left of its 25 evaluations: 3–4 % more passes to the 99 % and 99.9 % targets (``docs/performance.md``, lever
    61). ``line_search_fn=None`` is torch's default: no line search, every step of length lr = 1 after the first (of
    length min(1, 1/|g|₁))."""
    return torch.optim.LBFGS(
        params,
        lr=1,
        history_size=history_size,
        max_iter=max_iter,
        max_eval=LBFGS_UNBOUNDED if max_iter == LBFGS_UNBOUNDED else None,
        line_search_fn=line_search_fn,
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )


def run_torch_lbfgs(
    run: Run, history_size: int = REFERENCE_HISTORY, line_search_fn: str | None = "strong_wolfe"
) -> None:
    """:func:`torch_lbfgs` on the run."""
    run.extra["history_size"] = history_size
    optimizer = torch_lbfgs(run.params, history_size, line_search_fn)
    state = optimizer.state[run.params[0]]
    while True:  # one step, unless LBFGS stops by itself (an exactly zero gradient or step): then it starts again
        try:
            optimizer.step(run)
        finally:
            run.extra["lbfgs_iterations"] = state.get("n_iter", 0)
            run.extra["lbfgs_evaluations"] = state.get("func_evals", 0)


class MeteredObjective(ClosureWithHvpObjective):
    """The run as SCG's objective: its call and ``hvp`` as for any closure with an ``hvp`` method, and its
    ``value_then_grad``, so that a trial rejected on its loss is charged the forward alone, as the library's
    :class:`~moller_scg.objective.AccumulatorObjective` would let it cost."""

    def value_then_grad(self) -> ValueThenGrad:
        self._last_gradients = None
        loss, gradient = self.closure.value_then_grad()
        return self._value_then_grad(loss, gradient)


KRONECKER_LOSSES = {"mnist": "cross_entropy", "logistic": "cross_entropy", "regression": "mse"}
"""The loss whose predictive distribution :class:`~moller_scg.kronecker.KroneckerFactors` draws labels from, for
each problem its H₀ is raced on. Not the physics-informed net (its loss holds the network's second derivatives, not
a likelihood of its output) nor the autoencoder (its Bernoulli factors, up to 785 × 785, lost in time as a research
variant: docs/performance.md, lever 71)."""

KRONECKER_OPTIONS = {"fraction": 0.05, "every": 5, "damping": 10.0, "rank": 64}
"""The factors' settings of the K-FAC rows: lever 71's best on the MNIST CNN (and the library's defaults; the
library's ``max_samples`` = 512 bounds none of the race's problems, whose 5 % is at most 100 samples)."""


class ChargedKroneckerFactors(KroneckerFactors):
    """:class:`~moller_scg.kronecker.KroneckerFactors` over the run's model and training inputs, each refresh charged
    to the run's budget as its share of a gradient pass (a forward and a backward over that share of the samples;
    it is not an evaluation of the objective, so it is not counted as one). A refresh the budget cannot pay for keeps
    the factors held, as lever 71's research variant did; the run ends at its next evaluation."""

    def __init__(self, run: Run, **options: Any) -> None:
        super().__init__(run.model, run.problem.train[0], loss=KRONECKER_LOSSES[run.problem.name], **options)
        self.run = run

    def refresh(self) -> None:
        share = self.samples / self.run.problem.samples
        try:
            self.run.charge("gradient", cost=share)
        except BudgetSpent:
            if self.refreshes == 0:
                raise
            return
        self.run.calls["gradient"] -= 1  # charged to the budget, not a call of the accumulator's
        self.run.extra["factor_passes"] = self.run.extra.get("factor_passes", 0.0) + share
        super().refresh()


def run_scg(run: Run, hvp: str, curvature_fraction: float = 1.0, loss_first: bool = True, **scg_options: Any) -> None:
    """moller_scg.SCG, default σ and λ₁ unless ``scg_options`` (keyword arguments of ``SCG``) say otherwise; the
    objective is the run itself (its ``hvp`` gives exact curvature, its ``value_then_grad`` the trial's loss
    before its gradient; with ``loss_first=False`` the run is SCG's closure, and every trial is a gradient pass).

    With ``curvature_fraction`` < 1 the run's accumulator takes each E''p over a rotating part of the samples, and
    an HVP call is charged the measured cost of such a pass.
    """
    if curvature_fraction < 1.0:
        run.acc = make_accumulator(run.problem, run.model, curvature_fraction=curvature_fraction)
        run.costs["hvp"] = run.calibrated["hvp_subsampled"]
    run.extra["hvp_cost"] = run.costs["hvp"]
    run.extra["scg_rejected"] = 0
    if scg_options.get("kronecker_factors") is not None:  # the factors' settings, made into factors of this run
        settings = scg_options["kronecker_factors"]
        if run.problem.name in KRONECKER_LOSSES:
            scg_options["kronecker_factors"] = ChargedKroneckerFactors(run, **settings)
            scg_options["diagonal_scaling"] = False  # K-FAC's H₀ in place of the diagonal one, where both are asked
        else:  # no factors: SCG(memory=m), or with diagonal_scaling its diagonal H₀, as a user would fall back to
            scg_options["kronecker_factors"] = None
    optimizer = SCG(run.params, hvp=hvp, **scg_options)
    objective = MeteredObjective(run, run.params) if loss_first else run
    run.extra["record_in_step"] = True
    while True:
        optimizer.step(objective)
        trace = optimizer.trace
        run.extra["scg_rejected"] += not trace.success  # Δ < 0: the trial point was worse, λ was raised
        # The point's time is the end of the step's last evaluation (an accepted step's trial), as LBFGS's points are
        # timed: the work after it belongs to the next point (lever 61). A rejected step's point lowers nothing.
        run.record(trace.loss, run.flat_params, at=run.evaluation_end)
        run.extra["scg_steps"] = trace.k
        run.extra["scg_closure_calls"] = trace.closure_calls
        run.extra["scg_hvp_calls"] = trace.hvp_calls


class _FullBatchLoss(torch.autograd.Function):
    """E(x) through the accumulator: forward = one gradient pass; backward returns the stored E'(x), whose own
    backward is one HVP pass — so torchmin's autograd gets exact E, E' and E''v without a full-batch graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Run) -> torch.Tensor:
        loss, gradient = run.value_and_grad_at(x.detach())
        ctx.save_for_backward(x)
        ctx.run, ctx.gradient = run, gradient
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_output * _StoredGradient.apply(x, ctx.run, ctx.gradient), None


class _StoredGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Run, gradient: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.run = run
        return gradient.clone()

    @staticmethod
    def backward(ctx, vector: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.run.hvp_at(x.detach(), vector), None, None


TORCHMIN_OPTIONS = {
    "cg": {"gtol": 0.0},
    "l-bfgs": {"gtol": 0.0, "xtol": 0.0},
    "newton-cg": {"xtol": 0.0},
    "trust-ncg": {"gtol": 0.0},
}


def run_torchmin(run: Run, method: str) -> None:
    """torchmin.minimize on the flat weight vector, its default settings except that no tolerance stops it."""
    torchmin, _ = require_peers()
    x0 = run.flat_params().clone()
    result = torchmin.minimize(
        lambda x: _FullBatchLoss.apply(x, run), x0, method=method, max_iter=10**9, options=TORCHMIN_OPTIONS[method]
    )
    run.status = f"ended by torchmin: {result.message}"


def run_netlab(run: Run) -> None:
    """paramz's port of netlab's SCG on float64 NumPy vectors; f = loss pass, gradf = gradient pass; no stop rules."""
    _, netlab_scg = require_peers()
    x0 = run.flat_params().double().numpy().copy()
    _, _, _, status = netlab_scg(run.numpy_loss, run.numpy_grad, x0, maxiters=10**9, xtol=0.0, ftol=0.0, gtol=0.0)
    run.status = f"ended by paramz: {status}"


def run_adam(run: Run, lr: float) -> None:
    """torch.optim.Adam on shuffled minibatches of the training set; the full-batch loss is recorded each pass."""
    problem = run.problem
    optimizer = torch.optim.Adam(run.params, lr=lr)
    loss_fn = problem.make_loss(run.model)
    inputs, targets = problem.train
    generator = torch.Generator().manual_seed(problem.seed + 2)
    samples = problem.samples
    seen = 0
    while seen < run.budget * samples:
        order = torch.randperm(samples, generator=generator)
        for start in range(0, samples, problem.adam_batch):
            if seen >= run.budget * samples:
                break
            index = order[start : start + problem.adam_batch]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(run.model(inputs[index]), targets[index]).backward()
            optimizer.step()
            seen += len(index)
            run.passes = seen / samples
            if seen // samples != (seen - len(index)) // samples or seen >= run.budget * samples:
                with run.clock.paused():
                    full_loss = float(run.acc.loss())
                    run.acc.passes.loss -= 1
                    run.peak_state_numbers = max(
                        run.peak_state_numbers, reachable_numbers([optimizer], run.excluded_storages())
                    )
                run.record_current(full_loss)
                run.switch()
    run.status = "budget spent"
    run.best_weights = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the report: how to run the optimizer, and its family (``SCG_FAMILY`` rows are judged by the goals)."""

    run: Callable[[Run], None]
    family: str
    history_size: int | None = None  # torch LBFGS rows: their history, which sets their memory
    memory: int = 0  # SCG rows: SCG's memory m (2m more weight-sized buffers for the secant pairs)
    diagonal_scaling: bool = False  # SCG rows: v and Λ, two more weight-sized buffers


def scg(
    hvp: str = "double-backward", curvature_fraction: float = 1.0, loss_first: bool = True, **scg_options: Any
) -> Row:
    """An SCG row: ``SCG(params, hvp=hvp, **scg_options)``, its curvature over ``curvature_fraction`` of the samples;
    ``loss_first=False`` charges every trial a gradient pass (the library before lever 12)."""
    memory = scg_options.get("memory", 0)
    diagonal_scaling = scg_options.get("diagonal_scaling", False)
    return Row(
        lambda run: run_scg(run, hvp, curvature_fraction, loss_first, **scg_options),
        SCG_FAMILY,
        memory=memory,
        diagonal_scaling=diagonal_scaling,
    )


def lbfgs(history_size: int, line_search_fn: str | None = "strong_wolfe") -> Row:
    """A torch LBFGS row (:func:`torch_lbfgs`); ``line_search_fn=None``: torch's default, no line search, a row of
    :data:`DEFAULT_LBFGS_FAMILY`."""
    family = LBFGS_FAMILY if line_search_fn else DEFAULT_LBFGS_FAMILY
    return Row(lambda run: run_torch_lbfgs(run, history_size, line_search_fn), family, history_size)


def optimizers(problem: Problem, default_lbfgs: bool = False) -> dict[str, Row]:
    """The rows of the report, in order. A new SCG mode is one more ``scg(...)`` line here: the race, the tables,
    the memory probe, the figure and the goals pick it up from its family. ``default_lbfgs``: also the rows of
    :data:`DEFAULT_LBFGS_ROWS`, torch LBFGS without a line search, after the strong-Wolfe LBFGS rows."""
    table = {
        REFERENCE: lbfgs(REFERENCE_HISTORY),
        "SCG exact": scg(),
        "SCG finite-diff": scg(hvp="finite-difference"),
        SUBSAMPLED: scg(curvature_fraction=CURVATURE_FRACTION),
        PRECONDITIONED: scg(hvp="secant", memory=DEFAULT_MEMORY),
        "SCG m=5": scg(hvp="secant", memory=5),
        "SCG m=40": scg(hvp="secant", memory=40),
        DIAGONAL: scg(hvp="secant", memory=DEFAULT_MEMORY, diagonal_scaling=True),
        KRONECKER: scg(
            hvp="secant",
            memory=DEFAULT_MEMORY,
            kronecker_factors=KRONECKER_OPTIONS,
        ),
        KRONECKER_OR_DIAGONAL: scg(
            hvp="secant",
            memory=DEFAULT_MEMORY,
            kronecker_factors=KRONECKER_OPTIONS,
            diagonal_scaling=True,
        ),
        "SCG m=40 diag": scg(hvp="secant", memory=40, diagonal_scaling=True),
        **{f"torch LBFGS h={history}": lbfgs(history) for history in LBFGS_HISTORIES},
        **{name: lbfgs(history, None) for name, history in DEFAULT_LBFGS_ROWS.items() if default_lbfgs},
        NETLAB: Row(run_netlab, PEER_FAMILY),
        "torchmin CG": Row(lambda run: run_torchmin(run, "cg"), PEER_FAMILY),
        "torchmin L-BFGS": Row(lambda run: run_torchmin(run, "l-bfgs"), PEER_FAMILY),
        "torchmin Newton-CG": Row(lambda run: run_torchmin(run, "newton-cg"), PEER_FAMILY),
        "torchmin trust-ncg": Row(lambda run: run_torchmin(run, "trust-ncg"), PEER_FAMILY),
    }
    for lr in problem.adam_lrs:
        table[f"Adam lr={lr:g}"] = Row(lambda run, lr=lr: run_adam(run, lr), ADAM_FAMILY)
    return table


def warm_up() -> None:
    """One tiny step of every optimizer family, so that no race pays for first-use costs (torch.optim's first step
    imports torch._dynamo, seconds on this machine; torchmin and paramz have their own)."""
    torchmin, netlab_scg = require_peers()
    model = nn.Linear(2, 1).double()
    data = (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    acc = GradientAccumulator(model, nn.MSELoss(), data)
    for optimizer in (
        torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe", max_iter=2),
        SCG(model.parameters()),
        SCG(model.parameters(), hvp="finite-difference"),
        SCG(model.parameters(), memory=2),
        torch.optim.Adam(model.parameters()),
    ):
        optimizer.step(acc)
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for method in TORCHMIN_OPTIONS:
        torchmin.minimize(lambda x: (x - 1).square().sum(), x0.clone(), method=method, max_iter=2)
    netlab_scg(lambda x: float(np.sum(x**2)), lambda x: 2 * x, x0.numpy().copy(), maxiters=2)
