"""The model card of one distillation run: what ``hf_kd.cards.model`` renders, filled from the run's
arguments, its evaluation logs and the teacher's own scores.

``run_card_info`` gathers the fixed facts once (teacher, data, loss settings, cache provenance, sizes,
command, recipe); ``with_latest_evaluation`` adds the scores of the latest evaluation in the Trainer's
``log_history``, so the card written next to each checkpoint says how good that checkpoint was.
Knowledge measures logged by ``hf_kd.callbacks`` (``eval_knowledge/...``) become the card's
"What was transferred" table instead of result rows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from hf_kd.cards.markdown import markdown_table
from hf_kd.cards.model import DistillationCardInfo
from hf_kd.knowledge.diagnosis import diagnose
from hf_kd.knowledge.measures import nested_measures
from hf_kd.redact import redact

KNOWLEDGE_PREFIX = "eval_knowledge/"
"""Prefix of the knowledge measures in the evaluation logs."""


def run_card_info(
    data_args,
    config,
    *,
    student_parameters: int,
    teacher_parameters: int | None = None,
    teacher_metrics: dict[str, float] | None = None,
    cache_provenance: dict[str, Any] | None = None,
    command: str | None = None,
    recipe_yaml: str | None = None,
    student_source: str | None = None,
    student_init: str | None = None,
    feature_losses: str | None = None,
    tokenizers: str | None = None,
) -> DistillationCardInfo:
    """The card's facts from a run's ``DataArguments`` and ``DistillationConfig``.

    The student is named by ``hub_model_id`` (else the output folder's name); the teacher by the
    teacher id and revision the cache recorded when the run read a teacher cache, else by
    ``teacher_model_name_or_path`` and ``teacher_model_revision`` (a served teacher: its served model;
    several teachers: each one's name, source, model and weight). A run whose loss uses no teacher
    (α = 0, ``none``, ``ls``) has none: an ordinary fine-tuning card. ``command`` and ``recipe_yaml`` are
    quoted with every secret redacted (``hf_kd.redact.redact``). ``student_init`` and ``feature_losses``
    say how the student was initialised from the teacher and which feature losses were used;
    ``tokenizers`` names the two tokenizers of a cross-tokenizer run.
    """
    teacher_id, teacher_revision = None, None
    if config.uses_teacher and cache_provenance is not None:
        teacher_id = cache_provenance["teacher_id"]
        teacher_revision = cache_provenance.get("teacher_revision")
    elif config.uses_teacher and config.teachers:  # several teachers
        teacher_id = ", ".join(
            f"{m['name']} ({m.get('source', 'online')} "
            f"{m.get('model') or m.get('cache') or (m.get('options') or {}).get('model')}, "
            f"weight {m.get('weight', 1)})"
            for m in config.teachers
        )
    elif config.uses_teacher:  # a served teacher is named by the model its server serves
        teacher_id = config.teacher_model_name_or_path or (config.teacher_options or {}).get("model")
        teacher_revision = config.teacher_model_revision if config.teacher_model_name_or_path else None
    return DistillationCardInfo(
        student_id=config.hub_model_id or Path(config.output_dir).name,
        teacher_id=teacher_id,
        teacher_revision=teacher_revision,
        task=data_args.task,
        divergence=config.divergence,
        temperature=config.temperature,
        alpha=config.alpha,
        datasets=[data_args.dataset_name] if data_args.dataset_name else [],
        eval_split=data_args.eval_split,
        student_source=student_source,
        student_init=student_init,
        feature_losses=feature_losses,
        tokenizers=tokenizers,
        temperature_squared=config.temperature_squared,
        logit_standardization=config.logit_standardization,
        synthetic_teacher=config.synthetic_teacher if config.synthetic_teacher != "kd" else None,
        teacher_source=config.teacher_source,
        cache_provenance=cache_provenance,
        teacher_metrics=dict(teacher_metrics or {}),
        teacher_parameters=teacher_parameters,
        student_parameters=student_parameters,
        command=None if command is None else redact(command, (config.hub_token,)),
        recipe_yaml=None if recipe_yaml is None else redact(recipe_yaml, (config.hub_token,)),
    )


def with_latest_evaluation(
    info: DistillationCardInfo, log_history: list[dict[str, Any]]
) -> DistillationCardInfo:
    """``info`` with the student's scores of the latest evaluation logged and the latest knowledge
    measures (logged as an entry of their own); as is when nothing was evaluated yet."""
    scores: dict[str, float] = {}
    knowledge: dict[str, float] = {}
    for entry in reversed(log_history):
        evaluation = {k: v for k, v in entry.items() if k.startswith("eval_")}
        if not scores:
            scores = {k: v for k, v in evaluation.items() if not k.startswith(KNOWLEDGE_PREFIX)}
        if not knowledge:
            knowledge = {
                k[len(KNOWLEDGE_PREFIX) :]: v for k, v in evaluation.items() if k.startswith(KNOWLEDGE_PREFIX)
            }
        if scores and knowledge:
            break
    return replace(
        info,
        student_metrics=scores or info.student_metrics,
        knowledge_summary=knowledge_summary(knowledge, alpha=info.alpha, temperature=info.temperature)
        or info.knowledge_summary,
    )


def knowledge_summary(measures: dict[str, float], *, alpha: float, temperature: float) -> str | None:
    """The knowledge report's diagnosis in words (``hf_kd.knowledge.diagnosis.diagnose``) and a markdown
    table of the scalar knowledge measures (histogram bins left out), or None without measures."""
    rows = [
        [f"`{name}`", f"{value:.4g}"]
        for name, value in measures.items()
        if "histogram" not in name and "bin_edges" not in name
    ]
    if not rows:
        return None
    lines = []
    nested = nested_measures(measures)
    if {"level1", "level2", "level3", "health"} <= nested.keys():  # what KnowledgeCallback logs
        diagnosis = diagnose(nested | {"settings": {"alpha": alpha, "temperature": temperature}})
        lines += [f"- {sentence}" for sentence in diagnosis["levels"] + diagnosis["failures"]] + [""]
    lines += [
        "Knowledge measures of the final evaluation (see hf_kd's README, the three knowledge levels):",
        "",
    ]
    lines.append(markdown_table(["Measure", "Value"], rows))
    return "\n".join(lines)
