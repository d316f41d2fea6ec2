"""MkDocs hooks for the docs build (``mkdocs.yml → hooks``): the benchmark figures in the gallery.

The benchmarks write their plots to ``benchmarks/results/*.png``, outside ``docs/``. This hook copies every such
figure into the site as ``gallery/benchmarks/<name>.png`` and replaces the marker ``<!-- benchmark-figures -->``
of ``gallery.md`` with one entry per figure, captioned with the command recorded in the ``.txt`` result of the
same name (its ``command:`` line). A new benchmark plot therefore appears in the gallery without editing a page.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "<!-- benchmark-figures -->"
SITE_FOLDER = "gallery/benchmarks"


def _figures() -> list[Path]:
    return sorted(RESULTS.glob("*.png")) if RESULTS.is_dir() else []


def on_files(files: Files, config, **kwargs) -> Files:
    for figure in _figures():
        files.append(File.generated(config, f"{SITE_FOLDER}/{figure.name}", abs_src_path=str(figure)))
    return files


def _command(figure: Path) -> str | None:
    result = figure.with_suffix(".txt")
    if not result.exists():
        return None
    for line in result.read_text(encoding="utf-8").splitlines():
        if line.startswith("command:"):
            return line.removeprefix("command:").strip()
    return None


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if page.file.src_uri != "gallery.md" or MARKER not in markdown:
        return markdown
    figures = _figures()
    if not figures:
        entries = "*No benchmark has drawn a figure yet: their plots appear here once `benchmarks/results/` has them.*"
    else:
        entries = "\n\n".join(
            f"### {figure.stem}\n\n![{figure.stem}]({SITE_FOLDER}/{figure.name})\n\n"
            + (f"Drawn by `{command}`." if (command := _command(figure)) else f"`benchmarks/results/{figure.name}`.")
            for figure in figures
        )
    return markdown.replace(MARKER, entries)
