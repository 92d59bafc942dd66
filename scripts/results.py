"""What the scripts write: Markdown tables, and a report as JSON and Markdown side by side."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """The lines of a Markdown table.

    - ``align``: one letter a column, ``l`` or ``r`` (numbers); columns past its end are left-aligned.
    - A row may have fewer cells than there are columns (an error message in place of figures).
    """
    rule = ["---:" if align[i : i + 1] == "r" else "---" for i in range(len(columns))]
    return [_row(columns), "|" + "|".join(rule) + "|", *(_row(row) for row in rows)]


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def write_report(out: Path, stem: str, report: dict, markdown: str) -> tuple[Path, Path]:
    """``out/STEM.json`` and ``out/STEM.md``; -> their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, markdown_path
