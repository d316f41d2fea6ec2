"""benchmarks/blog_mnist.py (issue #17) runs end to end on tiny IDX files, so the script cannot rot.

Full MNIST is not needed: the test writes 72 training images (60 train / 12 validation) and 20 test images whose
class is a bright bar at a class-dependent height, so a few seconds of training must classify them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script
from test_cli import write_tiny_mnist

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "blog_mnist.py"


@pytest.fixture
def blog_mnist(monkeypatch):
    pytest.importorskip("matplotlib", reason="benchmarks/blog_mnist.py draws its figure with matplotlib")
    return load_script(BENCHMARK, monkeypatch)


def test_run_on_tiny_idx_files_writes_table_json_and_figure(blog_mnist, tmp_path, capsys):
    data, out = tmp_path / "mnist", tmp_path / "results"
    write_tiny_mnist(data, train=300, test=20)  # 60 images could be fitted to a stall within 1.5 s
    argv = ["--data", str(data), "--max-time", "1.5", "--snapshots", "3", "--threads", "1", "--out", str(out)]
    assert blog_mnist.main(argv) == 0

    report = (out / "blog_mnist.txt").read_text(encoding="utf-8")
    assert "| blog (2022): SCG, finite differences | 97.92% |" in report
    assert "command: " in report and "load average" in report
    assert (out / "blog_mnist.png").stat().st_size > 10_000
    results = json.loads((out / "blog_mnist.json").read_text(encoding="utf-8"))
    assert results["splits"] == {"train": 250, "validation": 50, "test": 20}
    runs = {run["name"]: run for run in results["results"]}
    assert list(runs) == list(blog_mnist.OPTIMIZERS)
    for name, run in runs.items():
        assert f"| {name} | {run['test_accuracy']:.2%} | {run['iterations']} |" in report
        seconds, curve = run["curve_seconds"], run["curve_test_accuracy"]
        assert seconds[0] == 0.0 and seconds == sorted(seconds) and seconds[-1] == run["wall_time"], name
        assert run["wall_time"] >= 1.5 and run["stop_reason"] == "max_time", name
        assert run["iterations"] >= 1 and run["test_accuracy"] == curve[-1], name
        # The table reports the trained weights, not the initial ones (chance is 10 %): the bars are learnable.
        assert run["test_accuracy"] >= 0.8 > curve[0], (name, curve)
        assert len(run["load_average_before"]) == 3
    # Pass accounting: one gradient pass per step for SCG m=20 (plus the first evaluation and the first step's
    # finite difference), two for Møller's finite differences after each success; Adam's 250 images are an epoch of
    # two minibatches, 128 and 122, so two steps are one pass.
    assert runs["SCG m=20"]["gradient_passes"] <= runs["SCG m=20"]["iterations"] + 2
    assert runs["SCG m=20 K-FAC"]["gradient_passes"] <= runs["SCG m=20 K-FAC"]["iterations"] + 2
    assert runs["SCG finite-diff (blog)"]["gradient_passes"] > runs["SCG finite-diff (blog)"]["iterations"]
    adam_steps = runs["Adam"]["iterations"]
    assert runs["Adam"]["gradient_passes"] == pytest.approx(adam_steps // 2 + (adam_steps % 2) * 128 / 250)
    finite_difference, subsampled = runs["SCG finite-diff (blog)"]["details"], runs["SCG 10% curv."]["details"]
    assert runs["SCG finite-diff (blog)"]["gradient_passes"] == finite_difference["closure_calls"]
    hvp_cost = results["pass_costs"]["hvp_subsampled"]
    expected = subsampled["closure_calls"] + subsampled["hvp_calls"] * hvp_cost
    assert runs["SCG 10% curv."]["gradient_passes"] == pytest.approx(expected)
    assert runs["torch LBFGS"]["gradient_passes"] > runs["torch LBFGS"]["iterations"]
    assert 0 < results["pass_costs"]["hvp_subsampled"] and 0 < results["pass_costs"]["loss"]


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--max-time", "0"], "--max-time must be > 0"), (["--max-train", "0"], "--max-train must be ≥ 1")],
)
def test_bad_options_are_refused_before_loading(blog_mnist, tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        blog_mnist.main(["--data", str(tmp_path / "missing"), *option])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
