"""Every module hf_kd and its scripts import is the standard library's, the project's own, or comes from
a distribution ``pyproject.toml`` declares: nothing works here only because another package brought it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


OPTIONAL = {
    "deepspeed": "ZeRO-3 placement, imported only when the run's accelerate config asks for DeepSpeed",
    "trl": "benchmarks compare with TRL's losses when it imports",
    "liger_kernel": "the GPU benchmark's Liger column, when it imports",
}
"""Imported only behind a check that they are installed, for what needs them."""


def declared(extras: tuple[str, ...] = ()) -> set[str]:
    """The normalised names of the distributions hf_kd requires (its installed metadata, made from
    ``pyproject.toml`` by ``make setup``), with those of its ``extras``."""
    names = set()
    for spec in importlib.metadata.requires("hf_kd") or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", spec)
        if extra is None or extra[1] in extras:
            names.add(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def imported() -> dict[str, str]:
    """Top-level modules imported by hf_kd/ and scripts/ (absolute imports), each with one file that does."""
    found = {}
    for path in sorted([*(ROOT / "hf_kd").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared():
    distributions = importlib.metadata.packages_distributions()
    own = {"hf_kd", "scripts", *(path.stem for path in (ROOT / "scripts").glob("*.py"))}
    undeclared = {}
    for module, where in imported().items():
        if module in sys.stdlib_module_names or module in own or module in OPTIONAL:
            continue
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if not names & declared(("dev",) if where.startswith("scripts/bench_") else ()):
            undeclared[module] = (sorted(names), where)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
