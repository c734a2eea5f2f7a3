"""Recipes and the command line: a YAML recipe's values become the defaults, flags win."""

from __future__ import annotations

import difflib
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from hf_kd.config.arguments import DataArguments, ModelArguments
from hf_kd.config.distillation import DistillationConfig
from hf_kd.config.groups.loss import temperature_value
from hf_kd.recipe import load_yaml, refuse, typed_recipe
from hf_kd.redact import redact

ARGUMENT_CLASSES = (DataArguments, ModelArguments, DistillationConfig)


def load_recipe(path: str | Path, classes: tuple[type, ...] = ARGUMENT_CLASSES) -> dict[str, Any]:
    """Read a YAML recipe (:func:`load_yaml`: safe types, no key twice) and reject keys none of ``classes``
    knows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    recipe = load_yaml(path.read_text(), f"recipe {str(path)!r}") or {}
    if not isinstance(recipe, dict):
        raise ValueError(
            f"recipe {str(path)!r} must be a mapping of field: value, got {type(recipe).__name__}"
        )
    known = {f.name for cls in classes for f in fields(cls) if f.init}
    for key in recipe:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown field {key!r} in recipe {str(path)!r}{hint}")
    return recipe


def parse_args(argv: list[str] | None = None, classes: tuple[type, ...] = ARGUMENT_CLASSES) -> tuple:
    """``--config recipe.yaml [--field value ...]``: defaults < recipe < command line.

    Unknown recipe keys and unknown flags are errors; the recipe's values become the parser's
    defaults, so any flag given on the command line wins. ``classes`` are the argument dataclasses
    (default: a distillation run's); one instance of each is returned, in order.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(classes)
    parser.error = refuse  # one line, not argparse's usage dump and exit
    for action in parser._actions:
        if action.dest == "temperature":  # a number or "auto": argparse's float would refuse "auto"
            action.type = temperature_value
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a recipe path")
        recipe = typed_recipe(load_recipe(argv[i + 1], classes), parser, Path(argv[i + 1]))
        argv = argv[:i] + argv[i + 2 :]
        # Required fields (output_dir) may come from the recipe: give argparse their defaults.
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
        parser.set_defaults(**recipe)
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # e.g. flags no field knows, quoted back: never with a secret
        raise ValueError(redact(str(error))) from None
