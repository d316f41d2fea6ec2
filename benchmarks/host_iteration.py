"""SCG's secant iteration written out in one function over the library's own storage, for measurement (lever 60).

Lever 35's lean step (``benchmarks/lean_step.py``) spends less own work than ``SCG(params, memory=m)`` on the
logistic problem of ``benchmarks/peers.py``, where a gradient pass takes about a millisecond. It differs from the
library in two ways at once: its vectors and pairs are rows of one NumPy array of its own (with its own bits and no
``state_dict``), and a step runs through one function instead of the library's pieces (``trial_at``,
``next_direction``, the storage's methods). Which of the two is its lead?

:class:`HostIterationSCG` keeps the first and changes the second: it is ``SCG`` with steps 2–9 written out in one
method for the steps that need nothing but the flat float64 rows and the secant pairs the library already keeps in
NumPy (``FlatBuffers.host_rows``, ``SecantPairs.on_host``): a step with pairs held after an accepted trial
(δ = μ), or any step after a rejected one (δ kept). It calls the same operations in the same order on the same
objects, so it takes the same steps bit for bit (:func:`same_bits` checks it on the race's small problems), and
``state_dict``, resumes and the trace are the library's. Every other step (the first, a restart's finite
difference, the steepest-descent fallback, r = 0) is left to ``SCG._iterate``.

Usage:
    python benchmarks/host_iteration.py                      # the bit check, then own work before each of 9
        # evaluations, 32 MiB evicted before each: SCG, this variant, the lean step and LBFGS history 20
    python benchmarks/host_iteration.py --diagonal-scaling   # the same with H₀ = γ_D Λ in the SCG rows
    python benchmarks/host_iteration.py --cold-caches 0      # warm
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

import torch
from common import environment
from lean_step import LeanSCG
from peers_adapters import torch_lbfgs

from moller_scg import SCG, step_arithmetic
from moller_scg import _vectors as vec
from moller_scg.objective import Objective
from moller_scg.scg import (
    GOOD_COMPARISON,
    MAX_NON_FINITE_TRIALS,
    NON_FINITE_COMPARISON,
    POOR_COMPARISON,
    SECANT_LAMBDA_DECREASE_FACTOR,
)
from moller_scg.scg_objective import EvaluationTally, evaluate_loss_first
from moller_scg.scg_state import LAMBDA_MAX, make_trace


class HostIterationSCG(SCG):
    """``SCG`` whose steps on the flat float64 NumPy rows run through :meth:`_iterate_on_host_rows` (module
    docstring); the same steps as ``SCG`` bit for bit."""

    def _iterate(
        self, objective: Objective, params: list[torch.Tensor], accepted: list[torch.Tensor], tally: EvaluationTally
    ) -> None:
        if not self._iterate_on_host_rows(objective, params, accepted, tally):
            super()._iterate(objective, params, accepted, tally)

    def _iterate_on_host_rows(
        self, objective: Objective, params: list[torch.Tensor], accepted: list[torch.Tensor], tally: EvaluationTally
    ) -> bool:
        """Steps 2–9 of a step that needs only the host rows and pairs; ``False`` (nothing done) for any other."""
        storage, pairs, scalars = self._storage, self._secant_pairs, self._scalars
        flat = storage.flat
        group = self.param_groups[0]
        success = scalars.success
        if (
            flat is None
            or flat.host_rows is None
            or pairs is None
            or not pairs.on_host
            or group["hvp"] != "secant"
            or scalars.k == 0  # the first step takes LBFGS's α₀
            or (success and not pairs.slots)  # after a restart: Møller's finite difference
        ):
            return False
        residual_sq, mu, direction_sq = storage.products([flat.residual], [flat.direction])
        if not (mu > 0.0 and mu * mu != 0.0 and residual_sq != 0.0):
            return False  # the steepest-descent fallback, or w stationary
        # Step 2: δ = μ from the quasi-Newton model (p = H r), or δ of the rejected trial.
        delta = mu if success else scalars.delta
        # Steps 3 and 4: δ scaled by λ and made positive; step 5: α = μ/δ.
        lambd, lambd_bar = scalars.lambd, scalars.lambd_bar
        delta, lambd, lambd_bar = step_arithmetic.scaled_curvature(delta, lambd, lambd_bar, direction_sq)
        alpha = mu / delta
        # Step 6: the trial point w + αp, its loss first, r₊ = −E'(w + αp) only if the loss does not reject it.
        vec.add_(params, flat.direction_views, alpha)
        loss = scalars.loss
        trial_loss, trial_gradient = evaluate_loss_first(objective)
        rows = flat.host_rows  # y, p, r₊, r
        prepared = None
        new_residual_sq = math.nan
        if not trial_loss <= loss:  # rejected on its loss alone (Δ < 0, or not finite)
            finite = math.isfinite(trial_loss)
            comparison = 2.0 * delta * (loss - trial_loss) / mu**2 if finite else math.nan
        else:
            vec.copy_(flat.new_residual_views, trial_gradient())
            flat.new_residual.neg_()
            prepared = pairs.prepare_advance(rows)  # y = r − r₊ and every product of the step
            _, new_dot_direction, new_residual_sq, new_dot_old = prepared.gram[2].tolist()
            finite = math.isfinite(trial_loss) and step_arithmetic.all_finite_given_squared_norm(
                [flat.new_residual], new_residual_sq
            )
            comparison = math.nan
            if finite:
                unchanged = trial_loss == loss and new_residual_sq == new_dot_old == residual_sq
                decrease = step_arithmetic.loss_decrease(
                    loss,
                    trial_loss,
                    alpha,
                    mu,
                    new_dot_direction,
                    step_arithmetic.loss_epsilon(params),
                    unchanged=unchanged,
                )
                comparison = 2.0 * delta * decrease / mu**2  # Δ
        # Step 7: accept (p₊ = H r₊ with the pair (αp, y) kept, or p₊ = r₊ at a restart) or reject.
        scalars.k += 1
        if finite and comparison >= 0.0:
            period = group["restart"] if group["restart"] is not None else flat.layout.size
            if scalars.k % period == 0:
                flat.direction.copy_(flat.new_residual)
                pairs.clear()
                pairs.observe_flat(flat.new_residual)
                new_direction_sq = new_mu = new_residual_sq
            else:
                pairs.advance_flat(flat.pair_rows, alpha, flat.residual, prepared)
                new_direction_sq, new_mu = (rows[1:3] @ rows[1]).tolist()  # |p₊|², p₊ᵀr₊
            flat.residual.copy_(flat.new_residual)  # r ← r₊
            held = (new_residual_sq, new_mu, new_direction_sq)
            scalars.loss = trial_loss
            lambd_bar = 0.0
            success = True
            if comparison >= GOOD_COMPARISON:
                lambd = lambd / SECANT_LAMBDA_DECREASE_FACTOR
            scalars.non_finite_trials = 0
        else:
            vec.copy_(params, accepted)
            held = (residual_sq, mu, direction_sq)
            lambd_bar = lambd
            success = False
            scalars.non_finite_trials = 0 if finite else scalars.non_finite_trials + 1
        # Step 8: raise λ when the quadratic model was poor.
        effective_comparison = comparison if finite else NON_FINITE_COMPARISON
        if effective_comparison < POOR_COMPARISON:
            lambd = min(lambd + delta * (1.0 - effective_comparison) / direction_sq, LAMBDA_MAX)
        scalars.lambd, scalars.lambd_bar, scalars.delta, scalars.success = lambd, lambd_bar, delta, success
        storage.remember_products(self.state, params, held)
        self._trace = make_trace(
            scalars,
            tally.totals(scalars),
            held[0],
            held[2],
            comparison=comparison,
            mu=mu,
            alpha=alpha,
            success=success,
        )
        if scalars.non_finite_trials >= MAX_NON_FINITE_TRIALS:
            raise step_arithmetic.non_finite_trials_error(scalars.non_finite_trials, trial_loss)
        return True


def same_bits(problem_name: str, diagonal_scaling: bool, steps: int, restart: int | None = None) -> tuple[bool, int]:
    """(whether ``SCG(memory=20)`` and :class:`HostIterationSCG` gave the same trace and weights bit for bit after each
    of ``steps`` steps on the race's problem, the rejected trials among them)."""
    from peers_problems import PROBLEMS, make_accumulator

    problem = PROBLEMS[problem_name](True, 0)
    traces, weights = [], []
    for kind in (SCG, HostIterationSCG):
        model = problem.make_model()
        accumulator = make_accumulator(problem, model)
        optimizer = kind(list(model.parameters()), memory=20, diagonal_scaling=diagonal_scaling, restart=restart)
        run = []
        for _ in range(steps):
            optimizer.step(accumulator)
            run.append(optimizer.trace)
        traces.append(run)
        weights.append([p.detach().clone() for p in model.parameters()])
    identical = all(_same(a, b) for a, b in zip(*traces)) and all(torch.equal(a, b) for a, b in zip(*weights))
    return identical, sum(not trace.success for trace in traces[0])


def _same(a: Any, b: Any) -> bool:
    """Whether two traces hold the same numbers, NaN equal to NaN."""
    return all(x == y or (x != x and y != y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))


def rows(diagonal_scaling: bool) -> dict[str, Any]:
    """The own-work table's rows: the library's mode, this variant, the lean step and LBFGS history 20."""
    mode = ", diagonal" if diagonal_scaling else ""
    return {
        f"SCG(memory=20{mode})": lambda params: SCG(params, memory=20, diagonal_scaling=diagonal_scaling),
        f"host iteration{mode}": lambda params: HostIterationSCG(params, memory=20, diagonal_scaling=diagonal_scaling),
        f"lean SCG(memory=20{mode})": lambda params: LeanSCG(
            params, memory=20, diagonal_scaling=diagonal_scaling, parameters_apart=True
        ),
        "torch LBFGS(h=20)": lambda params: torch_lbfgs(params, 20),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="logistic")
    parser.add_argument("--evaluations", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--cold-caches", type=int, default=32, metavar="MIB")
    parser.add_argument("--diagonal-scaling", action="store_true", help="the diagonal H₀ in the SCG rows")
    parser.add_argument("--check-steps", type=int, default=150, help="steps of the bit check on each problem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from own_work import print_rows_before_each_evaluation

    env = environment(" ".join(["python benchmarks/host_iteration.py", *(sys.argv[1:] if argv is None else argv)]))
    print(f"torch {env['torch']}, 1 thread, {env['date']}; {env['command']}")
    for problem_name in ("logistic", "regression"):
        for restart in (None, 37):
            identical, rejected = same_bits(problem_name, args.diagonal_scaling, args.check_steps, restart)
            print(
                f"{problem_name}, restart={restart}: {args.check_steps} steps ({rejected} rejected) "
                f"{'bit for bit' if identical else 'NOT bit for bit'} SCG's"
            )
    print_rows_before_each_evaluation(
        args.problem, rows(args.diagonal_scaling), args.evaluations, args.repeats, args.cold_caches, label_width=32
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
