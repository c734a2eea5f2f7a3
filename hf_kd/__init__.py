"""hf_kd: knowledge distillation for the Hugging Face ecosystem, explained with the three knowledge
levels of Tang et al. (2020)."""

from hf_kd.config import DataArguments, DistillationConfig, ModelArguments, parse_args
from hf_kd.losses import SparseLogits, distillation_loss, divergence
from hf_kd.pipeline import RunResult, run_distillation
from hf_kd.trainer import DistillationTrainer

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
