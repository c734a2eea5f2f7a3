"""Every measure of the three knowledge levels and of teacher health, on teacher (and student) logits.

``knowledge_measures`` computes the numbers of one dataset's items (pure, on tensors);
``similarity_matrices`` builds the class-similarity matrices it compares; ``scalar_measures`` and
``nested_measures`` flatten its nested result for logs and back. :class:`Predictions` holds the items
the measures read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_kd.knowledge.domain import (
    class_similarity,
    hierarchy_score,
    most_frequent_classes,
    similarity_agreement,
    soft_confusion,
    spearman,
)
from hf_kd.knowledge.health import expected_calibration_error, saturation_share, tail_flatness
from hf_kd.knowledge.instance import rescaling_summary, rescaling_weight
from hf_kd.knowledge.universe import effective_smoothing, kl_to_uniform, teacher_entropy, wrong_mass


@dataclass
class Predictions:
    """Flattened items of a dataset: logits [N, K] (float32, CPU) and labels [N] (NO_LABEL = none)."""

    student_logits: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        logits = self.teacher_logits if self.teacher_logits is not None else self.student_logits
        return logits.shape[-1]


def _mean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return x.double().mean().item() if x.numel() else math.nan


def _std(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return x.double().std().item() if x.numel() > 1 else math.nan


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    agreement = similarity_agreement(a, b)
    return {
        "pearson": agreement.pearson,
        "spearman": agreement.spearman,
        "num_classes": agreement.num_classes,
    }


def similarity_matrices(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_logits: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    student_weight: torch.Tensor | None = None,
    classes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Class-similarity matrices of labelled items (label ≥ 0): ``teacher_confusion`` and
    ``student_confusion`` (soft confusion C), ``teacher_weights`` and ``student_weights`` (S_W), the
    ones whose inputs are given. With ``classes`` (indices) everything is restricted to those classes
    first: items labelled with one of them, logits over them only (a large vocabulary's M most frequent
    tokens), so no [K, K] matrix is built."""
    K = teacher_logits.shape[-1]
    if classes is not None:
        position = torch.full((K,), -1, dtype=torch.long)
        position[classes] = torch.arange(len(classes))
        keep = (labels >= 0) & (position[labels.clamp_min(0)] >= 0)
        labels = position[labels[keep]]
        teacher_logits = teacher_logits[keep][:, classes]
        student_logits = None if student_logits is None else student_logits[keep][:, classes]
    keep = labels >= 0
    n = teacher_logits.shape[-1]
    out = {
        "teacher_confusion": soft_confusion(torch.softmax(teacher_logits[keep].float(), -1), labels[keep], n)
    }
    if student_logits is not None:
        out["student_confusion"] = soft_confusion(
            torch.softmax(student_logits[keep].float(), -1), labels[keep], n
        )
    if teacher_weight is not None:
        out["teacher_weights"] = class_similarity(teacher_weight, classes)
    if student_weight is not None:
        out["student_weights"] = class_similarity(student_weight, classes)
    return out


def knowledge_measures(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_logits: torch.Tensor | None = None,
    alpha: float,
    temperature: float,
    groups: Sequence[int] | None = None,
    difficulty: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    student_weight: torch.Tensor | None = None,
    max_classes: int = 256,
) -> dict[str, Any]:
    """Every measure of ``docs/knowledge.md`` on the labelled items (label ≥ 0); [N, K] logits, [N] labels.

    level1: means of H(p^τ)/log K, KL(p^τ ‖ u), ε_eff = α(1 − p^τ_t).
    level2: soft confusion C of the teacher (and the student), S_W of the logit-layer weights when
            given, their agreement (Pearson/Spearman of off-diagonal entries, over the ``max_classes``
            most frequent classes when K is larger) and hierarchy scores when ``groups`` is given.
    level3: teacher p_t statistics, Spearman(p_t, difficulty) when ``difficulty`` is given; with a
            student, w_t (:func:`rescaling_weight`) and its summary, Spearman(q_t, p_t).
    health: saturation share, ECE and mean tail flatness at τ = 1, teacher accuracy.
    """
    keep = labels >= 0
    if not keep.any():
        raise ValueError("knowledge_measures needs labelled items (label ≥ 0); every label is < 0")
    v, y = teacher_logits[keep].float(), labels[keep]
    z = None if student_logits is None else student_logits[keep].float()
    d = None if difficulty is None else difficulty[keep].float()
    K = v.shape[-1]
    classes = most_frequent_classes(y, K, max_classes) if K > max_classes else None
    p_t = 1.0 - wrong_mass(v, y)
    sims = similarity_matrices(v, y, z, teacher_weight, student_weight, classes)
    margin = (
        v.gather(-1, y.unsqueeze(-1)).squeeze(-1) - v.scatter(-1, y.unsqueeze(-1), -math.inf).max(-1).values
    )
    measures: dict[str, Any] = {
        "settings": {
            "alpha": alpha,
            "temperature": temperature,
            "num_items": int(y.numel()),
            "num_classes": K,
        },
        "level1": {
            "teacher_entropy": _mean(teacher_entropy(v, temperature=temperature)),
            "kl_to_uniform": _mean(kl_to_uniform(v, temperature=temperature)),
            "effective_smoothing": _mean(effective_smoothing(v, y, alpha=alpha, temperature=temperature)),
        },
        "level2": {
            "teacher_similarity_source": "soft confusion"
            if teacher_weight is None
            else "soft confusion + logit-layer weights"
        },
        "level3": {
            "teacher_true_prob_mean": _mean(p_t),
            "teacher_true_prob_std": _std(p_t),
            "spearman_teacher_prob_difficulty": None if d is None else spearman(p_t, d),
            "spearman_teacher_prob_margin": spearman(p_t, margin),
        },
        "health": {
            "saturation_share": saturation_share(v, y),
            "expected_calibration_error": expected_calibration_error(v, y),
            "tail_flatness": _mean(tail_flatness(v, y)),
            "teacher_accuracy": (v.argmax(-1) == y).double().mean().item(),
        },
    }
    level2 = measures["level2"]
    if groups is not None:
        if classes is not None:
            groups = torch.as_tensor(groups)[classes]
        for name, matrix in sims.items():
            level2[f"{name.split('_')[0]}_hierarchy_{name.split('_')[1]}"] = hierarchy_score(matrix, groups)
    for kind in ("confusion", "weights"):
        if f"teacher_{kind}" in sims and f"student_{kind}" in sims:
            level2[f"agreement_{kind}"] = _agreement(sims[f"teacher_{kind}"], sims[f"student_{kind}"])
    if z is not None:
        q_t = 1.0 - wrong_mass(z, y)
        w = rescaling_weight(z, v, y, alpha=alpha, temperature=temperature)
        student_loss = -torch.log(q_t.clamp_min(torch.finfo(torch.float32).tiny))
        measures["level3"].update(
            {
                "rescaling": rescaling_summary(w, p_t, d),
                "spearman_rescaling_student_loss": spearman(w, student_loss),
                "spearman_rescaling_teacher_margin": spearman(w, margin),
                "spearman_student_teacher_prob": spearman(q_t, p_t),
            }
        )
        measures["health"]["student_accuracy"] = (z.argmax(-1) == y).double().mean().item()
        measures["health"]["top1_agreement"] = (z.argmax(-1) == v.argmax(-1)).double().mean().item()
    return measures


def teacher_agreement(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """The student's agreement with one teacher on the labelled items (label ≥ 0); [N, K] logits, [N]
    labels (several teachers: one call per teacher, so the report says what each one contributed).

    top1_agreement = mean[argmax z = argmax v];  kl = mean KL(p ‖ q), p = softmax(v), q = softmax(z)
    (τ = 1);  teacher_accuracy = mean[argmax v = y].
    """
    return mean_agreement(agreement_items(student_logits, teacher_logits, labels))


def agreement_items(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The terms of :func:`teacher_agreement` per labelled item (label ≥ 0), [n] each, float64:
    ``top1_agreement`` [argmax z = argmax v], ``kl`` KL(p ‖ q), ``teacher_accuracy`` [argmax v = y]
    (averaged over items collected batch by batch: :func:`mean_agreement`)."""
    keep = labels >= 0
    z, v, y = student_logits[keep].float(), teacher_logits[keep].float(), labels[keep]
    log_p, log_q = torch.log_softmax(v, -1), torch.log_softmax(z, -1)
    return {
        "top1_agreement": (z.argmax(-1) == v.argmax(-1)).double(),
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1).double(),
        "teacher_accuracy": (v.argmax(-1) == y).double(),
    }


def mean_agreement(items: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean of each term of :func:`agreement_items` ([n] each) over its items."""
    if not all(len(values) for values in items.values()):
        raise ValueError("teacher_agreement needs labelled items (label ≥ 0); every label is < 0")
    return {name: values.mean().item() for name, values in items.items()}


def scalar_measures(measures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of ``measures`` as a flat ``{"level1/teacher_entropy": value}`` dict (for logs)."""
    flat: dict[str, float] = {}
    for key, value in measures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalar_measures(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
            flat[name] = float(value)
    return flat


def nested_measures(flat: dict[str, float]) -> dict[str, Any]:
    """The inverse of :func:`scalar_measures`: ``{"level1/teacher_entropy": v}`` → ``{"level1": {...}}``."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
