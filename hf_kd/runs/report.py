"""The knowledge report of saved models: load a teacher (and a student) and a dataset from the recipe
arguments of ``scripts/analyze.py``, run them over one split, and write the report's files."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_kd.data.hierarchy import class_groups
from hf_kd.data.loading import dataset_inputs, load_splits
from hf_kd.knowledge.outcome import RunFacts
from hf_kd.knowledge.report import write_report
from hf_kd.modeling import (
    check_model_source,
    freeze,
    load_pretrained,
    load_teacher,
    logit_layer_weight_or_none,
)
from hf_kd.paths import refuse_overlap
from hf_kd.predictions import collect_predictions
from hf_kd.tasks import build_task, teacher_own_processor
from hf_kd.tasks.causal_lm import CausalLMTask
from hf_kd.teachers.online import OnlineTeacher

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
    kd_runs: Sequence[RunFacts] = (),
    twin_runs: Sequence[RunFacts] = (),
    metric: str = "accuracy",
) -> dict[str, Any]:
    """Load ``teacher`` (and ``student``) model directories, run them on ``split`` of the recipe's
    dataset, and :func:`write_report`. Class groups come from labels named ``g{group}_c{i}`` (the
    synthetic hierarchy task), instance difficulty from a ``difficulty`` column when present.

    With ``kd_runs`` and their no-KD ``twin_runs`` (``hf_kd.runs.run_record.read_run``) the report leads
    with the outcome of KD (``metric`` names their compared score).

    The teacher is loaded at the recipe's ``teacher_model_revision`` when it is the recipe's teacher,
    at ``main`` otherwise. Classification tasks only: a token-level task (``causal-lm``) is refused.
    ``report_dir`` may not be, contain or lie inside the teacher or the dataset (inside the student is
    allowed: ``<output_dir>/report``, next to the student it describes), checked before anything loads."""
    if data_args.task == CausalLMTask.name:
        raise ValueError(
            f"task={data_args.task!r}: the knowledge report covers classification tasks (one label per row); "
            "a token-level task has no label column to read class names, groups or difficulty from"
        )
    check_model_source("teacher", teacher)
    if student is not None:
        check_model_source("student", student)
    refuse_overlap(
        "report_dir",
        report_dir,
        {"teacher": teacher, "student": student, **dataset_inputs(data_args)},
        may_lie_inside=("student",),
    )
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
    teacher_model = load_teacher(task, teacher, revision=revision)
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

    teacher_weight = logit_layer_weight_or_none(teacher_model, output_map)
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
        kd_runs=kd_runs,
        twin_runs=twin_runs,
        metric=metric,
        class_names=names,
    )
