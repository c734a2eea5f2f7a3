"""What every task adapter provides, and the batch conventions the trainer relies on.

A batch is a flat dict of tensors:
- the student's model inputs under their usual names (``input_ids``, ``pixel_values``, ...);
- ``labels``: −100 where an item has no hard label (unlabelled transfer data, masked tokens);
- ``teacher_<name>``: the teacher's own model inputs, present only when its preprocessing differs;
- ``kd_teacher_<name>``: cached teacher outputs (see ``hf_kd.teachers.cache.format``);
- ``kd_alignment_<name>``: how a teacher of another tokenizer lines up with the student (``hf_kd.tasks.alignment``);
- ``kd_member<i>_<column>``: the same columns of member i of several teachers (``teacher_source: mixture``)
  whose tokenizer is another than the student's (``teacher_input_ids``, ``kd_alignment_*``, ...), each
  member under its own prefix (:func:`member_prefix`);
- ``kd_text_bytes`` / ``kd_text_bytes_teacher``: UTF-8 bytes of the text each token covers, over the student's
  and the teacher's positions (a causal LM's bits per byte: ``hf_kd.tasks.causal_lm.text_bytes``).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from hf_kd.losses import HiddenStates, SparseLogits

TEACHER_INPUT_PREFIX = "teacher_"
CACHE_PREFIX = "kd_teacher_"
ALIGNMENT_PREFIX = "kd_alignment_"
TEXT_BYTES = "kd_text_bytes"
TEACHER_TEXT_BYTES = TEXT_BYTES + "_teacher"
MEMBER_PREFIX = "kd_member"
NO_LABEL = -100


def member_prefix(index: int) -> str:
    """The column prefix of member ``index`` of several teachers, for its own columns (another tokenizer)."""
    return f"{MEMBER_PREFIX}{index}_"


@dataclass
class KDItems:
    """Flattened distillation instances: one row per example (classification) or token (causal LM)."""

    student_logits: torch.Tensor | HiddenStates  # [N, K], or [N, H] hidden states and the [K, H] output layer
    teacher: torch.Tensor | SparseLogits | None  # [N, K]; None when no teacher signal is used
    labels: torch.Tensor  # [N], NO_LABEL = no hard label
    soft_mask: torch.Tensor  # [N] bool: items that take the soft term


def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(student model inputs without labels, teacher's own inputs with the prefix removed, cached columns);
    alignment, text-byte and mixture members' columns are none of these (the teacher signal and the
    evaluation read them)."""
    student, teacher, cached = {}, {}, {}
    for key, value in batch.items():
        if key.startswith((ALIGNMENT_PREFIX, TEXT_BYTES, MEMBER_PREFIX)):
            continue
        if key.startswith(CACHE_PREFIX):
            cached[key[len(CACHE_PREFIX) :]] = value
        elif key.startswith(TEACHER_INPUT_PREFIX):
            teacher[key[len(TEACHER_INPUT_PREFIX) :]] = value
        elif key != "labels":
            student[key] = value
    return student, teacher, cached


def processor_fingerprint(processor: Any) -> str:
    """SHA-256 of what decides a processor's output: a tokenizer's full vocabulary, merges, normaliser
    and special tokens (its ``tokenizer.json``), or an image processor's settings. hf_kd's one processor
    fingerprint: equal fingerprints, same model inputs (a teacher cache records it as ``processor_hash``).
    A tokenizer's truncation and padding state is left out: a tokenizer saved after a run truncated with it
    carries its ``max_length`` in ``tokenizer.json``, yet splits every text into the same tokens."""
    if hasattr(processor, "backend_tokenizer"):
        backend = processor.backend_tokenizer
        if backend.truncation is not None or backend.padding is not None:
            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        payload = backend.to_str() + json.dumps(processor.special_tokens_map, sort_keys=True)
    elif hasattr(processor, "to_json_string"):
        state = json.loads(processor.to_json_string())
        state.pop("processor_class", None)
        payload = json.dumps(state, sort_keys=True)
    else:
        raise TypeError(f"cannot fingerprint a processor of type {type(processor).__name__}")
    return hashlib.sha256(payload.encode()).hexdigest()


def teacher_own_processor(task: Task, teacher_processor: Any, student_processor: Any) -> Any | None:
    """The teacher's processor when its preprocessing differs from the student's (the teacher then gets
    its own ``teacher_*`` input columns), else None: the teacher reads the student's inputs."""
    if not task.needs_processor or processor_fingerprint(teacher_processor) == processor_fingerprint(
        student_processor
    ):
        return None
    return teacher_processor


def check_tokenizer(task_name: str, processor: Any) -> None:
    """A text task's processor must be a tokenizer."""
    if not isinstance(processor, PreTrainedTokenizerBase):
        raise TypeError(
            f"{task_name} needs a tokenizer as processing_class, got a {type(processor).__name__}"
        )


def row_columns(dataset: Any) -> list[str] | None:
    """The keys of a dataset's rows as the collator sees them: the output of a transform applied on the fly
    (``with_transform``), else the column names; None when they cannot be known without iterating."""
    if isinstance(dataset, datasets.Dataset) and dataset.format["type"] == "custom" and len(dataset):
        return list(dataset[0])
    names = getattr(dataset, "column_names", None)
    return None if names is None else list(names)


class Task(ABC):
    """Adapter between a dataset, the models' heads and the distillation loss."""

    name: str
    needs_processor: bool = True  # False: model inputs are dataset columns as they are (feature vectors)
    input_column: str  # the model-input column of processed rows (``input_ids``, ``pixel_values``, ...)

    # What the task can do, declared here so that no caller tests its type or name:
    token_level: bool = False
    """Each token with a next-token target is one item (a vocabulary instead of label names)."""
    scores_bytes: bool = False
    """Its evaluation reports perplexity and bits per byte (``hf_kd.tasks.lm_scoring``)."""
    can_generate: bool = False
    """Its rows are prompts a model can continue (on-policy distillation samples completions)."""
    aligns_tokenizers: bool = False
    """It can distil a teacher of another tokenizer (``use_teacher_tokenizer``, ``hf_kd.tasks.alignment``)."""
    transforms_raw_rows: bool = False
    """Its model inputs are made from the raw columns as batches are read (images), so those columns must
    reach the collator (``remove_unused_columns: false``)."""

    @abstractmethod
    def raw_columns(self) -> tuple[str, ...]:
        """Columns of raw rows, any one of which :meth:`prepare` turns into model inputs."""

    def use_processor(self, processor: Any, *, pad_token_id: int | None = None) -> None:  # noqa: B027 (optional hook)
        """Collate rows processed by ``processor`` (the student's). ``processor`` None: keep the one
        :meth:`prepare` was given, else pad with ``pad_token_id`` (the student's). Nothing to set by default
        (rows that are stacked as they are: pixel values, feature vectors)."""

    def prepare_if_raw(self, dataset, *, student_processor: Any, name: str = "dataset"):
        """``dataset`` as model inputs: processed rows (they hold :attr:`input_column`) as they are, raw rows
        (they hold one of :meth:`raw_columns`) through :meth:`prepare`; anything else is an error naming the
        dataset's columns. Datasets whose rows cannot be listed without iterating are taken as processed."""
        columns = row_columns(dataset)
        if columns is None or self.input_column in columns:
            return dataset
        raw = [column for column in self.raw_columns() if column in columns]
        if not raw:
            expected = " or ".join(repr(column) for column in self.raw_columns())
            raise ValueError(
                f"{name} has columns {columns}: {self.name} takes processed rows (with {self.input_column!r}) "
                f"or raw rows (with {expected}) and a processing_class to process them"
            )
        if student_processor is None and self.needs_processor:
            raise ValueError(
                f"{name} holds raw rows (column {raw[0]!r}) and no processing_class was given to process them: "
                f"pass processing_class=<the student's processor>, or process the rows first (into {self.input_column!r})"
            )
        return self.prepare(dataset, student_processor=student_processor)

    @abstractmethod
    def model_class(self) -> type:
        """The ``AutoModelFor...`` class of this task."""

    @abstractmethod
    def load_processor(
        self, name_or_path: str, *, revision: str = "main", trust_remote_code: bool = False
    ) -> Any:
        """Load the tokenizer or image processor of a model."""

    @abstractmethod
    def prepare(self, dataset, *, student_processor, teacher_processor=None):
        """Turn raw rows into model inputs (+ ``teacher_*`` inputs when ``teacher_processor`` is given)."""

    def teacher_output_map(self, teacher_config, student_config, args) -> list[int] | None:
        """Check that the teacher's outputs can be compared with the student's, before training, and
        return the index map that aligns the teacher's last logit axis with the student's (None: as is)."""
        return None

    @abstractmethod
    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Build a batch from prepared rows."""

    @abstractmethod
    def kd_items(self, student_logits, teacher_logits, labels) -> KDItems:
        """Flatten one batch into distillation instances."""

    def teacher_scored_items(self, teacher_output, batch: dict[str, Any], classes: int):
        """The teacher's output on an evaluation ``batch`` as the items it is scored on, by the student's
        measure: (logits [n, C], labels [n] (−100: not scored), the bytes each position covers or None,
        the positions scored) — here the student's items over the ``classes`` both models share; None
        when the batch holds nothing comparable."""
        if isinstance(teacher_output, HiddenStates):  # teacher_logits_from_hidden_states: made whole here
            teacher_output = teacher_output.logits()
        items = self.kd_items(teacher_output[..., :classes], None, batch["labels"])
        return items.student_logits.float(), items.labels, batch.get(TEXT_BYTES), batch["labels"] != NO_LABEL

    @abstractmethod
    def count_items(self, batch: dict[str, Any]) -> torch.Tensor:
        """[number of hard-label items, number of soft-term items] of a batch (normalisers of the loss)."""
