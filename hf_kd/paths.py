"""Keeping what a run writes apart from what it reads: an output folder never overlaps an input."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

GLOB_CHARACTERS = "*?["


def local_input(name_or_path: str | os.PathLike) -> Path | None:
    """The resolved local path (symlinks followed) that ``name_or_path`` reads, or None when it names
    nothing on this machine (a Hub id, a builder name). A glob pattern reads from the folder before its
    first wildcard."""
    text = os.fspath(name_or_path)
    wildcard = min((text.index(c) for c in GLOB_CHARACTERS if c in text), default=None)
    if wildcard is not None:
        text = os.path.dirname(text[:wildcard]) or "."
    path = Path(text).expanduser()
    return path.resolve() if path.exists() else None


def refuse_overlap(
    output_field: str,
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None],
    *,
    may_lie_inside: Collection[str] = (),
) -> None:
    """Raise before anything is loaded or written when the folder ``output`` is, contains or lies inside
    one of ``inputs`` (field name → what the field names; None and non-local names are skipped).
    Paths are compared resolved, symlinks followed. ``may_lie_inside``: inputs the output may be a
    subfolder of (a report written into the student it describes)."""
    written = Path(output).expanduser().resolve()
    for field_name, value in inputs.items():
        read = None if value is None else local_input(value)
        if read is None:
            continue
        if written == read:
            relation = "is"
        elif read.is_relative_to(written):
            relation = "contains"
        elif written.is_relative_to(read) and field_name not in may_lie_inside:
            relation = "lies inside"
        else:
            continue
        raise ValueError(
            f"{output_field}={os.fspath(output)!r} {relation} {field_name}={os.fspath(value)!r} "
            f"(resolved: {str(written)!r}, {str(read)!r}): writing there would overwrite an input; "
            f"choose another {output_field}, apart from every input"
        )
