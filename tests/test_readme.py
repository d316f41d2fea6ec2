"""The README's commands and snippet stay true: CI runs the README's test command, and the snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _code_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    commands = [block.strip() for block in _code_blocks("bash")]
    assert len(commands) >= 2
    main_job, tests = commands[0], commands[1]
    assert "pip install" in main_job and "python" in main_job.split("&&")[-1]
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # Every step of the README's test command after the virtual environment appears verbatim in .ci/run.
    for step in [part.strip() for part in tests.split("&&")][2:]:
        assert step in ci_script, f"the README's test step {step!r} is not what .ci/run runs"


def test_readme_python_snippets_run_in_order():
    namespace: dict = {}  # one namespace: a later snippet uses what an earlier one defined, as a reader would
    for block in _code_blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["history"].stop_reason is not None
    assert float(namespace["loss"]) <= namespace["history"]["loss"][-1]  # SCG never accepts a higher loss
