"""Causal language modelling: every token that has a target is one distillation instance.

Rows are plain text (``text_column``), conversations (``messages_column``, a list of
``{"role", "content"}`` rendered with the tokenizer's chat template), or plain prompts
(``prompt_column``) with or without their completions (``completion_column``). ``labels`` follow the Hugging
Face convention: aligned with ``input_ids`` (the model's logit at position t predicts ``labels[t + 1]``),
−100 where there is no target — prompt tokens when ``completion_only_loss``, padding, and the first
token of every packed sequence.

The named parts, whose public names also import from here: ``chat.py`` (prompt columns, chat-template
spans, a text's ids with offsets), ``lm_scoring.py`` (next-token targets, bits per byte), ``lm_batches.py``
(packing, collation), ``lm_teacher.py`` and ``alignment.py`` (a teacher of another tokenizer's columns,
and the teacher scored on its own tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd.losses import AlignedLogits, HiddenStates, SparseLogits, WeightedTeachers
from hf_kd.tasks.alignment import VocabularyMap
from hf_kd.tasks.base import (
    CACHE_PREFIX,
    NO_LABEL,
    TEXT_BYTES,
    KDItems,
    Task,
    check_tokenizer,
)
from hf_kd.tasks.chat import assistant_spans, check_prompt_columns, encode_with_eos
from hf_kd.tasks.lm_batches import collate_rows, pack_rows
from hf_kd.tasks.lm_scoring import bits_per_byte, in_spans, next_token_targets, scored_bytes, text_bytes
from hf_kd.tasks.lm_teacher import OtherTokenizer, other_tokenizer, teacher_columns, teacher_own_items
from hf_kd.vocab import check_output_layer, shared_vocab_size, vocab_size_of

__all__ = [
    "CausalLMTask",
    "assistant_spans",
    "bits_per_byte",
    "check_output_layer",
    "check_prompt_columns",
    "encode_with_eos",
    "in_spans",
    "next_token_targets",
    "scored_bytes",
    "text_bytes",
    "vocab_size_of",
]


class CausalLMTask(Task):
    """Plain-text or chat causal LM, padded (``attention_mask``) or packed (``position_ids``).

    Packing puts whole examples one after the other in rows of at most ``max_length`` tokens, with
    ``position_ids`` restarting at 0 for each and no ``attention_mask``: Transformers then builds a
    block-diagonal causal mask from the position ids (``masking_utils.find_packed_sequence_indices``),
    so no token attends to another example, and the first token of each example gets no target.
    """

    name = "causal-lm"
    input_column = "input_ids"
    token_level = scores_bytes = aligns_tokenizers = True

    def __init__(
        self,
        text_column: str = "text",
        messages_column: str = "messages",
        max_length: int = 1024,
        completion_only_loss: bool = True,
        packing: bool = False,
        prompt_column: str | None = None,
        completion_column: str = "completion",
    ):
        if max_length < 2:
            raise ValueError(f"max_length={max_length!r}: a causal LM example needs at least 2 tokens")
        self.text_column, self.messages_column = text_column, messages_column
        self.max_length, self.completion_only_loss, self.packing = max_length, completion_only_loss, packing
        self.prompt_column, self.completion_column = prompt_column, completion_column
        self.tokenizer = None
        self.pad_token_id = 0
        self.cache_decoder: Callable[[list[bytes], list[int]], SparseLogits] | None = None
        """Decodes a compressed cache's ``kd_teacher_packed`` rows (``TeacherCache.decoder``)."""
        self.teacher_tokenizer = None
        """The teacher's tokenizer when its vocabulary differs from the student's (set by :meth:`prepare`):
        rows then carry the teacher's own inputs and the alignment (``hf_kd.tasks.alignment``)."""
        self.vocabulary: VocabularyMap | None = None
        """The tokens both tokenizers share, when they differ."""
        self.teacher_pad_token_id = 0
        self.members: dict[str, OtherTokenizer] = {}
        """Several teachers' members of another tokenizer, by column prefix (:meth:`use_member_tokenizer`)."""

    def raw_columns(self) -> tuple[str, ...]:
        if self.prompt_column is not None:
            return (self.prompt_column,)
        return (self.text_column, self.messages_column)

    @property
    def can_generate(self) -> bool:
        """Unpacked rows only: completions are generated per prompt."""
        return not self.packing

    def use_processor(self, processor, *, pad_token_id=None) -> None:
        """Pad with the tokenizer's pad id (else its EOS: padded positions are masked, any id works); without
        a tokenizer (and none given to :meth:`prepare`), with ``pad_token_id`` (else 0)."""
        if processor is not None:
            check_tokenizer(self.name, processor)
            self.tokenizer = processor
            candidates = (processor.pad_token_id, processor.eos_token_id, self.pad_token_id)
        elif self.tokenizer is None:
            candidates = (pad_token_id, self.pad_token_id)
        else:
            return
        self.pad_token_id = next(i for i in candidates if i is not None)

    def model_class(self):
        return AutoModelForCausalLM

    def load_processor(self, name_or_path, *, revision="main", trust_remote_code=False):
        """The tokenizer of ``name_or_path``; a local folder it cannot be loaded from (a model saved without
        its tokenizer) is refused naming the folder, what it holds and what was expected."""
        try:
            return AutoTokenizer.from_pretrained(
                name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as error:
            folder = Path(name_or_path)
            if not folder.is_dir():
                raise
            held = sorted(path.name for path in folder.iterdir())
            raise ValueError(
                f"no tokenizer could be loaded from the folder {str(folder)!r}, which holds {held}: expected "
                "a tokenizer.json (or a tokenizer_config.json with its vocabulary files) there. A model saved "
                "without its tokenizer needs the tokenizer named apart: teacher_tokenizer (the teacher's) or "
                "student_processor (the student's), its folder or Hub id"
            ) from error

    def teacher_output_map(self, teacher_config, student_config, args) -> None:
        """Checks that both output layers cover the tokenizer (each its own when they differ); padded
        sizes are sliced by :meth:`kd_items`."""
        if self.teacher_tokenizer is not None:
            check_output_layer("teacher", teacher_config, self.teacher_tokenizer)
            check_output_layer("student", student_config, self.tokenizer)
            return None
        tokenizer_size = None if self.tokenizer is None else len(self.tokenizer)
        shared_vocab_size(vocab_size_of(teacher_config), vocab_size_of(student_config), tokenizer_size)
        return None

    # ---- preprocessing ------------------------------------------------------------------------

    def prepare(self, dataset, *, student_processor, teacher_processor=None):
        """Tokenise (and pack). A teacher tokenizer with the student's vocabulary reads the student's ids;
        one with another vocabulary gets its own ``teacher_input_ids`` / ``teacher_attention_mask`` of the
        same text (the student's rendered chat template, encoded without added special tokens) and the
        alignment columns (``hf_kd.tasks.alignment``). Packing and cached teacher columns are refused then."""
        self.use_processor(student_processor)
        columns = dataset.column_names
        cached = [c for c in columns if c.startswith(CACHE_PREFIX)]
        self.use_teacher_tokenizer(teacher_processor)
        if cached and self.teacher_tokenizer is not None:
            raise ValueError(
                "cached teacher columns follow the student's tokens; a teacher with another tokenizer must run "
                "online (teacher_source: online)"
            )
        if self.prompt_column is not None:
            check_prompt_columns(dataset.features or columns, self.prompt_column, self.completion_column)
            other = self.teacher_tokenizer is not None or self.members
            if other and student_processor.chat_template is None:
                raise ValueError(
                    f"prompt_column {self.prompt_column!r} without a chat template is not supported with a teacher "
                    "whose tokenizer differs from the student's (prompt and completion are tokenised apart, so the "
                    "two tokenizations cannot be aligned by text); give the rows as conversations or as text"
                )
            source = [self.prompt_column]
            if self.completion_column in columns:
                source.append(self.completion_column)
            encode = self._encode_prompt
        elif self.messages_column in columns:
            if student_processor.chat_template is None:
                message = f"column {self.messages_column!r} holds conversations but the tokenizer has no chat_template"
                if getattr(self.teacher_tokenizer, "chat_template", None) is not None:
                    message += (
                        " (the student's; the teacher's has one, but a conversation is rendered with the "
                        "student's template and the teacher reads that same text): give the student's "
                        "tokenizer a chat_template"
                    )
                raise ValueError(message)
            encode, source = self._encode_conversation, self.messages_column
        elif self.text_column in columns:
            encode, source = self._encode_text, self.text_column
        else:
            raise ValueError(
                f"causal-lm needs a {self.text_column!r} (plain text) or {self.messages_column!r} (chat) column; "
                f"the dataset has {columns}"
            )
        if self.packing and cached:
            raise ValueError(
                "packing: true cannot be combined with cached per-token teacher outputs (they follow unpacked rows)"
            )
        encoded = dataset.map(
            encode,
            input_columns=source,
            remove_columns=[c for c in columns if c not in cached],
            desc="Tokenizing",
        )
        if not self.packing:
            return encoded
        return encoded.map(
            partial(pack_rows, max_length=self.max_length),
            batched=True,
            batch_size=1000,
            remove_columns=encoded.column_names,
            desc="Packing",
        )

    def use_teacher_tokenizer(self, teacher_processor) -> None:
        """Distil across tokenizers when ``teacher_processor`` (the teacher's tokenizer) maps text to other
        ids than the student's (set by :meth:`use_processor` first): :attr:`teacher_tokenizer` and
        :attr:`vocabulary` are set, and packing is refused. A tokenizer with the student's vocabulary
        turns it off; None keeps the tokenizer set before (rows prepared later get its columns too)."""
        if teacher_processor is None:
            return
        single = self.teacher_tokenizer
        known = None if single is None else OtherTokenizer(single, self.vocabulary, self.teacher_pad_token_id)
        other = other_tokenizer(self, teacher_processor, "a teacher", known)
        self.teacher_tokenizer, self.vocabulary = (
            (None, None) if other is None else (other.tokenizer, other.vocabulary)
        )
        if other is not None:
            self.teacher_pad_token_id = other.pad_token_id

    def use_member_tokenizer(self, prefix: str, teacher_processor, who: str) -> VocabularyMap | None:
        """As :meth:`use_teacher_tokenizer`, for one of several teachers (``who``, as errors name it): when
        its tokenizer maps text to other ids than the student's, rows prepared from now on carry its
        columns under ``prefix`` (:attr:`members`) and the tokens both share are returned; else None."""
        other = other_tokenizer(self, teacher_processor, who, self.members.get(prefix))
        if other is None:
            self.members.pop(prefix, None)
            return None
        self.members[prefix] = other
        return other.vocabulary

    def _truncate(self, ids: list[int], labels: list[int], byte_counts: list[int]) -> dict[str, list[int]]:
        """The row's columns, cut to ``max_length`` tokens: ids, labels and the bytes each token covers."""
        return {
            "input_ids": ids[: self.max_length],
            "labels": labels[: self.max_length],
            TEXT_BYTES: byte_counts[: self.max_length],
        }

    def _encode(
        self, text: str, add_special_tokens: bool, with_eos: bool
    ) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """(ids, character offsets, special-token flags) of ``text`` with the student's tokenizer (see
        :func:`encode_with_eos`)."""
        return encode_with_eos(self.tokenizer, text, add_special_tokens, with_eos)

    def _encode_text(self, text: str) -> dict[str, list[int]]:
        """Plain text: every token is a target; an EOS is appended so the model learns where text ends."""
        ids, offsets, special = self._encode(text, True, True)
        row = self._truncate(ids, list(ids), text_bytes(text, offsets))
        return self._with_teacher(text, True, True, row, offsets, special)

    def _encode_prompt(self, prompt: str, completion: str | None = None) -> dict[str, list[int]]:
        """A plain prompt and its completion (None: a prompt-only row, without any label; its completion
        is generated). With a chat template the prompt is one user turn and the completion the assistant's
        reply (rendered, and labelled, as a conversation); without one the completion's own tokens (no
        special tokens added, an EOS appended) follow the prompt's, so the prompt ends on a token boundary
        as it does for generation. Labels follow ``completion_only_loss`` as for conversations."""
        messages = [{"role": "user", "content": prompt}]
        templated = self.tokenizer.chat_template is not None
        if completion is not None and templated:
            return self._encode_conversation([*messages, {"role": "assistant", "content": completion}])
        if templated:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids, prompt_offsets, _ = self._encode(text, False, False)
        else:
            text = prompt
            prompt_ids, prompt_offsets, _ = self._encode(prompt, True, False)
        prompt_bytes = text_bytes(text, prompt_offsets)
        if completion is None:
            return self._truncate(prompt_ids, [NO_LABEL] * len(prompt_ids), prompt_bytes)
        completion_ids, completion_offsets, _ = self._encode(completion, False, True)
        prompt_labels = [NO_LABEL] * len(prompt_ids) if self.completion_only_loss else prompt_ids
        return self._truncate(
            prompt_ids + completion_ids,
            prompt_labels + completion_ids,
            prompt_bytes + text_bytes(completion, completion_offsets),
        )

    def _encode_conversation(self, messages: list[dict[str, Any]]) -> dict[str, list[int]]:
        """A conversation through the chat template; with ``completion_only_loss`` only the assistant's
        tokens (those starting inside an assistant span) keep their label, and a conversation without any
        assistant turn is a prompt: it ends with the template's generation prompt, as a ``prompt_column``
        row without completion (what on-policy distillation continues)."""
        prompt_only = self.completion_only_loss and all(m["role"] != "assistant" for m in messages)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_only)
        ids, offsets, special = self._encode(text, False, False)
        spans = assistant_spans(self.tokenizer, messages, text) if self.completion_only_loss else None
        labels = [
            token if scored else NO_LABEL for token, scored in zip(ids, in_spans(offsets, spans), strict=True)
        ]
        row = self._truncate(ids, labels, text_bytes(text, offsets))
        return self._with_teacher(text, False, False, row, offsets, special, scored_spans=spans)

    def _with_teacher(
        self,
        text: str,
        add_special_tokens: bool,
        with_eos: bool,
        row: dict,
        offsets: list,
        special: list[bool],
        scored_spans: list[tuple[int, int]] | None = None,
    ) -> dict[str, list[int]]:
        """``row`` with each teacher of another tokenizer's columns (:func:`teacher_columns`), a member's prefixed."""
        others = dict(self.members)
        if self.teacher_tokenizer is not None:
            others[""] = OtherTokenizer(self.teacher_tokenizer, self.vocabulary, self.teacher_pad_token_id)
        columns = {}
        for prefix, other in others.items():
            own = teacher_columns(
                other.tokenizer, other.vocabulary, text, row, offsets, special, max_length=self.max_length,
                add_special_tokens=add_special_tokens, with_eos=with_eos, scored_spans=scored_spans,
            )  # fmt: skip
            columns.update({prefix + key: value for key, value in own.items()})
        return row | columns

    # ---- batches ------------------------------------------------------------------------------

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded batch of ``features`` (:func:`hf_kd.tasks.lm_batches.collate_rows`), padded with
        this task's pad ids and a compressed cache decoded by :attr:`cache_decoder`."""
        members = {prefix: other.pad_token_id for prefix, other in self.members.items()}
        return collate_rows(
            features, self.pad_token_id, self.teacher_pad_token_id, self.cache_decoder, members
        )

    def teacher_scored_items(self, teacher_output, batch: dict[str, Any], classes: int):
        """As :meth:`Task.teacher_scored_items`; a teacher of another tokenizer (:class:`AlignedLogits`) is
        scored on its own tokens of the same text, those whose text bytes are counted (≥ 0: where the
        student's tokens have labels); only its bytes make it comparable. None without those columns."""
        if not isinstance(teacher_output, AlignedLogits):
            return super().teacher_scored_items(teacher_output, batch, classes)
        return teacher_own_items(teacher_output, batch)

    def kd_items(self, student_logits, teacher_logits, labels) -> KDItems:
        """Position t of a row is one instance with target ``labels[t + 1]``. Both logits are cut to the
        shared vocabulary prefix when the output layers are padded to different sizes (views, no copy
        of the student's logits). The student and the teacher may be :class:`HiddenStates` (final hidden
        states [B, T, H], output-layer weight [V, H]): their weight's rows are cut instead, and the loss
        makes their logits chunk by chunk."""
        targets = next_token_targets(labels).reshape(-1)
        if isinstance(teacher_logits, WeightedTeachers):  # several teachers, each flattened as if alone
            dense = [o for o in teacher_logits.outputs if not isinstance(o, AlignedLogits)]
            sizes = [o.num_classes if isinstance(o, SparseLogits) else o.shape[-1] for o in dense]
            student_logits = student_logits[..., : min([student_logits.shape[-1], *sizes])]
            parts = [self.kd_items(student_logits, o, labels).teacher for o in teacher_logits.outputs]
            student = student_logits.reshape(-1, student_logits.shape[-1])
            rows = teacher_logits.rows  # routing: [B] per teacher, every position of a row
            rows = None if rows is None else [r[:, None].expand(labels.shape).reshape(-1) for r in rows]
            teacher = WeightedTeachers(parts, teacher_logits.weights, teacher_logits.names, rows)
            return KDItems(student, teacher, targets, targets != NO_LABEL)
        if isinstance(teacher_logits, AlignedLogits):  # another tokenizer: already over flattened rows
            student = student_logits.reshape(-1, student_logits.shape[-1])
            return KDItems(student, teacher_logits, targets, targets != NO_LABEL)
        from_hidden = isinstance(student_logits, HiddenStates)
        vocab = student_logits.weight.shape[0] if from_hidden else student_logits.shape[-1]
        if isinstance(teacher_logits, SparseLogits):
            vocab = min(vocab, teacher_logits.num_classes)
            if teacher_logits.num_classes > vocab and bool((teacher_logits.indices >= vocab).any()):
                raise ValueError(
                    f"cached teacher top-k holds token ids ≥ {vocab}, beyond the student's vocabulary"
                )
            teacher = teacher_logits.reshape(-1).first_classes(vocab)
        elif isinstance(teacher_logits, HiddenStates):  # teacher_logits_from_hidden_states: its output layer
            vocab = min(vocab, teacher_logits.weight.shape[0])
            hidden = teacher_logits.hidden
            teacher = HiddenStates(hidden.reshape(-1, hidden.shape[-1]), teacher_logits.weight[:vocab])
        elif teacher_logits is not None:
            vocab = min(vocab, teacher_logits.shape[-1])
            teacher = teacher_logits[..., :vocab].reshape(-1, vocab)
        else:
            teacher = None
        if from_hidden:
            hidden = student_logits.hidden
            student = HiddenStates(hidden.reshape(-1, hidden.shape[-1]), student_logits.weight[:vocab])
        else:
            student = student_logits[..., :vocab].reshape(-1, vocab)
        return KDItems(student, teacher, targets, targets != NO_LABEL)

    def count_items(self, batch) -> torch.Tensor:
        """Tokens with a target, counted once for the hard term and once for the soft term."""
        num_targets = (batch["labels"][:, 1:] != NO_LABEL).sum()
        return torch.stack([num_targets, num_targets])
