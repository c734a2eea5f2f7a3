"""The three knowledge levels of Tang et al. (2020): pure measures on teacher/student tensors.

Tensors in, numbers and sentences out; nothing here loads a model or a dataset or runs a model.

- ``universe``: level 1, the teacher's entropy and the smoothing it applies.
- ``domain``: level 2, class similarity, soft confusion and their agreement.
- ``instance``: level 3, the per-instance rescaling weight w_t.
- ``health``: the teacher's failure signals (saturation, calibration, tail flatness).
- ``measures``: every measure of one dataset's items at once (``knowledge_measures``).
- ``diagnosis``: those measures in words, by fixed thresholds (``diagnose``, ``THRESHOLDS``).
- ``report``: the report's files, ``report.json``, ``report.md`` and plots (``write_report``).
- ``profile``: before training, the teacher's measures on a slice (``teacher_profile``, ``kept_mass_by_k``);
- ``preflight``: the recommended setting from them (``recommend``, the rules ``PREFLIGHT_RULES``).

Collecting the logits runs models, so it lives above: ``hf_kd.predictions`` (the loop),
``hf_kd.callbacks`` (the measures at each evaluation), ``hf_kd.runs.report`` (a report of saved models).
"""

from hf_kd.knowledge.diagnosis import THRESHOLDS, diagnose
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
from hf_kd.knowledge.measures import Predictions, knowledge_measures
from hf_kd.knowledge.report import write_report
from hf_kd.knowledge.universe import effective_smoothing, entropy, kl_to_uniform, teacher_entropy, wrong_mass

__all__ = [
    "THRESHOLDS",
    "Agreement",
    "Predictions",
    "class_similarity",
    "diagnose",
    "effective_smoothing",
    "entropy",
    "expected_calibration_error",
    "hierarchy_score",
    "kl_to_uniform",
    "knowledge_measures",
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
    "write_report",
]
