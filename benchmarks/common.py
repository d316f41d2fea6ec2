"""Helpers shared by the scripts in ``benchmarks/``: where results go and what the environment was."""

from __future__ import annotations

import datetime
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import moller_scg

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    """How this script was started, as ``python benchmarks/<script>.py [arguments]``, quoted for a shell (a row name
    such as ``"SCG m=20"`` holds spaces)."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def git_commit() -> str | None:
    """The commit the repository holding this script is at (``None`` without git or outside a checkout)."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if found.returncode != 0:
        return None
    return found.stdout.strip() or None


def environment(command: str, device: torch.device | None = None) -> dict[str, Any]:
    """torch and Python versions, the library's version and git commit (``None`` outside a git checkout), torch
    threads, the CPU's instruction set as torch uses it (float32 kernels, and so float32 trajectories, differ between
    AVX2 and AVX-512 machines), the command and the date (and the device, when one is given)."""
    env: dict[str, Any] = {
        "moller_scg": moller_scg.__version__,
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": command,
        "date": datetime.date.today().isoformat(),
    }
    if device is not None:
        env["device"] = str(device)
        env["cuda_device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return env
