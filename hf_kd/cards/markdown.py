"""Markdown pieces every hf_kd card is built from: readable values, tables and fenced code blocks."""

from __future__ import annotations

import json
import re
from typing import Any


def format_value(value: Any) -> str:
    """A readable cell: 4 significant digits for floats, JSON for containers, "—" for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value, sort_keys=True, default=str)}`"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; pipes and newlines in cells are escaped."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def field_table(fields: dict[str, Any]) -> str:
    """A Field | Value table of the ``fields`` that have a value (not None), names as inline code."""
    rows = [[f"`{name}`", format_value(value)] for name, value in fields.items() if value is not None]
    return markdown_table(["Field", "Value"], rows)


def code_block(text: str, language: str) -> str:
    """A fenced code block whose fence is longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text.strip("\n")
    return f"{fence}{language}\n{body}\n{fence}"
