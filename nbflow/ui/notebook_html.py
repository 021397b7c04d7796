"""Executed notebooks exported to HTML pages, with nbconvert (the `html` extra).

Owns: checking that nbconvert is there before anything is written (its absence
is an error naming `pip install "nbflow[html]"`), and writing one page per
notebook with nbconvert's HTMLExporter, images embedded, as Ploomber and
`jupyter nbconvert --to html` users expect. The pages are nbconvert's own
(its template, its scripts for math and widgets), not the report's: they show
the whole notebook, inputs included. Nothing else in nbflow imports nbconvert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import NbflowError

__all__ = ["exporter", "export"]

INSTALL = 'pip install "nbflow[html]"'


def exporter() -> Any:
    """nbconvert's HTMLExporter, set to embed images; an error naming the extra when nbconvert is missing."""
    try:
        from nbconvert import HTMLExporter  # noqa: PLC0415
    except ImportError:
        raise NbflowError(f"exporting the executed notebooks to HTML needs nbconvert: {INSTALL} "
                          "(or leave out --notebooks-html)") from None
    return HTMLExporter(embed_images=True)


def export(html_exporter: Any, notebook: Path, target: Path) -> None:
    """Write `notebook` (an executed .ipynb) as the HTML page `target`."""
    import nbformat  # noqa: PLC0415 - comes with nbconvert

    try:
        nb = nbformat.read(notebook, as_version=4)
    except (OSError, ValueError) as e:
        raise NbflowError(f"{notebook}: cannot read it to export it to HTML: {e}") from None
    body, _ = html_exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body, encoding="utf-8")
    except OSError as e:
        raise NbflowError(f"{target}: cannot write it: {e.strerror}; choose a writable path with -o") from None
