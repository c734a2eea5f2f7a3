"""Did distillation pay? A run compared with its no-KD twin (same student, same data, α = 0): the gain and
its seed spread, the share of the no-KD → teacher gap closed, the budgets of both — the verdict only at an
equal budget (:mod:`hf_kd.knowledge.budget`), "cannot judge" otherwise — and each measured cause with what
to try, decided by the rules of thumb of :data:`OUTCOME_THRESHOLDS`. Budget differences and under-training
(:mod:`hf_kd.knowledge.progress`) are named whatever the verdict; the other causes when KD did not help.

Pure: run facts in (:class:`RunFacts`, read from a run's folder by ``hf_kd.runs.run_record``), numbers and
sentences out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_kd.knowledge.budget import BUDGET_TOLERANCE, apart, budget_remedy, compare_budgets
from hf_kd.knowledge.progress import clock_at, late_fall_share, late_rise, lr_clock

OUTCOME_THRESHOLDS = {
    "confidence": 0.9,
    "budget_tolerance": BUDGET_TOLERANCE,
    "still_improving": 0.02,
    "still_falling": 0.1,
    "soft_not_learnt": 0.5,
    "low_agreement": 0.8,
    "size_ratio": 5.0,
    "term_dominance": 10.0,
    "class_deficit": 0.1,
    "class_min_items": 5,
}
"""Where the outcome's diagnoses draw their lines (rules of thumb from the digits runs of BENCHMARKS.md,
"When KD does not help"; read the numbers next to them):

- ``confidence``: the verdict's t interval of the mean gain (paired by seed: mean ± t·s/√n over the n
  per-seed gains, t the Student quantile at (1 + confidence)/2 with n − 1 degrees of freedom; unpaired:
  Welch's). "Helped" when the whole interval is above 0, "hurt" when below: each a one-sided test at
  (1 − confidence)/2 = 5 %. At 3 seeds the mean gain must exceed 1.69× the per-seed gains' std, at 5
  seeds 0.95×, at 10 seeds 0.55×; one seed decides nothing.
- ``budget_tolerance``: the KD run and its twin differ by more than this share in optimizer steps, rows
  per step, labelled rows, or labelled rows seen (except the KD run's own unlabelled rows at equal
  steps, see :func:`hf_kd.knowledge.budget.compare_budgets`) → unequal budgets: the comparison measures
  the budget, not the teacher, and the verdict is "cannot judge".
- ``still_improving``: with ≥ 4 evaluations logged during training (``eval_strategy: steps``), the
  compared metric's mean over the last quarter of the learning-rate time (``Σ η`` up to each step,
  :mod:`hf_kd.knowledge.progress`) exceeds the quarter before by at least this → the student was still
  getting better when it stopped: under-trained. The held-out metric is the direct signal; a training
  loss keeps falling while a student memorises a few labels. On digits (evaluated every 10 % of 720
  cosine steps) converged runs rose at most 0.013 (7 of 539 images).
- ``still_falling``: without such evaluations, the soft loss (the training loss when there is no soft
  term) made at least this share of its whole fall (first quarter's mean → last quarter's) over the
  last quarter of the learning-rate time → still falling: under-trained. A straight line scores 1/3, a
  flattened curve near 0 (a relative drop would flag a loss that is tiny and still halving). On the
  learning-rate clock a decaying schedule does not flatten the curve: on the standard-library text
  runs of BENCHMARKS.md, "When KD does not help", an 800-step linear-decay KD run scores 0.22 there
  (0.075 on the step axis: "flat") and gained 7.4 points at twice the steps; at 1,600 steps, on a
  plateau, it scores 0.07.
- ``soft_not_learnt``: the soft loss at the end is at least this share of its first logged value → the
  student has not come close to the teacher on the transfer rows.
- ``low_agreement``: student–teacher agreement on the evaluation split below it, with the soft loss no
  longer falling and the teacher at least ``size_ratio`` times larger → a capacity gap.
- ``term_dominance``: over the first quarter of training, the mean gradient norm of one weighted term
  on the student's logits (``grad_norm_hard`` = ‖∂(1 − α)·CE/∂z‖, ``grad_norm_soft`` = ‖∂α·s·D/∂z‖,
  logged by the trainer once per logging window) is this many times the other's → the other term
  hardly steers the update (the parameters' gradient is the same Jacobian applied to their sum).
- ``class_deficit`` / ``class_min_items``: the teacher is less accurate than the student by at least this
  much on a class with at least this many evaluation items → it teaches that class wrongly.
"""


@dataclass(frozen=True)
class RunFacts:
    """What one finished run's folder records: its settings, budget, final scores and training log."""

    name: str
    """The run's folder (for the sentences)."""
    seed: int
    alpha: float
    temperature: float
    temperature_squared: bool = True
    metric: float | None = None
    """The compared final evaluation metric of the student (e.g. ``eval_accuracy``)."""
    teacher_metric: float | None = None
    """The same metric of the teacher on the same split, when the run evaluated it."""
    optimizer_steps: int = 0
    epochs: float = 0.0
    labelled_rows: int = 0
    """Training rows with a label (after ``num_labeled_examples`` and any drop)."""
    unlabelled_rows: int = 0
    """Training rows without a label the run kept (soft term only)."""
    inert_rows_dropped: int = 0
    """Unlabelled rows dropped because nothing learns from them at this setting (α = 0 or no soft term)."""
    batch_size: int = 0
    """Rows per optimizer step (all processes, gradient accumulation included)."""
    student_parameters: int | None = None
    teacher_parameters: int | None = None
    agreement: float | None = None
    """Share of evaluation rows where student and teacher predict the same class."""
    losses: tuple[dict[str, float], ...] = field(default_factory=tuple)
    """The logged training entries in order: ``step``, ``loss`` and, when logged, ``learning_rate``,
    ``loss_hard``, ``loss_soft``, ``grad_norm_hard``, ``grad_norm_soft`` (the weighted terms' gradient
    norms)."""
    evals: tuple[dict[str, float], ...] = field(default_factory=tuple)
    """The evaluations logged during training in order: ``step`` and the compared ``metric``."""

    @property
    def uses_soft_term(self) -> bool:
        return self.alpha > 0

    @property
    def labelled_rows_seen(self) -> float:
        """Labelled rows fed to the loss: every epoch passes each labelled row once."""
        return self.epochs * self.labelled_rows

    @property
    def rows_seen(self) -> int:
        return self.optimizer_steps * self.batch_size


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _pm(mean: float, std: float, digits: int = 3, sign: bool = False) -> str:
    head = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return head if math.isnan(std) else f"{head} ± {std:.{digits}f}"


def gain_interval(
    gains: Sequence[float], confidence: float, other: Sequence[float] | None = None
) -> tuple[float, float]:
    """The ``confidence`` t interval of the mean of ``gains`` (paired differences), or — with ``other`` —
    of mean(gains) − mean(other) (Welch, unpaired). ``(nan, nan)`` when a side has fewer than 2 values."""
    from scipy.stats import t as student_t

    if len(gains) < 2 or (other is not None and len(other) < 2):
        return math.nan, math.nan
    mean, std = mean_std(gains)
    if other is None:
        se, df = std / math.sqrt(len(gains)), len(gains) - 1
    else:
        mean_b, std_b = mean_std(other)
        a, b = std**2 / len(gains), std_b**2 / len(other)
        mean, se = mean - mean_b, math.sqrt(a + b)
        df = (a + b) ** 2 / (a**2 / (len(gains) - 1) + b**2 / (len(other) - 1)) if a + b else 1
    half = student_t.ppf((1 + confidence) / 2, df) * se
    return mean - half, mean + half


def compare(
    kd: Sequence[RunFacts], twin: Sequence[RunFacts], metric: str = "accuracy", confidence: float = 0.9
) -> dict[str, Any]:
    """The outcome of ``kd`` runs against their no-KD ``twin`` runs: seeds are paired where both ran one
    (the seed fixes the initialisation and the labelled subset), else the means are compared. Keys:
    ``kd``/``twin``/``teacher`` (means, stds), ``gain`` and ``gain_std`` (paired when ``paired``),
    ``gains`` per seed, ``interval`` (the ``confidence`` t interval of the mean gain, see
    :data:`OUTCOME_THRESHOLDS`), ``gap_closed`` (share of the twin → teacher gap; None without a teacher
    score or gap), ``verdict`` (``helped``, ``hurt`` or ``inside the spread``: the interval holds 0 or
    there is one seed) and ``sentence``."""
    for side, runs in (("KD", kd), ("no-KD twin", twin)):
        if not runs:
            raise ValueError(f"the outcome needs at least one {side} run")
        missing = [r.name for r in runs if r.metric is None]
        if missing:
            raise ValueError(f"{side} runs without a final {metric}: {missing} (did they evaluate?)")
    twin_by_seed = {r.seed: r.metric for r in twin}
    gains = {r.seed: r.metric - twin_by_seed[r.seed] for r in kd if r.seed in twin_by_seed}
    kd_mean, kd_std = mean_std([r.metric for r in kd])
    twin_mean, twin_std = mean_std([r.metric for r in twin])
    if gains:
        gain, gain_std = mean_std(list(gains.values()))
        low, high = gain_interval(list(gains.values()), confidence)
    else:
        gain, gain_std = kd_mean - twin_mean, math.hypot(kd_std, twin_std)
        low, high = gain_interval([r.metric for r in kd], confidence, [r.metric for r in twin])
    teachers = [r.teacher_metric for r in kd if r.teacher_metric is not None]
    teacher = statistics.fmean(teachers) if teachers else None
    gap_closed = None if teacher is None or teacher <= twin_mean else gain / (teacher - twin_mean)
    verdict = "helped" if low > 0 else "hurt" if high < 0 else "inside the spread"  # NaN: neither
    how = (
        f"paired over {len(gains)} seed{'s' if len(gains) > 1 else ''}"
        if gains
        else f"means of {len(kd)} vs {len(twin)} runs, unpaired"
    )
    if math.isnan(low):
        how += "; one seed: no spread, no verdict — run at least 3 seeds"
    else:
        how += f"; {confidence:.0%} interval {low:+.3f} … {high:+.3f}"
    head = {
        "helped": "KD helped",
        "hurt": "KD did not help: the student is worse than without KD",
        "inside the spread": "KD did not help measurably: the gain's interval includes 0",
    }[verdict]
    detail = (
        f"{metric} {_pm(kd_mean, kd_std)} with KD vs {_pm(twin_mean, twin_std)} without "
        f"(gain {_pm(gain, gain_std, sign=True)}, {how})"
    )
    if teacher is not None:
        closed = (
            ""
            if gap_closed is None
            else f"; KD closed {gap_closed:.0%} of the no-KD → teacher gap"
            if gap_closed >= 0
            else f"; KD widened the no-KD → teacher gap by {-gap_closed:.0%}"
        )
        detail += f"; teacher {teacher:.3f}{closed}"
    return {
        "metric": metric,
        "kd": {"mean": kd_mean, "std": kd_std, "n": len(kd)},
        "twin": {"mean": twin_mean, "std": twin_std, "n": len(twin)},
        "teacher": teacher,
        "gain": gain,
        "gain_std": gain_std,
        "gains": gains,
        "paired": bool(gains),
        "interval": (low, high),
        "confidence": confidence,
        "gap_closed": gap_closed,
        "verdict": verdict,
        "detail": detail + ".",
        "sentence": f"{head}. {detail}.",
    }


def budget_sentence(run: RunFacts, label: str) -> str:
    """One run's budget in words: optimizer steps, epochs, labelled and unlabelled rows, inert rows dropped."""
    text = (
        f"{label}: {run.optimizer_steps:,} optimizer steps ({run.epochs:.3g} epochs of batch {run.batch_size}), "
        f"{run.labelled_rows:,} labelled rows seen {run.epochs:.3g} times each ({run.labelled_rows_seen:,.0f} in all), "
        f"{run.unlabelled_rows:,} unlabelled rows"
    )
    return text + (
        f", {run.inert_rows_dropped:,} inert unlabelled rows dropped" if run.inert_rows_dropped else ""
    )


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


ALWAYS_NAMED = ("unequal budgets", "budget difference", "under-training")
"""Causes named whatever the verdict: a gain at another budget, or from a student still learning, is not
the teacher's to claim."""


def outcome(
    kd: Sequence[RunFacts],
    twin: Sequence[RunFacts],
    *,
    metric: str = "accuracy",
    knowledge_failures: Sequence[str] = (),
    per_class: Mapping[str, Mapping[str, float]] | None = None,
    thresholds: Mapping[str, float] = OUTCOME_THRESHOLDS,
) -> dict[str, Any]:
    """:func:`compare` at an equal budget — else the verdict is ``cannot judge`` and the sentence says
    which budgets differ — plus both runs' budgets in words and the diagnoses of :func:`diagnose_outcome`:
    budget differences and under-training whatever the verdict, the other causes when KD did not help."""
    result = compare(kd, twin, metric, thresholds["confidence"])
    pair = next((r for r in twin if r.seed == kd[0].seed), twin[0])
    budgets = compare_budgets(kd, twin, thresholds["budget_tolerance"])
    if not budgets.same:
        result["verdict"] = "cannot judge"
        result["sentence"] = (
            f"Cannot judge: budgets differ ({', '.join(budgets.blocking)}); the difference measures the budget, "
            f"not the teacher. {result['detail']}"
        )
    causes = diagnose_outcome(
        kd, twin, knowledge_failures=knowledge_failures, per_class=per_class, thresholds=thresholds
    )
    if result["verdict"] == "helped":
        causes = [c for c in causes if c["name"] in ALWAYS_NAMED]
    result["budgets"] = [budget_sentence(kd[0], "KD"), budget_sentence(pair, "No KD")]
    result["budget_differences"] = list(budgets.differences)
    result["diagnoses"] = causes
    result["thresholds"] = dict(thresholds)
    return result


def outcome_markdown(result: Mapping[str, Any]) -> str:
    """The outcome as markdown: the verdict, the budgets of both runs, then each cause and what to try."""
    lines = [f"**{result['sentence']}**", "", "Budgets (seed of the first run):", ""]
    lines += [f"- {s}." for s in result["budgets"]]
    if result["diagnoses"]:
        lines += ["", "Why, and what to try:", ""]
        lines += [f"- {d['finding']} **Try:** {d['remedy']}" for d in result["diagnoses"]]
    elif result["verdict"] != "helped":
        lines += [
            "",
            "No cause found by the rules of thumb; try the sweep (scripts/tune.py) over α, τ and the budget.",
        ]
    return "\n".join(lines)


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
