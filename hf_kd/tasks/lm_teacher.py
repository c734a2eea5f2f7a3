"""A causal LM row's columns for a teacher of another tokenizer: the teacher's ids of the same text,
the alignment of the two tokenizations (``hf_kd.tasks.alignment``) and the bytes each teacher token
covers (docs/knowledge.md#different-tokenizers), and the teacher scored on its own tokens of them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from hf_kd.losses import AlignedLogits
from hf_kd.tasks.alignment import VocabularyMap, align_spans, alignment_columns, vocabulary_map
from hf_kd.tasks.base import NO_LABEL, TEACHER_INPUT_PREFIX, TEACHER_TEXT_BYTES, check_tokenizer
from hf_kd.tasks.chat import encode_with_eos
from hf_kd.tasks.lm_scoring import in_spans, next_token_targets, text_bytes
from hf_kd.vocab import first_difference, same_vocabulary

logger = logging.getLogger("hf_kd.tasks.causal_lm")  # the task's log, where a run reports it


@dataclass
class OtherTokenizer:
    """A teacher's tokenizer whose vocabulary differs from the student's: the tokenizer, the tokens both
    share and the id its inputs are padded with."""

    tokenizer: Any
    vocabulary: VocabularyMap
    pad_token_id: int


def other_tokenizer(
    task: Any, teacher_processor: Any, who: str, known: OtherTokenizer | None
) -> OtherTokenizer | None:
    """``teacher_processor`` as a tokenizer of another vocabulary than ``task``'s student tokenizer (its
    vocabulary map made and logged, unless ``known`` already holds it), None when it has the student's;
    packing is refused, naming ``who``."""
    if same_vocabulary(teacher_processor, task.tokenizer):
        return None
    check_tokenizer(task.name, teacher_processor)
    if task.packing:
        raise ValueError(
            f"packing: true is not supported with {who} whose tokenizer differs from the student's "
            "(cross-tokenizer distillation aligns the two tokenizations row by row); set packing: false"
        )
    if known is not None and known.tokenizer is teacher_processor:
        vocabulary = known.vocabulary
    else:
        vocabulary = vocabulary_map(task.tokenizer, teacher_processor)
        logger.info(
            "%s differs from the student's (%s): distilling across tokenizers, %d tokens shared",
            "the teacher's tokenizer" if who == "a teacher" else f"the tokenizer of {who}",
            first_difference(teacher_processor, task.tokenizer),
            len(vocabulary.student_ids),
        )
    ids = (teacher_processor.pad_token_id, teacher_processor.eos_token_id, 0)
    return OtherTokenizer(teacher_processor, vocabulary, next(i for i in ids if i is not None))


def teacher_columns(
    teacher_tokenizer: Any,
    vocabulary: VocabularyMap,
    text: str,
    row: dict,
    offsets: list,
    special: list[bool],
    *,
    max_length: int,
    add_special_tokens: bool,
    with_eos: bool,
    scored_spans: list[tuple[int, int]] | None = None,
) -> dict[str, list[int]]:
    """For ``row`` (the student's truncated ids and labels of ``text``, its tokens' character ``offsets``
    and special-token flags): the teacher's ids of the same ``text`` (truncated alike), the alignment
    columns and the bytes each teacher token covers, −1 for a token the teacher is not scored on: one
    starting outside ``scored_spans`` (the characters whose tokens have labels; None: all), as the
    student's labels."""
    teacher_ids, teacher_offsets, teacher_special = encode_with_eos(
        teacher_tokenizer, text, add_special_tokens, with_eos
    )
    kept_student, kept_teacher = len(row["input_ids"]), min(len(teacher_ids), max_length)

    def end(offsets_kept: list, total: int) -> int:  # where a side's kept tokens stop covering the text
        return len(text) if len(offsets_kept) == total else max((o[1] for o in offsets_kept), default=0)

    spans = align_spans(
        offsets[:kept_student],
        teacher_offsets[:kept_teacher],
        student_special=special[:kept_student],
        teacher_special=teacher_special[:kept_teacher],
        student_end=end(offsets[:kept_student], len(offsets)),
        teacher_end=end(teacher_offsets[:kept_teacher], len(teacher_offsets)),
        text=text,
    )
    teacher_ids = teacher_ids[:kept_teacher]
    columns = alignment_columns(spans, row["input_ids"], row["labels"], teacher_ids, vocabulary.teacher_id_of)
    teacher_bytes = [
        count if scored else -1
        for count, scored in zip(
            text_bytes(text, teacher_offsets), in_spans(teacher_offsets, scored_spans), strict=True
        )
    ]
    return columns | {
        "teacher_input_ids": teacher_ids,
        "teacher_attention_mask": [1] * kept_teacher,
        TEACHER_TEXT_BYTES: teacher_bytes[:kept_teacher],
    }


def teacher_own_items(
    teacher_output: AlignedLogits, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(the teacher's logits [B, T', V_t] in float32, its next-token targets [B · T'], the bytes each of its
    tokens covers [B, T'], which of them are scored [B, T'] bool) from the columns
    :func:`teacher_columns` made: the teacher scored on its own tokens where their bytes are counted
    (≥ 0). None for rows prepared without those columns (nothing comparable)."""
    if TEACHER_TEXT_BYTES not in batch:
        return None
    byte_counts = batch[TEACHER_TEXT_BYTES]
    scored = byte_counts >= 0
    own_ids = batch[TEACHER_INPUT_PREFIX + "input_ids"].masked_fill(~scored, NO_LABEL)
    return teacher_output.logits.float(), next_token_targets(own_ids).reshape(-1), byte_counts, scored
