"""benchmarks/weight_decay_accuracy.py: the main job's test accuracy for several weight decays ν."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "weight_decay_accuracy.py"


def test_each_row_trains_the_main_job_with_its_weight_decay(monkeypatch, capsys):
    benchmark = load_script(BENCHMARK, monkeypatch)
    seen = []
    train_mnist = benchmark.train_mnist

    def recording(**options):
        seen.append((options["weight_decay"], options["seed"], options["memory"], options["preconditioner"]))
        return train_mnist(**options)

    monkeypatch.setattr(benchmark, "train_mnist", recording)
    arguments = ["--weight-decays", "0", "0.001", "--seeds", "0", "1", "--memory", "5", "--max-iter", "2"]
    assert benchmark.main([*arguments, "--max-train", "40"]) == 0
    assert seen == [(0.0, 0, 5, "scalar"), (0.0, 1, 5, "scalar"), (0.001, 0, 5, "scalar"), (0.001, 1, 5, "scalar")]
    lines = capsys.readouterr().out.splitlines()
    assert "SCG(memory=5), 2 iterations" in lines[1]
    assert lines[2].startswith("ν = 0 ") and "seed 0:" in lines[2] and "seed 1:" in lines[2]
    assert lines[3].startswith("ν = 0.001 ")


def test_gauss_newton_rows_ask_the_main_job_for_gauss_newton_products(monkeypatch, capsys):
    benchmark = load_script(BENCHMARK, monkeypatch)
    seen = []
    train_mnist = benchmark.train_mnist

    def recording(**options):
        seen.append(options["hvp_method"])
        return train_mnist(**options)

    monkeypatch.setattr(benchmark, "train_mnist", recording)
    arguments = ["--weight-decays", "0", "--seeds", "0", "--memory", "0", "--gauss-newton", "--max-iter", "2"]
    assert benchmark.main([*arguments, "--max-train", "40"]) == 0
    assert seen == ["gauss-newton"]
    lines = capsys.readouterr().out.splitlines()
    assert "SCG(memory=0), Gauss–Newton curvature products, 2 iterations" in lines[1]
    assert "products" in lines[2] and "passes" in lines[2]


def test_the_preconditioner_option_gives_the_main_job_its_h0_and_the_header_names_it(monkeypatch, capsys):
    benchmark = load_script(BENCHMARK, monkeypatch)
    seen = []
    train_mnist = benchmark.train_mnist

    def recording(**options):
        seen.append(options["preconditioner"])
        return train_mnist(**options)

    monkeypatch.setattr(benchmark, "train_mnist", recording)
    arguments = ["--weight-decays", "0", "--seeds", "0", "--max-iter", "2", "--max-train", "40"]
    assert benchmark.main([*arguments, "--preconditioner", "kronecker"]) == 0
    assert benchmark.main([*arguments, "--diagonal-scaling"]) == 0
    assert seen == ["kronecker", "diagonal"]
    lines = capsys.readouterr().out.splitlines()
    assert "SCG(memory=20, H₀ kronecker), 2 iterations" in lines[1]


def test_an_h0_without_secant_pairs_is_refused_by_the_parser(monkeypatch, capsys):
    benchmark = load_script(BENCHMARK, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--memory", "0", "--preconditioner", "kronecker"])
    assert exit_info.value.code == 2 and "--memory M ≥ 1" in capsys.readouterr().err
