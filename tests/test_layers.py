"""The layers import top-down only: pure packages (losses, knowledge measures and diagnosis, tasks,
synthetic targets, the teacher cache, cards) import nothing of the trainer or orchestration layers, and the trainer imports no
orchestration and no data loading. Each package is imported, with all its submodules, in a fresh
interpreter, and the hf_kd modules it loaded are listed."""

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
