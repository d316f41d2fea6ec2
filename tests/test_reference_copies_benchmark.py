"""benchmarks/reference_copies.py: the torch LBFGS rows of one race, each over their median, at three evaluations."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_copies.py"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torchmin, at import
def test_quick_run_prints_each_lbfgs_rows_time_over_their_median(tmp_path, monkeypatch):
    pytest.importorskip("torchmin", reason="benchmarks/peers.py needs torchmin: pip install 'moller-scg[benchmarks]'")
    script = load_script(BENCHMARK, monkeypatch)
    out = tmp_path / "copies.txt"
    assert script.main(["--quick", "--out", str(out)]) == 0
    lines = [line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("race ")]
    assert [line.split(":")[0] for line in lines] == [f"race 1, evaluation {e}" for e in script.QUICK_EVALUATIONS]
    for line in lines:
        ratios = {name: float(value) for name, value in re.findall(r"(torch LBFGS[^0-9]*?(?:h=\d+)?) (\d\.\d+)", line)}
        assert set(ratios) == {name.strip() for name in script.LBFGS_ROWS}, line
        assert statistics.median(ratios.values()) == pytest.approx(1.0, abs=1e-3)
