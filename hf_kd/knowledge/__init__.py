"""The three knowledge levels of Tang et al. (2020): pure measures on teacher/student tensors."""

from hf_kd.knowledge.domain import (
    Agreement,
    class_similarity,
    hierarchy_score,
    most_frequent_classes,
    pearson,
    rank,
    similarity_agreement,
    soft_confusion,
    spearman,
)
from hf_kd.knowledge.health import expected_calibration_error, saturation_share, tail_flatness
from hf_kd.knowledge.instance import rescaling_summary, rescaling_weight
from hf_kd.knowledge.universe import effective_smoothing, entropy, kl_to_uniform, teacher_entropy, wrong_mass

__all__ = [
    "Agreement",
    "class_similarity",
    "effective_smoothing",
    "entropy",
    "expected_calibration_error",
    "hierarchy_score",
    "kl_to_uniform",
    "most_frequent_classes",
    "pearson",
    "rank",
    "rescaling_summary",
    "rescaling_weight",
    "saturation_share",
    "similarity_agreement",
    "soft_confusion",
    "spearman",
    "tail_flatness",
    "teacher_entropy",
    "wrong_mass",
]
