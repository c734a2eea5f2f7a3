"""The knowledge report of saved models: load a teacher (and a student) and a dataset from the recipe
arguments of ``scripts/analyze.py``, run them over one split, and write the report's files. A run taught
by several teachers (``teacher_source: mixture``) has them opened and built by the run's own opener and
factory, and the report names each one with what it contributed."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_kd.data.hierarchy import class_groups
from hf_kd.data.loading import dataset_inputs, load_splits
from hf_kd.knowledge.facts import RunFacts
from hf_kd.knowledge.report import write_report
from hf_kd.modeling import (
    check_model_source,
    freeze,
    load_pretrained,
    load_teacher,
    logit_layer_weight_or_none,
)
from hf_kd.paths import refuse_overlap
from hf_kd.predictions import collect_predictions, teacher_agreements
from hf_kd.tasks import build_task, teacher_own_processor
from hf_kd.tasks.causal_lm import CausalLMTask
from hf_kd.teachers.mixture import member_configs
from hf_kd.teachers.online import OnlineTeacher
from hf_kd.teachers.signal import build_teacher_signal, open_teacher_source

_GROUPED_LABEL = re.compile(r"^g\d+_c\d+$")


def build_report(
    data_args,
    config,
    *,
    teacher: str | None,
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
    at ``main`` otherwise. ``teacher`` None: the recipe's several teachers (``teacher_source: mixture``),
    each opened as the run opened it (:func:`hf_kd.teachers.signal.open_teacher_source`); the report's
    teacher is then what the student was taught by (their mixture, or each row's routed teacher), and its
    ``teachers`` give each one's share (weight, or rows routed to it), accuracy and the student's agreement
    with it (:func:`hf_kd.predictions.teacher_agreements`); the student is needed (the teachers are read
    in its tokenizer and label order). Classification tasks only: a token-level task (``causal-lm``) is refused.
    ``report_dir`` may not be, contain or lie inside the teacher or the dataset (inside the student is
    allowed: ``<output_dir>/report``, next to the student it describes), checked before anything loads."""
    if data_args.task == CausalLMTask.name:
        raise ValueError(
            f"task={data_args.task!r}: the knowledge report covers classification tasks (one label per row); "
            "a token-level task has no label column to read class names, groups or difficulty from"
        )
    if teacher is None:
        members = _mixture_members(config, student)
        teacher_inputs = {
            f"teachers[{m['name']!r}]": sub.teacher_model_name_or_path or sub.teacher_cache
            for m, sub in members
        }
    else:
        check_model_source("teacher", teacher)
        teacher_inputs = {"teacher": teacher}
    if student is not None:
        check_model_source("student", student)
    refuse_overlap(
        "report_dir",
        report_dir,
        {**teacher_inputs, "student": student, **dataset_inputs(data_args)},
        may_lie_inside=("student",),
    )
    split = split or data_args.eval_split or data_args.train_split
    task = build_task(data_args)
    splits = load_splits(data_args)
    if split not in splits:
        raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(splits)}")
    if data_args.label_column not in splits[split].features:
        raise ValueError(
            f"label_column={data_args.label_column!r} is not a column of split {split!r}; "
            f"it has {splits[split].column_names}"
        )
    opened = None
    if teacher is None:  # every teacher opened on the analysed split, as the run opened them
        opened, splits = open_teacher_source(config, task, splits, [split])
    rows = splits[split]
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    student_model, processor = None, None
    if student is not None:
        student_model = freeze(load_pretrained(task.model_class(), student))
        processor = task.load_processor(student)
    teachers, teacher_weight = None, None
    if teacher is None:
        signal = build_teacher_signal(
            config, task, student_model, resource=opened, student_processor=processor
        )
        prepared = task.prepare(rows, student_processor=processor)
        predictions = collect_predictions(
            prepared,
            task,
            student=student_model,
            teacher_signal=signal,
            batch_size=config.per_device_eval_batch_size,
        )
        agreements = teacher_agreements(
            prepared,
            task,
            student=student_model,
            teacher_signal=signal,
            batch_size=config.per_device_eval_batch_size,
        )
        teachers = _contributions(members, agreements, config.teacher_routing_column, rows)
        teacher_name = " + ".join(teachers)
    else:
        revision = config.teacher_model_revision if teacher == config.teacher_model_name_or_path else "main"
        teacher_model = load_teacher(task, teacher, revision=revision)
        teacher_processor = task.load_processor(teacher, revision=revision)
        output_map = None
        if student_model is not None:
            output_map = task.teacher_output_map(teacher_model.config, student_model.config, config)
            teacher_processor = teacher_own_processor(task, teacher_processor, processor)
        else:
            processor, teacher_processor = teacher_processor, None
        prepared = task.prepare(rows, student_processor=processor, teacher_processor=teacher_processor)
        predictions = collect_predictions(
            prepared,
            task,
            student=student_model,
            teacher_signal=OnlineTeacher(teacher_model, output_map),
            batch_size=config.per_device_eval_batch_size,
        )
        teacher_weight = logit_layer_weight_or_none(teacher_model, output_map)
        teacher_name = Path(teacher).name
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

    student_weight = None if student_model is None else logit_layer_weight_or_none(student_model)
    title = (
        f"Knowledge report: {teacher_name}" + (f" → {Path(student).name}" if student else "") + f" on {split}"
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
        teachers=teachers,
    )


def _mixture_members(config, student: str | None) -> list[tuple[dict[str, Any], Any]]:
    """The recipe's several teachers (``hf_kd.teachers.mixture.member_configs``), each model checked,
    before anything loads; a recipe of one teacher without one, or a report without its student, refused."""
    if config.teacher_source != "mixture":
        raise ValueError(
            f"no teacher: teacher_source={config.teacher_source!r} and no teacher model given "
            "(pass the teacher's model directory, or analyse a run of teacher_source: mixture)"
        )
    if not config.uses_teacher:
        raise ValueError(
            f"teacher_source='mixture' with alpha={config.alpha}, synthetic_teacher={config.synthetic_teacher!r}: "
            "the run was taught by none of its teachers; pass the teacher model to analyse"
        )
    if student is None:
        raise ValueError(
            "the knowledge report of several teachers needs their student (its tokenizer and label order "
            "are theirs): pass the run's output_dir as the student"
        )
    members = member_configs(config)
    for member, sub in members:
        if sub.teacher_model_name_or_path:
            check_model_source(f"teachers[{member['name']!r}].model", sub.teacher_model_name_or_path)
    return members


def _contributions(
    members: list[tuple[dict[str, Any], Any]],
    agreements: dict[str, dict[str, float]],
    routing_column: str | None,
    rows,
) -> dict[str, dict[str, Any]]:
    """Each teacher's part, by name: its source, its share of the mixture (weight / Σ weights; None when
    routed) or of the rows (the share routed to it by ``routing_column``; None when mixed), and the
    student's agreement with it (``agreements``: top-1 agreement, KL, the teacher's accuracy)."""
    total = sum(member["weight"] for member, _ in members)
    routes = None if routing_column is None else list(rows[routing_column])
    return {
        member["name"]: {
            "source": member["source"],
            "weight": None if routes is not None else member["weight"] / total,
            "routed_share": None if routes is None else routes.count(member["name"]) / len(routes),
            **agreements[member["name"]],
        }
        for member, _ in members
    }
