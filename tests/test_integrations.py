"""The integration examples run, and do what their docs say: Lightning, the LBFGS swap, torch.func models."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moller_scg import SCG

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Lightning pickles hyperparameters by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    """These runs are tiny: one thread is faster than two, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# A script written for torch.optim.LBFGS, with SCG swapped in


IMPORT = "from moller_scg import SCG\n"


def original_script(swapped: str) -> str:
    """The LBFGS script SCG was swapped into: the line marked ``# was: …`` put back as it was, no SCG import."""
    (line,) = [line for line in swapped.splitlines() if "# was: torch.optim.LBFGS(" in line]
    code, was = line.split("  # was: ")
    assignment = code[: code.index("=") + 1]
    assert code.strip().startswith("optimizer = SCG(")
    assert swapped.count(IMPORT) == 1
    return swapped.replace(line, f"{assignment} {was}").replace(IMPORT, "")


def run_script(source: str, steps: int) -> float:
    namespace: dict = {"__name__": "swap_lbfgs_under_test"}
    exec(compile(source, str(EXAMPLES / "swap_lbfgs.py"), "exec"), namespace)  # noqa: S102 - our own example
    namespace["STEPS"] = steps
    return namespace["main"]()


def test_swap_lbfgs_changes_the_optimizer_line_and_adds_the_import_and_both_versions_train(capsys):
    swapped = (EXAMPLES / "swap_lbfgs.py").read_text(encoding="utf-8")
    original = original_script(swapped)
    assert "    optimizer = torch.optim.LBFGS(model.parameters())\n" in original
    changed = [
        line
        for line in difflib.unified_diff(original.splitlines(), swapped.splitlines(), lineterm="", n=0)
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]
    assert changed == [
        "+from moller_scg import SCG",
        "-    optimizer = torch.optim.LBFGS(model.parameters())",
        "+    optimizer = SCG(model.parameters(), memory=20)  # was: torch.optim.LBFGS(model.parameters())",
    ], changed

    initial = run_script(swapped, steps=0)
    scg_loss = run_script(swapped, steps=60)
    lbfgs_loss = run_script(original, steps=3)
    assert scg_loss < 0.1 * initial
    assert lbfgs_loss < 0.1 * initial
    output = capsys.readouterr().out
    assert "SCG: training loss" in output and "LBFGS: training loss" in output


def test_plain_backward_closure_with_exact_curvature_says_what_to_do():
    model = nn.Linear(2, 1)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    optimizer = SCG(model.parameters())  # double-backward, but the closure builds no graph of the gradient

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="create_graph=True") as error:
        optimizer.step(closure)
    assert "hvp='finite-difference'" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# torch.func-style functional models


def test_functional_model_trains_with_exact_forward_over_reverse_curvature(capsys):
    example = load_example("functional_model")
    loss = example.main(iterations=40)
    assert loss < 1e-3
    assert "exact Hessian-vector products" in capsys.readouterr().out


def test_functional_objective_is_exact_against_double_backward():
    example = load_example("functional_model")
    torch.manual_seed(0)
    x = torch.randn(16, 2, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    module = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    params = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}

    def loss_of_params(weights):
        return ((torch.func.functional_call(module, weights, (x,)) - y) ** 2).mean()

    objective = example.FunctionalObjective(loss_of_params, params)
    loss = objective()
    vectors = [torch.randn_like(p) for p in params.values()]
    products = objective.hvp(vectors)

    reference_loss = loss_of_params(params)
    gradients = torch.autograd.grad(reference_loss, list(params.values()), create_graph=True)
    reference_products = torch.autograd.grad(
        sum((g * v).sum() for g, v in zip(gradients, vectors)), list(params.values())
    )
    torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-14, atol=0)
    for p, g in zip(params.values(), gradients):
        torch.testing.assert_close(p.grad, g.detach(), rtol=1e-12, atol=1e-14)
    for s, reference in zip(products, reference_products):
        torch.testing.assert_close(s, reference, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch Lightning's automatic optimization


@pytest.fixture(scope="module")
def lightning_example():
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        pytest.importorskip("pytorch_lightning", reason="PyTorch Lightning is not installed (pip install lightning)")
    return load_example("lightning_scg")


def plain_scg_run(example, hvp: str, iterations: int) -> tuple[list[torch.Tensor], SCG]:
    """The same model, data and SCG, driven by a hand-written closure instead of Lightning's Trainer."""
    torch.manual_seed(0)
    model = example.FullBatchRegression(hvp)
    ((x, y),) = list(example.full_batch_loader())
    optimizer = SCG(model.parameters(), hvp=hvp)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model.net(x), y)
        loss.backward(create_graph=hvp == "double-backward")
        return loss

    for _ in range(iterations):
        optimizer.step(closure)
    return [p.detach() for p in model.parameters()], optimizer


def initial_loss(example) -> float:
    torch.manual_seed(0)
    model = example.FullBatchRegression()
    ((x, y),) = list(example.full_batch_loader())
    with torch.no_grad():
        return float(nn.functional.mse_loss(model.net(x), y))


@pytest.mark.parametrize("hvp", ["finite-difference", "double-backward"])
def test_lightning_trainer_runs_scg_like_a_plain_closure_loop(lightning_example, hvp):
    iterations = 12
    model = lightning_example.train(hvp, iterations)
    trace = model.scg.trace
    assert trace.k == iterations
    assert trace.loss < 0.5 * initial_loss(lightning_example)
    # Lightning's closure (training_step, zero_grad, backward) evaluates exactly what a plain closure does.
    expected_weights, plain = plain_scg_run(lightning_example, hvp, iterations)
    for p, expected in zip(model.parameters(), expected_weights):
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)
    assert (trace.closure_calls, trace.hvp_calls) == (plain.trace.closure_calls, plain.trace.hvp_calls)
    if hvp == "double-backward":
        assert trace.closure_calls == iterations + 1  # one trial per iteration, plus E(w₁)


def test_lightning_default_backward_has_no_graph_for_exact_curvature(lightning_example):
    pl = lightning_example.pl

    class DefaultBackward(lightning_example.FullBatchRegression):
        def backward(self, loss, *args, **kwargs):
            pl.LightningModule.backward(self, loss, *args, **kwargs)  # loss.backward(), no create_graph

    torch.manual_seed(0)
    model = DefaultBackward("double-backward")
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with pytest.raises(RuntimeError, match="create_graph=True") as error:
        trainer.fit(model, lightning_example.full_batch_loader())
    message = str(error.value)
    assert "hvp='finite-difference'" in message and "LightningModule.backward" in message
