"""Reading a recipe strictly: YAML with no key written twice, every value of the type its field takes,
and argument errors in one line (never with a secret)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from hf_kd.redact import redact


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key written twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice (lines {lines[key]} and {line}): keep one"
                )
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """``text`` (YAML read from ``source``) through :class:`UniqueKeyLoader`: safe types only, a key written
    twice refused in one line naming it, its lines and ``source``."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: {' '.join(str(error).split())}") from None


def _typed(key: str, value: Any, action: Any, path: Path) -> Any:
    """A recipe ``value`` for the parser action of field ``key``: converted as a command-line string
    would be (``1e-5`` read by YAML as a string becomes a number), or refused in one line naming the key,
    the value, its type and what the field takes."""
    convert = action.type
    if value is None or convert is None:
        return value
    name = getattr(convert, "__name__", "")
    if isinstance(value, str):
        try:
            converted = convert(value)
        except (TypeError, ValueError, KeyError, argparse.ArgumentTypeError):
            converted = _REFUSED
    elif convert is int:
        converted = value if isinstance(value, int) and not isinstance(value, bool) else _REFUSED
    elif convert is float:
        converted = (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _REFUSED
        )
    elif name == "string_to_bool":
        converted = value if isinstance(value, bool) else _REFUSED
    else:
        converted = value  # a mapping or list for a field that also takes one (e.g. dict | str)
    if converted is not _REFUSED and (not action.choices or converted in action.choices):
        return converted
    expected = getattr(convert, "expected", None) or {int: "an integer", float: "a number"}.get(
        convert, "true or false" if name == "string_to_bool" else "a string"
    )
    if action.choices:
        expected = f"one of {[getattr(c, 'value', c) for c in action.choices]}"
    raise ValueError(
        f"{key}: {value!r} ({type(value).__name__}) in recipe {str(path)!r}: expected {expected}"
    )


_REFUSED = object()


def typed_recipe(recipe: dict[str, Any], parser: HfArgumentParser, path: Path) -> dict[str, Any]:
    """``recipe`` with every value checked and converted by its field's parser action (:func:`_typed`),
    lists element by element: a wrong type is refused before anything loads, not after the teacher."""
    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for key, value in recipe.items():
        action = actions.get(key)
        if action is None:
            typed[key] = value
        elif isinstance(value, list) and action.nargs in ("+", "*"):
            typed[key] = [_typed(key, item, action, path) for item in value]
        else:
            typed[key] = _typed(key, value, action, path)
    return typed


def refuse(message: str) -> None:
    """``ArgumentParser.error`` as one ValueError naming the flag and value, secrets redacted."""
    raise ValueError(redact(message))
