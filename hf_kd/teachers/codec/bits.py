"""Bit fields packed into and read from a byte stream, vectorised over all fields (the codecs' bits)."""

from __future__ import annotations

import numpy as np
import torch


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Bits of each non-negative integer (0 for 0), exactly (float64 exponents)."""
    return torch.frexp(x.double()).exponent.long()


def write_bits(values: torch.Tensor, widths: torch.Tensor) -> np.ndarray:
    """Fields ``values`` (their low ``widths`` bits each, most significant bit first) packed into bytes.

    Each field is shifted into place within the few bytes it touches, and the bytes are summed (the
    fields' bits never overlap, so the sum is their OR): O(fields), not O(fields × widest field)."""
    widths = widths.long()
    values = values.long() & ((1 << widths) - 1)
    start = torch.cumsum(widths, 0) - widths
    span = (int(widths.max()) + 7) // 8 + 1 if len(widths) else 0  # bytes one field can touch
    first, offset = start // 8, start % 8
    window = values << (span * 8 - offset - widths)  # the field within bytes first .. first + span − 1
    shifts = 8 * torch.arange(span - 1, -1, -1)
    parts = (window[:, None] >> shifts) & 0xFF
    size = (int(widths.sum()) + 7) // 8
    at = (first[:, None] + torch.arange(span)).clamp(max=size)  # a spare byte takes the zero overhang
    stream = torch.zeros(size + 1, dtype=torch.long).index_add_(0, at.reshape(-1), parts.reshape(-1))
    return stream[:size].to(torch.uint8).numpy()


def words(stream: bytes) -> torch.Tensor:
    """For each byte of ``stream``, the 8 bytes from it (zeros past the end) as one big-endian int64."""
    data = torch.frombuffer(bytearray(stream) + bytes(7), dtype=torch.uint8).long()
    size = len(stream)
    words = torch.zeros(size, dtype=torch.long)
    for j in range(8):
        words.bitwise_or_(data[j : j + size] << (56 - 8 * j))
    return words


def read_bits(words: torch.Tensor, starts: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The fields of ``widths`` bits (at most 57) starting at bit ``starts`` (same shapes; width 0 reads
    0) of the stream whose :func:`words` are ``words``: one read of the word at each field's first byte."""
    if not len(words):
        return torch.zeros_like(starts)
    word = words[(starts >> 3).clamp(0, len(words) - 1)]
    return (word >> (64 - (starts & 7) - widths).clamp(max=63)) & ((1 << widths) - 1)
