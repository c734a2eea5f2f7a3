"""What a cache capture runs and writes: :class:`CaptureSpec`, every setting of
:func:`hf_kd.teachers.cache.capture.capture` in one object, checked before the teacher runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict

from hf_kd.tasks.base import Task, processor_fingerprint
from hf_kd.teachers.cache.format import (
    LOGIT_DTYPES,
    METADATA_FILE,
    CacheMetadata,
    config_hash,
    content_fingerprint,
    stored_config,
    weights_hash,
)
from hf_kd.teachers.codec import TopkCodec
from hf_kd.teachers.sketch import SKETCH_FILE, check_setting
from hf_kd.vocab import shared_vocab_size


def compression_top_k(task: Task, compression: TopkCodec | None, top_k: int | None) -> int | None:
    """The top-k a capture stores: ``top_k``, or the ``compression``'s ``max_k`` (a codec packs the
    per-token outputs of a causal LM only); a clear error for settings that do not go together."""
    if compression is None:
        return top_k
    if not task.token_level:
        raise ValueError(
            f"compression={compression.name!r} packs per-token (causal-lm) caches; task is {task.name!r}"
        )
    if top_k not in (None, compression.max_k):
        raise ValueError(f"top_k={top_k} differs from the compression's max_k={compression.max_k}")
    return compression.max_k


@dataclass
class CaptureSpec:
    """One cache capture: the teacher, the rows it runs over, where the cache goes and how it is stored.

    Args:
        teacher: the teacher model, run in ``eval`` mode under ``torch.inference_mode``.
        teacher_processor: the teacher's tokenizer or image processor: the teacher reads its own
            preprocessing (``task.prepare`` with it).
        task: the task that prepares and collates the rows (a causal LM's outputs are stored per token).
        dataset: the splits to capture, name → rows; at least one.
        output_dir: the cache's directory (``<output_dir>.partial`` while the capture runs).
        teacher_id: the teacher's Hub id or path, recorded in the metadata.
        teacher_revision: the teacher's revision, recorded in the metadata.
        top_k: None stores the full logits; else the top-k log-probabilities, their indices and the tail
            mass. With ``compression``: None or the codec's ``max_k`` (it becomes that).
        dtype: the stored logits' dtype, one of ``LOGIT_DTYPES``.
        batch_size: rows per teacher forward.
        shard_size: rows per shard (the unit a capture resumes from, and shares between processes).
        dataset_name: the dataset's name, recorded in the metadata.
        dataset_config: the dataset's configuration, recorded in the metadata.
        overwrite: replace a cache already at ``output_dir`` (else refused).
        progress: show a progress bar.
        compression: a codec packing each example's per-token top-k into one row (causal LM only).
        sketch_rank: > 0 adds a low-rank sketch of the logits of this rank to a per-token top-k
            (:mod:`hf_kd.teachers.sketch`), fitted on the first positions of the first split.
        sketch_bits: the bits of each sketch code.

    ``num_classes`` (set on creation): the classes the teacher scores — a causal LM's tokenizer ids only
    (rows padded onto its output layer are never targets), else its labels.
    """

    teacher: torch.nn.Module
    teacher_processor: Any
    task: Task
    dataset: DatasetDict | dict[str, Dataset]
    output_dir: str | os.PathLike
    teacher_id: str
    teacher_revision: str | None = None
    top_k: int | None = None
    dtype: str = "float32"
    batch_size: int = 64
    shard_size: int = 4096
    dataset_name: str | None = None
    dataset_config: str | None = None
    overwrite: bool = False
    progress: bool = True
    compression: TopkCodec | None = None
    sketch_rank: int = 0
    sketch_bits: int = 4
    num_classes: int = field(init=False)

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        if self.dtype not in LOGIT_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {LOGIT_DTYPES}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(
                f"top_k={self.top_k!r} must be a positive number of classes (or None for full logits)"
            )
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} and shard_size={self.shard_size!r} must be ≥ 1")
        if not self.dataset:
            raise ValueError("no split to capture: dataset is empty")
        if (self.output_dir / METADATA_FILE).is_file() and not self.overwrite:
            raise FileExistsError(
                f"{self.output_dir} already holds a teacher cache; pass overwrite=True to replace it"
            )
        if self.per_token:  # the tokenizer's ids only: rows padded onto the output layer are never targets
            vocab_size = self.teacher.config.get_text_config().vocab_size
            self.num_classes = shared_vocab_size(
                vocab_size, len(self.teacher_processor), len(self.teacher_processor)
            )
        else:
            self.num_classes = self.teacher.config.num_labels
        self.top_k = compression_top_k(self.task, self.compression, self.top_k)
        if self.top_k is not None and self.top_k > self.num_classes:
            raise ValueError(f"top_k={self.top_k} exceeds the teacher's {self.num_classes} classes")
        if self.sketch_rank:
            if not self.per_token or self.top_k is None:
                raise ValueError(
                    f"sketch_rank={self.sketch_rank} sketches the tail of a per-token top-k: it needs task "
                    f"causal-lm and top_k (task is {self.task.name!r}, top_k={self.top_k})"
                )
            check_setting(self.sketch_rank, self.sketch_bits, self.num_classes)

    @property
    def per_token(self) -> bool:
        """Whether the teacher's outputs are stored per token (a causal LM) rather than per example."""
        return self.task.token_level

    def metadata(self) -> CacheMetadata:
        """The cache's metadata before its files are written: the teacher (config, weights hash,
        processor), the storage settings and each split's size and content fingerprint."""
        teacher, task = self.teacher, self.task
        return CacheMetadata(
            task=task.name,
            teacher_id=self.teacher_id,
            teacher_revision=self.teacher_revision,
            teacher_commit=getattr(teacher.config, "_commit_hash", None),
            teacher_config=stored_config(teacher.config),
            teacher_config_hash=config_hash(teacher.config),
            teacher_weights_hash=weights_hash(teacher),
            processor_hash=None
            if self.teacher_processor is None
            else processor_fingerprint(self.teacher_processor),
            num_classes=self.num_classes,
            top_k=self.top_k,
            dtype=self.dtype,
            per_token=self.per_token,
            max_length=getattr(task, "max_length", None) if self.per_token else None,
            splits={
                name: {"num_rows": len(split), "fingerprint": content_fingerprint(split)}
                for name, split in self.dataset.items()
            },
            dataset_name=self.dataset_name,
            dataset_config=self.dataset_config,
            compression=None if self.compression is None else self.compression.spec(),
            sketch={"rank": self.sketch_rank, "bits": self.sketch_bits, "file": SKETCH_FILE}
            if self.sketch_rank
            else None,
        )
