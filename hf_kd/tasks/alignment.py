"""Aligning the tokens of two tokenizers over the same text, for a teacher whose vocabulary differs from
the student's (``hf_kd.losses.cross_tokenizer``; docs/knowledge.md#different-tokenizers).

Rows in, rows out (done once, when the dataset is prepared), and the batch's alignment columns made into
:class:`hf_kd.losses.AlignedLogits` for the loss:

- :func:`vocabulary_map`: the tokens both vocabularies share, compared by the text (bytes) they stand
  for, so that byte-level BPE's ``Ġthe``, SentencePiece's ``▁the`` and a plain `` the`` are one token
  (each text through the id its tokenizer writes it with, :func:`written_ids`); the two end-of-sequence
  tokens are paired whatever their strings.
- :func:`align_spans`: tokens grouped into spans whose character boundaries coincide on both sides,
  from the fast tokenizers' character offsets. A boundary between two tokens of a side is the gap
  ``[end of one, start of the next]`` (empty when they touch; none when they overlap, as the byte
  pieces of one multi-byte character do; none over text a normaliser composed or dropped); a span ends
  where a gap of each side meet. Zero-width special tokens (a BOS or EOS the tokenizer adds) are not
  text: they pair with the other side's zero-width special tokens at the same character, in order, or
  with nothing (then no loss uses them).
- :func:`alignment_columns`: per row, which student position predicts the start of which span, from
  which teacher position, and whether the span is matched (one token each side, the same token).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from tokenizers import Tokenizer

from hf_kd.losses import AlignedLogits
from hf_kd.tasks.base import ALIGNMENT_PREFIX

Offsets = list[tuple[int, int]]


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte, inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_LEVEL_CHARS = _byte_level_chars()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


WHITESPACE_DROPPING = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer"}
"""Pre-tokenizers that split on spaces and drop them: a word token stands for the word after a space."""


def _component_steps(tokenizer: Any, component: str) -> list[dict[str, Any]]:
    """The steps of a fast tokenizer's ``component`` (``decoder``, ``pre_tokenizer``, ``normalizer``) as
    their JSON states, in order, those inside a ``Sequence`` in its place; [] when it has none."""

    def steps(part: dict[str, Any]) -> list[dict[str, Any]]:
        inner = part.get("decoders") or part.get("pretokenizers") or part.get("normalizers")
        return [part] if inner is None else [step for sub in inner for step in steps(sub)]

    part = json.loads(tokenizer.backend_tokenizer.to_str()).get(component)
    return [] if part is None else steps(part)


def _component_kinds(tokenizer: Any, component: str) -> set[str]:
    """The types of a fast tokenizer's ``component`` (``decoder``, ``pre_tokenizer``), those inside a
    ``Sequence`` included."""
    return {step.get("type") for step in _component_steps(tokenizer, component)}


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """The text each id of ``tokenizer`` stands for in running text, as UTF-8 bytes: byte-level tokens
    through the byte-level alphabet, ``<0xNN>`` byte-fallback tokens as their byte, ``▁`` as a space
    (SentencePiece and Metaspace), added tokens as written. A tokenizer that drops spaces when it splits
    words (word-level, WordPiece) has a space before each word token, none before a ``##`` piece."""
    kinds = _component_kinds(tokenizer, "decoder")
    spaced = bool(_component_kinds(tokenizer, "pre_tokenizer") & WHITESPACE_DROPPING)
    added = {token.content for token in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    result = {}
    for token, index in tokenizer.get_vocab().items():
        if token in added:
            result[index] = token.encode()
        elif "ByteLevel" in kinds and all(char in BYTE_LEVEL_CHARS for char in token):
            result[index] = bytes(BYTE_LEVEL_CHARS[char] for char in token)
        elif "ByteFallback" in kinds and BYTE_FALLBACK.fullmatch(token):
            result[index] = bytes([int(BYTE_FALLBACK.fullmatch(token).group(1), 16)])
        elif spaced:
            result[index] = token[2:].encode() if token.startswith("##") else b" " + token.encode()
        else:
            result[index] = token.replace("▁", " ").encode()
    return result


@dataclass
class VocabularyMap:
    """The shared tokens S of two tokenizers: ``student_ids[i]`` and ``teacher_ids[i]`` stand for the
    same text (each text once: the id each side writes it with, :func:`written_ids`)."""

    student_ids: list[int]
    teacher_ids: list[int]

    @cached_property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student ids [M], teacher ids [M]) as long tensors, made once."""
        return torch.tensor(self.student_ids), torch.tensor(self.teacher_ids)

    @cached_property
    def teacher_id_of(self) -> dict[int, int]:
        """Student id → the teacher id of the same token, for the shared tokens (made once)."""
        return dict(zip(self.student_ids, self.teacher_ids, strict=True))


SPACE_MARKING = {"Prepend", "Strip", "ByteLevel"}
"""Normaliser steps that only add, trim or encode spaces (Llama's ``Prepend("▁")``), as a ``Replace`` by
``▁`` does: they rewrite no token's text."""


def text_normalizer(tokenizer: Any) -> Any | None:
    """The steps of ``tokenizer``'s normaliser that rewrite text (``Lowercase``, ``NFKC``,
    ``StripAccents``, ...) as one normaliser (``normalize_str``); None when it has none."""
    rewriting = [
        step
        for step in _component_steps(tokenizer, "normalizer")
        if step["type"] not in SPACE_MARKING
        and not (step["type"] == "Replace" and step.get("content") == "▁")
    ]
    if not rewriting:
        return None
    bare = {"type": "WordLevel", "vocab": {}, "unk_token": "<unk>"}
    normalising = {"normalizer": {"type": "Sequence", "normalizers": rewriting}, "model": bare}
    return Tokenizer.from_str(json.dumps({"version": "1.0", "added_tokens": []} | normalising)).normalizer


def written_ids(tokenizer: Any) -> dict[bytes, int]:
    """For each text (:func:`token_bytes`) the id ``tokenizer`` writes it with, when several ids stand for
    it: an ordinary token before a byte-fallback ``<0xNN>`` (a tokenizer falls back to bytes only for what
    its vocabulary lacks: Llama writes "a" as the token ``a``, never as ``<0x61>``, whose id is smaller),
    then the smallest id. A token whose text its normaliser rewrites is never written and left out: a
    lowercasing tokenizer's ``The`` (it reads "The" as "the"), NFKC's ``ﬁ``; added tokens, which skip
    the normaliser, and byte pieces of a character are kept."""
    vocabulary = tokenizer.get_vocab()
    fallback = {index for token, index in vocabulary.items() if BYTE_FALLBACK.fullmatch(token)}
    normalizer, added = (
        text_normalizer(tokenizer),
        set(tokenizer.backend_tokenizer.get_added_tokens_decoder()),
    )

    def rewritten(index: int, text: bytes) -> bool:
        if normalizer is None or index in added:
            return False
        try:
            decoded = text.decode()
        except UnicodeDecodeError:  # a byte piece: no text of its own to normalise
            return False
        return normalizer.normalize_str(decoded).split() != decoded.split()

    ids: dict[bytes, int] = {}
    for index, text in sorted(
        token_bytes(tokenizer).items(), key=lambda item: (item[0] in fallback, item[0])
    ):
        if not rewritten(index, text):
            ids.setdefault(text, index)
    return ids


def vocabulary_map(student: Any, teacher: Any) -> VocabularyMap:
    """The tokens ``student`` and ``teacher`` (fast tokenizers) share, by :func:`token_bytes` and
    :func:`written_ids`; ordered by student id. The two end-of-sequence tokens are paired whatever their
    strings when neither has a partner of its own text: a chat template's end-of-turn marker that is one
    side's EOS and a plain token of the other (``<|im_end|>``) stays paired with itself. Raises when
    nothing is shared (no exact part could ever be computed: the vocabularies have nothing in common)."""
    student_ids, teacher_ids = written_ids(student), written_ids(teacher)
    pairs = {student_ids[text]: teacher_ids[text] for text in student_ids.keys() & teacher_ids.keys()}
    student_eos, teacher_eos = student.eos_token_id, teacher.eos_token_id
    if (
        None not in (student_eos, teacher_eos)
        and student_eos not in pairs
        and teacher_eos not in pairs.values()
    ):
        pairs[student_eos] = teacher_eos
    if not pairs:
        raise ValueError("the teacher's and the student's tokenizers share no token: nothing can be aligned")
    ordered = sorted(pairs.items())
    return VocabularyMap([s for s, _ in ordered], [t for _, t in ordered])


def _gaps(offsets: Offsets, tokens: list[int], end: int, text: str | None) -> list[tuple[int, int, int]]:
    """The boundaries of one side's text ``tokens`` (indices into ``offsets``) as ``(low, high, k)``: a
    span may end after the first k tokens anywhere in [low, high]. The start (k = 0) reaches back to 0;
    the end (k = len) reaches to ``end``; touching or spaced neighbours give a gap, overlapping ones none.
    With ``text``, a gap over characters other than whitespace is no boundary: the side's normaliser
    composed them into a neighbour (NFKC's ``e`` + combining accent → ``é``, offsets on the ``e`` only)
    or dropped them, and which side of the gap they belong to is unknown."""
    if not tokens:
        gaps = [(0, end, 0)]
    else:
        gaps = [(0, offsets[tokens[0]][0], 0)]
        for k in range(1, len(tokens)):
            left_end, right_start = offsets[tokens[k - 1]][1], offsets[tokens[k]][0]
            if right_start >= left_end:
                gaps.append((left_end, right_start, k))
        last_end = offsets[tokens[-1]][1]
        gaps.append((last_end, max(last_end, end), len(tokens)))
    if text is None:
        return gaps
    return [(low, high, k) for low, high, k in gaps if not text[low:high].strip()]


def align_spans(
    student: Offsets,
    teacher: Offsets,
    *,
    student_special: list[bool] | None = None,
    teacher_special: list[bool] | None = None,
    student_end: int | None = None,
    teacher_end: int | None = None,
    text: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Spans of the same text on both sides: pairs (student token indices, teacher token indices), in
    text order, from each token's character offsets ``(start, end)``.

    ``*_special`` marks special tokens: those of width 0 are not text (see the module docstring).
    ``*_end`` is where a side's text ends (default: its last token's end); a side cut short by
    truncation passes its last token's end, so that the spans stop where both sides still cover the
    text. ``text`` (the text both offsets index) lets a boundary fall only where a side leaves nothing
    but whitespace out of its tokens (:func:`_gaps`). Tokens in no span (past a truncation, an unpaired
    zero-width token) are left out."""
    student_special = student_special or [False] * len(student)
    teacher_special = teacher_special or [False] * len(teacher)

    def marks(offsets: Offsets, special: list[bool]) -> list[int]:
        return [
            i
            for i, ((start, stop), flag) in enumerate(zip(offsets, special, strict=True))
            if flag and start == stop
        ]

    student_marks, teacher_marks = marks(student, student_special), marks(teacher, teacher_special)
    student_text = sorted(set(range(len(student))) - set(student_marks))
    teacher_text = sorted(set(range(len(teacher))) - set(teacher_marks))
    last = lambda offsets, text: offsets[text[-1]][1] if text else 0  # noqa: E731
    student_gaps = _gaps(
        student, student_text, last(student, student_text) if student_end is None else student_end, text
    )
    teacher_gaps = _gaps(
        teacher, teacher_text, last(teacher, teacher_text) if teacher_end is None else teacher_end, text
    )
    cuts, a, b = [], 0, 0
    while a < len(student_gaps) and b < len(teacher_gaps):
        (s_low, s_high, s_k), (t_low, t_high, t_k) = student_gaps[a], teacher_gaps[b]
        if s_high < t_low:
            a += 1
        elif t_high < s_low:
            b += 1
        else:
            cuts.append((s_k, t_k))
            a, b = a + 1, b + 1
    spans = [
        (student_text[s0:s1], teacher_text[t0:t1])
        for (s0, t0), (s1, t1) in itertools.pairwise(cuts)
        if s1 > s0 and t1 > t0
    ]
    for position in sorted({student[i][0] for i in student_marks}):
        here_s = [i for i in student_marks if student[i][0] == position]
        here_t = [i for i in teacher_marks if teacher[i][0] == position]
        spans += [([s], [t]) for s, t in zip(here_s, here_t, strict=False)]  # unpaired: no span
    return sorted(spans, key=lambda span: span[0][0])


def alignment_columns(
    spans: list[tuple[list[int], list[int]]],
    student_ids: list[int],
    student_labels: list[int],
    teacher_ids: list[int],
    teacher_id_of: dict[int, int],
    no_label: int = -100,
) -> dict[str, list[int]]:
    """The alignment columns of one row (predictor positions: position t predicts token t + 1).

    For each span whose tokens both have a predictor (not the first token of a side) and whose student
    tokens all have a label (completion-only masks carry over this way): ``teacher_position`` at the
    student position predicting its first token is the teacher position predicting the teacher's first
    token; ``matched`` is 1 when the span is one student token and one teacher token that
    ``teacher_id_of`` pairs (the exact part), 0 for the other spans (ULD at the span start). −1 / 0
    elsewhere."""
    teacher_position, matched = [-1] * len(student_ids), [0] * len(student_ids)
    for student_tokens, teacher_tokens in spans:
        first, teacher_first = student_tokens[0], teacher_tokens[0]
        if first < 1 or teacher_first < 1 or any(student_labels[k] == no_label for k in student_tokens):
            continue
        start = first - 1
        teacher_position[start] = teacher_first - 1
        one_each = len(student_tokens) == len(teacher_tokens) == 1
        if one_each and teacher_id_of.get(student_ids[first]) == teacher_ids[teacher_first]:
            matched[start] = 1
    return {ALIGNMENT_PREFIX + "teacher_position": teacher_position, ALIGNMENT_PREFIX + "matched": matched}


def aligned_logits(
    teacher_logits: torch.Tensor,
    batch: dict[str, Any],
    vocabulary: VocabularyMap,
    *,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
) -> AlignedLogits:
    """The teacher's logits [B, T_t, V_t] on a collated batch (its ``teacher_input_ids`` and alignment
    columns) as :class:`AlignedLogits` over the flattened rows (student row = b·T_s + t, teacher row =
    b·T_t + u)."""
    columns = {
        key[len(ALIGNMENT_PREFIX) :]: value
        for key, value in batch.items()
        if key.startswith(ALIGNMENT_PREFIX)
    }
    batch_size = columns["teacher_position"].shape[0]
    teacher_length = teacher_logits.shape[1]

    def flat(positions: torch.Tensor, length: int) -> torch.Tensor:
        base = torch.arange(positions.shape[0], device=positions.device)[:, None] * length
        return torch.where(positions >= 0, positions + base, -1).reshape(-1)

    return AlignedLogits(
        logits=teacher_logits.reshape(batch_size * teacher_length, -1),
        teacher_row=flat(columns["teacher_position"], teacher_length),
        matched=columns["matched"].reshape(-1).bool(),
        student_ids=vocabulary.tensors[0],
        teacher_ids=vocabulary.tensors[1],
        matched_weight=matched_weight,
        unmatched_weight=unmatched_weight,
    )
