"""Import a script of ``benchmarks/`` or ``examples/`` (folders that are not packages) as a module, for a test."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def load_script(path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The script at ``path`` as a module named after its file.

    Its folder goes first on ``sys.path`` (it imports its sibling modules, as when run as a script), and the module
    is registered in ``sys.modules`` (dataclasses look their module up there); both are undone after the test.
    """
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module
