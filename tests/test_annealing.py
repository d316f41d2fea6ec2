"""SAGRAD-style annealing restarts: escaping a poor minimum, the record of each restart, best weights never lost,
the Metropolis chain against a plain reference, settings validation, and checkpoint/resume bit-identity."""

from __future__ import annotations

import math

import pytest
import torch
from problems import regression_problem
from torch import nn

from moller_scg import SCG, History, fit
from moller_scg.annealing import (
    EVENT_KEYS,
    INITIAL,
    REINITIALISATION,
    RESTART,
    AnnealingRestarts,
    metropolis_walk,
)
from moller_scg.checkpoint import load_checkpoint

TILT = 0.3
"""E(w) = (w² − 1)² + 0.3 w: a poor local minimum at w ≈ 0.96 (E ≈ 0.294) and the global one at w ≈ −1.04."""
POOR_MINIMUM_LOSS = 0.29


class DoubleWell(nn.Module):
    """A one-weight "network" whose output is the double-well energy, whatever the input."""

    def __init__(self, start: float, tilt: float = TILT) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([start], dtype=torch.float64))
        self.tilt = tilt

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        w = self.w[0]
        return ((w**2 - 1) ** 2 + self.tilt * w).expand(inputs.shape[0])


def energy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.mean()


WELL_DATA = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
ESCAPING = AnnealingRestarts(window=5, temperature=0.5, scale=1.0, perturbations=10, max_restarts=3, seed=0)


def fit_well(model: nn.Module, annealing: AnnealingRestarts | None = None, **options) -> History:
    # The scenarios are Møller's SCG's stalls (fit's default is SCG(memory=20) with the H₀ its preconditioner
    # chooses, the diagonal one for this energy, whose λ reaches the bound first).
    options.setdefault("optimizer", SCG(model.parameters()))
    options.setdefault("max_iter", 60)
    return fit(model, energy, WELL_DATA, reduction="mean", batch_size=4, progress=False, annealing=annealing, **options)


# Restarts after every 3 iterations that gain less than 20 %: many restarts in a short run.
FREQUENT = AnnealingRestarts(window=3, rel_tol=0.2, temperature=0.01, scale=0.05, perturbations=4, max_restarts=6)


def fit_regression(model: nn.Module, data, **options) -> History:
    options.setdefault("optimizer", SCG(model.parameters()))
    options.setdefault("max_iter", 40)
    return fit(model, nn.MSELoss(), data, batch_size=16, progress=False, annealing=FREQUENT, **options)


# --------------------------------------------------------------------------------------------------------------
# Escaping, recording, never losing the best


def test_restarts_escape_the_poor_minimum_that_plain_scg_stays_in():
    plain_model, annealed_model = DoubleWell(2.0), DoubleWell(2.0)
    plain = fit_well(plain_model)
    annealed = fit_well(annealed_model, ESCAPING)
    assert plain["loss"][-1] > POOR_MINIMUM_LOSS and plain_model.w.item() > 0  # stuck in the right-hand well
    assert annealed["loss"][-1] < -0.3 and annealed_model.w.item() < 0  # the global minimum, E ≈ −0.3054
    assert len(annealed) <= 60 and annealed.restarts[0]["loss_after"] < 0

    again = fit_well(DoubleWell(2.0), ESCAPING)
    assert again.columns["loss"] == annealed.columns["loss"] and again.restarts == annealed.restarts


def test_every_restart_is_recorded_with_its_reason_and_temperature():
    history = fit_well(DoubleWell(2.0), ESCAPING)
    assert len(history.restarts) == ESCAPING.max_restarts
    for j, event in enumerate(history.restarts):
        assert tuple(event) == EVENT_KEYS
        assert event["kind"] == RESTART and event["reason"].startswith("stall: the loss went from")
        assert event["temperature"] == ESCAPING.temperature * ESCAPING.decay**j
        assert event["scale"] == ESCAPING.scale * ESCAPING.decay**j
        assert event["moves"] == ESCAPING.perturbations and 0 <= event["accepted"] <= event["moves"]
        assert event["loss_after"] <= event["loss_before"]
        assert event["loss_before"] == history["loss"][event["iteration"] - 1]
    iterations = [event["iteration"] for event in history.restarts]
    assert iterations == sorted(iterations) and all(b - a > ESCAPING.window for a, b in zip(iterations, iterations[1:]))


def test_best_weights_are_never_lost(regression):
    model, data = regression
    history = fit_regression(model, data, max_iter=60)
    assert len(history.restarts) == FREQUENT.max_restarts
    losses = history["loss"]
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))  # SCG is monotone, so is the chain
    best_seen = min(losses + [event["loss_after"] for event in history.restarts])
    with torch.no_grad():
        final = float(nn.MSELoss()(model(data[0]), data[1]))
    assert final <= best_seen * (1 + 1e-12)
    assert all(event["accepted"] > 0 for event in history.restarts)  # the chains did wander


def test_lambda_bound_triggers_a_restart():
    config = AnnealingRestarts(window=1000, lambda_bound=1e-3, max_restarts=1, temperature=0.5, scale=1.0)
    history = fit_well(DoubleWell(2.0), config)
    (event,) = history.restarts
    assert event["reason"].startswith("λ = ") and "≥ lambda_bound = 0.001" in event["reason"]
    assert history["lambd"][event["iteration"] - 1] >= 1e-3


def test_a_zero_gradient_restarts_instead_of_stopping_unless_min_grad_is_given():
    untilted = dict(tilt=0.0)  # w = 0 is a local maximum of (w² − 1)² with E'(0) = 0 exactly
    stuck = fit_well(DoubleWell(0.0, **untilted))
    assert stuck.stop_reason == "min_grad" and len(stuck) == 1 and stuck["loss"][-1] == 1.0

    config = AnnealingRestarts(temperature=0.1, scale=0.5, max_restarts=2)
    history = fit_well(DoubleWell(0.0, **untilted), config, goal=1e-20)
    assert history.restarts[0]["reason"].startswith("zero gradient") and history.restarts[0]["iteration"] == 1
    assert history.stop_reason == "goal" and history["loss"][-1] <= 1e-20

    asked = fit_well(DoubleWell(0.0, **untilted), config, min_grad=1e-8)
    assert asked.stop_reason == "min_grad" and asked.restarts == []


def test_after_max_restarts_fit_stops_by_its_own_rules():
    config = AnnealingRestarts(window=5, temperature=0.5, scale=1.0, max_restarts=1)
    history = fit_well(DoubleWell(2.0), config, max_iter=500, max_stall=8)
    assert len(history.restarts) == 1 and history.stop_reason in ("stalled", "min_grad")
    assert len(history) < 500
    since = history.restarts[0]["iteration"]
    assert len(history) - since > 8  # the stall is counted from the restart on


def test_the_initial_low_intensity_pass_runs_before_the_first_iteration():
    config = AnnealingRestarts(initial_perturbations=5, temperature=0.5, scale=1.0, max_restarts=0)
    history = fit_well(DoubleWell(2.0), config, max_iter=3)
    (event,) = history.restarts
    assert event["kind"] == INITIAL and event["iteration"] == 0 and event["moves"] == 5
    assert event["loss_before"] == pytest.approx(9 + 2 * TILT) and event["loss_after"] <= event["loss_before"]
    assert history["loss"][0] <= event["loss_after"]


def test_insufficient_progress_reinitialises_from_fresh_weights_at_the_initial_scale():
    # From w = 2 SCG falls into the poor well (E ≈ 0.294): a 97 % decrease, short of reinit_progress = 99.9 %, so
    # the restart re-initialises: w ~ N(0, 2²) (2 = the RMS of the initial weights), then the cooled chain.
    config = AnnealingRestarts(
        window=5, temperature=0.5, scale=1.0, perturbations=10, max_restarts=1, reinit_progress=0.999, seed=4
    )
    history = fit_well(DoubleWell(2.0), config)
    (event,) = history.restarts
    assert event["kind"] == REINITIALISATION and "insufficient progress" in event["reason"]
    assert event["loss_before"] == history["loss"][event["iteration"] - 1]

    generator = torch.Generator().manual_seed(4)
    fresh = float(torch.randn(1, generator=generator, dtype=torch.float64)) * 2.0
    _, best_e, accepted = reference_walk(
        [fresh], lambda w: (w[0] ** 2 - 1) ** 2 + TILT * w[0], 10, 0.5, 1.0, generator, cooling=config.cooling
    )
    assert event["accepted"] == accepted
    assert event["loss_after"] == pytest.approx(min(best_e, event["loss_before"]), abs=1e-15)
    assert event["loss_after"] < 0  # this draw found the lower well
    assert history["loss"][-1] < -0.3


def test_a_reinitialisation_that_finds_nothing_better_keeps_the_current_weights():
    # Started in the global minimum, SCG makes no progress; no fresh chain beats E ≈ −0.305.
    config = AnnealingRestarts(window=3, temperature=0.01, scale=0.1, max_restarts=2, reinit_progress=0.5)
    model = DoubleWell(-1.0375)
    history = fit_well(model, config, max_iter=30)
    assert [event["kind"] for event in history.restarts] == [REINITIALISATION] * 2
    for event in history.restarts:
        assert event["loss_after"] == event["loss_before"]
    assert model.w.item() == pytest.approx(-1.0375, abs=1e-2) and history["loss"][-1] < -0.305


def test_annealing_is_off_by_default_and_then_changes_nothing(regression):
    model, data = regression
    history = fit(model, nn.MSELoss(), data, batch_size=16, max_iter=10, progress=False)
    assert history.restarts == []


# --------------------------------------------------------------------------------------------------------------
# The Metropolis chain


def reference_walk(
    start: list[float], energy_fn, moves: int, temperature: float, scale: float, seed, cooling: float = 1.0
):
    """The chain written out in plain Python floats, drawing the same numbers from the same generator (or from a
    new one seeded with ``seed``); step i runs at temperature · coolingⁱ."""
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    current, current_e = list(start), energy_fn(start)
    best, best_e, accepted = list(start), current_e, 0
    for i in range(moves):
        xi = torch.randn(len(start), generator=generator, dtype=torch.float64).tolist()
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        candidate = [c + scale * x for c, x in zip(current, xi)]
        e = energy_fn(candidate)
        if e - current_e <= 0 or u < math.exp(-(e - current_e) / (temperature * cooling**i)):
            current, current_e, accepted = candidate, e, accepted + 1
            if e < best_e:
                best, best_e = candidate, e
    return best, best_e, accepted


@pytest.mark.parametrize("cooling", [1.0, 0.8])
@pytest.mark.parametrize("temperature", [1e-3, 0.3, 30.0])
def test_metropolis_walk_matches_a_plain_reference(temperature, cooling):
    def energy_fn(w):
        return (w[0] ** 2 - 1) ** 2 + (w[1] - 0.5) ** 2 + 0.3 * w[0]

    w = torch.tensor([0.8, -0.4], dtype=torch.float64)
    result = metropolis_walk(
        [w],
        lambda: energy_fn(w.tolist()),
        moves=50,
        temperature=temperature,
        scale=0.7,
        generator=torch.Generator().manual_seed(3),
        cooling=cooling,
    )
    best, best_e, accepted = reference_walk([0.8, -0.4], energy_fn, 50, temperature, 0.7, seed=3, cooling=cooling)
    assert w.tolist() == pytest.approx(best, abs=1e-15)
    assert result.loss_after == pytest.approx(best_e, abs=1e-15) and result.accepted == accepted
    assert result.loss_before == energy_fn([0.8, -0.4]) and result.loss_after <= result.loss_before


def test_cooling_accepts_fewer_uphill_moves_late_in_the_chain():
    # A bowl at T = 1: at a fixed temperature most moves are accepted; cooled by 0.5 per move, the temperature is
    # below 1e-3 after ten moves and the chain freezes.
    def accepted(cooling):
        w = torch.zeros(2, dtype=torch.float64)
        result = metropolis_walk(
            [w], lambda: float((w**2).sum()), moves=60, temperature=1.0, scale=0.3,
            generator=torch.Generator().manual_seed(0), cooling=cooling,
        )  # fmt: skip
        return result.accepted

    assert accepted(0.5) < 20 < accepted(1.0)


def test_metropolis_walk_rejects_non_finite_losses_and_keeps_the_start():
    w = torch.tensor([1.0, 2.0])
    calls = iter([1.0] + [math.nan, math.inf] * 5)
    result = metropolis_walk(
        [w], lambda: next(calls), moves=10, temperature=1e6, scale=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert result.accepted == 0 and result.loss_after == 1.0 and w.tolist() == [1.0, 2.0]


# --------------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"window": 0}, ValueError, "window value: 0"),
        ({"window": 2.5}, TypeError, "window must be an int, got float: 2.5"),
        ({"rel_tol": -1e-3}, ValueError, "rel_tol value: -0.001"),
        ({"rel_tol": math.inf}, ValueError, "rel_tol value: inf"),
        ({"lambda_bound": 0.0}, ValueError, "lambda_bound value: 0.0"),
        ({"lambda_bound": 1e101}, ValueError, "LAMBDA_MAX"),
        ({"perturbations": 0}, ValueError, "perturbations value: 0"),
        ({"temperature": 0.0}, ValueError, "temperature value: 0.0"),
        ({"temperature": math.nan}, ValueError, "temperature value: nan"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number, got str"),
        ({"decay": 0.0}, ValueError, "decay value: 0.0"),
        ({"decay": 1.5}, ValueError, "decay value: 1.5"),
        ({"scale": -1.0}, ValueError, "scale value: -1.0"),
        ({"max_restarts": -1}, ValueError, "max_restarts value: -1"),
        ({"max_restarts": True}, TypeError, "max_restarts must be an int, got bool"),
        ({"seed": -1}, ValueError, "seed value: -1"),
        ({"initial_perturbations": -2}, ValueError, "initial_perturbations value: -2"),
        ({"cooling": 0.0}, ValueError, "cooling value: 0.0"),
        ({"cooling": 1.1}, ValueError, "cooling value: 1.1"),
        ({"reinit_progress": 1.0}, ValueError, "reinit_progress value: 1.0"),
        ({"reinit_progress": -0.1}, ValueError, "reinit_progress value: -0.1"),
    ],
)
def test_bad_settings_are_refused_with_the_value_named(options, error, match):
    with pytest.raises(error, match=match):
        AnnealingRestarts(**options)


def test_fit_refuses_annealing_without_scg_or_of_the_wrong_type(regression):
    model, data = regression
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="LBFGS"):
        fit(model, nn.MSELoss(), data, batch_size=16, max_iter=2, optimizer=lbfgs, annealing=AnnealingRestarts())
    with pytest.raises(TypeError, match="annealing must be an AnnealingRestarts or None, got dict"):
        fit(model, nn.MSELoss(), data, batch_size=16, max_iter=2, annealing={"window": 5})


# --------------------------------------------------------------------------------------------------------------
# History and checkpoints


def test_restarts_round_trip_through_a_weights_only_dict(tmp_path):
    history = fit_well(DoubleWell(2.0), ESCAPING)
    path = tmp_path / "history.pt"
    torch.save(history.to_dict(), path)
    again = History.from_dict(torch.load(path, weights_only=True))
    assert again.restarts == history.restarts and again["loss"] == history["loss"]
    assert History.from_dict({"columns": history.to_dict()["columns"]}).restarts == []  # dicts from before annealing
    with pytest.raises(ValueError, match="restarts must be a list of dicts"):
        History.from_dict({"columns": history.to_dict()["columns"], "restarts": ["stall"]})


def test_a_run_resumed_without_annealing_keeps_the_restarts_in_its_checkpoint(tmp_path):
    path = tmp_path / "run.pt"

    def resumed(max_iter, **options):
        model, data = regression_problem()
        return fit(
            model,
            nn.MSELoss(),
            data,
            max_iter=max_iter,
            progress=False,
            batch_size=16,
            checkpoint=path,
            resume=True,
            preconditioner="scalar",  # γI's run plateaus twice in 60 iterations; K-FAC's H₀ does not plateau there
            **options,
        )

    first = resumed(60, annealing=AnnealingRestarts(window=5, rel_tol=0.05, max_restarts=3))
    assert len(first.restarts) == 2
    assert len(resumed(70).restarts) == 2
    assert load_checkpoint(path)["extra"]["restarts"] == first.restarts  # written without annealing too
    assert resumed(75).restarts == first.restarts


def test_a_chain_cut_short_by_ctrl_c_leaves_the_weights_where_it_found_them(monkeypatch):
    # A Ctrl-C (KeyboardInterrupt) in the third loss pass of the initial chain, after two candidates were written
    # into the model: fit stops as interrupted, and the model holds the weights it started from.
    from moller_scg import annealing

    walk = annealing.metropolis_walk

    def interrupted_walk(params, loss, **options):
        calls = []

        def loss_until_interrupted():
            calls.append(None)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return loss()

        return walk(params, loss_until_interrupted, **options)

    monkeypatch.setattr(annealing, "metropolis_walk", interrupted_walk)
    model, data = regression_problem()
    start = [p.detach().clone() for p in model.parameters()]
    config = AnnealingRestarts(initial_perturbations=5, scale=0.5)
    history = fit(model, nn.MSELoss(), data, max_iter=5, progress=False, annealing=config)
    assert history.stop_reason == "interrupted" and len(history) == 0 and not history.restarts
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_resume_with_annealing_ends_bit_identical(tmp_path):
    reference_model, data = regression_problem()
    reference = fit_regression(reference_model, data)
    restarts = [event["iteration"] for event in reference.restarts]
    assert len(restarts) >= 3

    # Stop right after the iteration that decided a restart (it is pending in the checkpoint), and elsewhere.
    for stop_at in (restarts[1], restarts[1] + 2):
        path = tmp_path / f"run{stop_at}.pt"
        model, data = regression_problem()
        first = fit_regression(model, data, checkpoint=path, callbacks=[lambda h, n=stop_at: len(h) == n])
        assert first.stop_reason == "callback" and len(first) == stop_at
        assert (load_checkpoint(path)["extra"]["annealing"]["pending"] is not None) == (stop_at in restarts)

        fresh_model, _ = regression_problem(seed=99)  # other initial weights: everything comes from the checkpoint
        resumed = fit_regression(fresh_model, data, checkpoint=path, resume=True)
        assert resumed.restarts == reference.restarts
        for name in ("loss", "lambd", "closure_calls", "hvp_calls", "residual_norm"):
            assert resumed[name] == reference[name], name
        for p, q in zip(fresh_model.parameters(), reference_model.parameters()):
            assert torch.equal(p, q)


def test_scg_starts_again_at_step_one_after_each_restart(regression):
    model, data = regression
    history = fit_regression(model, data)
    calls = history["closure_calls"]
    first_rows = {event["iteration"] for event in history.restarts}
    for row in range(1, len(history)):
        # Step 1 re-evaluates E(w) and r at the new weights: one closure call more than a plain step.
        assert calls[row] - calls[row - 1] == (2 if row in first_rows else 1)
