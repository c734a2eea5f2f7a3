"""The layers import top-down only: pure packages (losses, knowledge measures and diagnosis, tasks,
synthetic targets, the teacher cache, cards) import nothing of the trainer or orchestration layers, and the trainer imports no
orchestration and no data loading. Each package is imported, with all its submodules, in a fresh
interpreter, and the hf_kd modules it loaded are listed. Every import statement of every product
module is also read from the source and checked against the layers (no import from a lower layer to a
higher one), and no product module may be over 400 lines."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ABOVE_PURE = ("hf_kd.trainer", "hf_kd.callbacks", "hf_kd.predictions", "hf_kd.runs")
"""The trainer layer and the orchestration layer: what no pure package may import."""

LOADERS = ("hf_kd.modeling", "hf_kd.data")
"""Model and dataset loading: what the knowledge measures may not import either."""

HUB_IO = ("hf_kd.hub",)
"""Requests to the Hub: cards render, the Hub module uploads them."""

IMPORT_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m == "hf_kd" or m.startswith("hf_kd."))))
"""


def imported_by(package: str) -> list[str]:
    """The hf_kd modules loaded by importing ``package`` and every submodule of it, in a new process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, package],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def within(modules: list[str], layers: tuple[str, ...]) -> list[str]:
    """The modules that are one of ``layers`` or inside one."""
    return [m for m in modules if any(m == layer or m.startswith(layer + ".") for layer in layers)]


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("hf_kd.losses", ABOVE_PURE),
        ("hf_kd.knowledge", ABOVE_PURE + LOADERS),
        ("hf_kd.tasks", ABOVE_PURE),
        ("hf_kd.teachers.synthetic", ABOVE_PURE),
        ("hf_kd.teachers.sources", ABOVE_PURE + LOADERS + HUB_IO),
        ("hf_kd.teachers.cache", ABOVE_PURE + LOADERS + HUB_IO + ("hf_kd.cards",)),
        ("hf_kd.cards", ABOVE_PURE + LOADERS + HUB_IO),
        ("hf_kd.redact", ABOVE_PURE + LOADERS + HUB_IO),
    ],
)
def test_pure_packages_import_no_layer_above(package, forbidden):
    modules = imported_by(package)
    assert package in modules
    assert within(modules, forbidden) == []


def test_trainer_imports_no_orchestration_and_no_data_loading():
    modules = imported_by("hf_kd.trainer")
    assert "hf_kd.cards.run" in modules  # the card the trainer writes comes from the pure cards package
    assert within(modules, ("hf_kd.runs", "hf_kd.data.loading")) == []


def test_cache_format_imports_neither_capture_nor_reading_nor_the_hub():
    """The format is the cache package's bottom: capture and load build on it, never the reverse."""
    modules = imported_by("hf_kd.teachers.cache.format")
    assert "hf_kd.teachers.cache.format" in modules
    assert within(modules, ("hf_kd.teachers.cache.capture", "hf_kd.teachers.cache.load", "hf_kd.hub")) == []


@pytest.mark.parametrize(
    "module",
    [
        "hf_kd.teachers.signal",
        "hf_kd.checkpoints",
        "hf_kd.hidden_states",
        "hf_kd.on_policy",
        "hf_kd.generation",
    ],
)
def test_trainer_layer_modules_import_no_trainer_and_nothing_above(module):
    """What the trainer is built from (its teacher signals, checkpoint overrides, hidden-state student)
    imports neither the trainer nor the orchestration layer nor data loading."""
    modules = imported_by(module)
    assert module in modules
    assert within(modules, ("hf_kd.trainer", "hf_kd.runs", "hf_kd.data.loading")) == []


# ---- every import statement, read from the source ------------------------------------------------

LAYER_OF = {
    "hf_kd.runs": 3,  # orchestration
    **dict.fromkeys(
        (
            "hf_kd.trainer",
            "hf_kd.trainer_data",
            "hf_kd.teacher_scores",
            "hf_kd.step_addons",
            "hf_kd.callbacks",
            "hf_kd.predictions",
            "hf_kd.auto_temperature",  # reads the teacher before the first step (predictions)
            "hf_kd.checkpoints",
            "hf_kd.training_guard",  # stops the trainer's steps
            "hf_kd.features",
            "hf_kd.on_policy",
            "hf_kd.generation",
            "hf_kd.completion_log",
            "hf_kd.teachers.placement",
            "hf_kd.teachers.signal",
            "hf_kd.teachers.mixture",  # builds each member's signal through the factory
        ),
        2,  # the trainer and what it is built from
    ),
    **dict.fromkeys(
        (
            "hf_kd.modeling",
            "hf_kd.data.loading",
            "hf_kd.teachers.cache.load",
            "hf_kd.teachers.cache.capture",
            "hf_kd.teachers.cache.shards",  # writes the shards, reads them back to merge
            "hf_kd.teachers.cached",  # opens a cache (teachers.cache.load)
            "hf_kd.teachers.served",  # connects to a server, checks it against the student
            "hf_kd.hub",
        ),
        1,  # loading: models, datasets and teacher caches read from (or written to) disk or the Hub
    ),
}
"""The layers of docs/architecture.md, highest first; every other hf_kd module is pure (layer 0)."""


def module_name(path: Path) -> str:
    """``hf_kd/teachers/cache/load.py`` → ``hf_kd.teachers.cache.load`` (a package: its name)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of ``module``: that of the longest entry of :data:`LAYER_OF` it is or lies inside."""
    for prefix in sorted(LAYER_OF, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYER_OF[prefix]
    return 0


def hf_kd_imports(path: Path) -> set[str]:
    """Every hf_kd module named by an import statement of ``path``, at any depth (imports inside a
    function, or under ``TYPE_CHECKING``, count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "hf_kd" or name.startswith("hf_kd.")}


PRODUCT = sorted((ROOT / "hf_kd").rglob("*.py"))


def upward_imports(module: str, path: Path) -> list[str]:
    """The imports of ``path`` (the source of ``module``) from a layer above ``module``'s."""
    return [
        f"{module} (layer {layer(module)}) imports {imported} (layer {layer(imported)})"
        for imported in sorted(hf_kd_imports(path))
        if layer(imported) > layer(module)
    ]


def test_no_import_from_a_lower_layer_to_a_higher_one():
    """Read from the source, so an import inside a function is seen too. ``hf_kd/__init__.py`` names the
    upper layers' entry points lazily (its ``__getattr__``) and is the one exception."""
    upward = [
        line
        for path in PRODUCT
        if module_name(path) != "hf_kd"
        for line in upward_imports(module_name(path), path)
    ]
    assert upward == []


def test_the_layer_check_fails_on_an_upward_import_inside_a_function(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from hf_kd.trainer import DistillationTrainer\n")
    assert upward_imports("hf_kd.losses.probe", source) == [
        "hf_kd.losses.probe (layer 0) imports hf_kd.trainer (layer 2)",
        "hf_kd.losses.probe (layer 0) imports hf_kd.trainer.DistillationTrainer (layer 2)",
    ]
    assert upward_imports("hf_kd.runs.probe", source) == []


MAX_LINES = 400


def test_no_product_module_is_over_400_lines():
    """One concept per module, readable in one sitting: a module past the limit is split by concept."""
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in PRODUCT}
    over = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert over == {}, f"split these modules (at most {MAX_LINES} lines): {over}"
