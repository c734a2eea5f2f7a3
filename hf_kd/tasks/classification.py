"""Sequence and image classification: one KD instance per example."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from hf_kd.tasks.base import CACHE_PREFIX, NO_LABEL, TEACHER_INPUT_PREFIX, KDItems, Task, check_tokenizer

BUILTIN_METRICS = Path(__file__).resolve().parent.parent / "metrics"
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def label_names_of(config) -> list[str]:
    """The label names of a classification config, in id order."""
    return [config.id2label[i] for i in range(config.num_labels)]


def label_output_map(
    teacher_labels: list[str], student_labels: list[str], mapping: dict | None = None
) -> list[int] | None:
    """Indices ``perm`` such that ``teacher_logits[..., perm]`` lists the teacher's scores in the student's
    label order, or None when the orders already agree.

    Names agree when they are equal, when either side only has generic ``LABEL_i`` names (then the
    order is taken as is), or through ``mapping`` (teacher name → student name). Anything else is an
    error naming both label lists.
    """
    if len(teacher_labels) != len(student_labels):
        raise ValueError(
            f"label spaces differ: the teacher has {len(teacher_labels)} labels {teacher_labels}, "
            f"the student/dataset has {len(student_labels)} labels {student_labels}"
        )
    generic = all(_GENERIC_LABEL.match(n) for n in teacher_labels) or all(
        _GENERIC_LABEL.match(n) for n in student_labels
    )
    if mapping is None and (generic or teacher_labels == student_labels):
        return None
    renamed = [(mapping or {}).get(name, name) for name in teacher_labels]
    if sorted(renamed) != sorted(student_labels):
        raise ValueError(
            f"label spaces differ: teacher labels {teacher_labels} vs student/dataset labels {student_labels}; "
            "set teacher_label_mapping: {teacher_name: student_name, ...} to align them"
        )
    perm = [renamed.index(name) for name in student_labels]
    return None if perm == list(range(len(perm))) else perm


def to_label(value: Any) -> int:
    """A dataset label as a training label: missing, −1 (ClassLabel's "no label") and −100 → NO_LABEL."""
    return NO_LABEL if value is None or value < 0 else int(value)


def pad_token_rows(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized rows without a tokenizer: ``input_ids`` with ``pad_token_id``, every other
    per-token column with 0; an ``attention_mask`` (made when missing) marks the real tokens."""
    lengths = [len(row["input_ids"]) for row in rows]
    length = max(lengths)
    batch = {
        key: torch.tensor(
            [
                list(row[key]) + [pad_token_id if key == "input_ids" else 0] * (length - n)
                for row, n in zip(rows, lengths, strict=True)
            ]
        )
        for key in rows[0]
    }
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.tensor([[1] * n + [0] * (length - n) for n in lengths])
    return batch


class ClassificationMetrics:
    """``compute_metrics`` for classification: the task metrics (``evaluate`` modules) on labelled rows,
    plus ``agreement``, the share of rows where student and teacher predict the same top-1 class."""

    def __init__(self, names: list[str], trust_remote_code: bool = False):
        self.metrics = {name: load_metric(name, trust_remote_code) for name in names}

    def __call__(self, eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        student, teacher = predictions if isinstance(predictions, tuple) else (predictions, None)
        student_top1 = np.argmax(student, axis=-1)
        labelled = labels != NO_LABEL
        results: dict[str, float] = {}
        for metric in self.metrics.values():
            results.update(metric.compute(predictions=student_top1[labelled], references=labels[labelled]))
        if teacher is not None:
            results["agreement"] = float(np.mean(student_top1 == np.argmax(teacher, axis=-1)))
        return results


def load_metric(name: str, trust_remote_code: bool = False):
    """An ``evaluate`` metric: hf_kd's offline copies first, then a local module directory, then a Hub
    metric, whose Python code ``evaluate`` downloads and runs: only with ``trust_remote_code``."""
    builtin = BUILTIN_METRICS / name
    if builtin.is_dir():
        return evaluate.load(str(builtin))
    if not Path(name).exists() and not trust_remote_code:
        raise ValueError(
            f"metric {name!r} is neither built into hf_kd ({sorted(p.name for p in BUILTIN_METRICS.iterdir() if p.is_dir())}) "
            "nor a local module: loading it from the Hub runs its code, so set trust_remote_code: true to allow it"
        )
    return evaluate.load(name)


class ClassificationTask(Task):
    """Shared logic of the classification tasks: logits [B, K], labels [B]."""

    def teacher_output_map(self, teacher_config, student_config, args) -> list[int] | None:
        """Label spaces must match (see :func:`label_output_map`)."""
        return label_output_map(
            label_names_of(teacher_config), label_names_of(student_config), args.teacher_label_mapping
        )

    def kd_items(self, student_logits, teacher_logits, labels) -> KDItems:
        return KDItems(student_logits, teacher_logits, labels, torch.ones_like(labels, dtype=torch.bool))

    def count_items(self, batch) -> torch.Tensor:
        labels = batch["labels"]
        return torch.stack([(labels != NO_LABEL).sum(), torch.tensor(labels.numel(), device=labels.device)])

    @staticmethod
    def _collate_labels(features: list[dict[str, Any]]) -> torch.Tensor:
        """[B] labels from ``labels`` (or Transformers' ``label``); missing and negative → NO_LABEL."""
        return torch.tensor([to_label(f.get("labels", f.get("label"))) for f in features])

    @staticmethod
    def _collate_cache(features: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
        for key in features[0]:
            if key.startswith(CACHE_PREFIX):
                batch[key] = torch.stack([torch.as_tensor(f[key]) for f in features])
        return batch


class TextClassificationTask(ClassificationTask):
    name = "text-classification"
    input_column = "input_ids"

    def __init__(
        self,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        max_length: int = 128,
    ):
        self.text_column, self.text_pair_column = text_column, text_pair_column
        self.label_column, self.max_length = label_column, max_length
        self._student_collator = self._teacher_collator = None

    def raw_columns(self) -> tuple[str, ...]:
        return (self.text_column,)

    def use_processor(self, processor, *, pad_token_id=None) -> None:
        """Pad batches with ``processor``'s ``DataCollatorWithPadding``; without one (and none given to
        :meth:`prepare`), pad with ``pad_token_id`` (else 0)."""
        if processor is not None:
            check_tokenizer(self.name, processor)
            self._student_collator = DataCollatorWithPadding(processor)
        elif self._student_collator is None:
            self._student_collator = partial(pad_token_rows, pad_token_id=pad_token_id or 0)

    def model_class(self):
        return AutoModelForSequenceClassification

    def load_processor(self, name_or_path, *, revision="main", trust_remote_code=False):
        return AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )

    def prepare(self, dataset, *, student_processor, teacher_processor=None):
        self.use_processor(student_processor)
        self._teacher_collator = (
            DataCollatorWithPadding(teacher_processor) if teacher_processor is not None else None
        )

        def encode(rows):
            texts = [rows[self.text_column]] + (
                [rows[self.text_pair_column]] if self.text_pair_column else []
            )
            out = dict(student_processor(*texts, truncation=True, max_length=self.max_length))
            if teacher_processor is not None:
                encoded = teacher_processor(*texts, truncation=True, max_length=self.max_length)
                out.update({TEACHER_INPUT_PREFIX + k: v for k, v in encoded.items()})
            out["labels"] = (
                [to_label(v) for v in rows[self.label_column]]
                if self.label_column in rows
                else [NO_LABEL] * len(rows[self.text_column])
            )
            return out

        keep = [c for c in dataset.column_names if c.startswith(CACHE_PREFIX)]
        return dataset.map(
            encode,
            batched=True,
            remove_columns=[c for c in dataset.column_names if c not in keep],
            desc="Tokenizing",
        )

    def collate(self, features):
        student = [
            {
                k: v
                for k, v in f.items()
                if not k.startswith((TEACHER_INPUT_PREFIX, CACHE_PREFIX)) and k not in ("label", "labels")
            }
            for f in features
        ]
        batch = dict(self._student_collator(student))
        batch["labels"] = self._collate_labels(features)
        if self._teacher_collator is not None:
            teacher = [
                {
                    k[len(TEACHER_INPUT_PREFIX) :]: v
                    for k, v in f.items()
                    if k.startswith(TEACHER_INPUT_PREFIX)
                }
                for f in features
            ]
            batch.update({TEACHER_INPUT_PREFIX + k: v for k, v in self._teacher_collator(teacher).items()})
        return self._collate_cache(features, batch)


class ImageClassificationTask(ClassificationTask):
    name = "image-classification"
    input_column = "pixel_values"
    transforms_raw_rows = True

    def __init__(self, image_column: str = "image", label_column: str = "label"):
        self.image_column, self.label_column = image_column, label_column

    def raw_columns(self) -> tuple[str, ...]:
        return (self.image_column,)

    def model_class(self):
        return AutoModelForImageClassification

    def load_processor(self, name_or_path, *, revision="main", trust_remote_code=False):
        return AutoImageProcessor.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )

    def prepare(self, dataset, *, student_processor, teacher_processor=None):
        """Images are transformed on the fly (``with_transform``), as the HF image examples do."""
        image_column, label_column = self.image_column, self.label_column

        def transform(rows):
            images = [image.convert("RGB") for image in rows[image_column]]
            out = {"pixel_values": student_processor(images, return_tensors="pt")["pixel_values"]}
            if teacher_processor is not None:
                out[TEACHER_INPUT_PREFIX + "pixel_values"] = teacher_processor(images, return_tensors="pt")[
                    "pixel_values"
                ]
            out["labels"] = (
                [to_label(v) for v in rows[label_column]]
                if label_column in rows
                else [NO_LABEL] * len(images)
            )
            out.update({k: v for k, v in rows.items() if k.startswith(CACHE_PREFIX)})
            return out

        return dataset.with_transform(transform)

    def collate(self, features):
        batch = {
            key: torch.stack([torch.as_tensor(f[key]) for f in features])
            for key in features[0]
            if key == "pixel_values" or key == TEACHER_INPUT_PREFIX + "pixel_values"
        }
        batch["labels"] = self._collate_labels(features)
        return self._collate_cache(features, batch)
