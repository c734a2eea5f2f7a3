"""The diagnosis in words: which knowledge levels the teacher offers and the student took, and which
failure pattern the teacher shows, decided by the fixed thresholds of :data:`THRESHOLDS`."""

from __future__ import annotations

import math
from typing import Any

THRESHOLDS = {
    "flat_tail": 0.9,
    "saturated_share": 0.5,
    "ece": 0.1,
    "near_uniform_entropy": 0.9,
    "domain_agreement": 0.5,
    "domain_agreement_partial": 0.2,
    "instance_agreement": 0.5,
    "hierarchy": 1.1,
}
"""Where the diagnosis draws its lines (README "Reading the report" explains each):

- ``flat_tail``: mean tail flatness H(p̄)/log(K − 1) at τ = 1 at or above it → the wrong-class tail is
  nearly flat, as a label-smoothed teacher's: level 2 is erased.
- ``saturated_share``: share of items with p_t > 0.99 at or above it → an over-confident teacher:
  w_t → 1 for most items, level 3 vanishes.
- ``ece``: expected calibration error at or above it → the teacher's confidences are miscalibrated.
- ``near_uniform_entropy``: mean H(p^τ)/log K at or above it → at the distillation temperature the
  teacher is close to uniform: KD acts mostly as label smoothing (level 1).
- ``domain_agreement`` / ``domain_agreement_partial``: Spearman of the off-diagonal soft-confusion
  entries, student vs teacher, at or above it → level 2 transferred / partly transferred.
- ``instance_agreement``: Spearman of the student's q_t with the teacher's p_t at or above it →
  level 3 transferred (the student finds the same instances hard).
- ``hierarchy``: hierarchy score at or above it (a class grouping is known) → the matrix shows the groups.
"""


def diagnose(measures: dict[str, Any], thresholds: dict[str, float] = THRESHOLDS) -> dict[str, list[str]]:
    """Sentences saying which levels the teacher offers and the student took, and which failure the
    teacher shows, decided by ``thresholds`` (see :data:`THRESHOLDS`). Keys: ``levels``, ``failures``."""
    l1, l2, l3, health = measures["level1"], measures["level2"], measures["level3"], measures["health"]
    alpha, tau = measures["settings"]["alpha"], measures["settings"]["temperature"]
    levels, failures = [], []
    if alpha > 0:
        levels.append(
            f"Level 1 (universe): transferred as smoothing of ε̄ = α(1 − p^τ_t) = {l1['effective_smoothing']:.3f} on average "
            f"(α = {alpha}, τ = {tau}); the teacher's normalised entropy at τ is {l1['teacher_entropy']:.3f}."
        )
    else:
        levels.append("Level 1 (universe): α = 0, nothing is distilled.")
    num_classes = measures["settings"].get("num_classes")
    flatness = health["tail_flatness"]
    agreement = l2.get("agreement_confusion")
    level2_defined = (num_classes is None or num_classes > 2) and math.isfinite(flatness)
    flat = level2_defined and flatness >= thresholds["flat_tail"]
    if not level2_defined:
        why = (
            f"with K = {num_classes} classes a single wrong class has no class relations"
            if num_classes is not None and num_classes <= 2
            else f"the tail flatness is {flatness}, as with K = 2 classes, where a single wrong class has no class relations"
        )
        levels.append(f"Level 2 (domain): undefined, {why}.")
    else:
        offered = (
            "does not offer it (its wrong-class tail is flat)"
            if flat
            else "offers it (its wrong-class tail has structure)"
        )
        if agreement is None:
            levels.append(f"Level 2 (domain): the teacher {offered}; no student to compare.")
        elif not math.isfinite(agreement["spearman"]):
            levels.append(
                f"Level 2 (domain): the teacher {offered}; whether the student took it is undefined "
                f"(student–teacher class-similarity Spearman {agreement['spearman']}: constant off-diagonal entries)."
            )
        else:
            s = agreement["spearman"]
            taken = (
                "transferred"
                if s >= thresholds["domain_agreement"]
                else "partly transferred"
                if s >= thresholds["domain_agreement_partial"]
                else "not transferred"
            )
            levels.append(
                f"Level 2 (domain): the teacher {offered}; {taken} (student–teacher class-similarity Spearman {s:.3f})."
            )
    if "teacher_hierarchy_confusion" in l2:
        shows = "shows" if l2["teacher_hierarchy_confusion"] >= thresholds["hierarchy"] else "does not show"
        levels.append(
            f"The teacher's class similarity {shows} the known class groups (hierarchy score {l2['teacher_hierarchy_confusion']:.3f})."
        )
    saturated = health["saturation_share"] >= thresholds["saturated_share"]
    offered = (
        "hardly offers it (most p_t > 0.99)"
        if saturated
        else f"offers it (p_t = {l3['teacher_true_prob_mean']:.3f} ± {l3['teacher_true_prob_std']:.3f})"
    )
    if "spearman_student_teacher_prob" not in l3:
        levels.append(f"Level 3 (instance): the teacher {offered}; no student to compare.")
    else:
        s = l3["spearman_student_teacher_prob"]
        taken = "transferred" if s >= thresholds["instance_agreement"] else "not transferred"
        below = l3["rescaling"]["share_below_zero"]
        levels.append(
            f"Level 3 (instance): the teacher {offered}; {taken} (Spearman of student q_t with teacher p_t {s:.3f}); "
            f"w_t has mean {l3['rescaling']['mean']:.3f} and {below:.1%} of instances below zero."
        )
    if flat:
        failures.append(
            f"Label-smoothed teacher pattern: tail flatness {health['tail_flatness']:.3f} ≥ {thresholds['flat_tail']}; "
            "the wrong classes look alike to the teacher, so class relations (level 2) are erased."
        )
    if saturated:
        failures.append(
            f"Over-confident teacher pattern: {health['saturation_share']:.1%} of instances have p_t > 0.99 "
            f"(≥ {thresholds['saturated_share']:.0%}); p_t ≈ 1 does not tell easy from hard instances, so level 3 vanishes. An earlier checkpoint may teach better."
        )
    if health["expected_calibration_error"] >= thresholds["ece"]:
        failures.append(
            f"Miscalibrated teacher: ECE {health['expected_calibration_error']:.3f} ≥ {thresholds['ece']}."
        )
    if l1["teacher_entropy"] >= thresholds["near_uniform_entropy"]:
        failures.append(
            f"Near-uniform teacher at τ = {tau}: normalised entropy {l1['teacher_entropy']:.3f} ≥ {thresholds['near_uniform_entropy']}; "
            "KD acts mostly as label smoothing (level 1). A lower τ keeps more of levels 2 and 3."
        )
    if not failures:
        failures.append(
            "No failure pattern: the tail is not flat, the teacher is not saturated and it is calibrated."
            if level2_defined
            else "No failure pattern: the teacher is not saturated and it is calibrated "
            "(the tail flatness is undefined, so the label-smoothed pattern is not checked)."
        )
    return {"levels": levels, "failures": failures}
