"""Did distillation pay? A run compared with its no-KD twin (same student, same data, α = 0): the gain and
its seed spread, the share of the no-KD → teacher gap closed, the budgets of both — the verdict only at an
equal budget (:mod:`hf_kd.knowledge.budget`), "cannot judge" otherwise — and each measured cause with what
to try (:mod:`hf_kd.knowledge.causes`), decided by the rules of thumb of
:data:`hf_kd.knowledge.facts.OUTCOME_THRESHOLDS`. Budget differences and under-training
(:mod:`hf_kd.knowledge.progress`) are named whatever the verdict; the other causes when KD did not help.

Pure: run facts in (:class:`RunFacts`, read from a run's folder by ``hf_kd.runs.run_record``), numbers and
sentences out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from hf_kd.knowledge.budget import compare_budgets
from hf_kd.knowledge.causes import diagnose_outcome
from hf_kd.knowledge.facts import OUTCOME_THRESHOLDS, RunFacts


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
