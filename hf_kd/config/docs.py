"""Each argument written down once: a TRL-style docstring is the one source of every field's ``--help``."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields
from types import MappingProxyType

ENTRY = re.compile(r"^(\w+) \(.*\):$")
"""The first line of a field's entry under ``Parameters:``: ``name (`type`, *optional*, defaults to ...):``."""


def parameter_entries(doc: str) -> dict[str, str]:
    """Field name → its description (one line, words joined by single spaces), read from the
    ``Parameters:`` section of a TRL-style docstring; ``> Title`` lines group the entries and are skipped."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index("Parameters:") + 1
    entries: dict[str, list[str]] = {}
    name = None
    for line in lines[start:]:
        text = line.strip()
        if not text or text.startswith(">"):
            continue
        header = ENTRY.match(text) if line.startswith("    ") and not line.startswith("     ") else None
        if header:
            name = header.group(1)
            entries[name] = []
        elif name is None:
            raise ValueError(f"docstring line {text!r} comes before any field's entry")
        else:
            entries[name].append(text)
    return {name: " ".join(words) for name, words in entries.items()}


def documented(**values: object):
    """Class decorator of an argument dataclass: its docstring's ``{NAME}`` marks are replaced by
    ``values`` (e.g. a registry's names), then each field it declares gets its docstring entry as its
    ``help`` metadata (what ``HfArgumentParser`` prints). A field without an entry, or an entry without a
    field, is an error when the class is defined."""

    def document(cls: type) -> type:
        doc = cls.__doc__
        for key, value in values.items():
            doc = doc.replace("{" + key + "}", str(value))
        cls.__doc__ = doc
        entries = parameter_entries(doc)
        own = [f for f in fields(cls) if f.name in cls.__dict__.get("__annotations__", {})]
        missing = sorted({f.name for f in own} - set(entries))
        extra = sorted(set(entries) - {f.name for f in own})
        if missing or extra:
            raise TypeError(f"{cls.__name__}'s docstring misses {missing} and documents no field {extra}")
        for f in own:
            f.metadata = MappingProxyType({**f.metadata, "help": entries[f.name]})
        return cls

    return document


def joined_doc(summary: str, groups: tuple[type, ...]) -> str:
    """A docstring of ``summary`` and the ``Parameters:`` of each group (a ``> Title`` line, its first
    line, before its entries): the docstring of a class made of these groups."""
    lines = [inspect.cleandoc(summary), "", "Parameters:"]
    for group in groups:
        doc = inspect.cleandoc(group.__doc__)
        title, _, rest = doc.partition("\n")
        entries = rest[rest.index("Parameters:\n") + len("Parameters:\n") :]
        lines += [f"    > {title}", "", entries, ""]
    return "\n".join(lines)
