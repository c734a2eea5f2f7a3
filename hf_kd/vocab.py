"""Token-level distillation on one vocabulary: checking whether teacher and student share it (when they
do not, ``hf_kd.tasks.alignment`` aligns their tokens), and aligning output layers that are padded to
different sizes (Qwen2.5: 151936 vs 152064 rows)."""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

# The parts of a tokenizer.json that decide which ids a text becomes. Padding/truncation settings,
# the post-processor (BOS/EOS insertion) and the chat template do not change what an id means.
_ID_DEFINING_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


def _tokenizer_state(tokenizer: Any) -> dict[str, Any]:
    """The :data:`_ID_DEFINING_PARTS` of a fast tokenizer's ``tokenizer.json``."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise TypeError(f"token-level distillation needs fast tokenizers, got a {type(tokenizer).__name__}")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    return {part: state.get(part) for part in _ID_DEFINING_PARTS}


def first_difference(teacher: Any, student: Any, limit: int = 5) -> str:
    """A readable account of where two tokenizers first disagree: differing ids, then the other parts."""
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    teacher_tokens = {i: t for t, i in teacher_vocab.items()}
    student_tokens = {i: t for t, i in student_vocab.items()}
    ids = sorted(set(teacher_tokens) | set(student_tokens))
    differing = [i for i in ids if teacher_tokens.get(i) != student_tokens.get(i)]
    lines = []
    if len(teacher_vocab) != len(student_vocab):
        lines.append(f"vocabulary sizes differ: teacher {len(teacher_vocab)}, student {len(student_vocab)}")
    for i in differing[:limit]:
        lines.append(f"id {i}: teacher {teacher_tokens.get(i)!r} vs student {student_tokens.get(i)!r}")
    if len(differing) > limit:
        lines.append(f"... {len(differing) - limit} more differing ids")
    if not differing:
        teacher_state, student_state = _tokenizer_state(teacher), _tokenizer_state(student)
        for part in _ID_DEFINING_PARTS:
            if teacher_state[part] != student_state[part]:
                lines.append(
                    f"same tokens per id, but the tokenizers' {part!r} differ ({_part_difference(teacher_state[part], student_state[part])})"
                )
    return "; ".join(lines) or "no difference found"


def _part_difference(teacher_part: Any, student_part: Any) -> str:
    if isinstance(teacher_part, dict) and isinstance(student_part, dict):
        keys = [
            k
            for k in sorted(set(teacher_part) | set(student_part))
            if teacher_part.get(k) != student_part.get(k)
        ]
        key = keys[0]
        return f"first at {key!r}: teacher {str(teacher_part.get(key))[:80]} vs student {str(student_part.get(key))[:80]}"
    return f"teacher {str(teacher_part)[:80]} vs student {str(student_part)[:80]}"


def same_vocabulary(teacher: Any, student: Any) -> bool:
    """Whether two tokenizers map text to the same ids: the same vocabulary, merges, added/special tokens,
    normaliser and pre-tokeniser. Settings that leave the ids alone may differ (padding, the
    post-processor, which token is EOS), unlike :func:`hf_kd.tasks.processor_fingerprint`, which tells
    whether the same inputs come out. When they differ (:func:`first_difference` says where), a causal-LM
    teacher is distilled across tokenizers (``hf_kd.losses.cross_tokenizer``)."""
    return _tokenizer_state(teacher) == _tokenizer_state(student)


def shared_vocab_size(teacher_size: int, student_size: int, tokenizer_size: int | None = None) -> int:
    """Rows of the output layers compared: the shared prefix ``min(teacher, student)``.

    Models of one family pad their embedding matrices to different sizes beyond the tokenizer's last
    id; the padded rows are never a target, so both models' logits are sliced to the shared prefix.
    That is only safe when every real token id (``tokenizer_size``, when known) is inside it.
    """
    shared = min(teacher_size, student_size)
    if tokenizer_size is not None and tokenizer_size > shared:
        raise ValueError(
            f"the tokenizer has {tokenizer_size} tokens but the {'teacher' if teacher_size < student_size else 'student'} "
            f"scores only {shared} (teacher vocab_size {teacher_size}, student {student_size}): its output layer is too small"
        )
    if teacher_size != student_size:
        logger.info(
            "teacher vocab_size %d and student vocab_size %d differ (padded embeddings): distilling on the shared first %d token ids",
            teacher_size,
            student_size,
            shared,
        )
    return shared


def vocab_size_of(config) -> int:
    """Rows of a (possibly multimodal) model's output layer."""
    return config.get_text_config().vocab_size


def check_output_layer(name: str, config, tokenizer) -> None:
    """A model (``name``: teacher or student) must score every token of its own tokenizer."""
    if vocab_size_of(config) < len(tokenizer):
        raise ValueError(
            f"the {name}'s tokenizer has {len(tokenizer)} tokens but the {name} scores only "
            f"{vocab_size_of(config)}: is it the {name}'s tokenizer?"
        )
