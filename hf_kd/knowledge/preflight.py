"""The pre-flight check: before any training, what a teacher offers a student and which setting to train
with — measured on a slice of the data, each choice with the measurement behind it.

Pure: the teacher's measures in (:mod:`hf_kd.knowledge.profile`), a recommended setting and sentences
out. The rules that turn the measures into a setting are :data:`PREFLIGHT_RULES`, each with the runs it
comes from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hf_kd.knowledge.diagnosis import THRESHOLDS
from hf_kd.knowledge.facts import OUTCOME_THRESHOLDS

PREFLIGHT_RULES = {
    "soft_signal": 0.1,
    "near_uniform_entropy": THRESHOLDS["near_uniform_entropy"],
    "saturated_share": THRESHOLDS["saturated_share"],
    "flat_tail": THRESHOLDS["flat_tail"],
    "ece": THRESHOLDS["ece"],
    "teacher_margin": 0.02,
    "alpha_reliable": 0.9,
    "alpha_cautious": 0.5,
    "alpha_token_level": 0.8,
    "min_epochs": 15.0,
    "kept_mass": 0.9,
    "size_ratio": OUTCOME_THRESHOLDS["size_ratio"],
    "on_policy_gap_nats": 1.0,
}
"""Where the pre-flight draws its lines (BENCHMARKS.md, "Before you train", checks them against sweeps):

- ``soft_signal``: τ is 1 unless the teacher is saturated (``saturated_share``); a saturated teacher gets
  the smallest τ of :data:`CANDIDATE_TEMPERATURES` at which it puts at least this share of its mass off
  the true class on average (mean 1 − p^τ_t). Revised after the runs of BENCHMARKS.md, "Before you
  train": the first rule (that smallest τ for every teacher) chose τ 2 for the text task's teacher
  (confident on its training rows, 0.033 off the true class at τ 1, none saturated), where τ 1 measured
  +0.123 ± 0.016 better (3 seeds, paired); on digits τ 1 and τ 2 were within the seed spread, and on a
  top-k LM cache τ 1 and τ 2 were equal ("Closing the gap to online KD"). The saturated branch is the
  paper's over-confident teacher (the 30-epoch digits teacher, 74 % of p_t > 0.99, gained nothing at
  τ 2); it is not measured against a sweep. On a task it was not revised on (a real-text LM, online,
  "On a held-out real-text LM") τ 1 beat τ 2 at α 0.5 and α 0.9 on every seed; on the 20-package text
  task, tuned on by no rule ("Out of sample"), τ 1 was within the seed spread of the best fixed τ at α 0.9
  (τ 2: −0.003 ± 0.008, 200 steps) and beat τ 4 on every seed (+0.069 ± 0.006). ``temperature: auto``
  is this rule, applied by the run (``hf_kd.auto_temperature``).
- ``near_uniform_entropy``: never a τ at which the teacher's normalised entropy is at or above it (the
  knowledge report's line: KD is then mostly label smoothing).
- ``saturated_share``, ``flat_tail``, ``ece``: the knowledge report's failure lines
  (:data:`hf_kd.knowledge.diagnosis.THRESHOLDS`), here as warnings before training; a saturated, flat or
  over-confident (ECE at or above the line, mean confidence above accuracy) teacher gets ``alpha_cautious``.
  An under-confident one does not: the demo's teacher (ECE 0.118 on its training images, confidence below
  accuracy) helped at α 0.9.
- ``teacher_margin``: the teacher must beat the student's reference score (a no-KD run's, when known,
  else the majority-class share) by at least this, or the pre-flight warns that KD is unlikely to help.
- ``alpha_reliable`` / ``alpha_cautious``: α for a healthy teacher / for one that fails a health line. α 0.9 is the demo's setting that helped (+0.082 ± 0.059, 5 seeds); α 0.5 with
  the same teacher on 377 labels at τ 2 was −0.004 ± 0.041 ("Ablation: the paper's synthetic teachers").
- ``alpha_token_level``: α for a token-level (causal LM) teacher read through a top-k cache (``top_k_cache``):
  α 0.8 was best of 0.5 / 0.8 / 0.9 from a top-32 cache of a real-text LM ("Closing the gap to online KD").
  A dense (online or full-logit) token-level teacher gets ``alpha_reliable``: online on a real-text LM,
  α 0.9 τ 1 beat α 0.8 τ 1 by 0.017 ± 0.006 nats on every seed (3 seeds, 200 steps, "On a held-out
  real-text LM"), as α 0.9 was the best α on digits and text too.
- ``min_epochs``: the budget is at least this many passes over the rows the soft term reads, and never
  fewer steps than the planned run: 2 epochs over the digits' 1,258 rows (80 steps) lost −0.534, 18 epochs
  (720 steps) won +0.098 ("When KD does not help"). On the 20-package text task, tuned on by no rule, it
  raised 200 steps to 1,495 and took the recommended run from 0.281 to 0.523 (the teacher: 0.518); its
  twin at 1,495 steps rose to 0.486 ("Out of sample"). Not checked on an LM (it asked 1,800 steps for a
  200-step run there).
- ``kept_mass``: the cache keeps the smallest k of :data:`CANDIDATE_TOP_K` whose mean kept probability
  mass reaches it; below, the cache warns (``LOW_KEPT_MASS``) and a cache keeping 0.5–0.6 of a flat
  teacher's mass stayed 0.175 nats behind online KD ("Closing the gap to online KD").
- ``size_ratio``: the outcome report's capacity-gap line (teacher parameters / student parameters).
- ``on_policy_gap_nats``: with on-policy KD planned (``lmbda`` > 0), a student whose per-token NLL on the
  data is more than this many nats above the teacher's does not yet write plausible text: from scratch
  (a gap of several nats), fully on-policy KD reached perplexity 318 / 209 / 251 against no KD's 134.3 /
  147.4 / 136.9; on reversal, on-policy lost 0.29–0.43 exact match from weak warm students and was within
  0.01 of off-policy KD from good ones ("On-policy distillation ...", "Warm-started"). Only the
  from-scratch end of this line is measured.
"""


@dataclass
class Choice:
    """One recommended field: its value and the measurement it was chosen from."""

    value: Any
    because: str


@dataclass
class Recommendation:
    """The recommended setting (``fields``: recipe field → :class:`Choice`) and the plain warnings."""

    fields: dict[str, Choice]
    warnings: list[str] = field(default_factory=list)

    def recipe_fields(self) -> dict[str, Any]:
        """The recipe fields alone (the ``top_k`` of a cache is a capture setting, not a recipe field)."""
        return {name: c.value for name, c in self.fields.items() if name != "cache_top_k"}

    def as_dict(self) -> dict[str, Any]:
        return {"fields": {n: asdict(c) for n, c in self.fields.items()}, "warnings": list(self.warnings)}


def choose_temperature(profile: Mapping[str, Any], rules: Mapping[str, float] = PREFLIGHT_RULES) -> Choice:
    """τ from a :func:`~hf_kd.knowledge.profile.teacher_profile` (the ``soft_signal`` rule of
    :data:`PREFLIGHT_RULES`): 1 unless the teacher is saturated; else the smallest measured τ at which it
    puts ``soft_signal`` of its mass off the true class, never one where it is near uniform. The pre-flight's
    recommendation and ``temperature: auto`` (``hf_kd.auto_temperature``) both read it."""
    t, rows = profile["teacher"], sorted(profile["by_temperature"].items())
    if t["saturation_share"] < rules["saturated_share"]:
        r = profile["by_temperature"].get(1.0)
        signal = (
            "" if r is None else f"; it puts {r['soft_signal']:.3f} of its mass off the true class at τ 1"
        )
        return Choice(
            1.0,
            f"the teacher is not saturated (p_t > 0.99 on {t['saturation_share']:.1%} of items, "
            f"< {rules['saturated_share']:.0%}): τ 1 distils its own distribution{signal}",
        )
    usable = [(tau, r) for tau, r in rows if r["teacher_entropy"] < rules["near_uniform_entropy"]]
    if not usable:
        tau, r = rows[0]
        return Choice(
            tau,
            f"the teacher is near uniform at every measured τ (normalised entropy {r['teacher_entropy']:.3f} at "
            f"τ {tau:g}, ≥ {rules['near_uniform_entropy']}): the lowest τ keeps the most of its structure",
        )
    for tau, r in usable:
        if r["soft_signal"] >= rules["soft_signal"]:
            return Choice(
                tau,
                f"a saturated teacher (p_t > 0.99 on {t['saturation_share']:.1%}): at τ {tau:g} it puts "
                f"{r['soft_signal']:.3f} of its mass off the true class on average (≥ {rules['soft_signal']}), "
                f"normalised entropy {r['teacher_entropy']:.3f}",
            )
    tau, r = usable[-1]
    return Choice(
        tau,
        f"a saturated teacher: even at τ {tau:g} it puts only {r['soft_signal']:.3f} of its mass off the true "
        f"class (< {rules['soft_signal']}): the highest τ below near-uniform",
    )


def recommend(
    profile: Mapping[str, Any],
    *,
    planned_steps: int,
    train_rows: int,
    batch_size: int,
    teacher_parameters: int | None = None,
    student_parameters: int | None = None,
    student_reference: float | None = None,
    token_level: bool = False,
    top_k_cache: bool = False,
    lmbda: float = 0.0,
    divergence: str = "forward_kl",
    rules: Mapping[str, float] = PREFLIGHT_RULES,
) -> Recommendation:
    """The recommended α, τ, divergence, budget (``max_steps``) and, for a token-level teacher, cache
    width, from a :func:`teacher_profile` and the planned run (``planned_steps`` optimizer steps of
    ``batch_size`` rows over ``train_rows`` rows the soft term reads, on-policy share ``lmbda``), each
    with its measurement; plus the warnings when the teacher is unlikely to help. ``student_reference``
    is the student's expected score without KD (a no-KD run's accuracy), when known; ``top_k_cache``:
    the teacher is read through a top-k cache (its α is ``alpha_token_level`` at the token level)."""
    t = profile["teacher"]
    warnings: list[str] = []
    fields: dict[str, Choice] = {"temperature": choose_temperature(profile, rules)}

    reference, source = (
        (student_reference, "the student's reference score without KD")
        if student_reference is not None
        else (profile["majority_share"], "the majority-class share")
    )
    heldout = profile.get("heldout")
    accuracy, where = (heldout["accuracy"], "held-out accuracy") if heldout else (t["accuracy"], "accuracy")
    if not token_level and accuracy < reference + rules["teacher_margin"]:
        warnings.append(
            f"The teacher is unlikely to help: its {where} {accuracy:.3f} is not above {source} "
            f"({reference:.3f}) by {rules['teacher_margin']}. Train the student on labels alone, or find a better teacher."
        )
    saturated = t["saturation_share"] >= rules["saturated_share"]
    flat = profile["num_classes"] > 2 and t["tail_flatness"] >= rules["flat_tail"]
    miscalibrated = t["expected_calibration_error"] >= rules["ece"]
    overconfident = miscalibrated and t["confidence_mean"] > t["accuracy"]
    if saturated:
        warnings.append(
            f"Over-confident teacher: p_t > 0.99 on {t['saturation_share']:.1%} of items (≥ {rules['saturated_share']:.0%}): "
            "it hardly tells easy from hard items (level 3). An earlier checkpoint of it may teach better."
        )
    if flat:
        warnings.append(
            f"Flat tail: the teacher's wrong-class distribution has normalised entropy {t['tail_flatness']:.3f} "
            f"(≥ {rules['flat_tail']}), as a label-smoothed teacher's: it carries no class relations (level 2)."
        )
    if miscalibrated:
        how = (
            "over-confident (mean confidence {c:.3f} > accuracy {a:.3f}): trust its soft labels less (lower α)"
            if overconfident
            else "under-confident (mean confidence {c:.3f} < accuracy {a:.3f}): its soft labels are softer than its accuracy"
        )
        warnings.append(
            f"Miscalibrated teacher: ECE {t['expected_calibration_error']:.3f} (≥ {rules['ece']}), "
            + how.format(c=t["confidence_mean"], a=t["accuracy"])
            + "."
        )

    if token_level and top_k_cache:
        fields["alpha"] = Choice(
            rules["alpha_token_level"],
            f"token-level teacher read through a top-k cache (perplexity {t['perplexity']:.1f} on the slice): "
            f"α {rules['alpha_token_level']} measured best of 0.5 / 0.8 / 0.9 from a top-k cache of an LM",
        )
    elif token_level:
        fields["alpha"] = Choice(
            rules["alpha_reliable"],
            f"token-level teacher read densely (perplexity {t['perplexity']:.1f} on the slice): "
            f"α {rules['alpha_reliable']} measured best of 0.5 / 0.8 / 0.9 online on a real-text LM",
        )
    elif saturated or flat or overconfident:
        fields["alpha"] = Choice(
            rules["alpha_cautious"],
            "the teacher fails a health line (see the warnings): keep half the weight on the labels",
        )
    else:
        fields["alpha"] = Choice(
            rules["alpha_reliable"],
            f"a healthy teacher: accuracy {t['accuracy']:.3f}, ECE {t['expected_calibration_error']:.3f}, "
            f"p_t > 0.99 on {t['saturation_share']:.1%}, tail flatness {t['tail_flatness']:.3f}",
        )

    fields["divergence"] = Choice(
        divergence if lmbda > 0 else "forward_kl",
        f"on-policy share lmbda {lmbda:g}: the planned divergence"
        if lmbda > 0
        else "off-policy: forward KL, the divergence of every measured run that helped",
    )

    min_steps = math.ceil(rules["min_epochs"] * train_rows / max(1, batch_size))
    steps = max(planned_steps, min_steps)
    fields["max_steps"] = Choice(
        steps,
        f"the planned {planned_steps} steps (the no-KD twin's) are {planned_steps * batch_size / max(1, train_rows):.1f} "
        f"passes over {train_rows} rows"
        + ("" if steps == planned_steps else f"; raised to {rules['min_epochs']:g} passes")
        + f" (at least {rules['min_epochs']:g} passes, never fewer than the twin's steps)",
    )

    if "kept_mass" in profile and profile["kept_mass"]:
        masses = profile["kept_mass"]
        enough = [k for k, m in sorted(masses.items()) if m["mean"] >= rules["kept_mass"]]
        k = enough[0] if enough else max(masses)
        table = ", ".join(f"k {kk}: {m['mean']:.3f}" for kk, m in sorted(masses.items()))
        fields["cache_top_k"] = Choice(
            k,
            (
                f"the smallest k keeping ≥ {rules['kept_mass']} of the teacher's mass on average"
                if enough
                else f"no measured k keeps {rules['kept_mass']} of the mass: train with sparse_tail: bucket, or online"
            )
            + f" (kept mass {table})",
        )
        if not enough:
            warnings.append(
                f"A top-k cache of this teacher keeps at most {masses[k]['mean']:.3f} of its mass (k {k}): "
                "online KD, or sparse_tail: bucket with the widest cache you can store."
            )

    if teacher_parameters and student_parameters:
        ratio = teacher_parameters / student_parameters
        if ratio >= rules["size_ratio"] and saturated:
            warnings.append(
                f"Size gap: the teacher has {ratio:.1f}× the student's parameters and is saturated: "
                "a smaller or earlier teacher, or a teacher assistant, may transfer more."
            )

    student = profile.get("student")
    if token_level and student is not None:
        gap = student["nll"] - t["nll"]
        if lmbda > 0 and gap > rules["on_policy_gap_nats"]:
            warnings.append(
                f"On-policy KD from a student that does not yet write plausible text: its per-token NLL on the "
                f"data is {student['nll']:.2f} nats (perplexity {student['perplexity']:.1f}), {gap:.2f} above the "
                f"teacher's (> {rules['on_policy_gap_nats']}); it agrees with the teacher's next token on "
                f"{student['top1_agreement']:.1%}. Warm-start it first (labels or off-policy KD, lmbda: 0), or mix "
                "(lmbda < 1): from scratch, fully on-policy KD ended worse than no KD."
            )
    return Recommendation(fields, warnings)


def preflight_markdown(
    title: str, profile: Mapping[str, Any], recommendation: Recommendation, facts: Mapping[str, Any]
) -> str:
    """The pre-flight report in markdown: the recommended setting with its reasons, the warnings, the
    measures (per temperature, kept mass) and ``facts`` (sizes, slice, time)."""
    t = profile["teacher"]
    lines = [f"# {title}", "", "## Recommended setting", "", "| field | value | because |", "|---|---|---|"]
    for name, c in recommendation.fields.items():
        lines.append(f"| `{name}` | {c.value} | {c.because} |")
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in recommendation.warnings] or [
        "- None: nothing measured says the teacher will not help."
    ]
    lines += [
        "",
        "## The teacher on the slice",
        "",
        f"- items: {profile['num_items']}, classes: {profile['num_classes']}, majority share {profile['majority_share']:.3f}",
        f"- accuracy {t['accuracy']:.4f}, NLL {t['nll']:.4f} (perplexity {t['perplexity']:.2f})",
        f"- calibration: ECE {t['expected_calibration_error']:.4f}, mean confidence {t['confidence_mean']:.4f}; "
        f"p_t > 0.99 on {t['saturation_share']:.1%}",
        f"- level 2: tail flatness {t['tail_flatness']:.4f} (1 = flat, no class relations)",
        f"- level 3: p_t {t['true_prob_mean']:.4f} ± {t['true_prob_std']:.4f}",
        "",
        "| τ | normalised entropy | KL to uniform | soft signal (mean 1 − p^τ_t) |",
        "|---|---|---|---|",
    ]
    for tau, r in sorted(profile["by_temperature"].items()):
        lines.append(
            f"| {tau:g} | {r['teacher_entropy']:.4f} | {r['kl_to_uniform']:.4f} | {r['soft_signal']:.4f} |"
        )
    s = profile.get("standardized")
    if s:
        lines.append(
            f"| z-scored logits, base τ {s['base_temperature']:g} (`logit_standardization`; mean logit σ "
            f"{s['logit_std']:.3f}: effective τ {s['base_temperature'] * s['logit_std']:.2f}) | "
            f"{s['teacher_entropy']:.4f} | {s['kl_to_uniform']:.4f} | {s['soft_signal']:.4f} |"
        )
    if "heldout" in profile:
        h = profile["heldout"]
        lines.insert(
            lines.index("| τ | normalised entropy | KL to uniform | soft signal (mean 1 − p^τ_t) |") - 1,
            f"- held out ({h['num_items']} items of the evaluation split): accuracy {h['accuracy']:.4f}, NLL {h['nll']:.4f}",
        )
    if "student" in profile:
        s = profile["student"]
        lines += [
            "",
            f"The student as it starts: accuracy {s['accuracy']:.4f}, NLL {s['nll']:.4f} (perplexity "
            f"{s['perplexity']:.2f}), top-1 agreement with the teacher {s['top1_agreement']:.1%}.",
        ]
    if profile.get("kept_mass"):
        lines += ["", "| cache top-k | mean kept mass | 10 % quantile |", "|---|---|---|"]
        for k, m in sorted(profile["kept_mass"].items()):
            lines.append(f"| {k} | {m['mean']:.4f} | {m['p10']:.4f} |")
    lines += ["", "## Facts", ""] + [f"- {k}: {v}" for k, v in facts.items()]
    return "\n".join(lines) + "\n"
