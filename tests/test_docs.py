"""The documentation's code runs: every ```python block of docs/*.md, and the docstring examples of the package.

A page's blocks run in order in one namespace, as a reader would paste them, from a scratch working directory.
A block fenced as ```python { .no-run } is shown on the site but not run (attr_list gives it the class no-run).
Blocks that only include a file (``--8<-- "examples/…"``) are skipped: the file runs in its own test.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import moller_scg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# These pages' snippets already run in the tests of their modules (test_docs_*_snippets_run).
RUN_ELSEWHERE = {"accumulation.md": "tests/test_accumulate.py", "variants.md": "tests/test_scg_adam.py"}
# These modules' docstring examples already run in their own tests (test_*docstring_example*_run).
DOCTESTED_ELSEWHERE = {"moller_scg.accumulate", "moller_scg.checkpoint", "moller_scg.coba", "moller_scg.scg_adam"}

_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
_INCLUDE = re.compile(r'^\s*--8<--\s+"[^"]+"\s*$')


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of each block of ``page`` that is meant to run."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        attributes, code = match.groups()
        if ".no-run" in attributes:
            continue
        lines = [line for line in code.splitlines() if line.strip()]
        if lines and all(_INCLUDE.match(line) for line in lines):
            continue
        blocks.append((text.count("\n", 0, match.start(2)) + 1, code))
    return blocks


PAGES = sorted(page for page in DOCS.rglob("*.md") if page.name not in RUN_ELSEWHERE and python_blocks(page))


def test_the_runner_finds_blocks_and_honours_no_run(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n\n```python { .no-run }\nraise SystemExit\n```\n\n"
        '```python\n--8<-- "examples/rosenbrock.py"\n```\n\n```bash\nexit 1\n```\n\n```python\ny = x + 1\n```\n',
        encoding="utf-8",
    )
    assert python_blocks(page) == [(2, "x = 1\n"), (18, "y = x + 1\n")]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_docs_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a snippet writes land in the scratch folder
    namespace: dict = {"__name__": "__docs__"}
    for line, code in python_blocks(page):
        # Pad with newlines so that a traceback's line numbers are the page's.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)  # noqa: S102 - the docs' own code


def test_the_pages_with_code_are_found():
    assert {"getting-started.md", "curvature.md", "training.md", "index.md"} <= {page.name for page in PAGES}


def test_pages_run_elsewhere_still_have_their_tests():
    for page, test_file in RUN_ELSEWHERE.items():
        assert (DOCS / page).exists() and f'"{page}"' in (ROOT / test_file).read_text(encoding="utf-8")


def package_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(moller_scg.__path__, prefix="moller_scg.")
        if info.name not in DOCTESTED_ELSEWHERE and info.name != "moller_scg.__main__"
    )


@pytest.mark.parametrize("name", package_modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"


_API_REFERENCE = re.compile(r"^::: (moller_scg[\w.]*)\s*$", flags=re.MULTILINE)


def api_references() -> list[str]:
    """The dotted paths the API pages render with mkdocstrings (``::: moller_scg.scg.LAMBDA_MAX``)."""
    return sorted(
        {
            path
            for page in (DOCS / "api").glob("*.md")
            for path in _API_REFERENCE.findall(page.read_text(encoding="utf-8"))
        }
    )


def test_the_api_pages_reference_objects():
    assert {"moller_scg.SCG", "moller_scg.scg.SCGScalars", "moller_scg.scg.LAMBDA_MAX"} <= set(api_references())


@pytest.mark.parametrize("path", api_references())
def test_every_object_an_api_page_names_is_importable_there(path):
    # A name that moved to another module (scg.py's trace, scalars and option bounds did) must stay importable
    # where the docs, and so the users, import it from.
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            assert hasattr(owner, name), f"{path}: {'.'.join(parts[:split])} has no {name}"
            owner = getattr(owner, name)
        return
    pytest.fail(f"{path}: no module of it can be imported")
