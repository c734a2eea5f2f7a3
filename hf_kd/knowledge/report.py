"""The knowledge report's files: ``write_report`` writes ``report.json`` (every measure of
:mod:`hf_kd.knowledge.measures` and the diagnosis of :mod:`hf_kd.knowledge.diagnosis`), ``report.md``
and PNG plots (matplotlib's non-interactive Agg backend) into a folder, each file written to a
temporary name and renamed. ``hf_kd.runs.report.build_report`` loads the models and data it reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_kd.files import write_atomic
from hf_kd.knowledge.causes import per_class_scores
from hf_kd.knowledge.diagnosis import THRESHOLDS, diagnose
from hf_kd.knowledge.domain import most_frequent_classes
from hf_kd.knowledge.facts import RunFacts
from hf_kd.knowledge.instance import rescaling_weight
from hf_kd.knowledge.measures import Predictions, knowledge_measures, scalar_measures, similarity_matrices
from hf_kd.knowledge.outcome import outcome, outcome_markdown
from hf_kd.knowledge.universe import teacher_entropy, wrong_mass


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _plot(
    predictions: Predictions, measures: dict[str, Any], folder: Path, teacher_weight, student_weight
) -> list[str]:
    """similarity.png (teacher vs student class similarity), rescaling.png (w_t against p_t),
    histograms.png (teacher entropy and p_t)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keep = predictions.labels >= 0
    v, y = predictions.teacher_logits[keep].float(), predictions.labels[keep]
    z = None if predictions.student_logits is None else predictions.student_logits[keep].float()
    K = v.shape[-1]
    classes = most_frequent_classes(y, K, 64) if K > 64 else None
    alpha, tau = measures["settings"]["alpha"], measures["settings"]["temperature"]
    written = []

    titles = {
        "teacher_confusion": "teacher soft confusion",
        "student_confusion": "student soft confusion",
        "teacher_weights": "teacher logit-layer cosine",
        "student_weights": "student logit-layer cosine",
    }
    sims = similarity_matrices(v, y, z, teacher_weight, student_weight, classes)
    panels = [(titles[name], matrix) for name, matrix in sims.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels, strict=True):
        m = matrix.clone()
        m.fill_diagonal_(math.nan)  # the diagonal (1 by construction) would wash out the colour scale
        image = ax.imshow(m.numpy(), cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("class")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    write_atomic(folder / "similarity.png", lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)
    written.append("similarity.png")

    p_t = 1.0 - wrong_mass(v, y)
    if z is not None:
        w = rescaling_weight(z, v, y, alpha=alpha, temperature=tau)
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(p_t.numpy(), w.numpy(), s=4, alpha=0.5)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("teacher p_t")
        ax.set_ylabel("rescaling weight w_t")
        ax.set_title(f"level 3: w_t against p_t (α = {alpha}, τ = {tau})", fontsize=9)
        fig.tight_layout()
        write_atomic(folder / "rescaling.png", lambda p: fig.savefig(p, dpi=80, format="png"))
        plt.close(fig)
        written.append("rescaling.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    # both in [0, 1]: the axis fixed there (a near-constant teacher's values span less than 30 float bins)
    axes[0].hist(teacher_entropy(v, temperature=tau).clamp(0, 1).numpy(), bins=30, range=(0.0, 1.0))
    axes[0].set_xlabel(f"teacher H(p^τ)/log K at τ = {tau}")
    axes[1].hist(p_t.clamp(0, 1).numpy(), bins=30, range=(0.0, 1.0))
    axes[1].set_xlabel("teacher p_t (τ = 1)")
    for ax in axes:
        ax.set_ylabel("instances")
    fig.tight_layout()
    write_atomic(folder / "histograms.png", lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)
    written.append("histograms.png")
    return written


def teachers_markdown(teachers: dict[str, dict[str, Any]]) -> str:
    """A table of several teachers (:func:`write_report`'s ``teachers``): each one's source, its share
    (weight in the mixture, or rows routed to it), the student's top-1 agreement and KL with it, and its
    own accuracy."""
    routed = any(t["routed_share"] is not None for t in teachers.values())
    share = "rows routed to it" if routed else "weight (normalised)"
    lines = [
        f"| teacher | source | {share} | student's top-1 agreement | KL(teacher ‖ student) | teacher accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in teachers.items():
        lines.append(
            f"| {name} | {t['source']} | {t['routed_share' if routed else 'weight']:.4g} | "
            f"{t['top1_agreement']:.4g} | {t['kl']:.4g} | {t['teacher_accuracy']:.4g} |"
        )
    return "\n".join(lines)


def _markdown(
    measures: dict[str, Any],
    diagnosis: dict[str, list[str]],
    plots: list[str],
    title: str,
    result: dict[str, Any] | None = None,
    teachers: dict[str, dict[str, Any]] | None = None,
) -> str:
    lines = [f"# {title}", ""]
    if result is not None:
        lines += ["## Did KD pay?", "", outcome_markdown(result), ""]
    if teachers:
        lines += [
            "## The teachers",
            "",
            f"The student was taught by {len(teachers)} teachers; the measures below read what it was taught "
            "(their mixture, or each row's own teacher). What each one contributed, on the same items:",
            "",
            teachers_markdown(teachers),
            "",
        ]
    lines += ["## What the teacher transfers", ""]
    lines += [f"- {s}" for s in diagnosis["levels"]]
    lines += ["", "## Failure patterns", ""]
    lines += [f"- {s}" for s in diagnosis["failures"]]
    lines += ["", "## Measures", "", "| measure | value |", "|---|---|"]
    for name, value in scalar_measures({k: v for k, v in measures.items() if k != "settings"}).items():
        if "histogram" in name or "bin_edges" in name:
            continue
        lines.append(f"| {name} | {value:.4g} |")
    s = measures["settings"]
    lines += [
        "",
        f"{s['num_items']} labelled items, K = {s['num_classes']}, α = {s['alpha']}, τ = {s['temperature']}.",
    ]
    lines += [
        "",
        "Thresholds of the diagnosis: "
        + ", ".join(f"{k} = {v}" for k, v in THRESHOLDS.items())
        + " (see README, Reading the report).",
        "",
    ]
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_report(
    folder: str | Path,
    predictions: Predictions,
    *,
    alpha: float,
    temperature: float,
    groups: Sequence[int] | None = None,
    difficulty: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    student_weight: torch.Tensor | None = None,
    title: str = "Knowledge report",
    plots: bool = True,
    kd_runs: Sequence[RunFacts] = (),
    twin_runs: Sequence[RunFacts] = (),
    metric: str = "accuracy",
    class_names: Sequence[str] = (),
    teachers: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``report.json`` (every number + the diagnosis), ``report.md`` and the PNG plots into
    ``folder``; return the JSON content. Given the KD runs (the analysed student's first) and their no-KD
    ``twin_runs``, both lead with the outcome (:func:`hf_kd.knowledge.outcome.outcome`: gain, spread, gap
    closed, budgets, causes with remedies; per-class accuracies named by ``class_names``). ``teachers``:
    several teachers' parts by name (``hf_kd.runs.report.build_report``: source, weight or routed share,
    the student's agreement with each), kept as they are in ``report.json`` and tabled first in
    ``report.md`` (:func:`teachers_markdown`)."""
    if predictions.teacher_logits is None:
        raise ValueError("a knowledge report needs the teacher's logits")
    measures = knowledge_measures(
        predictions.teacher_logits,
        predictions.labels,
        student_logits=predictions.student_logits,
        alpha=alpha,
        temperature=temperature,
        groups=groups,
        difficulty=difficulty,
        teacher_weight=teacher_weight,
        student_weight=student_weight,
    )
    diagnosis = diagnose(measures)
    result = None
    if kd_runs and twin_runs:
        per_class = (
            None
            if predictions.student_logits is None
            else per_class_scores(
                predictions.teacher_logits, predictions.student_logits, predictions.labels, class_names
            )
        )
        result = outcome(
            kd_runs, twin_runs, metric=metric, knowledge_failures=diagnosis["failures"], per_class=per_class
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = _plot(predictions, measures, folder, teacher_weight, student_weight) if plots else []
    content = {"outcome": result} if result is not None else {}
    content |= {"teachers": teachers} if teachers else {}
    content |= {"measures": measures, "diagnosis": diagnosis, "thresholds": THRESHOLDS, "plots": written}
    write_atomic(
        folder / "report.json",
        lambda p: p.write_text(json.dumps(_json_safe(content), indent=2, allow_nan=False)),
    )
    write_atomic(
        folder / "report.md",
        lambda p: p.write_text(_markdown(measures, diagnosis, written, title, result, teachers)),
    )
    return content
