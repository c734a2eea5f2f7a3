"""A run's data phase: the splits loaded, the teacher source opened on them, the training rows chosen
(labels hidden, rows nothing learns from dropped), all before any model loads; then, once the
processors are known, the rows prepared for the trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from hf_kd.config import DataArguments, DistillationConfig
from hf_kd.data.labels import count_unlabeled, drop_unlabeled, hide_labels, label_names
from hf_kd.data.loading import load_splits
from hf_kd.on_policy import check_prompts_only
from hf_kd.runs.models import RunModels
from hf_kd.tasks import Task
from hf_kd.tasks.lm_targets import drop_rows_without_target
from hf_kd.teachers.signal import open_teacher_source
from hf_kd.teachers.synthetic import topk_count

logger = logging.getLogger(__name__)


@dataclass
class RunRows:
    """The rows of a run, before preprocessing.

    Args:
        train: the training rows.
        evaluation: the evaluation rows, or None without ``eval_split``.
        labels: the dataset's label names (classification), None for a causal LM.
        source: what :func:`hf_kd.teachers.signal.open_teacher_source` opened (a loaded cache, …) or None.
        unlabelled_rows: training rows without a label (they learn through the soft term only).
        inert_rows_dropped: unlabelled rows dropped because nothing would be learnt from them.
    """

    train: Dataset
    evaluation: Dataset | None
    labels: list[str] | None
    source: Any
    unlabelled_rows: int
    inert_rows_dropped: int


def select_rows(data_args: DataArguments, config: DistillationConfig, task: Task) -> RunRows:
    """Load the splits, open the teacher source on them (a cache: loaded, checked, joined) and choose the
    training and evaluation rows; a split with nothing left to learn from is refused here, before any
    model loads."""
    splits = load_splits(data_args)
    check_prompts_only(
        config, splits[data_args.train_split].column_names, task, f"split {data_args.train_split!r}"
    )
    source, splits = open_teacher_source(
        config, task, splits, [name for name in (data_args.train_split, data_args.eval_split) if name]
    )
    train = splits[data_args.train_split]
    labels = None if task.token_level else label_names(train, data_args.label_column)  # before hiding any
    if labels is not None and config.alpha > 0 and config.synthetic_teacher == "kd_topk":
        topk_count(config.synthetic_topk, len(labels))  # k must fit the label space
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.num_labeled_examples is not None:
        train = hide_labels(train, data_args.label_column, data_args.num_labeled_examples, config.seed)
    rows_before_drop = len(train)
    if not data_args.use_unlabeled:
        train = drop_unlabeled(train, data_args.label_column)
        rows_before_drop = len(train)  # dropped by choice, not inert
    elif labels is not None and not config.uses_teacher:
        train = drop_inert_rows(train, data_args.label_column, config)
    if len(train) == 0:  # before any model loads
        raise ValueError(
            f"no training row is left to learn from in split {data_args.train_split!r} "
            f"(num_labeled_examples={data_args.num_labeled_examples}, use_unlabeled={data_args.use_unlabeled}, "
            f"alpha={config.alpha}, max_train_samples={data_args.max_train_samples}): unlabelled rows teach only "
            "through a soft term (alpha > 0 with a teacher), and use_unlabeled: false drops them"
        )
    evaluation = splits[data_args.eval_split] if data_args.eval_split else None
    if evaluation is not None:
        check_prompts_only(
            config, evaluation.column_names, task, f"split {data_args.eval_split!r}", evaluation=True
        )
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return RunRows(
        train,
        evaluation,
        labels,
        source,
        unlabelled_rows=count_unlabeled(train, data_args.label_column),
        inert_rows_dropped=rows_before_drop - len(train),
    )


def drop_inert_rows(train, label_column: str, config: DistillationConfig):
    """Without a soft term (alpha = 0, or a label-only target) an unlabelled row has nothing to learn
    from: drop such rows, in one log line, so they cannot change the run's budget unannounced."""
    unlabeled = count_unlabeled(train, label_column)
    if unlabeled == 0:
        return train
    logger.warning(
        "dropping the %d unlabelled training rows: alpha=%s with synthetic_teacher=%r has no soft term, "
        "so nothing is learnt from them (they would only fill batches and add steps); %d labelled rows remain",
        unlabeled,
        config.alpha,
        config.synthetic_teacher,
        len(train) - unlabeled,
    )
    return drop_unlabeled(train, label_column)


def prepare_rows(
    task: Task, rows: RunRows, models: RunModels, data_args: DataArguments, config: DistillationConfig
) -> tuple[Dataset, Dataset | None]:
    """The training and evaluation rows preprocessed for the trainer by both models' processors; for a
    causal LM, rows with no token to learn are dropped (they only add steps) and a split of only such rows
    is refused."""
    processors = {"student_processor": models.processor, "teacher_processor": models.teacher_processor}
    train = task.prepare(rows.train, **processors)
    evaluation = None if rows.evaluation is None else task.prepare(rows.evaluation, **processors)
    if task.token_level:
        if not (config.lmbda == 1 or config.seq_kd):  # else every completion is generated from the prompts
            train = drop_rows_without_target(train, f"split {data_args.train_split!r}", task.max_length)
        if evaluation is not None:
            where = f"split {data_args.eval_split!r}"
            evaluation = drop_rows_without_target(evaluation, where, task.max_length)
    return train, evaluation
