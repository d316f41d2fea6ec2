"""benchmarks/levers_sr1.py: lever 67's research variant, an L-SR1 model damped by Møller's λ."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from levers_sr1 import FlatSR1  # noqa: E402
from test_levers_variants import CountingClosure, LossFirstClosure  # noqa: E402


class Quadratic:
    """E(w) = ½ wᵀAw − bᵀw with an indefinite A (float64); counts gradient passes."""

    def __init__(self, eigenvalues: list[float], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        n = len(eigenvalues)
        basis, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        self.matrix = basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T
        self.vector = torch.randn(n, generator=generator, dtype=torch.float64)
        self.weights = torch.nn.Parameter(torch.randn(n, generator=generator, dtype=torch.float64))
        self.passes = 0

    def __call__(self) -> torch.Tensor:
        self.passes += 1
        self.weights.grad = None
        w = self.weights
        loss = 0.5 * w @ (self.matrix @ w) - self.vector @ w
        loss.backward()
        return loss.detach()


def trained(closure: CountingClosure, steps: int, memory: int = 5) -> FlatSR1:
    optimizer = FlatSR1(list(closure.model.parameters()), memory=memory)
    for _ in range(steps):
        optimizer.step(closure)
    return optimizer


def test_the_compact_model_is_the_sr1_matrix_its_smallest_eigenvalue_and_its_damped_solve():
    """B from the compact form against B built densely; λ_min(B) from the k × k eigenproblem against eigvalsh of
    the dense B; and p = (B + λI)⁻¹ r by Woodbury against a dense solve — on a model whose B is indefinite."""
    optimizer = trained(CountingClosure(1), steps=12)
    assert len(optimizer.slots) == 5
    assert 12 - optimizer.rejected - optimizer.skipped > 5  # more pushes than rows: the rows were reused
    b0, certified = optimizer.initial_curvature(optimizer.r)
    assert not certified
    middle, gram = optimizer.middle_and_gram(b0)
    steps = optimizer.held_steps[optimizer.slots]
    changes = optimizer.held_changes[optimizer.slots]
    # SR1 built densely, one pair at a time from B₀ = b₀I, in time order (Nocedal & Wright 2006, eq. 6.24).
    dense = b0 * torch.eye(steps.shape[1], dtype=torch.float64)
    for s, y in zip(steps, changes):
        residual = y - dense @ s
        dense = dense + torch.outer(residual, residual) / float(residual @ s)
    assert torch.allclose(optimizer.dense_model(b0), dense, rtol=1e-7, atol=1e-9)
    smallest = float(torch.linalg.eigvalsh(dense).min())
    assert smallest < 0.0
    assert optimizer.smallest_eigenvalue(b0, middle, gram) == pytest.approx(smallest, rel=1e-8)
    lambd = -1.5 * smallest
    p = optimizer.damped_direction(optimizer.r, b0, lambd, middle, gram)
    expected = torch.linalg.solve(dense + lambd * torch.eye(dense.shape[0], dtype=torch.float64), optimizer.r)
    assert torch.allclose(p, expected, rtol=1e-8, atol=1e-12)


def test_on_a_quadratic_the_model_meets_every_secant_pair_held():
    """SR1's hereditary property: on a quadratic E''= A, B sᵢ = yᵢ for every pair held, not only the newest."""
    quadratic = Quadratic([0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0], seed=2)
    optimizer = FlatSR1([quadratic.weights], memory=8)
    for _ in range(5):
        optimizer.step(quadratic)
    assert len(optimizer.slots) >= 3
    b0, _ = optimizer.initial_curvature(optimizer.r)
    model = optimizer.dense_model(b0)
    for row in optimizer.slots:
        s, y = optimizer.held_steps[row], optimizer.held_changes[row]
        assert torch.allclose(y, quadratic.matrix @ s, rtol=1e-10, atol=1e-12)  # y = A s
        assert torch.allclose(model @ s, y, rtol=1e-6, atol=1e-9)


def test_on_an_indefinite_quadratic_each_direction_descends_and_lambda_covers_the_negative_curvature():
    """A saddle: B turns indefinite once the pairs see the negative eigenvalue; every p is still a descent direction
    (μ = pᵀr > 0) because λ_e ≥ −1.5 λ_min(B), and the loss never rises."""
    quadratic = Quadratic([-2.0, -0.5, 0.3, 1.0, 3.0, 10.0], seed=3)
    optimizer = FlatSR1([quadratic.weights], memory=6)
    optimizer.log = []
    losses = [float(quadratic())]
    for _ in range(25):
        losses.append(optimizer.step(quadratic))
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 10.0  # unbounded below: it follows the negative curvature down
    assert all(entry["mu"] > 0.0 for entry in optimizer.log)
    indefinite = [entry for entry in optimizer.log if entry["smallest"] < 0.0]
    assert indefinite
    assert all(entry["lambd"] >= -1.5 * entry["smallest"] * (1 - 1e-12) for entry in indefinite)


def test_a_rejected_trial_leaves_the_accepted_weights_and_the_loss_never_rises():
    closure = CountingClosure(0)
    params = list(closure.model.parameters())
    optimizer = FlatSR1(params, memory=5)
    optimizer.log = []
    losses = []
    for _ in range(60):
        losses.append(optimizer.step(closure))
        with torch.no_grad():
            current = float(torch.nn.functional.mse_loss(closure.model(closure.x), closure.y))
        assert current == pytest.approx(optimizer.loss, rel=1e-12)  # w is the accepted point, never a trial
    assert optimizer.rejected > 0
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_the_skip_rule_keeps_a_pair_only_where_the_rank_one_update_is_defined():
    """|sᵀ(y − Bs)| > 10⁻⁸ |s| |y − Bs|: y = Bs (0/0) and y − Bs orthogonal to s (a division by 0) are skipped."""
    s = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    assert FlatSR1.informative(s, 0.3 * s)
    assert FlatSR1.informative(s, torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64))
    assert not FlatSR1.informative(s, torch.zeros(3, dtype=torch.float64))
    assert not FlatSR1.informative(s, torch.tensor([2.0, -1.0, 7.0], dtype=torch.float64))
    assert not FlatSR1.informative(s, torch.tensor([2.0, -1.0 + 1e-10, 7.0], dtype=torch.float64))


def test_the_step_holds_only_informative_pairs(monkeypatch):
    """The step asks the skip rule about each accepted pair, handing it y − Bs = λ_e s − r₊ (Bs = r − λ_e s), and
    holds only the pairs it keeps."""
    closure = CountingClosure(0)
    optimizer = FlatSR1(list(closure.model.parameters()), memory=5)
    asked = []

    def refuse_every_other(step: torch.Tensor, residual: torch.Tensor) -> bool:
        asked.append(len(asked))
        return len(asked) % 2 == 1

    monkeypatch.setattr(FlatSR1, "informative", staticmethod(refuse_every_other))
    optimizer.step(closure)
    held_after_one = len(optimizer.slots)
    for _ in range(7):
        optimizer.step(closure)
    accepted = 8 - optimizer.rejected
    assert len(asked) == accepted
    assert optimizer.skipped == accepted // 2
    assert held_after_one == 1
    assert len(optimizer.slots) == min(5, accepted - accepted // 2)


def test_at_a_stationary_point_the_step_leaves_the_weights_and_costs_no_trial():
    quadratic = Quadratic([1.0, 2.0, 3.0], seed=5)
    with torch.no_grad():
        quadratic.weights.copy_(torch.linalg.solve(quadratic.matrix, quadratic.vector))
    optimizer = FlatSR1([quadratic.weights], memory=3)
    optimizer.step(quadratic)
    before = quadratic.weights.detach().clone()
    passes = quadratic.passes
    optimizer.r = torch.zeros_like(optimizer.r)  # an exact zero gradient
    optimizer.step(quadratic)
    assert torch.equal(quadratic.weights.detach(), before)
    assert quadratic.passes == passes


def test_an_ill_conditioned_middle_matrix_drops_the_oldest_pairs():
    """Two copies of one pair make M singular: the older is dropped before B is formed."""
    quadratic = Quadratic([1.0, 2.0, 5.0], seed=6)
    optimizer = FlatSR1([quadratic.weights], memory=3)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    y = quadratic.matrix @ s
    optimizer.push(s, y)
    optimizer.push(s, y)
    _, _, middle, _ = optimizer.fitted_model(s)
    assert middle.shape == (1, 1)
    assert optimizer.dropped == 1
    assert np.isfinite(middle).all()


def test_the_oldest_pair_is_the_one_dropped():
    """(s, y) then (2s, 2y): M is singular, and the pair kept is the newer one."""
    quadratic = Quadratic([1.0, 2.0, 5.0], seed=6)
    optimizer = FlatSR1([quadratic.weights], memory=3)
    s = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    optimizer.push(s, quadratic.matrix @ s)
    optimizer.push(2 * s, quadratic.matrix @ (2 * s))
    optimizer.fitted_model(s)
    assert optimizer.dropped == 1
    assert torch.equal(optimizer.held_steps[optimizer.slots[0]], 2 * s)


def test_the_ratio_b0_is_the_largest_curvature_ratio_inverted():
    """``initial="ratio"``: b₀ = 1/γ = minᵢ yᵢᵀyᵢ / sᵢᵀyᵢ, not certified; max(1, |r|₁) before any pair, certified."""
    quadratic = Quadratic([1.0, 2.0, 5.0], seed=9)
    optimizer = FlatSR1([quadratic.weights], memory=3)
    r = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    assert optimizer.initial_curvature(r) == (4.5, True)
    first, second = (
        torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
    )
    optimizer.push(first, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))  # yᵀy / sᵀy = 5 / 2
    optimizer.push(second, torch.tensor([0.0, 4.0, 0.0], dtype=torch.float64))  # 16 / 4
    assert optimizer.initial_curvature(r) == (2.5, False)


def test_b0_below_the_pencil_makes_the_model_positive_definite():
    """``initial="pencil"``: b₀ = 0.9 θ_min of (D + L + Lᵀ, SᵀS); with θ_min > 0, M ≻ 0 and B ⪰ b₀I."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    quadratic = Quadratic([0.2, 0.7, 1.5, 4.0, 9.0, 20.0], seed=7)
    optimizer = FlatSR1([quadratic.weights], memory=4, initial="pencil")
    for _ in range(4):
        optimizer.step(quadratic)
    assert len(optimizer.slots) >= 2
    steps = optimizer.held_steps[optimizer.slots]
    changes = optimizer.held_changes[optimizer.slots]
    products = (steps @ changes.T).numpy()  # sᵢᵀyⱼ, time order
    lower = np.tril(products, -1)
    symmetric_part = np.diag(np.diag(products)) + lower + lower.T
    theta = scipy_linalg.eigh(symmetric_part, (steps @ steps.T).numpy(), eigvals_only=True).min()
    assert theta > 0.0
    b0, certified = optimizer.initial_curvature(optimizer.r)
    assert certified
    assert b0 == pytest.approx(0.9 * theta, rel=1e-8)
    middle, _ = optimizer.middle_and_gram(b0)
    assert np.linalg.eigvalsh(middle).min() > 0.0
    assert float(torch.linalg.eigvalsh(optimizer.dense_model(b0)).min()) >= b0 * (1 - 1e-9)


def test_an_unknown_initial_rule_is_refused():
    quadratic = Quadratic([1.0, 2.0], seed=8)
    with pytest.raises(ValueError, match="initial must be one of"):
        FlatSR1([quadratic.weights], initial="newest")


def test_the_trace_script_prints_each_step_of_the_variant(monkeypatch, capsys):
    """``benchmarks/levers_sr1_trace.py --quick``: one line per step, and after the first pair the ratio's b₀ makes
    B singular (λ_min(B) = 0 up to rounding), which is what lever 67 reports."""
    from scripts import load_script

    script = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "levers_sr1_trace.py", monkeypatch)
    assert script.main(["--quick", "--steps", "3", "--problem", "mnist"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "FlatSR1(memory=20, initial='ratio') on mnist, seed 0"
    assert lines[1].split() == ["step", *script.COLUMNS, "pairs"]
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    b0, smallest = float(rows[1][5]), float(rows[1][6])
    assert abs(smallest) <= 1e-6 * b0


def test_the_pencil_uses_the_lower_triangle_of_the_products_on_a_loss_that_is_not_quadratic():
    """Off a quadratic SᵀY is not symmetric, so D + L + Lᵀ (sᵢᵀyⱼ for i newer than j) differs from D + U + Uᵀ."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    closure = CountingClosure(2)
    optimizer = FlatSR1(list(closure.model.parameters()), memory=4, initial="pencil")
    for _ in range(8):
        optimizer.step(closure)
    steps, changes = optimizer.held_steps[optimizer.slots], optimizer.held_changes[optimizer.slots]
    products = (steps @ changes.T).numpy()
    assert not np.allclose(products, products.T, rtol=1e-3)
    lower, upper = np.tril(products, -1), np.triu(products, 1)
    gram = (steps @ steps.T).numpy()
    expected = scipy_linalg.eigh(np.diag(np.diag(products)) + lower + lower.T, gram, eigvals_only=True).min()
    other = scipy_linalg.eigh(np.diag(np.diag(products)) + upper + upper.T, gram, eigvals_only=True).min()
    assert optimizer.pencil_smallest() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(other, rel=1e-3)


def test_the_skip_rule_is_handed_y_minus_b_s():
    """The free residual λ_e s − r₊ is y − Bs for the B the step solved with, (B + λ_e I)s = r."""
    closure = CountingClosure(0)
    optimizer = FlatSR1(list(closure.model.parameters()), memory=4)
    optimizer.step(closure)
    checked = 0
    for _ in range(10):
        r = optimizer.r.clone()
        b0, _, _, _ = optimizer.fitted_model(r)
        model = optimizer.dense_model(b0)
        handed = []
        original = FlatSR1.informative

        def recording(step, residual, handed=handed, original=original):
            handed.append((step.clone(), residual.clone()))
            return original(step, residual)

        optimizer.informative = recording
        optimizer.step(closure)
        del optimizer.informative
        if handed:
            (step, residual), new_r = handed[0], optimizer.r
            torch.testing.assert_close(residual, (r - new_r) - model @ step, rtol=1e-7, atol=1e-10)
            checked += 1
    assert checked >= 5


def test_lambda_is_halved_after_a_good_step_and_raised_from_lambda_e_after_a_poor_one():
    closure = CountingClosure(0)
    optimizer = trained(closure, steps=0)
    optimizer.log = []
    for _ in range(40):
        optimizer.step(closure)
    trust = 5e-7
    kinds = set()
    for entry in optimizer.log:
        comparison = entry["comparison"] if math.isfinite(entry["comparison"]) else -2.0
        assert entry["lambd"] >= trust  # λ_e ≥ λ
        if comparison < 0.25:
            expected = min(entry["lambd"] + entry["mu"] * (1.0 - comparison) / entry["p_sq"], 1e100)
            kinds.add("raised")
        elif comparison >= 0.75:
            expected = trust / 2.0
            kinds.add("halved")
        else:
            expected = trust
            kinds.add("kept")
        assert entry["next_lambd"] == pytest.approx(expected, rel=1e-12)
        trust = entry["next_lambd"]
    assert {"raised", "halved"} <= kinds


def test_a_trial_rejected_on_its_loss_costs_no_backward_and_the_steps_are_the_same():
    """FlatSR1 always defers the backward where the run allows it: the same trajectory, fewer gradient passes."""
    full, loss_first = CountingClosure(seed=1), LossFirstClosure(seed=1)
    optimizers = [FlatSR1(list(c.model.parameters()), memory=5) for c in (full, loss_first)]
    losses = [[o.step(c) for _ in range(40)] for o, c in zip(optimizers, (full, loss_first))]
    assert losses[0] == losses[1]
    rejected = optimizers[1].rejected
    assert rejected > 0 and optimizers[0].rejected == rejected
    assert loss_first.forwards == full.passes - 1
    assert loss_first.passes == full.passes - rejected
