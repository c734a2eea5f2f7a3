"""A causal LM's rows made batches: packing and collation, with a compressed teacher cache decoded."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from hf_kd.losses import SparseLogits
from hf_kd.tasks.alignment import ALIGNMENT_PREFIX
from hf_kd.tasks.base import CACHE_PREFIX, NO_LABEL, TEACHER_INPUT_PREFIX, TEACHER_TEXT_BYTES, TEXT_BYTES


def pack_rows(rows: dict[str, list], max_length: int) -> dict[str, list]:
    """Packing, first-fit in order: examples (``datasets`` batched columns) fill a row until the next one
    would pass ``max_length``; ``position_ids`` restart at 0 for each example, whose first token gets no
    target."""
    packed: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], TEXT_BYTES: []}
    for ids, labels, byte_counts in zip(rows["input_ids"], rows["labels"], rows[TEXT_BYTES], strict=True):
        if not packed["input_ids"] or len(packed["input_ids"][-1]) + len(ids) > max_length:
            for column in packed.values():
                column.append([])
        packed["input_ids"][-1] += ids
        packed["labels"][-1] += [NO_LABEL] + labels[1:]  # no target across the example boundary
        packed["position_ids"][-1] += list(range(len(ids)))
        packed[TEXT_BYTES][-1] += byte_counts
    return packed


def collate_rows(
    features: list[dict[str, Any]],
    pad_token_id: int,
    teacher_pad_token_id: int = 0,
    cache_decoder: Callable[[list[bytes], list[int]], SparseLogits] | None = None,
    member_pad_token_ids: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: ``attention_mask`` for padded rows (the rows' own, padded, when
    they have one); for packed rows the padding gets its own ``position_ids`` run (a separate block
    nobody attends to). Rows without ``labels`` are their own targets (Transformers' causal-LM
    convention); no position outside the attention mask has one. Cached per-token teacher columns are
    padded with a valid distribution (uniform over the stored k) so masked positions stay finite.
    Packed columns (a compressed cache) are decoded here by ``cache_decoder`` into the same three
    columns. A teacher of
    another tokenizer gets its own padded ``teacher_input_ids`` / ``teacher_attention_mask`` (padded with
    ``teacher_pad_token_id``); the
    alignment columns are padded with −1 (no alignment) and 0 (not matched); the text bytes with 0 (the
    student's: padding has no label) and −1 (the teacher's: not scored). Each mixture member of another
    tokenizer (``member_pad_token_ids``: its column prefix → its pad id) gets the same columns under its
    prefix, padded alike with its own pad id."""
    length = max(len(f["input_ids"]) for f in features)
    lengths = [len(f["input_ids"]) for f in features]

    def padded(key: str, value) -> torch.Tensor:
        return torch.tensor(
            [list(f[key]) + [value] * (length - n) for f, n in zip(features, lengths, strict=True)]
        )

    batch = {
        "input_ids": padded("input_ids", pad_token_id),
        "labels": padded("labels" if "labels" in features[0] else "input_ids", NO_LABEL),
    }
    if "position_ids" in features[0]:
        batch["position_ids"] = torch.tensor(
            [
                list(f["position_ids"]) + list(range(length - n))
                for f, n in zip(features, lengths, strict=True)
            ]
        )
    elif "attention_mask" in features[0]:
        batch["attention_mask"] = padded("attention_mask", 0)
        batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, NO_LABEL)
    else:
        batch["attention_mask"] = torch.tensor([[1] * n + [0] * (length - n) for n in lengths])
    if TEACHER_INPUT_PREFIX + "input_ids" in features[0]:
        batch.update(collate_teacher(features, teacher_pad_token_id, length))
    for prefix, pad in (member_pad_token_ids or {}).items():
        own = [
            {key[len(prefix) :]: value for key, value in f.items() if key.startswith(prefix)}
            for f in features
        ]
        batch.update({prefix + key: value for key, value in collate_teacher(own, pad, length).items()})
    for key in features[0]:
        if key == TEXT_BYTES:
            batch[key] = padded(key, 0)
        elif key == CACHE_PREFIX + "packed":
            batch.update(decode_packed(cache_decoder, [f[key] for f in features], lengths, length))
        elif key.startswith(CACHE_PREFIX) and torch.as_tensor(features[0][key]).dim() == 0:  # one per row
            batch[key] = torch.tensor([f[key] for f in features])
        elif key.startswith(CACHE_PREFIX):
            batch[key] = pad_cached(key, [torch.as_tensor(f[key]) for f in features], length)
    return batch


def collate_teacher(
    features: list[dict[str, Any]], teacher_pad_token_id: int, length: int
) -> dict[str, torch.Tensor]:
    """The columns of a teacher of another tokenizer, right-padded: over its own positions (to its longest
    row) its input ids, attention mask and text bytes (−1: not scored); over the student's ``length``
    positions the alignment columns (−1: no alignment, 0: not matched)."""
    ids_key, mask_key = TEACHER_INPUT_PREFIX + "input_ids", TEACHER_INPUT_PREFIX + "attention_mask"
    own_length = max(len(f[ids_key]) for f in features)
    fills = [(ids_key, teacher_pad_token_id, own_length), (mask_key, 0, own_length)]
    fills += [(TEACHER_TEXT_BYTES, -1, own_length)]
    fills += [
        (key, 0 if key == ALIGNMENT_PREFIX + "matched" else -1, length)
        for key in features[0]
        if key.startswith(ALIGNMENT_PREFIX)
    ]
    return {
        key: torch.tensor([list(f[key]) + [value] * (size - len(f[key])) for f in features])
        for key, value, size in fills
        if key in features[0]
    }


def decode_packed(
    cache_decoder: Callable[[list[bytes], list[int]], SparseLogits] | None,
    rows: list[bytes],
    lengths: list[int],
    length: int,
) -> dict[str, torch.Tensor]:
    """Packed per-token top-k rows → the ``log_probs`` / ``indices`` / ``tail_log_mass`` columns
    [B, length, k] by ``cache_decoder``, padded positions filled as :func:`pad_cached` fills them."""
    if cache_decoder is None:
        raise ValueError(
            f"the batch holds {CACHE_PREFIX}packed (a compressed teacher cache) but no decoder was set "
            "(cache_decoder = TeacherCache.decoder())"
        )
    sparse = cache_decoder(rows, lengths)
    k = sparse.log_probs.shape[-1]
    mask = torch.arange(length) < torch.tensor(lengths)[:, None]
    log_probs = torch.full((len(rows), length, k), -math.log(k))
    indices = torch.arange(k).expand(len(rows), length, k).clone()
    tail = torch.full((len(rows), length), -math.inf)
    log_probs[mask], indices[mask], tail[mask] = sparse.log_probs, sparse.indices, sparse.tail_log_mass
    return {
        CACHE_PREFIX + "log_probs": log_probs,
        CACHE_PREFIX + "indices": indices,
        CACHE_PREFIX + "tail_log_mass": tail,
    }


def pad_cached(key: str, rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Cached per-token teacher columns ``key`` right-padded to ``length`` positions with a valid
    distribution: uniform over the stored k (log-probs), indices 0..k−1, no tail; full logits with 0."""
    name = key[len(CACHE_PREFIX) :]
    out = []
    for row in rows:
        missing = length - row.shape[0]
        if name == "log_probs":
            fill = torch.full((missing, row.shape[-1]), -torch.log(torch.tensor(float(row.shape[-1]))).item())
        elif name == "indices":
            fill = torch.arange(row.shape[-1]).expand(missing, -1)
        elif name == "tail_log_mass":
            fill = torch.full((missing,), -torch.inf)
        else:  # full logits
            fill = torch.zeros((missing, *row.shape[1:]))
        out.append(torch.cat([row, fill.to(row.dtype)]))
    return torch.stack(out)
