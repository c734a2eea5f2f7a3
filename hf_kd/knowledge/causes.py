"""Why KD did (not) pay against its no-KD twin: each measured cause with what to try — budget
differences, under-training on the learning-rate clock (:mod:`hf_kd.knowledge.progress`), a capacity gap,
the hard/soft balance, classes the teacher teaches wrongly (by precision and recall), and the teacher's
failure patterns from the knowledge report — decided by the rules of thumb of
:data:`hf_kd.knowledge.facts.OUTCOME_THRESHOLDS`. Pure: :class:`~hf_kd.knowledge.facts.RunFacts` in,
``{name, finding, remedy}`` diagnoses out."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from hf_kd.knowledge.budget import apart, budget_remedy, compare_budgets
from hf_kd.knowledge.facts import OUTCOME_THRESHOLDS, RunFacts
from hf_kd.knowledge.progress import clock_at, late_fall_share, late_rise, lr_clock


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _entries(run: RunFacts, key: str) -> list[dict[str, float]]:
    return [entry for entry in run.losses if entry.get(key) is not None and math.isfinite(entry[key])]


def _series(run: RunFacts, key: str) -> list[float]:
    return [entry[key] for entry in _entries(run, key)]


def _diagnosis(name: str, finding: str, remedy: str) -> dict[str, str]:
    return {"name": name, "finding": finding, "remedy": remedy}


def budget_diagnosis(
    kd: Sequence[RunFacts], twin: Sequence[RunFacts], tolerance: float
) -> dict[str, str] | None:
    """Every budget difference between the KD runs and their twins (:func:`compare_budgets`): ``unequal
    budgets`` when one decides the comparison, ``budget difference`` when it is only named (the KD run's
    unlabelled rows at equal steps)."""
    found = compare_budgets(kd, twin, tolerance)
    if not found.differences:
        return None
    pair = next((r for r in twin if r.seed == kd[0].seed), twin[0])
    if found.same:
        return _diagnosis(
            "budget difference",
            "Budgets: " + "; ".join(found.differences) + ".",
            "Nothing to equalise: both made the same optimizer steps of the same batch size; the verdict weighs "
            "the teacher's soft labels on the unlabelled rows against more passes over the labels.",
        )
    return _diagnosis(
        "unequal budgets",
        "Unequal budgets: " + "; ".join(found.differences) + f" (tolerance {tolerance:.0%}).",
        budget_remedy(kd[0], pair),
    )


def _late_fall(run: RunFacts, key: str) -> tuple[float | None, float | None, bool]:
    """The share of ``key``'s whole fall made over the last quarter of the learning-rate time, the same
    over the last quarter of the steps, and whether the learning-rate clock was available."""
    entries = _entries(run, key)
    values = [e[key] for e in entries]
    by_step = late_fall_share(values, [e["step"] for e in entries])
    clock = lr_clock(entries)
    return (by_step, by_step, False) if clock is None else (late_fall_share(values, clock), by_step, True)


def under_training(kd: RunFacts, twin: RunFacts, thresholds: Mapping[str, float]) -> dict[str, str] | None:
    """The KD run was still learning when it stopped, measured on the learning-rate clock (a decaying
    schedule flattens every curve on the step axis, :mod:`hf_kd.knowledge.progress`): its evaluation
    metric, when evaluated during training, still rose by ``still_improving`` over the last quarter of the
    learning-rate time (else its soft loss — its training loss without a soft term — made at least
    ``still_falling`` of its whole fall there); or it made fewer optimizer steps than the twin (beyond
    ``budget_tolerance``) with its soft loss still above ``soft_not_learnt`` of its start. Also stated:
    labelled rows seen fewer times than by the twin."""
    soft = _series(kd, "loss_soft")
    evidence = []
    if len(kd.evals) >= 4:
        clock = lr_clock(kd.losses) if kd.losses else None
        steps = [e["step"] for e in kd.evals]
        rise = late_rise(
            [e["metric"] for e in kd.evals], None if clock is None else clock_at(steps, kd.losses, clock)
        )
        if rise is not None and rise >= thresholds["still_improving"]:
            where = "learning-rate time" if clock is not None else "evaluations"
            evidence.append(
                f"its evaluation metric still rose {rise:+.3f} over the last quarter of its {where} "
                f"({len(kd.evals)} evaluations during training, {kd.evals[0]['metric']:.3f} → {kd.evals[-1]['metric']:.3f})"
            )
    else:
        key = "loss_soft" if soft else "loss"
        share, by_step, on_clock = _late_fall(kd, key)
        if share is not None and share >= thresholds["still_falling"]:
            where = "learning-rate time" if on_clock else "training"
            hidden = (
                f"; on the step axis the decaying learning rate made it look flat ({by_step:.0%})"
                if on_clock and (by_step or 0.0) < thresholds["still_falling"]
                else ""
            )
            values = _series(kd, key)
            evidence.append(
                f"its {'soft' if soft else 'training'} loss ({values[0]:.3g} → {values[-1]:.3g}) made {share:.0%} of its "
                f"whole fall in the last quarter of its {where} (a converged curve: near 0 %){hidden}"
            )
    short = kd.optimizer_steps < twin.optimizer_steps and apart(
        kd.optimizer_steps, twin.optimizer_steps, thresholds["budget_tolerance"]
    )
    if soft and soft[-1] >= thresholds["soft_not_learnt"] * soft[0] and (evidence or short):
        evidence.append(
            f"its soft loss is still {soft[-1] / soft[0]:.0%} of its start ({soft[0]:.3g} → {soft[-1]:.3g}) "
            f"after {kd.optimizer_steps:,} optimizer steps (the twin made {twin.optimizer_steps:,})"
        )
    if not evidence:
        return None
    if twin.epochs > kd.epochs:
        evidence.append(f"it saw each labelled row {kd.epochs:.3g} times, the twin {twin.epochs:.3g} times")
    factor = max(2.0, twin.optimizer_steps / kd.optimizer_steps if kd.optimizer_steps else 2.0)
    return _diagnosis(
        "under-training",
        "Under-trained: " + "; ".join(evidence) + ".",
        f"Train the KD student longer: {factor:.3g}× the steps, and the twin for as many (max_steps: "
        f"{math.ceil(factor * kd.optimizer_steps):,} for both), until it stops improving.",
    )


def capacity_gap(kd: RunFacts, thresholds: Mapping[str, float]) -> dict[str, str] | None:
    """The student cannot follow the teacher: low agreement and a soft loss far from its floor, with a
    teacher many times larger (asked only of a run that is not under-trained: it stopped learning)."""
    soft = _series(kd, "loss_soft")
    if kd.agreement is None or kd.agreement >= thresholds["low_agreement"] or len(soft) < 2:
        return None
    if soft[-1] < thresholds["soft_not_learnt"] * soft[0]:
        return None
    ratio = (
        kd.teacher_parameters / kd.student_parameters
        if kd.teacher_parameters and kd.student_parameters
        else None
    )
    if ratio is not None and ratio < thresholds["size_ratio"]:
        return None
    size = f"; the teacher is {ratio:.1f}× larger" if ratio is not None else ""
    return _diagnosis(
        "capacity gap",
        f"Capacity gap: the student agrees with the teacher on {kd.agreement:.1%} of evaluation rows and its soft loss "
        f"stopped at {soft[-1] / soft[0]:.0%} of its start ({soft[-1]:.3g}){size}.",
        "The student cannot follow this teacher (Cho & Hariharan 2019; Mirzadeh et al. 2020): try an "
        "early-stopped or smaller teacher, a teacher assistant of intermediate size distilled first, or a lower τ.",
    )


def term_balance(kd: RunFacts, limit: float) -> dict[str, str] | None:
    """Over the first quarter of training (where the student's direction is set), the mean logged gradient
    norm of one weighted term (``grad_norm_hard``, ``grad_norm_soft``: with respect to the student's
    logits, logged by the distillation trainer) is ``limit`` times the other's."""
    hard, soft = _series(kd, "grad_norm_hard"), _series(kd, "grad_norm_soft")
    if not hard or len(hard) != len(soft) or not 0 < kd.alpha < 1:
        return None
    early = max(1, len(hard) // 4)
    hard_norm, soft_norm = _mean(hard[:early]), _mean(soft[:early])
    if min(hard_norm, soft_norm) <= 0 or max(hard_norm, soft_norm) / min(hard_norm, soft_norm) < limit:
        return None
    if soft_norm > hard_norm:
        which, remedy = (
            "soft",
            f"lower α (e.g. {max(0.1, kd.alpha - 0.4):.1g}) or τ so that the labels still steer the student",
        )
    else:
        which, remedy = (
            "hard",
            f"raise α (e.g. {min(0.9, kd.alpha + 0.4):.1g}) so that the teacher's term counts",
        )
    return _diagnosis(
        "hard/soft balance",
        f"The {which} term dominates: over the first quarter of training its gradient (on the student's logits) "
        f"is {max(hard_norm, soft_norm) / min(hard_norm, soft_norm):.0f}× the other's: hard {hard_norm:.3g}, "
        f"soft {soft_norm:.3g} (α = {kd.alpha}, τ = {kd.temperature}).",
        f"Rebalance: {remedy}.",
    )


def teacher_weak_classes(
    per_class: Mapping[str, Mapping[str, float]], deficit: float, min_items: int
) -> dict[str, str] | None:
    """Classes (``name → scores``, as :func:`per_class_scores`) on which the teacher's F1 is below the
    student's by at least ``deficit``: precision and recall both count, so a student that predicts a
    class everywhere (recall 1, precision low) is not called better on it."""
    weak = sorted(
        (
            name
            for name, c in per_class.items()
            if c["items"] >= min_items and c["student_f1"] - c["teacher_f1"] >= deficit
        ),
        key=lambda name: per_class[name]["teacher_f1"] - per_class[name]["student_f1"],
    )
    if not weak:
        return None

    def scores(name: str) -> str:
        c = per_class[name]
        return (
            f"{name} (F1 {c['teacher_f1']:.2f} vs {c['student_f1']:.2f}: precision {c['teacher_precision']:.2f} "
            f"vs {c['student_precision']:.2f}, recall {c['teacher_recall']:.2f} vs {c['student_recall']:.2f}, "
            f"{c['items']:,} items)"
        )

    return _diagnosis(
        "teacher worse on some classes",
        f"The teacher is worse than the student on {len(weak)} classes (teacher vs student): "
        + ", ".join(scores(n) for n in weak[:8])
        + ".",
        "Its soft labels pull the student the wrong way there: use a better teacher for those classes, a lower α, "
        "or keep those classes' rows labelled.",
    )


KNOWLEDGE_REMEDIES = {
    "Label-smoothed teacher": "use a teacher trained without label smoothing (its class relations are erased).",
    "Over-confident teacher": "use an earlier (early-stopped) checkpoint of the teacher, or a higher τ.",
    "Miscalibrated teacher": "calibrate the teacher (a τ fitted on held-out data) or use an earlier checkpoint.",
    "Near-uniform teacher": "lower τ: the teacher's distribution is nearly flat at this temperature.",
}
"""What to try for each failure pattern of :func:`hf_kd.knowledge.diagnosis.diagnose`, by its first words."""


def knowledge_causes(failures: Sequence[str]) -> list[dict[str, str]]:
    """The knowledge report's failure patterns as diagnoses with a remedy ("No failure pattern" left out)."""
    found = []
    for sentence in failures:
        for start, remedy in KNOWLEDGE_REMEDIES.items():
            if sentence.startswith(start):
                found.append(_diagnosis(start.lower(), sentence, remedy[0].upper() + remedy[1:]))
    return found


def diagnose_outcome(
    kd: Sequence[RunFacts],
    twin: Sequence[RunFacts],
    *,
    knowledge_failures: Sequence[str] = (),
    per_class: Mapping[str, Mapping[str, float]] | None = None,
    thresholds: Mapping[str, float] = OUTCOME_THRESHOLDS,
) -> list[dict[str, str]]:
    """Every cause found, each ``{name, finding, remedy}``: budget differences over every pair of runs,
    then — measured on the first KD run and its twin of the same seed (else the first twin) —
    under-training, capacity gap, the hard/soft balance, classes the teacher gets wrong, and the
    teacher's failure patterns from the knowledge report."""
    first = kd[0]
    pair = next((r for r in twin if r.seed == first.seed), twin[0])
    under_trained = under_training(first, pair, thresholds)
    found = [
        budget_diagnosis(kd, twin, thresholds["budget_tolerance"]),
        under_trained,
        None
        if under_trained
        else capacity_gap(first, thresholds),  # a student still learning is not at its limit
        term_balance(first, thresholds["term_dominance"]),
        teacher_weak_classes(
            per_class or {}, thresholds["class_deficit"], int(thresholds["class_min_items"])
        ),
    ]
    return [d for d in found if d is not None] + knowledge_causes(knowledge_failures)


def _precision_recall(predicted, labels, k: int) -> tuple[float, float, int]:
    hits = int(((predicted == k) & (labels == k)).sum())
    n_predicted, n_items = int((predicted == k).sum()), int((labels == k).sum())
    return (hits / n_predicted if n_predicted else 0.0), (hits / n_items if n_items else 0.0), n_predicted


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def per_class_scores(
    teacher_logits, student_logits, labels, names: Sequence[str] = ()
) -> dict[str, dict[str, float]]:
    """``class name → {teacher_precision, teacher_recall, teacher_f1, teacher_predicted, student_…,
    items}`` over the labelled items (torch tensors ``[N, K]``, ``[N, K]``, ``[N]``; a label < 0 is
    unlabelled). Precision = right predictions of the class / predictions of it (0 when never
    predicted), recall = right / items of it, F1 their harmonic mean. A class without a name is named by
    its index."""
    keep = labels >= 0
    y = labels[keep]
    predicted = {"teacher": teacher_logits[keep].argmax(-1), "student": student_logits[keep].argmax(-1)}
    table = {}
    for k in y.unique().tolist():
        name = names[k] if k < len(names) else str(k)
        row: dict[str, float] = {"items": int((y == k).sum())}
        for who, guess in predicted.items():
            precision, recall, n_predicted = _precision_recall(guess, y, k)
            row |= {
                f"{who}_precision": precision,
                f"{who}_recall": recall,
                f"{who}_f1": _f1(precision, recall),
                f"{who}_predicted": n_predicted,
            }
        table[name] = row
    return table
