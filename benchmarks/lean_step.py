"""A lean SCG step, for measurement: ``SCG(params, memory=m)``'s algorithm in as few calls as it takes (lever 35).

On a model whose gradient pass takes about a millisecond (the logistic problem of ``benchmarks/peers.py``), SCG's own
work decides its time to the early targets, and with the CPU's caches cold — as after other work — every part of the
library's step slows alike (docs/performance.md, lever 34). Would a step that makes far fewer calls win there? Before
rewriting the library's step (and changing every trajectory's bits), this research variant answers it.

:class:`LeanSCG` runs the library's secant mode with H₀ = γI — δ = μ from the quasi-Newton model, the first step
LBFGS's α₀ = min(1, 1/|r₁|₁), Møller's λ, λ̄ and Δ with λ ÷ 2 after a good step, p = H r₊ from the compact form of
the last m pairs with γ = maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ, the same curvature condition, restart period and steepest-descent
fallback — on one NumPy array: the parameters become views of one flat tensor, and r, p, r₊, y and the m pairs are
rows of one ``(4 + 2m) × n`` array, so that every inner product a step needs is one matrix product and H r₊ one
more. With ``diagonal_scaling=True``, H₀ = γ_D Λ as in ``SCG(params, memory=m, diagonal_scaling=True)``: v and Λ
from the accepted gradients (:mod:`moller_scg.diagonal_scaling`'s rule and constants) and H r₊ by the form
:mod:`moller_scg.quasi_newton` derives for it. Left out (research variant, not the library): Møller's finite
difference for a step without pairs after the first (it takes α₀ again), the slopes' estimate of a decrease that
rounding drowns, λ's bound, a state dict, and any check of its input. Real parameters of one dtype on the CPU only.

Usage:
    python benchmarks/lean_step.py                 # own work before each of 9 evaluations, cold, beside SCG and LBFGS
    python benchmarks/lean_step.py --cold-caches 0 # the same warm
    python benchmarks/lean_step.py --plain-loop --problems logistic --repetitions 31 --out FILE   # a user's loop
    python benchmarks/lean_step.py --race --problems logistic --races 9 --out DIR    # peers.py's race, four rows
    python benchmarks/lean_step.py --race --default-lbfgs [...]   # and torch LBFGS without a line search (six rows)
    python benchmarks/lean_step.py --race --full-crowd [...]      # every row of peers.py's race and the lean one
    python benchmarks/lean_step.py --diagonal-scaling [...]     # each of the above with H₀ = γ_D Λ in the SCG rows
    python benchmarks/lean_step.py --pairs-from A.json [B.json ...] [--diagonal-scaling]  # the lean row against
        # the others, race by race, over every race of the saved --race runs
    python benchmarks/lean_step.py --as-optimizer [...]         # the lean rows behind torch.optim.Optimizer's step
    python benchmarks/lean_step.py --parameters-apart [...]     # own work: and the lean step with the parameters'
        # own storage, w written into them (lever 56)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import environment
from peers_adapters import USER_LOOP_MAX_ITER, torch_lbfgs
from scipy.linalg import blas, lapack

from moller_scg import SCG
from moller_scg.diagonal_scaling import BETA, EPSILON, power_into
from moller_scg.quasi_newton import CURVATURE_CONDITION
from moller_scg.scg import GOOD_COMPARISON, NON_FINITE_COMPARISON, POOR_COMPARISON, SECANT_LAMBDA_DECREASE_FACTOR
from moller_scg.step_arithmetic import scaled_curvature

Y, P, R_NEW, R = 0, 1, 2, 3
"""The rows of :attr:`LeanSCG.rows` that hold y = r − r₊, p, r₊ and r; the pairs' steps and changes follow."""


class LeanSCG:
    """``SCG(params, memory=m)`` (secant mode, H₀ = γI) with every vector a row of one NumPy array (module docstring).

    Args:
        params: real parameters of one dtype on the CPU; they become views of one flat tensor (unless
            ``parameters_apart``).
        memory: m ≥ 1.
        lambd: λ₁.
        parameters_apart: keep the parameters' own storage and write w into them after each change of w (one
            ``torch._foreach_copy_`` from views of w), instead of making them views of w (lever 56: what the views
            are worth).
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        memory: int = 20,
        lambd: float = 5e-7,
        diagonal_scaling: bool = False,
        parameters_apart: bool = False,
    ) -> None:
        self.params = list(params)
        self.memory = m = memory
        self.lambd_initial = lambd
        n = sum(p.numel() for p in self.params)
        flat = torch.empty(n, dtype=self.params[0].dtype)
        views = []
        offset = 0
        with torch.no_grad():
            for p in self.params:
                view = flat[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                views.append(view)
                if not parameters_apart:
                    p.data = view
                offset += p.numel()
        self._flat = flat
        self._views_of_w = views if parameters_apart else None
        self.w = flat.numpy()
        self.accepted = np.empty_like(self.w)
        self.rows = np.zeros((4 + 2 * m, n), dtype=self.w.dtype)
        self.pair_rows = self.rows[4:].reshape(2, m, n)  # [0]: the steps sᵢ, [1]: the changes yᵢ, by slot
        self.sy = np.zeros((m, m))  # sᵢᵀyⱼ by slot
        self.yy = np.zeros((m, m))  # yᵢᵀyⱼ by slot
        self.order: list[int] = []  # the slots held, oldest first
        # With diagonal scaling, H₀ = γ_D Λ: v ← βv + (1 − β)g² over the accepted gradients, Λ = 1/(v^κ + ε mean v^κ)
        # (moller_scg.diagonal_scaling's constants).
        self.second_moment = np.zeros(n, dtype=self.w.dtype) if diagonal_scaling else None
        self.diagonal = np.zeros(n, dtype=self.w.dtype) if diagonal_scaling else None
        self.started = False
        self.k = 0

    def step(self, objective: Any) -> torch.Tensor:
        """One iteration; the first call also evaluates E(w₁) and r₁ = p₁ = −E'(w₁)."""
        rows = self.rows
        if not self.started:
            self.loss = float(objective())
            self._gather_negated([p.grad for p in self.params], rows[R])
            rows[P] = rows[R]
            if self.second_moment is not None:
                np.multiply(rows[R], rows[R], out=self.second_moment)
                self.second_moment *= 1.0 - BETA
                self._form_diagonal()
            self.mu = self.direction_sq = float(rows[R] @ rows[R])
            self.lambd, self.lambd_bar, self.success, self.delta = self.lambd_initial, 0.0, True, 0.0
            self.order.clear()
            self.started = True
        mu, direction_sq, lambd, lambd_bar = self.mu, self.direction_sq, self.lambd, self.lambd_bar
        if not rows[R].any():  # r = 0: w is stationary, and stays
            return torch.tensor(self.loss, dtype=torch.float64)
        if mu <= 0.0:  # p lost descent (rounding): steepest descent, the pairs dropped
            self.order.clear()
            rows[P] = rows[R]
            mu = direction_sq = float(rows[R] @ rows[R])
            self.success, lambd_bar = True, 0.0
        if self.success:
            delta = mu if self.order else mu / min(1.0, 1.0 / float(np.abs(rows[R]).sum()))
        else:
            delta = self.delta
        delta, lambd, lambd_bar = scaled_curvature(delta, lambd, lambd_bar, direction_sq)
        alpha = mu / delta
        self.accepted[:] = self.w
        np.multiply(rows[P], alpha, out=self.w)
        self.w += self.accepted
        self._write_parameters()
        trial_loss_tensor, gradient = objective.value_then_gradient()
        trial_loss = float(trial_loss_tensor)
        self.k += 1
        comparison = 2.0 * delta * (self.loss - trial_loss) / mu**2
        finite = np.isfinite(trial_loss)
        if finite and comparison >= 0.0:
            self._gather_negated(gradient(), rows[R_NEW])
            finite = self._accept(alpha, trial_loss)
        if finite and comparison >= 0.0:
            lambd_bar, self.success = 0.0, True
            if comparison >= GOOD_COMPARISON:
                lambd /= SECANT_LAMBDA_DECREASE_FACTOR
        else:
            self.w[:] = self.accepted
            self._write_parameters()
            lambd_bar, self.success = lambd, False
        effective = comparison if finite else NON_FINITE_COMPARISON
        if effective < POOR_COMPARISON:
            lambd = lambd + delta * (1.0 - effective) / direction_sq
        self.lambd, self.lambd_bar, self.delta = lambd, lambd_bar, delta
        return torch.tensor(self.loss, dtype=torch.float64)

    def _write_parameters(self) -> None:
        """With ``parameters_apart``, w into the parameters' own storage (they are w's views otherwise)."""
        if self._views_of_w is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self._views_of_w)

    def _gather_negated(self, gradients: Any, out: np.ndarray) -> None:
        np.concatenate([g.numpy().reshape(-1) for g in gradients], out=out)
        np.negative(out, out=out)

    def _accept(self, alpha: float, trial_loss: float) -> bool:
        """Step 7 after Δ ≥ 0: the pair, p₊ = H r₊, r ← r₊; ``False`` (nothing changed) if r₊ is not finite."""
        rows, m = self.rows, self.memory
        np.subtract(rows[R], rows[R_NEW], out=rows[Y])
        products = rows[:3] @ rows.T  # [y, p, r₊] against [y, p, r₊, r, S, Y]: every inner product of the step
        new_residual_sq = products[R_NEW, R_NEW]
        if not np.isfinite(new_residual_sq):
            return False
        self.loss = trial_loss
        if self.second_moment is not None:  # v ← βv + (1 − β)r₊², then Λ
            np.multiply(rows[R_NEW], rows[R_NEW], out=self.diagonal)
            self.diagonal *= 1.0 - BETA
            self.second_moment *= BETA
            self.second_moment += self.diagonal
            self._form_diagonal()
        restart = self.k % self.rows.shape[1] == 0
        if restart:
            self.order.clear()
            rows[P] = rows[R_NEW]
            self.mu = self.direction_sq = float(new_residual_sq)
            rows[R] = rows[R_NEW]
            return True
        change_sq, step_dot_change = products[Y, Y], alpha * products[P, Y]
        s_dot_v, y_dot_v = products[R_NEW, 4 : 4 + m].copy(), products[R_NEW, 4 + m :].copy()
        if step_dot_change > CURVATURE_CONDITION * change_sq > 0.0:
            full = len(self.order) == m
            slot = self.order.pop(0) if full else len(self.order)
            steps, changes = self.pair_rows
            np.multiply(rows[P], alpha, out=steps[slot])
            changes[slot] = rows[Y]
            self.sy[:, slot] = products[Y, 4 : 4 + m]  # Sᵀy
            self.sy[slot, :] = alpha * products[P, 4 + m :]  # sᵀY
            self.yy[:, slot] = self.yy[slot, :] = products[Y, 4 + m :]
            self.sy[slot, slot], self.yy[slot, slot] = step_dot_change, change_sq
            s_dot_v[slot], y_dot_v[slot] = alpha * products[P, R_NEW], products[Y, R_NEW]
            self.order.append(slot)
        if self.order:
            self._inverse_product(s_dot_v, y_dot_v)
        else:
            rows[P] = rows[R_NEW]
        rows[R] = rows[R_NEW]
        self.direction_sq, self.mu = (rows[P : R_NEW + 1] @ rows[P]).tolist()  # |p₊|², r₊ᵀp₊
        return True

    def _form_diagonal(self) -> None:
        """Λ = 1/max(v^κ + ε mean v^κ, the smallest normal number), as :mod:`moller_scg.diagonal_scaling` forms it."""
        d = self.diagonal
        power_into(self.second_moment, d)
        d += EPSILON * d.dtype.type(np.add.reduce(d) / d.size)
        np.maximum(d, np.finfo(d.dtype).tiny, out=d)
        np.reciprocal(d, out=d)

    def _inverse_product(self, s_dot_v: np.ndarray, y_dot_v: np.ndarray) -> None:
        """p ← H r₊ by the compact form (Byrd, Nocedal & Schnabel 1994), as :mod:`moller_scg.quasi_newton` forms it."""
        m, order = self.memory, np.array(self.order)
        in_order = np.ix_(order, order)
        upper = np.triu(self.sy[in_order])
        diagonal = upper.diagonal()
        gamma = float((diagonal / self.yy[order, order]).max())
        r_inv_u, _ = lapack.dtrtrs(upper, s_dot_v[order])
        if self.diagonal is not None:
            self._scaled_inverse_product(order, upper, r_inv_u)
            return
        inner = diagonal * r_inv_u + gamma * (self.yy[in_order] @ r_inv_u) - gamma * y_dot_v[order]
        coefficients = np.zeros(2 * m)
        coefficients[order], _ = lapack.dtrtrs(upper, inner, trans=1)
        coefficients[m + order] = -gamma * r_inv_u
        rows = self.rows
        rows[P] = rows[R_NEW]
        gemv = blas.dgemv if rows.dtype == np.float64 else blas.sgemv
        gemv(1.0, rows[4:].T, coefficients.astype(rows.dtype), beta=gamma, y=rows[P], overwrite_y=1)

    def _scaled_inverse_product(self, order: np.ndarray, upper: np.ndarray, r_inv_u: np.ndarray) -> None:
        """p ← H r₊ with H₀ = γ_D Λ: H v = γ_D Λq + S R⁻ᵀ(D R⁻¹u − γ_D YᵀΛq), q = v − Y R⁻¹u (the form
        :mod:`moller_scg.quasi_newton` derives), q in p's row and Λq in y's (y is stored)."""
        m, rows = self.memory, self.rows
        steps, changes = self.pair_rows
        gemv = blas.dgemv if rows.dtype == np.float64 else blas.sgemv
        c_q = np.zeros(m)
        c_q[order] = -r_inv_u
        rows[P] = rows[R_NEW]
        gemv(1.0, changes.T, c_q.astype(rows.dtype), beta=1.0, y=rows[P], overwrite_y=1)  # q
        np.multiply(self.diagonal, rows[P], out=rows[Y])  # Λq
        changes_dot_scaled = changes @ rows[Y]  # YᵀΛq
        gram_diagonal = (changes * changes) @ self.diagonal  # yᵢᵀΛyᵢ
        diagonal_of_r = upper.diagonal()
        gamma = float((diagonal_of_r / gram_diagonal[order]).max())  # γ_D
        c_s = np.zeros(m)
        c_s[order], _ = lapack.dtrtrs(upper, diagonal_of_r * r_inv_u - gamma * changes_dot_scaled[order], trans=1)
        rows[P] = rows[Y]
        gemv(1.0, steps.T, c_s.astype(rows.dtype), beta=gamma, y=rows[P], overwrite_y=1)  # γ_D Λq + S c_S


class LeanSCGOptimizer(torch.optim.Optimizer):
    """:class:`LeanSCG` behind ``torch.optim.Optimizer``'s ``step``: its profiler range, step hooks and ``no_grad``,
    which the library's ``SCG`` pays at every iteration and the variant alone does not (``--as-optimizer``)."""

    def __init__(self, params: list[torch.Tensor], memory: int = 20, diagonal_scaling: bool = False) -> None:
        params = list(params)
        super().__init__(params, {})
        self.lean = LeanSCG(params, memory=memory, diagonal_scaling=diagonal_scaling)

    @torch.no_grad()
    def step(self, closure: Any) -> torch.Tensor:  # type: ignore[override]
        return self.lean.step(closure)


class _RunAsAccumulator:
    """A race's run (``peers_metering.Run``) as :class:`LeanSCG` calls its objective: the accumulator's names."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def __call__(self) -> torch.Tensor:
        return self.run()

    def value_then_gradient(self) -> tuple[torch.Tensor, Callable[[], list[torch.Tensor]]]:
        return self.run.value_then_grad()


def run_lean(run: Any, diagonal_scaling: bool = False) -> None:
    """:class:`LeanSCG` (m = 20) in ``benchmarks/peers.py``'s race, its accepted points recorded after each step as
    ``peers_adapters.run_scg`` records SCG's (the race ends it when the budget is spent)."""
    optimizer = LeanSCG(run.params, memory=20, diagonal_scaling=diagonal_scaling)
    objective = _RunAsAccumulator(run)
    run.extra["record_in_step"] = True
    while True:
        loss = optimizer.step(objective)
        run.record(float(loss), run.flat_params, at=run.evaluation_end)  # timed as run_scg times SCG's (lever 61)


def race_rows(diagonal_scaling: bool) -> tuple[str, ...]:
    """The rows of ``peers.py`` that ``--race`` runs beside the lean one: LBFGS(100), LBFGS history 20 and the
    library's mode the lean row computes."""
    return ("torch LBFGS", "torch LBFGS h=20", "SCG m=20 diag" if diagonal_scaling else "SCG m=20")


def lean_race_row(diagonal_scaling: bool) -> str:
    """The lean row's name in the race; a peer's row, so that the report's goals of issue #14 leave it out (the race's
    memory measure does not see NumPy arrays)."""
    return f"lean SCG m=20{' diag' if diagonal_scaling else ''} (research)"


def race_optimizers(diagonal_scaling: bool, full_crowd: bool = False) -> Callable[..., dict[str, Any]]:
    """What stands in for ``peers.optimizers`` in ``peers.py``'s race: :func:`race_table`, same arguments."""
    return lambda problem, default_lbfgs=False: race_table(problem, diagonal_scaling, default_lbfgs, full_crowd)


def race_table(
    problem: Any, diagonal_scaling: bool = False, default_lbfgs: bool = False, full_crowd: bool = False
) -> dict[str, Any]:
    """``peers.py``'s table cut to :func:`race_rows` (with ``default_lbfgs``, ``peers.py --default-lbfgs``: and the
    rows of torch LBFGS without a line search), with the lean row; with ``full_crowd``, ``peers.py``'s whole table
    with the lean row (lever 57: the lean step among the nineteen rows the goals are judged in)."""
    import peers_adapters

    full = peers_adapters.optimizers(problem, default_lbfgs)
    names = [*race_rows(diagonal_scaling), *(peers_adapters.DEFAULT_LBFGS_ROWS if default_lbfgs else ())]
    table = dict(full) if full_crowd else {name: full[name] for name in names}
    lean = peers_adapters.Row(lambda run: run_lean(run, diagonal_scaling), peers_adapters.PEER_FAMILY)
    table[lean_race_row(diagonal_scaling)] = lean
    return table


def rows(
    diagonal_scaling: bool, as_optimizer: bool = False, parameters_apart: bool = False
) -> dict[str, Callable[[list[torch.Tensor]], Any]]:
    """The library's mode, its lean variant (behind ``torch.optim.Optimizer``'s step if ``as_optimizer``) and LBFGS
    history 20, by the labels of the own-work table; with ``parameters_apart``, also the lean variant that leaves the
    parameters' storage alone (lever 56)."""
    mode = ", diagonal" if diagonal_scaling else ""
    lean = LeanSCGOptimizer if as_optimizer else LeanSCG
    table = {
        f"SCG(memory=20{mode})": lambda params: SCG(params, memory=20, diagonal_scaling=diagonal_scaling),
        f"lean SCG(memory=20{mode})": lambda params: lean(params, memory=20, diagonal_scaling=diagonal_scaling),
    }
    if parameters_apart:
        table[f"lean, parameters apart{mode}"] = lambda params: LeanSCG(
            params, memory=20, diagonal_scaling=diagonal_scaling, parameters_apart=True
        )
    table["torch LBFGS(h=20)"] = lambda params: torch_lbfgs(params, 20)
    return table


def race_pairs(diagonal_scaling: bool) -> list[tuple[str, str]]:
    """The (row, partner) pairs that ``--pairs-from`` compares: the lean row and the library's mode each against
    LBFGS history 20 (the m = 20 mode's equal-memory partner in ``peers.py``'s goals) and LBFGS(100), then the lean
    row against the library's mode."""
    reference, history_20, library = race_rows(diagonal_scaling)
    lean = lean_race_row(diagonal_scaling)
    return [(lean, history_20), (library, history_20), (lean, reference), (library, reference), (lean, library)]


def pairs_report(paths: list[str], diagonal_scaling: bool) -> str:
    """For the saved ``--race`` runs at ``paths`` (pooled as ``peers.py --report-from`` pools them, which refuses runs
    that did not compute the same), each of :func:`race_pairs` as the report's goals print a row against its partner
    (``peers_report.race_by_race_cell``: the median over every race of the ratio of the two rows' times in that race,
    and in how many races the row was first; its "only SCG" and "only LBFGS" mean the row and the partner).
    ``peers.py``'s report leaves the lean row out of its goals: the race's memory measure does not see its NumPy
    arrays."""
    import peers_pooling
    import peers_report

    runs = [peers_report.from_json(Path(path).read_text(encoding="utf-8")) for path in paths]
    results = runs[0] if len(runs) == 1 else peers_pooling.pool_runs(runs, paths, "")
    lines = []
    for block in results["problems"]:
        by_name = {row["name"]: row for row in block["results"]}
        lines.append(f"{block['problem']['name']}, {block['races']} races, T1 / T2 / T3 race by race:")
        for name, partner in race_pairs(diagonal_scaling):
            lines.append(f"  {name} ÷ {partner}: {peers_report.race_by_race_cell(by_name[name], by_name[partner])}")
    return "\n".join(lines)


@contextlib.contextmanager
def _replaced(module: Any, attributes: dict[str, Any]) -> Iterator[None]:
    """The module's attributes replaced for the duration (``peers.py``'s table, ``plain_loop.py``'s rows, the reports'
    command lines), then put back."""
    saved = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="logistic")
    parser.add_argument("--evaluations", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--cold-caches", type=int, default=32, metavar="MIB")
    parser.add_argument("--plain-loop", action="store_true", help="instead: plain_loop.py's user's loop with the rows")
    parser.add_argument(
        "--race", action="store_true", help="instead: peers.py's race, four rows (race_rows); --default-lbfgs: six"
    )
    parser.add_argument("--diagonal-scaling", action="store_true", help="the diagonal H₀ in the SCG rows")
    parser.add_argument(
        "--full-crowd", action="store_true", help="with --race: every row of peers.py's race, and the lean row"
    )
    parser.add_argument(
        "--as-optimizer", action="store_true", help="the lean rows behind torch.optim.Optimizer's step (not --race)"
    )
    parser.add_argument(
        "--pairs-from", nargs="+", metavar="JSON", help="instead: the lean row against the others in saved --race runs"
    )
    parser.add_argument(
        "--parameters-apart",
        action="store_true",
        help="own work: also the lean step that writes w into the parameters' own storage (lever 56)",
    )
    args, rest = parser.parse_known_args(argv)
    if args.pairs_from:
        if rest or args.race or args.plain_loop or args.as_optimizer or args.parameters_apart or args.full_crowd:
            parser.error("--pairs-from reads saved races: of the other options it takes --diagonal-scaling only")
        print(pairs_report(args.pairs_from, args.diagonal_scaling))
        return 0
    torch.set_num_threads(1)
    if args.as_optimizer and args.race:
        parser.error("--as-optimizer times the own work or the user's loop, not the race")
    if args.full_crowd and not args.race:
        parser.error("--full-crowd is an option of --race")
    if args.parameters_apart and (args.race or args.plain_loop or args.as_optimizer):
        parser.error("--parameters-apart adds a row to the own-work table only")
    diagonal = " --diagonal-scaling" if args.diagonal_scaling else ""  # the reports' command lines
    diagonal += " --full-crowd" if args.full_crowd else ""
    diagonal += " --as-optimizer" if args.as_optimizer else ""
    if args.race:
        import peers

        race = {
            "optimizers": race_optimizers(args.diagonal_scaling, args.full_crowd),
            "memory_probe": lambda *args: None,  # the probe's table needs Adam's rows; memory is not asked here
            "environment": lambda command: environment(
                command.replace("python benchmarks/peers.py", f"python benchmarks/lean_step.py --race{diagonal}", 1)
            ),
        }
        with _replaced(peers, race):
            return peers.main(rest)
    if args.plain_loop:
        import one_at_a_time
        import plain_loop

        library, lean, _ = rows(args.diagonal_scaling, args.as_optimizer).values()
        diag = " diag" if args.diagonal_scaling else ""
        loop_rows = {
            "torch LBFGS": lambda params: torch_lbfgs(params, 100, max_iter=USER_LOOP_MAX_ITER),
            "torch LBFGS h=20": lambda params: torch_lbfgs(params, 20, max_iter=USER_LOOP_MAX_ITER),
            f"SCG m=20{diag}": library,
            f"lean SCG m=20{diag}": lean,
        }
        script = "python benchmarks/lean_step.py"
        labelled = {
            "environment": lambda command: environment(command.replace(script, f"{script} --plain-loop{diagonal}", 1))
        }
        with _replaced(plain_loop, {"ROWS": loop_rows}), _replaced(one_at_a_time, labelled):
            return one_at_a_time.run_command(
                rest,
                description=__doc__.splitlines()[0],
                script="lean_step",
                rows_are="A user's loop with the lean row (lean_step.py --plain-loop: plain_loop.py's measurement), "
                "optimizer.step(accumulator), each row alone",
                measure=plain_loop.plain_loop,
                default_repetitions=7,
            )
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from own_work import print_rows_before_each_evaluation

    env = environment(" ".join(["python benchmarks/lean_step.py", *(sys.argv[1:] if argv is None else argv)]))
    print(f"torch {env['torch']}, 1 thread, {env['date']}; {env['command']}")
    table = rows(args.diagonal_scaling, args.as_optimizer, args.parameters_apart)
    print_rows_before_each_evaluation(
        args.problem, table, args.evaluations, args.repeats, args.cold_caches, label_width=32
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
