"""hf_kd: knowledge distillation for the Hugging Face ecosystem, explained with the three knowledge
levels of Tang et al. (2020)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hf_kd.config import DataArguments, DistillationConfig, ModelArguments, parse_args
from hf_kd.losses import SparseLogits, distillation_loss, divergence

if TYPE_CHECKING:
    from hf_kd.runs.distill import RunResult, run_distillation
    from hf_kd.trainer import DistillationTrainer

_UPPER_LAYERS = {
    "DistillationTrainer": "hf_kd.trainer",
    "RunResult": "hf_kd.runs.distill",
    "run_distillation": "hf_kd.runs.distill",
}
"""Names of the trainer and orchestration layers, imported on first use: importing a pure package
(``hf_kd.losses``, ``hf_kd.knowledge``, ...) runs this file first, and must not load the layers above."""


def __getattr__(name: str) -> Any:
    """``hf_kd.DistillationTrainer``, ``hf_kd.run_distillation``, ...: imported from their module."""
    if name in _UPPER_LAYERS:
        return getattr(importlib.import_module(_UPPER_LAYERS[name]), name)
    raise AttributeError(f"module 'hf_kd' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "DataArguments",
    "DistillationConfig",
    "DistillationTrainer",
    "ModelArguments",
    "RunResult",
    "SparseLogits",
    "distillation_loss",
    "divergence",
    "parse_args",
    "run_distillation",
]
