"""A griffe extension for the docs build: docstrings written for Sphinx and doctest, rendered as Google style.

The package's docstrings follow the Google style, which mkdocstrings renders, with two habits of the PyTorch world
that it would print badly:

* Sphinx roles (``:class:`~moller_scg.SCG```, ``:func:`fit```) become code spans of the name (the last component
  when it starts with ``~``), as Sphinx displays them;
* an ``Example:`` section becomes ``Examples:``, the section griffe parses into doctest code blocks (it reads the
  singular as a free-form admonition and runs the ``>>>`` lines together into one paragraph).

Used by ``mkdocs.yml`` (``plugins → mkdocstrings → handlers → python → options → extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`<]+?)`")
_EXAMPLE_SECTION = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.MULTILINE)


def _replace_role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    name = target.rsplit(".", 1)[-1] if tilde else target
    return f"`{name}`"


def convert(text: str) -> str:
    """``:class:`~a.b.C``` → `` `C` ``; ``:func:`a.f``` → `` `a.f` ``; ``Example:`` → ``Examples:``."""
    return _EXAMPLE_SECTION.sub(r"\1Examples:", _ROLE.sub(_replace_role, text))


class SphinxAndDoctestDocstrings(griffe.Extension):
    """Rewrite every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
