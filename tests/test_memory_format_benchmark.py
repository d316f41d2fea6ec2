"""benchmarks/memory_format.py: the MNIST CNN's passes and main job in both layouts, side by side."""

from __future__ import annotations

from pathlib import Path

from scripts import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_format.py"


def test_it_times_every_pass_in_both_layouts_and_runs_the_main_job_each_way(monkeypatch, capsys, tmp_path):
    memory_format = load_script(BENCHMARK, monkeypatch)
    out = tmp_path / "report.txt"
    arguments = ["--rounds", "1", "--max-train", "100", "--main-job", "1", "--max-iter", "2", "--out", str(out)]
    assert memory_format.main(arguments) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    lines = printed.splitlines()
    assert lines[0].startswith("the MNIST CNN's passes") and "--max-train 100" in lines[0]
    header = next(index for index, line in enumerate(lines) if line.startswith("seconds per pass over 100 "))
    assert "contiguous" in lines[header + 1] and "channels_last" in lines[header + 1]
    rows = lines[header + 2 : header + 2 + len(memory_format.PASSES)]
    for kind, row in zip(memory_format.PASSES, rows):
        assert row.strip().startswith(kind)
        assert row.count(" s (") == 2 and "(1.00×)" in row  # each layout's seconds; contiguous is the unit
    runs = [line for line in lines if " run 1: " in line]
    assert [run.split()[0] for run in runs] == ["contiguous", "channels_last"]
    assert all("3 closure calls" in run and "test accuracy" in run for run in runs)
    assert lines[-1].startswith("  channels_last ÷ contiguous, run by run: ")
