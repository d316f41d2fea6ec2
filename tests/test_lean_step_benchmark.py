"""benchmarks/lean_step.py: the library's secant mode in a few NumPy calls a step, a research variant (lever 35)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from problems import softmax_problem
from scripts import load_script
from torch import nn

from moller_scg import SCG, GradientAccumulator

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "lean_step.py"


@pytest.mark.parametrize("diagonal_scaling", [False, True])
def test_it_takes_the_library_secant_modes_steps(monkeypatch, diagonal_scaling):
    # The same algorithm as SCG(params, memory=m): the same accepted and rejected trials, the losses equal to rounding,
    # over 40 steps that fill and recycle m = 3 slots and reject some trials — before the first restart (k = N = 43,
    # the number of weights), after which the library takes Møller's finite difference and the variant α₀ again.
    script = load_script(BENCHMARK, monkeypatch)
    model, accumulator = softmax_problem()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    library = SCG(model.parameters(), memory=3, diagonal_scaling=diagonal_scaling)
    library_losses, rejected = [], 0
    for _ in range(40):
        library_losses.append(float(library.step(accumulator)))
        rejected += not library.trace.success
    model.load_state_dict(initial)
    lean = script.LeanSCG(list(model.parameters()), memory=3, diagonal_scaling=diagonal_scaling)
    lean_losses = [float(lean.step(accumulator)) for _ in range(40)]
    assert rejected > 0
    assert lean_losses == pytest.approx(library_losses, rel=1e-9, abs=0.0)
    assert lean_losses[-1] < 0.6 * lean_losses[0]  # it trains (1.11 → 0.50 with γI, → 0.61 with the diagonal H₀)


def test_the_parameters_become_views_of_one_flat_array_with_their_values(monkeypatch):
    script = load_script(BENCHMARK, monkeypatch)
    model, _ = softmax_problem()
    before = [p.detach().clone() for p in model.parameters()]
    lean = script.LeanSCG(list(model.parameters()), memory=2)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    lean.w[0] = 7.0  # the NumPy array is the parameters' memory
    assert next(model.parameters()).reshape(-1)[0].item() == 7.0


@pytest.mark.parametrize("diagonal_scaling", [False, True])
def test_with_the_parameters_apart_it_takes_the_same_steps_and_leaves_their_storage(monkeypatch, diagonal_scaling):
    # Lever 56: w written into the parameters' own storage after every change of w, instead of the parameters made
    # views of w — the same numbers, bit for bit (the same NumPy arithmetic; only where the model reads w changes).
    script = load_script(BENCHMARK, monkeypatch)
    model, accumulator = softmax_problem()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    storage = [p.data_ptr() for p in model.parameters()]
    apart = script.LeanSCG(list(model.parameters()), memory=3, diagonal_scaling=diagonal_scaling, parameters_apart=True)
    apart_losses = [float(apart.step(accumulator)) for _ in range(40)]
    assert [p.data_ptr() for p in model.parameters()] == storage
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(flat, torch.from_numpy(apart.w))  # the parameters hold w, the last accepted point
    apart_final = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(initial)
    views = script.LeanSCG(list(model.parameters()), memory=3, diagonal_scaling=diagonal_scaling)
    assert [float(views.step(accumulator)) for _ in range(40)] == apart_losses
    assert all(torch.equal(v, apart_final[k]) for k, v in model.state_dict().items())


class _NaNTrials(GradientAccumulator):
    """An accumulator whose trials (``value_then_gradient``) return a NaN loss from the ``nan_from``-th on."""

    trials = 0
    nan_from = 0

    def value_then_gradient(self):
        loss, gradient = super().value_then_gradient()
        self.trials += 1
        return (torch.tensor(math.nan, dtype=torch.float64) if self.trials >= self.nan_from else loss), gradient


def test_a_non_finite_trial_leaves_the_accepted_weights_and_raises_lambda(monkeypatch):
    script = load_script(BENCHMARK, monkeypatch)
    model, accumulator = softmax_problem()
    accumulator.__class__ = _NaNTrials
    accumulator.nan_from = 4
    lean = script.LeanSCG(list(model.parameters()), memory=3)
    for _ in range(3):
        lean.step(accumulator)
    accepted = [p.detach().clone() for p in model.parameters()]
    loss, lambd = lean.loss, lean.lambd
    assert float(lean.step(accumulator)) == loss  # the fourth trial is NaN: rejected
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), accepted))
    assert lean.lambd > lambd and not lean.success


def test_as_a_torch_optimizer_it_takes_the_same_steps_through_optimizer_step(monkeypatch):
    script = load_script(BENCHMARK, monkeypatch)
    model, accumulator = softmax_problem()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    bare = script.LeanSCG(list(model.parameters()), memory=3)
    bare_losses = [float(bare.step(accumulator)) for _ in range(10)]
    model.load_state_dict(initial)
    optimizer = script.LeanSCGOptimizer(list(model.parameters()), memory=3)
    hooked = []
    optimizer.register_step_post_hook(lambda *args: hooked.append(True))
    assert [float(optimizer.step(accumulator)) for _ in range(10)] == bare_losses
    assert len(hooked) == 10  # through torch.optim.Optimizer's step wrapper
    assert isinstance(
        script.rows(False, as_optimizer=True)["lean SCG(memory=20)"](list(model.parameters())), torch.optim.Optimizer
    )
    with pytest.raises(SystemExit):
        script.main(["--race", "--as-optimizer"])


def test_at_a_zero_gradient_the_weights_stay(monkeypatch):
    script = load_script(BENCHMARK, monkeypatch)
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    accumulator = GradientAccumulator(model, nn.MSELoss(), (torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 1)))
    lean = script.LeanSCG(list(model.parameters()), memory=2)
    assert float(lean.step(accumulator)) == 0.0 and float(lean.step(accumulator)) == 0.0
    assert not any(p.detach().any() for p in model.parameters())


def test_it_prints_the_own_work_of_each_row_and_runs_the_users_loop(monkeypatch, capsys, tmp_path):
    for module in ("sklearn", "torchmin"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    script = load_script(BENCHMARK, monkeypatch)
    assert script.main(["--repeats", "1", "--evaluations", "3", "--cold-caches", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("logistic: own work before each of the first 3 evaluations")
    assert [line.split("  ")[1].strip() for line in lines[2:5]] == list(script.rows(False))
    assert script.main(["--repeats", "1", "--evaluations", "2", "--cold-caches", "0", "--diagonal-scaling"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[1].strip() for line in lines[2:5]] == list(script.rows(True))
    assert lines[2].strip().startswith("SCG(memory=20, diagonal)")
    assert script.main(["--repeats", "1", "--evaluations", "2", "--cold-caches", "0", "--parameters-apart"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[1].strip() for line in lines[2:6]] == list(script.rows(False, parameters_apart=True))
    assert lines[4].strip().startswith("lean, parameters apart")
    with pytest.raises(SystemExit):
        script.main(["--repetitions", "1"])  # plain_loop.py's option, without --plain-loop
    out = tmp_path / "lean_plain.txt"
    args = ["--plain-loop", "--problems", "logistic", "--quick", "--repetitions", "1", "--out", str(out)]
    assert script.main(args) == 0
    report = out.read_text()
    assert "lean SCG m=20" in report and "torch LBFGS h=20" in report
    assert "command python benchmarks/lean_step.py --plain-loop --problems logistic --quick" in report
    import common
    import one_at_a_time
    import plain_loop

    assert "lean SCG m=20" not in plain_loop.ROWS and one_at_a_time.environment is common.environment  # put back


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torchmin, at import
def test_it_races_the_lean_row_beside_three_rows_of_the_race(monkeypatch, tmp_path, capsys):
    for module in ("sklearn", "torchmin", "paramz"):
        pytest.importorskip(module, reason=f"benchmarks/peers.py needs {module}: pip install 'moller-scg[benchmarks]'")
    script = load_script(BENCHMARK, monkeypatch)
    assert script.main(["--race", "--problems", "logistic", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "peers_quick.txt").read_text()
    assert "command: python benchmarks/lean_step.py --race --problems logistic --quick" in report
    lines = report.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("-----")) + 1 :][:4]
    assert [line.split("  ")[0] for line in table] == [*script.race_rows(False), script.lean_race_row(False)]
    assert "budget spent" in next(line for line in lines if line.startswith(script.lean_race_row(False)))
    # --pairs-from: the lean row against the others, race by race, over the saved runs' races (pooled: this run
    # twice is one of two races with the same ratios).
    saved = str(tmp_path / "peers_quick.json")
    capsys.readouterr()
    assert script.main(["--pairs-from", saved, saved]) == 0
    pairs = capsys.readouterr().out.splitlines()
    assert pairs[0] == "logistic, 2 races, T1 / T2 / T3 race by race:"
    expected = [f"  {name} ÷ {partner}: " for name, partner in script.race_pairs(False)]
    assert [line[: len(start)] for line, start in zip(pairs[1:], expected)] == expected and len(pairs) == 6
    results = json.loads(Path(saved).read_text(encoding="utf-8"))
    by_name = {row["name"]: row for row in results["problems"][0]["results"]}
    lean, library = by_name[script.lean_race_row(False)], by_name["SCG m=20"]
    first = lean["targets"][0]
    if first["reached"] and library["targets"][0]["reached"]:  # one race: the ratio of the two times
        ratio = first["seconds"] / library["targets"][0]["seconds"]
        ahead = int(first["seconds"] < library["targets"][0]["seconds"])
        assert pairs[5].split(": ", 1)[1].startswith(f"time ÷ its {ratio:.2f} / ")
        assert pairs[5].endswith(" of 2 races") and f"first in {2 * ahead} / " in pairs[5]
    import common
    import peers
    import peers_adapters
    from peers_problems import PROBLEMS  # benchmarks/ is on sys.path while the script is loaded

    assert peers.optimizers is peers_adapters.optimizers and peers.environment is common.environment  # put back

    table = script.race_table(PROBLEMS["logistic"](True, 0), diagonal_scaling=True)
    assert list(table) == ["torch LBFGS", "torch LBFGS h=20", "SCG m=20 diag", "lean SCG m=20 diag (research)"]
    table = script.race_table(PROBLEMS["logistic"](True, 0), default_lbfgs=True)  # --race --default-lbfgs
    assert list(table) == [*script.race_rows(False), "LBFGS no LS", "LBFGS h=20 no LS", script.lean_race_row(False)]
    table = script.race_table(PROBLEMS["logistic"](True, 0), diagonal_scaling=True, full_crowd=True)  # --full-crowd
    assert list(table) == [*peers_adapters.optimizers(PROBLEMS["logistic"](True, 0)), script.lean_race_row(True)]
    with pytest.raises(SystemExit):
        script.main(["--full-crowd"])  # an option of --race only
    with pytest.raises(SystemExit):
        script.main(["--race", "--parameters-apart"])  # a row of the own-work table only
    with pytest.raises(SystemExit):
        script.main(["--pairs-from", "any.json", "--race"])  # reads saved races, races none
