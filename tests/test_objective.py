"""The Objective protocol's three faces against closed-form derivatives, their counts, and as_objective."""

from __future__ import annotations

import weakref
from typing import Protocol, runtime_checkable

import pytest
import torch
from torch import nn

from moller_scg import (
    SCG,
    AccumulatorObjective,
    ClosureObjective,
    EvaluationCounts,
    FunctionObjective,
    GradientAccumulator,
    Objective,
    as_objective,
)
from moller_scg.objective import ClosureWithHvpObjective
from moller_scg.objective.protocol import read_gradients

MODES = ["double-backward", "finite-difference"]


def quartic_problem(hvp_mode: str = "double-backward"):
    """E(w) = Σ wᵢ⁴ + (a·w)²: E' = 4w³ + 2(a·w)a, E''v = 12w²v + 2(a·v)a."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.3, 1.0, -2.0], dtype=torch.float64)

    def closure():
        w.grad = None
        loss = (w**4).sum() + (a @ w) ** 2
        loss.backward(create_graph=hvp_mode == "double-backward")
        return loss

    def gradient(x):
        return 4 * x**3 + 2 * (a @ x) * a

    def product(x, v):
        return 12 * x**2 * v + 2 * (a @ v) * a

    return w, closure, gradient, product


V = torch.tensor([0.7, -0.1, 2.0], dtype=torch.float64)


@pytest.mark.parametrize("hvp_mode", MODES)
def test_closure_objective_value_gradient_and_product(hvp_mode):
    w, closure, gradient, product = quartic_problem(hvp_mode)
    objective = ClosureObjective(closure, [w], hvp_mode)
    loss, (g,) = objective.value_and_grad()
    x = w.detach().clone()
    assert float(loss) == pytest.approx(
        float((x**4).sum() + (torch.tensor([0.3, 1.0, -2.0], dtype=torch.float64) @ x) ** 2)
    )
    torch.testing.assert_close(g, gradient(x), rtol=1e-15, atol=0)
    (s,) = objective.hvp([V])
    tolerance = {"double-backward": 1e-14, "finite-difference": 1e-3}[hvp_mode]
    torch.testing.assert_close(s, product(x, V), rtol=tolerance, atol=0)
    assert torch.equal(w.detach(), x)  # the finite difference put the weights back bit for bit
    extra = 1 if hvp_mode == "finite-difference" else 0  # the gradient at w + σₖv
    assert objective.counts == EvaluationCounts(nfev=1 + extra, ngev=1 + extra, nhev=1)


def test_returned_gradients_are_not_overwritten_by_the_next_evaluation():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)

    def closure():
        # zero_grad(set_to_none=False): zeroes .grad in place, then backward accumulates into it.
        if w.grad is not None:
            w.grad.zero_()
        loss = (w**2).sum()
        loss.backward()
        return loss

    objective = ClosureObjective(closure, [w], "finite-difference")
    _, (first,) = objective.value_and_grad()
    with torch.no_grad():
        w.add_(1.0)
    objective.value_and_grad()
    assert first.tolist() == [2.0, 4.0]


def test_gradients_without_copy_are_the_grad_tensors_and_with_copy_new_ones():
    w, closure, gradient, _ = quartic_problem("finite-difference")
    objective = ClosureObjective(closure, [w], "finite-difference")
    _, (borrowed,) = objective.value_and_grad(copy=False)
    assert borrowed.untyped_storage().data_ptr() == w.grad.untyped_storage().data_ptr()
    _, (owned,) = objective.value_and_grad()
    assert owned.untyped_storage().data_ptr() != w.grad.untyped_storage().data_ptr()
    assert torch.equal(borrowed, owned) and torch.equal(owned, gradient(w.detach()))


def test_accumulator_gradients_without_copy_are_the_grad_tensors():
    accumulator, params, _ = accumulator_problem()
    objective = AccumulatorObjective(accumulator)
    _, borrowed = objective.value_and_grad(copy=False)
    assert all(b.untyped_storage().data_ptr() == p.grad.untyped_storage().data_ptr() for p, b in zip(params, borrowed))
    _, owned = objective.value_and_grad()
    for p, b, o in zip(params, borrowed, owned):
        assert o.untyped_storage().data_ptr() != p.grad.untyped_storage().data_ptr() and torch.equal(b, o)


def test_the_last_graph_is_let_go_before_the_closure_builds_the_next():
    # SCG after a rejected trial: its graph must not live on through the next evaluation's forward pass.
    w, closure, _, _ = quartic_problem()
    alive_during_next_call = []
    last_gradient = None

    def recording_closure():
        if last_gradient is not None:
            w.grad = None  # what zero_grad() does first
            alive_during_next_call.append(last_gradient() is not None)
        return closure()

    objective = ClosureObjective(recording_closure, [w])
    for _ in range(3):
        objective.value_and_grad(copy=False)
        last_gradient = weakref.ref(w.grad)
    assert alive_during_next_call == [False, False]


def test_hvp_after_the_weights_were_written_evaluates_again():
    w, closure, _, product = quartic_problem()
    objective = ClosureObjective(closure, [w])
    objective.value_and_grad()
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)  # a trial point …
        w.copy_(saved)  # … and back: same values, new version
    (s,) = objective.hvp([V])
    torch.testing.assert_close(s, product(saved, V), rtol=1e-14, atol=0)
    assert objective.counts == EvaluationCounts(nfev=2, ngev=2, nhev=1)


def test_second_product_at_the_same_point_rebuilds_the_graph():
    w, closure, _, product = quartic_problem()
    objective = ClosureObjective(closure, [w])
    objective.value_and_grad()
    first = objective.hvp([V])[0]
    second = objective.hvp([V])[0]
    assert torch.equal(first, second)
    torch.testing.assert_close(first, product(w.detach(), V), rtol=1e-14, atol=0)
    assert objective.counts == EvaluationCounts(nfev=2, ngev=2, nhev=2)


def test_closure_without_create_graph_is_named():
    w = torch.tensor([1.0], requires_grad=True)

    def closure():
        w.grad = None
        loss = (w**3).sum()
        loss.backward()
        return loss

    objective = ClosureObjective(closure, [w])
    objective.value_and_grad()  # no product asked for yet: torch.optim's closures without a graph evaluate
    with pytest.raises(RuntimeError, match="create_graph=True"):
        objective.hvp([torch.ones(1)])


def test_bad_vectors_are_named():
    w, closure, _, _ = quartic_problem()
    objective = ClosureObjective(closure, [w])
    objective.value_and_grad()
    with pytest.raises(ValueError, match=r"hvp vector 0 has shape \(2,\), but parameter 0 has \(3,\)"):
        objective.hvp([torch.ones(2, dtype=torch.float64)])
    with pytest.raises(TypeError, match="sequence of tensors"):
        objective.hvp(V)


def test_closure_objective_state_dict_round_trip():
    w, closure, _, _ = quartic_problem()
    objective = ClosureObjective(closure, [w])
    objective.value_and_grad()
    objective.hvp([V])
    restored = ClosureObjective(closure, [w])
    restored.load_state_dict(objective.state_dict())
    assert restored.counts == EvaluationCounts(1, 1, 1)
    with pytest.raises(ValueError, match="nfev = -1 is not an int ≥ 0"):
        restored.load_state_dict({"counts": {"nfev": -1, "ngev": 0, "nhev": 0}})
    with pytest.raises(ValueError, match="no 'counts' entry"):
        restored.load_state_dict({})


# ---------------------------------------------------------------------------------------------------------------
# GradientAccumulator face


def accumulator_problem(batch_size=4, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(11, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(11, 1, generator=generator, dtype=torch.float64)
    accumulator = GradientAccumulator(model, nn.MSELoss(), (x, y), batch_size=batch_size, **kwargs)
    params = list(model.parameters())

    def full_loss(weights):
        return nn.MSELoss()(torch.func.functional_call(model, dict(zip(names, weights)), (x,)), y)

    names = [name for name, _ in model.named_parameters()]
    return accumulator, params, full_loss


@pytest.mark.parametrize("hvp_mode", MODES)
def test_accumulator_objective_matches_the_whole_batch_at_once(hvp_mode):
    accumulator, params, full_loss = accumulator_problem()
    objective = AccumulatorObjective(accumulator, hvp_mode, sigma=1e-7)  # small σ: truncation error O(σ)
    loss, gradients = objective.value_and_grad()
    weights = tuple(p.detach() for p in params)
    expected_gradients = torch.func.grad(lambda *ws: full_loss(list(ws)), argnums=tuple(range(len(params))))(*weights)
    assert float(loss) == pytest.approx(float(full_loss(list(weights))), rel=1e-14)
    for g, expected in zip(gradients, expected_gradients):
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)
    vectors = [torch.ones_like(p) for p in params]
    _, expected_products = torch.autograd.functional.hvp(lambda *ws: full_loss(list(ws)), weights, tuple(vectors))
    products = objective.hvp(vectors)
    tolerance = {"double-backward": 1e-12, "finite-difference": 1e-6}[hvp_mode]
    for s, expected in zip(products, expected_products):
        torch.testing.assert_close(s, expected, rtol=tolerance, atol=tolerance)
    for p, weight in zip(params, weights):
        assert torch.equal(p.detach(), weight)
    # Counts are the accumulator's passes: the finite difference reuses E'(w) of the last pass, adds one at w + σₖv.
    passes = accumulator.passes
    if hvp_mode == "double-backward":
        assert (passes.gradient, passes.hvp) == (1, 1)
    else:
        assert (passes.gradient, passes.hvp) == (2, 0)
    assert objective.counts == EvaluationCounts(nfev=passes.gradient, ngev=passes.gradient, nhev=1)
    objective.loss()
    assert objective.counts.nfev == passes.gradient + 1 and objective.counts.ngev == passes.gradient


def test_accumulator_objective_state_dict_restores_counts_and_curvature_window():
    accumulator, params, _ = accumulator_problem(curvature_fraction=0.5)
    objective = AccumulatorObjective(accumulator)
    objective.value_and_grad()
    objective.hvp([torch.ones_like(p) for p in params])
    state = objective.state_dict()
    assert state["curvature_window"] == accumulator.curvature_cursor.state_dict() == {"window": 1}
    fresh, _, _ = accumulator_problem(curvature_fraction=0.5)
    restored = AccumulatorObjective(fresh)
    restored.load_state_dict(state)
    assert restored.counts == objective.counts and fresh.curvature_window == 1
    with pytest.raises(ValueError, match="not an AccumulatorObjective state_dict"):
        restored.load_state_dict({"counts": {}})


def test_accumulator_objective_loads_the_bare_int_window_of_older_state_dicts_and_refuses_a_bad_one():
    accumulator, params, _ = accumulator_problem(curvature_fraction=0.5)
    objective = AccumulatorObjective(accumulator)
    objective.value_and_grad()
    older = objective.state_dict() | {"curvature_window": 4}  # the form saved before the cursor had a state_dict
    fresh, _, _ = accumulator_problem(curvature_fraction=0.5)
    restored = AccumulatorObjective(fresh)
    restored.load_state_dict(older)
    assert fresh.curvature_cursor.state_dict() == {"window": 4} and restored.counts == objective.counts
    untouched = AccumulatorObjective(accumulator_problem(curvature_fraction=0.5)[0])
    for bad in ({"window": -2}, {"position": 1}, True, -1):
        with pytest.raises(ValueError, match="window"):
            untouched.load_state_dict(objective.state_dict() | {"curvature_window": bad})
        assert untouched.counts == EvaluationCounts(nfev=0, ngev=0, nhev=0)  # nothing loaded
        assert untouched.accumulator.curvature_window == 0


def test_accumulator_objective_rejects_other_closures():
    with pytest.raises(TypeError, match="must be a moller_scg.GradientAccumulator, got function"):
        AccumulatorObjective(lambda: 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Function face, the protocol, as_objective


def test_function_objective_loss_costs_one_call_of_fun_and_forms_no_gradient():
    def fun(x):
        return (x**2).sum()

    objective = FunctionObjective(fun, torch.tensor([3.0], dtype=torch.float64))
    loss = objective.loss()
    assert float(loss) == 9.0 and not loss.requires_grad
    assert all(p.grad is None for p in objective.params)
    assert objective.counts == EvaluationCounts(nfev=1, ngev=0, nhev=0)


def test_function_objective_loss_of_a_fun_that_differentiates_inside():
    """A physics-informed loss holds a derivative of its network: loss() must leave autograd on for it."""
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64).reshape(-1, 1)

    def residual_loss(x):
        points = t.clone().requires_grad_(True)
        u = x["a"] * points + x["b"] * points**2
        (du,) = torch.autograd.grad(u.sum(), points, create_graph=True)
        return ((du - 2 * points) ** 2).mean()

    x0 = {"a": torch.tensor(1.0, dtype=torch.float64), "b": torch.tensor(0.0, dtype=torch.float64)}
    objective = FunctionObjective(residual_loss, x0)
    with torch.no_grad():  # as a validation loop would call it
        loss = objective.loss()
    assert float(loss) == float(objective.value_and_grad()[0])


def test_function_objective_refuses_a_graph_that_does_not_reach_x():
    other = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    objective = FunctionObjective(lambda x: other**2 + x.detach().sum(), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="the graph does not reach x"):
        objective.value_and_grad()


@pytest.mark.parametrize("hvp_mode", MODES)
def test_function_objective_value_then_grad_pays_for_the_gradient_only_when_asked(hvp_mode):
    def fun(x):
        return (x**4).sum()

    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    objective, reference = FunctionObjective(fun, x0, hvp_mode), FunctionObjective(fun, x0, hvp_mode)
    loss, gradient = objective.value_then_grad()
    assert float(loss) == 17.0 and objective.counts == EvaluationCounts(nfev=1, ngev=0, nhev=0)
    (g,) = gradient()
    assert g.tolist() == [4.0, -32.0] and objective.counts == EvaluationCounts(nfev=1, ngev=1, nhev=0)
    assert gradient()[0] is g and objective.counts.ngev == 1
    # The product at that point uses the evaluation just completed (its graph, or its gradient), as after
    # value_and_grad: no further evaluation of fun in double-backward mode, one at w + σₖv otherwise.
    reference.value_and_grad()
    vectors = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
    assert torch.equal(objective.hvp(vectors)[0], reference.hvp(vectors)[0])
    assert objective.counts == reference.counts


@pytest.mark.parametrize("hvp_mode", MODES)
def test_accumulator_objective_value_then_grad_over_one_batch(hvp_mode):
    accumulator, params, _ = accumulator_problem(batch_size=11)  # the 11 samples in one batch
    reference, _, _ = accumulator_problem(batch_size=11)
    objective, expected = AccumulatorObjective(accumulator, hvp_mode), AccumulatorObjective(reference, hvp_mode)
    expected_loss, expected_gradients = expected.value_and_grad()
    loss, gradient = objective.value_then_grad()
    assert torch.equal(loss, expected_loss) and objective.counts == EvaluationCounts(nfev=1, ngev=0, nhev=0)
    assert all(torch.equal(g, e) for g, e in zip(gradient(), expected_gradients))
    assert objective.counts == EvaluationCounts(nfev=1, ngev=1, nhev=0)
    vectors = [torch.ones_like(p) for p in params]
    assert all(torch.equal(s, e) for s, e in zip(objective.hvp(vectors), expected.hvp(vectors)))
    assert objective.counts == expected.counts  # the finite difference reuses the completed gradient


def test_function_linear_in_x_has_zero_curvature():
    objective = FunctionObjective(lambda x: 3 * x.sum(), torch.ones(2, dtype=torch.float64))
    objective.value_and_grad()
    assert objective.hvp([torch.ones(2, dtype=torch.float64)])[0].tolist() == [0.0, 0.0]


def test_every_face_is_an_objective():
    w, closure, _, _ = quartic_problem()
    accumulator, _, _ = accumulator_problem()
    faces = [
        ClosureObjective(closure, [w]),
        AccumulatorObjective(accumulator),
        FunctionObjective(lambda x: x.sum(), torch.ones(1)),
    ]
    assert all(isinstance(face, Objective) for face in faces)
    assert not isinstance(accumulator, Objective) and not isinstance(closure, Objective)


def test_as_objective_wraps_what_an_optimizer_is_given():
    w, closure, _, _ = quartic_problem()
    wrapped = as_objective(closure, [w], "finite-difference", sigma=1e-6)
    assert isinstance(wrapped, ClosureObjective) and wrapped.hvp_mode == "finite-difference" and wrapped.sigma == 1e-6
    assert as_objective(wrapped, [w]) is wrapped
    accumulator, params, _ = accumulator_problem()
    adapted = as_objective(accumulator, params)
    assert isinstance(adapted, AccumulatorObjective) and adapted.accumulator is accumulator
    with pytest.raises(ValueError, match="other tensors, or in another order"):
        as_objective(accumulator, params[::-1])
    with pytest.raises(ValueError, match="other tensors, or in another order"):
        as_objective(wrapped, [w.detach().clone().requires_grad_(True)])
    with pytest.raises(TypeError, match="expected a closure, a GradientAccumulator or an Objective, got int"):
        as_objective(3, [w])
    with pytest.raises(ValueError, match="Invalid hvp_mode value: 'exact'"):
        as_objective(closure, [w], "exact")
    with pytest.raises(ValueError, match="params is empty"):
        as_objective(closure, [])


def test_as_objective_asks_the_protocol_of_a_subclass_of_the_accumulator():
    # A GradientAccumulator itself is wrapped without the runtime Protocol check (30 µs of SCG's first step); a
    # subclass that is an Objective too is still taken as the Objective it is, and a plain subclass is wrapped.

    class PlainSubclass(GradientAccumulator):
        pass

    class AlsoAnObjective(GradientAccumulator):
        counts = EvaluationCounts()

        def value_and_grad(self, *, copy=True):
            raise NotImplementedError

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model = nn.Linear(3, 1).double()
    params = list(model.parameters())
    data = (torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64))
    plain = PlainSubclass(model, nn.MSELoss(), data, batch_size=2)
    adapted = as_objective(plain, params)
    assert isinstance(adapted, AccumulatorObjective) and adapted.accumulator is plain
    objective = AlsoAnObjective(model, nn.MSELoss(), data, batch_size=2)
    assert isinstance(objective, Objective)
    assert as_objective(objective, params) is objective


def test_as_objective_skips_the_protocol_check_where_the_answer_is_known(monkeypatch):
    # The runtime Protocol check cost 24–33 µs of SCG's first step, cold: the library's own objectives (and subclasses,
    # such as the race's metered one) and objects without value_and_grad are told apart without it; an object
    # with value_and_grad that is none of the library's is still asked.
    import moller_scg.objective as objective_module

    asked = []

    class RecordingMeta(type(Objective)):
        def __instancecheck__(cls, instance):
            asked.append(type(instance).__name__)
            return super().__instancecheck__(instance)

    class Recorded(Objective, Protocol, metaclass=RecordingMeta):
        pass

    monkeypatch.setattr(objective_module, "Objective", runtime_checkable(Recorded))
    w, closure, _, _ = quartic_problem()

    class MeteredLikeTheRace(ClosureWithHvpObjective):
        pass

    class ClosureWithHvp:
        def __call__(self):
            return closure()

        def hvp(self, vectors):
            raise NotImplementedError

    library_faces = [
        ClosureObjective(closure, [w]),
        FunctionObjective(lambda x: x.sum(), torch.ones(1)),
        MeteredLikeTheRace(ClosureWithHvp(), [w]),
    ]
    for face in library_faces:
        assert as_objective(face, face.params) is face
    accumulator, params, _ = accumulator_problem()
    assert isinstance(as_objective(accumulator, params), AccumulatorObjective)

    class PlainSubclass(GradientAccumulator):
        pass

    model = nn.Linear(3, 1).double()
    data = (torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64))
    plain = PlainSubclass(model, nn.MSELoss(), data, batch_size=2)
    assert isinstance(as_objective(plain, list(model.parameters())), AccumulatorObjective)
    assert asked == []

    class OwnObjective:
        def __init__(self):
            self.params, self.counts = [w], EvaluationCounts()

        def value_and_grad(self, *, copy=True):
            raise NotImplementedError

        hvp = loss = state_dict = load_state_dict = value_and_grad

    own = OwnObjective()
    assert as_objective(own, [w]) is own
    assert asked == ["OwnObjective"]


def test_a_closure_with_its_own_hvp_is_asked_for_the_product():
    w, closure, gradient, product = quartic_problem("finite-difference")  # no create_graph needed
    calls = []

    class ClosureWithHvp:
        def __call__(self):
            return closure()

        def hvp(self, vectors):
            calls.append(vectors)
            return [product(w.detach(), vectors[0])]

    wrapped = as_objective(ClosureWithHvp(), [w])
    assert isinstance(wrapped, ClosureWithHvpObjective) and isinstance(wrapped, Objective)
    _, (g,) = wrapped.value_and_grad()
    assert torch.equal(g, gradient(w.detach()))
    (s,) = wrapped.hvp([V])
    assert torch.equal(s, product(w.detach(), V)) and len(calls) == 1
    assert wrapped.counts == EvaluationCounts(nfev=1, ngev=1, nhev=1)


def test_a_closure_with_hvp_over_other_parameters_or_returning_too_few_products_is_refused():
    w, closure, _, _ = quartic_problem()
    other = w.detach().clone().requires_grad_(True)

    class ClosureWithHvp:
        params = [other]

        def __call__(self):
            return closure()

        def hvp(self, vectors):
            return []

    with pytest.raises(ValueError, match="ClosureWithHvp differentiates other tensors.*params="):
        as_objective(ClosureWithHvp(), [w])
    ClosureWithHvp.params = [w]
    wrapped = as_objective(ClosureWithHvp(), [w])
    with pytest.raises(ValueError, match="closure.hvp returned 0 tensors for 1 parameters"):
        wrapped.hvp([V])


@pytest.mark.parametrize("hvp_mode", MODES)
def test_scg_stepped_on_an_objective_follows_the_plain_closure_bit_for_bit(hvp_mode):
    # What SCG will consume: today SCG.step(objective) already works, the objective serving hvp() and counts.
    w, closure, _, _ = quartic_problem(hvp_mode)
    plain = SCG([w], hvp=hvp_mode)
    plain_losses = [float(plain.step(closure)) for _ in range(8)]
    plain_weights = w.detach().clone()
    with torch.no_grad():
        w.copy_(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    objective = ClosureObjective(closure, [w], hvp_mode)
    optimizer = SCG([w], hvp=hvp_mode)
    losses = [float(optimizer.step(objective)) for _ in range(8)]
    assert losses == plain_losses and torch.equal(w.detach(), plain_weights)
    trace = optimizer.trace
    assert objective.counts.nfev == trace.closure_calls == plain.trace.closure_calls
    if hvp_mode == "double-backward":
        assert objective.counts.nhev == trace.hvp_calls


def test_gradients_read_without_a_copy_are_the_grad_tensors_or_detached_from_their_graph():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    plain = torch.tensor([3.0, 4.0], dtype=torch.float64)
    (read,) = read_gradients([w], [plain], copy=False)
    assert read is plain  # no graph: the .grad tensor itself, no detach dispatched
    (copied,) = read_gradients([w], [plain], copy=True)
    assert copied is not plain and torch.equal(copied, plain)
    with_graph = w * 2.0  # as a backward with create_graph=True leaves .grad
    (read,) = read_gradients([w], [with_graph], copy=False)
    assert not read.requires_grad and torch.equal(read, with_graph.detach())
