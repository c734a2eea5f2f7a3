"""How the distillation trainer takes its datasets: raw rows prepared by the task before anything
loads, the teacher's and cached columns kept through ``remove_unused_columns``, inert rows reported."""

from __future__ import annotations

import logging
from typing import Any

import datasets
from datasets import Dataset
from transformers import PreTrainedModel

from hf_kd.config import DistillationConfig
from hf_kd.data.labels import count_unlabeled
from hf_kd.on_policy import check_prompts_only
from hf_kd.tasks.base import (
    ALIGNMENT_PREFIX,
    CACHE_PREFIX,
    MEMBER_PREFIX,
    TEACHER_INPUT_PREFIX,
    TEXT_BYTES,
    row_columns,
)

logger = logging.getLogger(__name__)


class TrainerDataMixin:
    """The dataset side of :class:`hf_kd.trainer.DistillationTrainer` (which sets ``self.task``)."""

    def _prepare_datasets(
        self, model: PreTrainedModel | None, args: DistillationConfig, kwargs: dict[str, Any]
    ) -> None:
        """Set the task's collation up from ``processing_class`` and process raw rows of ``train_dataset``
        and ``eval_dataset`` (a dataset or a dict of them) in ``kwargs``, before anything loads; raw
        prompt-only training rows need every completion generated, and evaluation rows need completions
        (``check_prompts_only``)."""
        processor = kwargs.get("processing_class")
        evaluation = kwargs.get("eval_dataset")
        splits = [("train_dataset", kwargs.get("train_dataset"), False)]
        if isinstance(evaluation, dict):
            splits += [(f"eval_dataset[{name!r}]", split, True) for name, split in evaluation.items()]
        else:
            splits.append(("eval_dataset", evaluation, True))
        for where, split, is_evaluation in splits:
            columns = row_columns(split)
            if columns is not None and getattr(self.task, "prompt_column", None) in columns:
                check_prompts_only(args, columns, self.task, where, evaluation=is_evaluation)
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.task.use_processor(processor, pad_token_id=pad_token_id)
        for key in ("train_dataset", "eval_dataset"):
            dataset = kwargs.get(key)
            if isinstance(dataset, dict):
                kwargs[key] = {
                    name: self.task.prepare_if_raw(
                        split, student_processor=processor, name=f"{key}[{name!r}]"
                    )
                    for name, split in dataset.items()
                }
            elif dataset is not None:
                kwargs[key] = self.task.prepare_if_raw(dataset, student_processor=processor, name=key)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep teacher inputs and cached teacher columns through ``remove_unused_columns``, and every
        column of a dataset transformed on the fly (``with_transform``: its transform reads them)."""
        super()._set_signature_columns_if_needed()
        extra = set()
        evaluation = (
            self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        )
        for dataset in (self.train_dataset, *evaluation):
            transformed = isinstance(dataset, datasets.Dataset) and dataset.format["type"] == "custom"
            for name in getattr(dataset, "column_names", None) or []:
                if transformed or name.startswith(
                    (TEACHER_INPUT_PREFIX, CACHE_PREFIX, ALIGNMENT_PREFIX, TEXT_BYTES, MEMBER_PREFIX)
                ):
                    extra.add(name)
        self._signature_columns = list(dict.fromkeys(self._signature_columns + sorted(extra)))

    def _warn_of_inert_rows(self) -> None:
        """Without a soft term, unlabelled rows only fill batches: say how many (scripts/distill.py drops them)."""
        if self.args.uses_teacher or not isinstance(self.train_dataset, Dataset):
            return
        for column in ("labels", "label"):
            unlabeled = count_unlabeled(self.train_dataset, column)
            if unlabeled:
                logger.warning(
                    "%d of the %d training rows have no label and alpha=%s with synthetic_teacher=%r has no "
                    "soft term: nothing is learnt from them, yet they fill batches and add optimizer steps; "
                    "drop them (hf_kd.data.loading.drop_unlabeled)",
                    unlabeled,
                    len(self.train_dataset),
                    self.args.alpha,
                    self.args.synthetic_teacher,
                )
                return
