"""The knowledge report: every measure of the three levels and of teacher health, a diagnosis in words,
and plots, for a teacher (and optionally a student) on a dataset.

``knowledge_measures`` computes the numbers (pure, on tensors); ``diagnose`` turns them into sentences
with the thresholds of :data:`THRESHOLDS`; ``write_report`` writes ``report.json``, ``report.md`` and
PNG plots (matplotlib's non-interactive Agg backend) into a folder, each file written to a temporary
name and renamed. ``build_report`` loads models and data from the recipe arguments of
``scripts/analyze.py``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_kd.data.hierarchy import class_groups
from hf_kd.data.loading import load_splits
from hf_kd.files import write_atomic
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
from hf_kd.knowledge.predictions import Predictions, collect_predictions
from hf_kd.knowledge.universe import effective_smoothing, kl_to_uniform, teacher_entropy, wrong_mass
from hf_kd.modeling import check_model_source, freeze, load_pretrained, logit_layer_weight_or_none
from hf_kd.tasks import build_task, teacher_own_processor
from hf_kd.tasks.causal_lm import CausalLMTask
from hf_kd.teachers.online import OnlineTeacher

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
    """Every measure of ``docs/knowledge.md#the-knowledge-report`` on the labelled items (label ≥ 0); [N, K] logits, [N] labels.

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


# ---- files ------------------------------------------------------------------------------------


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
    axes[0].hist(teacher_entropy(v, temperature=tau).numpy(), bins=30)
    axes[0].set_xlabel(f"teacher H(p^τ)/log K at τ = {tau}")
    axes[1].hist(p_t.numpy(), bins=30)
    axes[1].set_xlabel("teacher p_t (τ = 1)")
    for ax in axes:
        ax.set_ylabel("instances")
    fig.tight_layout()
    write_atomic(folder / "histograms.png", lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)
    written.append("histograms.png")
    return written


def _markdown(measures: dict[str, Any], diagnosis: dict[str, list[str]], plots: list[str], title: str) -> str:
    lines = [f"# {title}", "", "## What the teacher transfers", ""]
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
) -> dict[str, Any]:
    """Write ``report.json`` (every number + the diagnosis), ``report.md`` and the PNG plots into
    ``folder``; return the JSON content."""
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = _plot(predictions, measures, folder, teacher_weight, student_weight) if plots else []
    content = {"measures": measures, "diagnosis": diagnosis, "thresholds": THRESHOLDS, "plots": written}
    write_atomic(
        folder / "report.json",
        lambda p: p.write_text(json.dumps(_json_safe(content), indent=2, allow_nan=False)),
    )
    write_atomic(folder / "report.md", lambda p: p.write_text(_markdown(measures, diagnosis, written, title)))
    return content


# ---- from recipe arguments ------------------------------------------------------------------------

_GROUPED_LABEL = re.compile(r"^g\d+_c\d+$")


def build_report(
    data_args,
    config,
    *,
    teacher: str,
    student: str | None,
    report_dir: str | Path,
    split: str | None = None,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Load ``teacher`` (and ``student``) model directories, run them on ``split`` of the recipe's
    dataset, and :func:`write_report`. Class groups come from labels named ``g{group}_c{i}`` (the
    synthetic hierarchy task), instance difficulty from a ``difficulty`` column when present.

    The teacher is loaded at the recipe's ``teacher_model_revision`` when it is the recipe's teacher,
    at ``main`` otherwise. Classification tasks only: a token-level task (``causal-lm``) is refused."""
    if data_args.task == CausalLMTask.name:
        raise ValueError(
            f"task={data_args.task!r}: the knowledge report covers classification tasks (one label per row); "
            "a token-level task has no label column to read class names, groups or difficulty from"
        )
    check_model_source("teacher", teacher)
    if student is not None:
        check_model_source("student", student)
    split = split or data_args.eval_split or data_args.train_split
    task = build_task(data_args)
    splits = load_splits(data_args)
    if split not in splits:
        raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(splits)}")
    rows = splits[split]
    if data_args.label_column not in rows.features:
        raise ValueError(
            f"label_column={data_args.label_column!r} is not a column of split {split!r}; "
            f"it has {rows.column_names}"
        )
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    revision = config.teacher_model_revision if teacher == config.teacher_model_name_or_path else "main"
    teacher_model = freeze(load_pretrained(task.model_class(), teacher, revision=revision))
    teacher_processor = task.load_processor(teacher, revision=revision)
    student_model, processor = None, teacher_processor
    output_map = None
    if student is not None:
        student_model = freeze(load_pretrained(task.model_class(), student))
        processor = task.load_processor(student)
        output_map = task.teacher_output_map(teacher_model.config, student_model.config, config)
        teacher_processor = teacher_own_processor(task, teacher_processor, processor)
    else:
        teacher_processor = None
    prepared = task.prepare(rows, student_processor=processor, teacher_processor=teacher_processor)
    predictions = collect_predictions(
        prepared,
        task,
        student=student_model,
        teacher_signal=OnlineTeacher(teacher_model, output_map),
        batch_size=config.per_device_eval_batch_size,
    )
    names = getattr(rows.features[data_args.label_column], "names", None) or []
    groups = None
    if names and all(_GROUPED_LABEL.match(n) for n in names):
        label_rows = rows.select_columns([data_args.label_column])
        if data_args.label_column != "label":  # class_groups reads the column named "label"
            label_rows = label_rows.rename_column(data_args.label_column, "label")
        groups = class_groups(label_rows)
    one_item_per_row = len(predictions.labels) == len(rows)
    difficulty = (
        torch.tensor(rows["difficulty"]) if "difficulty" in rows.column_names and one_item_per_row else None
    )

    teacher_weight = logit_layer_weight_or_none(teacher_model)
    if teacher_weight is not None and output_map is not None:
        teacher_weight = teacher_weight[output_map]
    student_weight = None if student_model is None else logit_layer_weight_or_none(student_model)
    title = (
        f"Knowledge report: {Path(teacher).name}"
        + (f" → {Path(student).name}" if student else "")
        + f" on {split}"
    )
    return write_report(
        report_dir,
        predictions,
        alpha=config.alpha,
        temperature=config.temperature,
        groups=groups,
        difficulty=difficulty,
        teacher_weight=teacher_weight,
        student_weight=student_weight,
        title=title,
    )
