"""The pre-flight check of a recipe, before any training: load its teacher (online or cached) and its
student, run both over a slice of the data, and write the recommended setting with the measurements
behind it (``hf_kd.knowledge.preflight``).

Writes one folder, complete or not at all: ``preflight.md`` (the report), ``preflight.json`` (every
measure) and ``recommended.yaml`` (the recipe with the recommended fields, for ``scripts/distill.py``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoConfig, set_seed

from hf_kd.config import DataArguments, DistillationConfig, ModelArguments, load_recipe
from hf_kd.data.labels import label_names
from hf_kd.data.loading import dataset_inputs, load_splits
from hf_kd.files import write_atomic_dir
from hf_kd.knowledge.preflight import preflight_markdown, recommend
from hf_kd.knowledge.profile import heldout_scores, teacher_profile
from hf_kd.modeling import check_model_fits, check_model_source, count_parameters, load_teacher
from hf_kd.paths import refuse_overlap
from hf_kd.predictions import collect_predictions
from hf_kd.runs.models import load_student
from hf_kd.tasks import build_task, teacher_own_processor
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.signal import build_teacher_signal


def _planned_steps(config: DistillationConfig, rows: int) -> int:
    """The optimizer steps the recipe plans: ``max_steps``, else its epochs over ``rows``."""
    if config.max_steps > 0:
        return int(config.max_steps)
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    return math.ceil(rows / batch) * math.ceil(config.num_train_epochs)


def run_preflight(
    data_args: DataArguments,
    model_args: ModelArguments,
    config: DistillationConfig,
    *,
    report_dir: str | Path,
    recipe: str | None = None,
    max_samples: int = 512,
    max_tokens: int = 4096,
    split: str | None = None,
    student_reference: float | None = None,
) -> dict[str, Any]:
    """Measure the recipe's teacher on ``max_samples`` rows (token-level tasks: ``max_tokens`` tokens) of
    ``split`` (default: the training split, the rows the soft term will read) — and, for an online
    classification teacher, its accuracy on as many rows of the evaluation split (what it knows beyond
    rows it may have memorised) — with the student as it starts, and write the report
    folder ``report_dir``. ``recipe``: the YAML the recommended recipe is written from (default: the
    recommended fields alone). ``student_reference``: the student's score without KD, when known."""
    started = time.perf_counter()
    if not config.teacher_model_name_or_path and config.teacher_source != "cached":
        raise ValueError(
            "the pre-flight measures a teacher: set teacher_model_name_or_path (or a teacher_cache)"
        )
    if config.teacher_source == "cached" and not config.teacher_cache:
        raise ValueError(
            "teacher_source: cached needs teacher_cache (the cache directory the pre-flight reads)"
        )
    refuse_overlap(
        "report_dir",
        report_dir,
        {
            "teacher_model_name_or_path": config.teacher_model_name_or_path,
            "teacher_cache": config.teacher_cache,
            "student_model_name_or_path": model_args.student_model_name_or_path,
            **dataset_inputs(data_args),
        },
    )
    if config.teacher_source != "cached":
        check_model_source("teacher_model_name_or_path", config.teacher_model_name_or_path)
    if not config.alpha > 0:  # the signal is built for a soft term; the pre-flight measures it whatever α
        config = replace(config, alpha=1.0)
    set_seed(config.seed)
    task = build_task(data_args)
    token_level = task.token_level
    cache = (
        load_teacher_cache(
            config.teacher_cache,
            teacher=config.teacher_model_name_or_path,
            teacher_revision=config.teacher_model_revision,
        )
        if config.teacher_source == "cached"
        else None
    )
    splits = load_splits(data_args)
    split = split or data_args.train_split
    if split not in splits:
        raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(splits)}")
    if cache is not None:
        if token_level:
            task.cache_decoder = cache.decoder()
        splits = cache.join(splits, task.name, [data_args.train_split, split])
    train = splits[data_args.train_split]
    labels = None if token_level else label_names(train, data_args.label_column)
    rows = splits[split].select(range(min(max_samples, len(splits[split]))))

    max_length = getattr(task, "max_length", None)
    student, student_processor = load_student(task, model_args, labels, max_length)
    teacher, teacher_processor = None, None
    if cache is None:
        teacher_processor = task.load_processor(
            model_args.teacher_processor or config.teacher_model_name_or_path,
            revision="main" if model_args.teacher_processor else config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
        teacher_config = AutoConfig.from_pretrained(
            config.teacher_model_name_or_path,
            revision=config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
        check_model_fits(task, teacher_config, "teacher", max_length=max_length)
        if token_level:
            task.use_processor(student_processor)
            task.use_teacher_tokenizer(teacher_processor)
            if task.vocabulary is not None:
                raise ValueError(
                    "the pre-flight compares the teacher's and the student's next-token distributions: a "
                    "teacher tokenizer with another vocabulary is not supported"
                )
        task.teacher_output_map(teacher_config, student.config, config)
        teacher_processor = teacher_own_processor(task, teacher_processor, student_processor)
        teacher = load_teacher(
            task,
            config.teacher_model_name_or_path,
            revision=config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
            **(config.teacher_model_init_kwargs or {}),
        )
    signal = build_teacher_signal(
        config, task, student, teacher_model=teacher, resource=cache, student_processor=student_processor
    )
    prepared = task.prepare(rows, student_processor=student_processor, teacher_processor=teacher_processor)
    with_student = token_level or model_args.student_model_name_or_path is not None
    predictions = collect_predictions(
        prepared,
        task,
        student=student if with_student else None,
        teacher_signal=signal,
        batch_size=config.per_device_eval_batch_size,
        max_items=max_tokens if token_level else None,
    )
    profile = teacher_profile(
        predictions.teacher_logits,
        predictions.labels,
        student_logits=predictions.student_logits,
        token_level=token_level and cache is None,
    )
    heldout = data_args.eval_split
    if not token_level and cache is None and heldout and heldout != split and heldout in splits:
        rows_out = splits[heldout].select(range(min(max_samples, len(splits[heldout]))))
        prepared_out = task.prepare(
            rows_out, student_processor=student_processor, teacher_processor=teacher_processor
        )
        out = collect_predictions(
            prepared_out, task, teacher_signal=signal, batch_size=config.per_device_eval_batch_size
        )
        profile["heldout"] = heldout_scores(out.teacher_logits, out.labels)

    if data_args.use_unlabeled or data_args.num_labeled_examples is None:
        train_rows = len(train)
    else:
        train_rows = min(data_args.num_labeled_examples, len(train))
    if data_args.max_train_samples is not None:
        train_rows = min(train_rows, data_args.max_train_samples)
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    planned = _planned_steps(config, train_rows)
    recommendation = recommend(
        profile,
        planned_steps=planned,
        train_rows=train_rows,
        batch_size=batch,
        teacher_parameters=None if teacher is None else count_parameters(teacher),
        student_parameters=count_parameters(student),
        student_reference=student_reference,
        token_level=token_level,
        top_k_cache=cache is not None and cache.metadata.top_k is not None,
        lmbda=config.lmbda,
        divergence=config.divergence,
    )
    facts = {
        "teacher": config.teacher_cache if cache is not None else config.teacher_model_name_or_path,
        "teacher parameters": "(cached)" if teacher is None else f"{count_parameters(teacher):,}",
        "student parameters": f"{count_parameters(student):,}",
        "slice": f"split {split!r}, {len(rows)} rows"
        + (f", {profile['num_items']} tokens" if token_level else ""),
        "planned run": f"{planned} steps of {batch} rows over {train_rows} rows, lmbda {config.lmbda:g}",
        "seconds": f"{time.perf_counter() - started:.1f}",
    }
    fields = recommendation.recipe_fields()
    comment = "Recommended by scripts/preflight.py before training:\n" + "\n".join(
        f"{name}: {c.value} ({c.because})" for name, c in recommendation.fields.items()
    )
    recommended = (load_recipe(recipe) if recipe is not None else {}) | fields
    if "output_dir" in recommended:  # the recommended run never overwrites the planned one
        recommended["output_dir"] = str(recommended["output_dir"]).rstrip("/") + "_preflight"
    if recommended.get("max_steps", -1) > 0:
        recommended.pop("num_train_epochs", None)  # the budget is max_steps alone
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    text += yaml.safe_dump(recommended, sort_keys=False, allow_unicode=True)
    content = {"profile": profile, "recommendation": recommendation.as_dict(), "facts": facts}
    title = f"Pre-flight: {Path(str(facts['teacher'])).name} → student on {split}"
    markdown = preflight_markdown(title, profile, recommendation, facts)

    def write(folder: Path) -> None:
        (folder / "preflight.md").write_text(markdown)
        (folder / "preflight.json").write_text(json.dumps(content, indent=2, default=str))
        (folder / "recommended.yaml").write_text(text)

    write_atomic_dir(report_dir, write)
    return content
