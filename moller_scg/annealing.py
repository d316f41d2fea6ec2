"""SAGRAD-style restarts: when full-batch SCG stalls, perturb the weights by simulated annealing and start again.

SAGRAD (Bernal & Torres-Jimenez 2015) trains a network by Møller's SCG; it (re)initialises the weights by
simulated annealing to (re)start SCG the first time and whenever SCG shows insufficient progress, and anneals
the weights when SCG, after possibly considerable progress, is stuck at a local minimum or in a flat area.
:func:`moller_scg.fit` does this with ``fit(..., annealing=AnnealingRestarts(...))``: a stuck SCG is restarted from
an annealing chain that starts at its current weights, and, with ``reinit_progress`` > 0, one that made
insufficient progress from a chain that starts at freshly drawn weights.

**When.** After iteration n, with the losses Eₘ of the iterations since the last restart (or since the start), a
restart is due when any of these holds:

* stall: the loss fell by no more than a fraction ``rel_tol`` of itself over the last W = ``window`` iterations,
  E_{n−W} − Eₙ ≤ rel_tol · |E_{n−W}|;
* the Levenberg–Marquardt scale has grown past a bound, λ ≥ ``lambda_bound``;
* ``fit``'s own stall rule fired (no decrease for ``max_stall`` iterations, or λ = ``LAMBDA_MAX``);
* the gradient is exactly zero (a stationary point) and ``fit`` was not given ``min_grad``.

After ``max_restarts`` restarts these rules no longer restart and ``fit`` stops as it would without annealing.

**How.** Restart j = 0, 1, … runs K = ``perturbations`` steps of a Metropolis chain (Metropolis et al. 1953)
with the perturbation size and the starting temperature

    σⱼ = σ₀ · ρʲ,    Tⱼ = T₀ · ρʲ        (σ₀ = ``scale``, T₀ = ``temperature``, ρ = ``decay``),

cooling at every move to Tⱼκⁱ (κ = ``cooling``; Kirkpatrick et al. 1983), starting from the current weights
w₀ = w (SCG's accepted point, the best weights of the run so far):

    w' = wᵢ + σⱼ · ξ,   ξ ~ N(0, I)
    accept (wᵢ₊₁ = w') with probability min(1, exp(−(E(w') − E(wᵢ)) / (Tⱼκⁱ))), otherwise wᵢ₊₁ = wᵢ,

and loads w* = argmin over {w₀, w₁, …, w_K} of E into the model: the best point the chain visited, never worse
than w₀. A re-initialisation (the loss fell by less than ``reinit_progress`` of itself since the latest start)
runs the same chain from fresh weights w₀ ~ N(0, s²) per tensor (s: the tensor's root mean square when the run
started) and loads its best point only if it is below E(w), else keeps w (K + 2 passes). E is the full-batch
loss of the loss-only pass (``GradientAccumulator.loss``, one pass per evaluation; K + 1 passes per restart). A
candidate with a non-finite loss is rejected. SCG then starts again at step 1 from
w* (E and r re-evaluated, p = r, λ = λ₁): the chain may have wandered uphill, but SCG restarts only from its best
point, so the training loss never increases over a run and the best weights are never lost.

The random numbers come from a ``torch.Generator`` seeded with ``seed``, independent of torch's global generator;
its state is saved in ``fit``'s checkpoints, so a resumed run repeats the same perturbations bit for bit. Every
restart is recorded in :attr:`moller_scg.History.restarts` with its reason, temperature, losses and accepted moves.

Example:
    One chain on the double well E(w) = (w² − 1)² + 0.3w, from the poor minimum's side (w = 1, E = 0.3):

    >>> import torch
    >>> from moller_scg.annealing import AnnealingRestarts, metropolis_walk
    >>> w = torch.tensor([1.0], dtype=torch.float64)
    >>> def energy():
    ...     return (w[0] ** 2 - 1) ** 2 + 0.3 * w[0]
    >>> result = metropolis_walk([w], energy, moves=10, temperature=0.5, scale=1.0,
    ...                          generator=torch.Generator().manual_seed(0))
    >>> result.loss_after < 0 < result.loss_before, bool(w < 0)  # w now holds the best point: the lower well
    (True, True)

    In training, the same chain runs inside ``fit`` whenever SCG stalls:
    ``fit(model, loss_fn, data, max_iter=500, annealing=AnnealingRestarts(window=20, temperature=0.05))``.

References:
    Bernal, J. & Torres-Jimenez, J. (2015). SAGRAD: A program for neural network training with simulated
    annealing and the conjugate gradient method. Journal of Research of the National Institute of Standards and
    Technology 120, 113–128.

    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.

    Metropolis, N., Rosenbluth, A. W., Rosenbluth, M. N., Teller, A. H. & Teller, E. (1953). Equation of state
    calculations by fast computing machines. The Journal of Chemical Physics 21(6), 1087–1092.

    Kirkpatrick, S., Gelatt, C. D. & Vecchi, M. P. (1983). Optimization by simulated annealing. Science 220(4598),
    671–680.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moller_scg import _vectors as vec
from moller_scg.history import History
from moller_scg.scg import LAMBDA_MAX, SCG

logger = logging.getLogger(__name__)

INITIAL = "initial"
"""``kind`` of the event of the optional low-intensity pass that chooses the first weights."""
RESTART = "restart"
"""``kind`` of the event of a restart after a stall: a chain from the current weights."""
REINITIALISATION = "reinitialisation"
"""``kind`` of the event of a restart after insufficient progress: a chain from freshly drawn weights."""

EVENT_KEYS = (
    "iteration",
    "kind",
    "reason",
    "temperature",
    "scale",
    "moves",
    "accepted",
    "loss_before",
    "loss_after",
)
"""The keys of each dict in :attr:`History.restarts <moller_scg.History.restarts>`:

* ``iteration``: iterations completed when the annealing ran (it ran between row ``iteration`` and the next);
* ``kind``: ``"restart"`` (a chain from the current weights), ``"reinitialisation"`` (a chain from freshly drawn
  weights, after insufficient progress), or ``"initial"`` for the low-intensity pass before the first iteration;
* ``reason``: why, in words (``"stall: …"``, ``"λ = … ≥ lambda_bound = …"``, …);
* ``temperature``, ``scale``: Tⱼ (the chain's first temperature; it cools to Tⱼκᴷ⁻¹) and σⱼ of this annealing;
* ``moves``, ``accepted``: Metropolis steps made, and how many were accepted;
* ``loss_before``, ``loss_after``: E at the weights before, and at the weights loaded after (≤ before)."""


@dataclasses.dataclass(frozen=True)
class AnnealingRestarts:
    """When and how :func:`moller_scg.fit` restarts SCG by simulated annealing (see the module docstring).

    Attributes:
        window: W, the iterations over which the loss must fall by more than ``rel_tol`` of itself.
        rel_tol: the relative decrease over ``window`` iterations below which SCG counts as stalled (≥ 0).
        lambda_bound: restart once λ ≥ this (0 < bound ≤ ``LAMBDA_MAX``): the steps have become tiny.
        perturbations: K, the Metropolis steps of one restart (each one loss pass).
        temperature: T₀ > 0, the temperature of the first restart, in units of the loss: a move that raises the
            loss by T₀ is accepted with probability 1/e. A few percent of the loss at a stall is a fair start.
        decay: ρ ∈ (0, 1], the factor by which the temperature and the perturbation size shrink per restart.
        scale: σ₀ > 0, the standard deviation of each weight's perturbation at the first restart, in weight units.
        max_restarts: how many restarts at most (≥ 0); after them ``fit`` stops by its usual rules.
        seed: seeds the annealing's own ``torch.Generator`` (0 ≤ seed < 2⁶⁴).
        initial_perturbations: K₀ Metropolis steps at (T₀, σ₀) from the initial weights before the first SCG
            iteration, SAGRAD's low-intensity initialisation; 0 (default) skips it. It does not count as a restart.
        cooling: κ ∈ (0, 1], the factor by which the temperature falls at every move of a chain: move i = 0, 1, …
            of restart j runs at Tⱼκⁱ (SAGRAD's annealing cools within a chain). 1 is a fixed-temperature chain.
        reinit_progress: when the loss fell by less than this fraction of itself over the iterations since the
            latest (re)start, SAGRAD's "insufficient progress", a due restart re-initialises instead: the chain
            starts from freshly drawn weights (each tensor i.i.d. N(0, s²), s the root mean square of that tensor
            at the start of the run) and its best point replaces the current weights only if it is better. 0
            (default) never re-initialises.
    """

    window: int = 20
    rel_tol: float = 1e-3
    lambda_bound: float = 1e10
    perturbations: int = 20
    temperature: float = 0.05
    decay: float = 0.5
    scale: float = 0.1
    max_restarts: int = 5
    seed: int = 0
    initial_perturbations: int = 0
    cooling: float = 0.9
    reinit_progress: float = 0.0

    def __post_init__(self) -> None:
        _check_int("window", self.window, minimum=1)
        _check_real("rel_tol", self.rel_tol, "a finite number ≥ 0", lambda x: 0.0 <= x < math.inf)
        _check_real(
            "lambda_bound",
            self.lambda_bound,
            f"a number with 0 < lambda_bound ≤ LAMBDA_MAX = {LAMBDA_MAX:g}",
            lambda x: 0.0 < x <= LAMBDA_MAX,
        )
        _check_int("perturbations", self.perturbations, minimum=1)
        _check_real("temperature", self.temperature, "a finite number > 0", lambda x: 0.0 < x < math.inf)
        _check_real("decay", self.decay, "a number with 0 < decay ≤ 1", lambda x: 0.0 < x <= 1.0)
        _check_real("scale", self.scale, "a finite number > 0", lambda x: 0.0 < x < math.inf)
        _check_int("max_restarts", self.max_restarts, minimum=0)
        _check_int("seed", self.seed, minimum=0, maximum=2**64 - 1)
        _check_int("initial_perturbations", self.initial_perturbations, minimum=0)
        _check_real("cooling", self.cooling, "a number with 0 < cooling ≤ 1", lambda x: 0.0 < x <= 1.0)
        _check_real(
            "reinit_progress", self.reinit_progress, "a number with 0 ≤ reinit_progress < 1", lambda x: 0.0 <= x < 1.0
        )

    def temperature_at(self, restart: int) -> float:
        """Tⱼ = T₀ ρʲ, the temperature of restart j = 0, 1, …"""
        return self.temperature * self.decay**restart

    def scale_at(self, restart: int) -> float:
        """σⱼ = σ₀ ρʲ, the perturbation size of restart j = 0, 1, …"""
        return self.scale * self.decay**restart


@dataclasses.dataclass(frozen=True)
class WalkResult:
    """What one Metropolis chain did: E at its start and at the best point it visited, and its accepted moves."""

    loss_before: float
    loss_after: float
    moves: int
    accepted: int


@torch.no_grad()
def metropolis_walk(
    params: Sequence[torch.Tensor],
    loss: Callable[[], Any],
    *,
    moves: int,
    temperature: float,
    scale: float,
    generator: torch.Generator,
    cooling: float = 1.0,
) -> WalkResult:
    """Run K = ``moves`` Metropolis steps from the weights ``params`` hold and leave them at the best point visited.

    Step i = 0, 1, …, K − 1 draws w' = wᵢ + σξ with ξ ~ N(0, I) and accepts it with probability
    min(1, exp(−(E(w') − E(wᵢ))/Tᵢ)), Tᵢ = Tκⁱ; a non-finite E(w') is rejected. Afterwards ``params`` hold argmin E
    over the chain, start included, written in place (every parameter's version changes, even when the start was
    the best).

    Args:
        params: the weights w, perturbed and finally set in place.
        loss: evaluates E at the weights ``params`` hold (a number or a one-element tensor); called K + 1 times.
        moves: K ≥ 1.
        temperature: T > 0, in units of the loss: the temperature of the first step.
        scale: σ > 0, the standard deviation of each weight's perturbation.
        generator: a CPU ``torch.Generator``; each step draws the normals for all weights (in order), then one
            uniform.
        cooling: κ ∈ (0, 1], the temperature's factor per step (1: a fixed temperature).

    Returns:
        E at the start and at the weights left in ``params``, K, and the number of accepted moves.
    """
    params = list(params)
    start = vec.clone(params)
    current_loss = best_loss = loss_before = float(loss())
    current, best = start, start
    accepted = 0
    for move in range(moves):
        noise = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
        uniform = float(torch.rand((), generator=generator, dtype=torch.float64))
        candidate = [w + scale * xi for w, xi in zip(current, noise)]
        vec.copy_(params, candidate)
        candidate_loss = float(loss())
        if not _metropolis_accepts(candidate_loss, current_loss, temperature * cooling**move, uniform):
            continue
        current, current_loss = candidate, candidate_loss
        accepted += 1
        if candidate_loss < best_loss:
            best, best_loss = candidate, candidate_loss
    vec.copy_(params, best)
    return WalkResult(loss_before=loss_before, loss_after=best_loss, moves=moves, accepted=accepted)


def _metropolis_accepts(candidate: float, current: float, temperature: float, uniform: float) -> bool:
    """The Metropolis rule: downhill always, uphill by ΔE with probability exp(−ΔE/T); never a non-finite loss."""
    if not math.isfinite(candidate):
        return False
    increase = candidate - current
    return increase <= 0.0 or uniform < math.exp(-increase / temperature)


class Annealer:
    """The annealing of one :func:`moller_scg.fit` run: decides when to restart, runs the chain, restarts SCG.

    What it remembers between iterations is its generator; ``pending``, the reason of a restart decided after
    the latest iteration and made before the next (so that a checkpoint written in between holds consistent weights
    and SCG state), and whether it re-initialises (``reinitialise_pending``); and the scales of a re-initialisation
    (``initial_scales``, measured when the run started). All are in :meth:`state_dict`. Everything else is derived
    from the History.

    Args:
        config: the :class:`AnnealingRestarts` settings.
        optimizer: the run's :class:`~moller_scg.SCG`; its parameters are the weights perturbed.
        loss: the loss-only pass E(w) at the weights the parameters hold.
    """

    def __init__(self, config: AnnealingRestarts, optimizer: SCG, loss: Callable[[], Any]) -> None:
        self.config = config
        self.optimizer = optimizer
        self.loss = loss
        self.generator = torch.Generator().manual_seed(config.seed)
        self.pending: str | None = None
        self.reinitialise_pending = False
        self.initial_scales = [float(p.detach().pow(2).mean().sqrt()) if p.numel() else 0.0 for p in self._params()]
        """s per parameter tensor, the root mean square of its weights when the run started: the scale of a
        re-initialisation's fresh draw."""

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ----------------------------------------------------------------------------------------------------------
    # Deciding

    @staticmethod
    def since(history: History) -> int:
        """The rows recorded before the latest annealing; the stall rules look only at the rows after them."""
        return history.restarts[-1]["iteration"] if history.restarts else 0

    @staticmethod
    def restarts_done(history: History) -> int:
        """Restarts made so far, re-initialisations included (the initial pass is not one)."""
        return sum(event["kind"] in (RESTART, REINITIALISATION) for event in history.restarts)

    def decide(self, history: History, fit_stop: str | None) -> str | None:
        """After an iteration: the reason to restart before the next one, or ``None``; also kept in ``pending``.

        Args:
            history: the run so far, the latest iteration included.
            fit_stop: what ``fit``'s own rules say after that iteration: ``None``, ``"stalled"``, or
                ``"zero_gradient"`` (a stationary point without ``min_grad``). Other stops are final.
        """
        self.pending = self._restart_reason(history, fit_stop)
        self.reinitialise_pending = self.pending is not None and self._insufficient_progress(history)
        return self.pending

    def _insufficient_progress(self, history: History) -> bool:
        """Whether the loss fell by less than ``reinit_progress`` of itself since the latest (re)start."""
        losses = history["loss"][self.since(history) :]
        first, now = losses[0], losses[-1]
        return first - now < self.config.reinit_progress * abs(first)

    def _restart_reason(self, history: History, fit_stop: str | None) -> str | None:
        config = self.config
        if self.restarts_done(history) >= config.max_restarts:
            return None
        losses = history["loss"][self.since(history) :]
        if not losses:
            return None
        lambd = history.last["lambd"]
        if lambd >= config.lambda_bound:
            return f"λ = {lambd:.3g} ≥ lambda_bound = {config.lambda_bound:.3g}"
        if len(losses) > config.window:
            before, now = losses[-1 - config.window], losses[-1]
            if before - now <= config.rel_tol * abs(before):
                return (
                    f"stall: the loss went from {before:.6g} to {now:.6g} over the last {config.window} iterations, "
                    f"a decrease of at most rel_tol = {config.rel_tol:g} of it"
                )
        if fit_stop == "stalled":
            return "stall: fit's stall rule fired (no decrease for max_stall iterations, or λ at LAMBDA_MAX)"
        if fit_stop == "zero_gradient":
            return "zero gradient: SCG reached a stationary point"
        return None

    # ----------------------------------------------------------------------------------------------------------
    # Annealing

    def before_iteration(self, history: History) -> bool:
        """Run the pending restart, or the initial pass before the first iteration; whether the weights were set."""
        if self.pending is not None:
            restart = self.restarts_done(history)
            if self.reinitialise_pending:
                reason = f"{self.pending}; insufficient progress (less than reinit_progress = "
                reason += f"{self.config.reinit_progress:g} of the loss since the latest start): re-initialised"
                self._anneal(history, REINITIALISATION, reason, restart, self.config.perturbations)
            else:
                self._anneal(history, RESTART, self.pending, restart, self.config.perturbations)
            self.pending, self.reinitialise_pending = None, False
            return True
        if not len(history) and not history.restarts and self.config.initial_perturbations:
            self._anneal(history, INITIAL, "initial low-intensity pass", 0, self.config.initial_perturbations)
            return True
        return False

    def _anneal(self, history: History, kind: str, reason: str, restart: int, moves: int) -> None:
        temperature, scale = self.config.temperature_at(restart), self.config.scale_at(restart)
        params = self._params()
        # A chain cut short (Ctrl-C, an error in the loss) leaves the weights and the generator as they were before
        # it, not at a random candidate: the run stops at an accepted point, and a resume draws the same chain.
        with torch.no_grad():
            start = vec.clone(params)
        generator_state = self.generator.get_state()
        try:
            if kind == REINITIALISATION:
                result = self._reinitialise(params, moves, temperature, scale)
            else:
                result = self._walk(params, moves, temperature, scale)
        except BaseException:
            with torch.no_grad():
                vec.copy_(params, start)
            self.generator.set_state(generator_state)
            raise
        _restart_scg(self.optimizer)
        event = {
            "iteration": len(history),
            "kind": kind,
            "reason": reason,
            "temperature": temperature,
            "scale": scale,
            "moves": result.moves,
            "accepted": result.accepted,
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
        }
        history.restarts.append(event)
        logger.info(
            "annealing %s after %d iterations (%s): T = %.3g, σ = %.3g, %d of %d moves accepted, loss %.6g → %.6g",
            kind,
            len(history),
            reason,
            temperature,
            scale,
            result.accepted,
            result.moves,
            result.loss_before,
            result.loss_after,
        )

    def _walk(self, params: list[torch.Tensor], moves: int, temperature: float, scale: float) -> WalkResult:
        """The annealing chain from the weights the parameters hold, with this annealer's generator and cooling."""
        return metropolis_walk(
            params,
            self.loss,
            moves=moves,
            temperature=temperature,
            scale=scale,
            generator=self.generator,
            cooling=self.config.cooling,
        )

    @torch.no_grad()
    def _reinitialise(self, params: list[torch.Tensor], moves: int, temperature: float, scale: float) -> WalkResult:
        """A chain from fresh weights wᵢ ~ N(0, sᵢ²); its best point replaces the current weights if it is better.

        Keeping the current weights when the fresh chain found nothing better is what keeps the best weights of
        the run: ``fit`` restores nothing at its end. Costs K + 2 loss passes.
        """
        current = vec.clone(params)
        current_loss = float(self.loss())
        for param, initial_scale in zip(params, self.initial_scales):
            fresh = torch.randn(param.shape, generator=self.generator, dtype=param.dtype)
            param.copy_(fresh.mul_(initial_scale).to(param.device))
        chain = self._walk(params, moves, temperature, scale)
        if not chain.loss_after < current_loss:
            vec.copy_(params, current)
        loss_after = min(chain.loss_after, current_loss)
        return WalkResult(loss_before=current_loss, loss_after=loss_after, moves=moves, accepted=chain.accepted)

    # ----------------------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The generator's state, the pending restart and the settings: tensors and plain values only."""
        return {
            "generator": self.generator.get_state(),
            "pending": self.pending,
            "reinitialise_pending": self.reinitialise_pending,
            "initial_scales": list(self.initial_scales),
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: Any) -> None:
        """Continue from :meth:`state_dict`; a different ``config`` is allowed (it is logged).

        A state saved before re-initialisation existed has no ``reinitialise_pending`` (taken as ``False``) and no
        ``initial_scales`` (those measured when this annealer was made are kept)."""
        if not isinstance(state, dict) or not isinstance(state.get("generator"), torch.Tensor):
            raise ValueError(f"not an annealing state (a dict with a 'generator' state tensor): {state!r:.120}")
        pending = state.get("pending")
        if pending is not None and not isinstance(pending, str):
            raise ValueError(f"the annealing state's 'pending' must be a reason string or None, got {pending!r:.80}")
        saved_config = state.get("config")
        if saved_config != dataclasses.asdict(self.config):
            logger.warning("resuming with other annealing settings than the checkpoint's: %s", saved_config)
        reinitialise_pending = state.get("reinitialise_pending", False)
        if not isinstance(reinitialise_pending, bool):
            raise ValueError(
                f"the annealing state's 'reinitialise_pending' must be a bool, got {reinitialise_pending!r:.80}"
            )
        scales = state.get("initial_scales", self.initial_scales)
        if not isinstance(scales, list) or len(scales) != len(self.initial_scales):
            raise ValueError(
                f"the annealing state's 'initial_scales' must be a list of {len(self.initial_scales)} numbers (one per "
                f"parameter tensor), got {scales!r:.120}"
            )
        self.generator.set_state(state["generator"])
        self.pending = pending
        self.reinitialise_pending = reinitialise_pending
        self.initial_scales = [float(scale) for scale in scales]


def _restart_scg(optimizer: SCG) -> None:
    """Make the next ``SCG.step`` start again at step 1 from the weights the parameters now hold."""
    optimizer.restart()


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"AnnealingRestarts.{name} must be an int, got {type(value).__name__}: {value!r:.80}")
    # int(value) > maximum: typeshed's numbers.Integral has < and <= but no >, and int's > does not take it
    if value < minimum or (maximum is not None and int(value) > maximum):
        bound = f"≥ {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"Invalid AnnealingRestarts.{name} value: {value!r}; it must be an int {bound}")


def _check_real(name: str, value: Any, valid: str, accepts: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"AnnealingRestarts.{name} must be a number, got {type(value).__name__}: {value!r:.80}")
    if not accepts(float(value)):
        raise ValueError(f"Invalid AnnealingRestarts.{name} value: {value!r}; it must be {valid}")
