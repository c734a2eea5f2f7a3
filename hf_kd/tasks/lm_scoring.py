"""How a causal LM's tokens are scored: next-token targets, the text bytes each token covers and bits
per byte, the tokenizer-free measure (docs/knowledge.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hf_kd.tasks.base import NO_LABEL


def text_bytes(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes of ``text`` that each token covers, from its character ``offsets``: from where the tokens
    before it stop (0 for the first) to its own end. Each character counts once, whatever a tokenizer's
    offsets leave out between tokens (a trimmed space) or give to several (the byte pieces of one
    character: the first takes it), so a row's tokens together cover ``text`` up to their last end; a
    zero-width token (an added BOS or EOS) covers 0 bytes."""
    counts, covered = [], 0
    for _, end in offsets:
        stop = max(end, covered)
        counts.append(len(text[covered:stop].encode()))
        covered = stop
    return counts


def bits_per_byte(nll_sum: float, num_bytes: float) -> float:
    """The tokenizer-free measure of a causal LM on some text: its summed next-token negative
    log-likelihood (nats) over the scored tokens, per UTF-8 byte of the text those tokens cover
    (:func:`text_bytes`), in bits: nll / (ln 2 · bytes). NaN without bytes."""
    return nll_sum / (math.log(2) * num_bytes) if num_bytes else math.nan


def scored_bytes(byte_counts: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """The bytes covered by the tokens that are next-token targets: ``byte_counts[b, t]`` summed where
    ``scored[b, t]`` (a bool mask over the same positions) for t ≥ 1 (token 0 has no predictor)."""
    return (byte_counts[:, 1:] * scored[:, 1:]).sum()


def in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]] | None) -> list[bool]:
    """Whether each token starts inside one of the character ``spans`` (None: every token does)."""
    if spans is None:
        return [True] * len(offsets)
    return [any(start <= char < end for start, end in spans) for char, _ in offsets]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[b, t] = labels[b, t + 1]: what position t is trained to predict (−100 at the last position)."""
    return F.pad(labels[:, 1:], (0, 1), value=NO_LABEL)
