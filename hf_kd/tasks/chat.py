"""Rows of text as a causal LM reads them: prompt and completion columns checked, the assistant's spans
of a conversation rendered by the chat template, and a text's ids with their character offsets."""

from __future__ import annotations

from typing import Any


def check_prompt_columns(
    features: Any, prompt_column: str, completion_column: str, where: str = "dataset"
) -> None:
    """Refuse, naming the field and the column, a ``prompt_column`` that ``features`` (a ``datasets``
    ``Features`` mapping, or a list of column names when the types are unknown) lacks, or a prompt or
    completion column that does not hold plain strings."""
    columns = list(features)
    if prompt_column not in columns:
        raise ValueError(
            f"prompt_column={prompt_column!r}: {where} has no column {prompt_column!r}; its columns: {columns}"
        )
    if not isinstance(features, dict):
        return
    for field_name, column in (("prompt_column", prompt_column), ("completion_column", completion_column)):
        feature = features.get(column)
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ValueError(
                f"{field_name}={column!r}: column {column!r} of {where} must hold plain-text strings, not "
                f"{feature}; conversations ([{{role, content}}, ...]) go in messages_column"
            )


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the whole rendered conversation) written by the assistant.

    A reply's span starts where the conversation before it, rendered with the generation prompt,
    ends, and ends where the conversation up to it ends (its end-of-turn marker included, so the
    student learns to stop). Needs a template that renders conversations prefix by prefix.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise ValueError(
                f"the chat template does not render this conversation prefix by prefix (turn {i}), so its "
                "assistant tokens cannot be located; set completion_only_loss: false to train on every token"
            )
        spans.append((len(before), len(through)))
    return spans


def encode_with_eos(
    tokenizer: Any, text: str, add_special_tokens: bool, with_eos: bool
) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """(ids, character offsets, whether each token is a special token) of ``text``; with ``with_eos`` an
    EOS is appended, at offset (len(text), len(text)), unless the ids already end with one. Special
    tokens the tokenizer's post-processor adds after the text (an EOS of ``"<s> $A </s>"``), which it
    reports at (0, 0), are put there too: they follow the text, they do not precede it. A token is
    special when the tokenizer names it so (``all_special_ids``) or its post-processor added it (a BOS
    added without ``bos_token`` set)."""
    encoded = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    ids = list(encoded["input_ids"])
    spans = [tuple(span) for span in encoded["offset_mapping"]]
    special_ids = set(tokenizer.all_special_ids)
    special = [
        token in special_ids or bool(added)
        for token, added in zip(ids, encoded["special_tokens_mask"], strict=True)
    ]
    text_tokens = [
        i
        for i, (flag, (start, end)) in enumerate(zip(special, spans, strict=True))
        if not flag or end > start
    ]
    after_text = text_tokens[-1] + 1 if text_tokens else len(ids)
    spans[after_text:] = [(len(text), len(text))] * (len(ids) - after_text)
    eos = tokenizer.eos_token_id
    if with_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        spans.append((len(text), len(text)))
        special.append(True)
    return ids, spans, special
