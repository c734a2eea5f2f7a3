"""Compressed per-token top-k teacher outputs: one packed ``bytes`` value per cached row.

Codec ``topk-packed`` (:class:`TopkCodec`, parameters ``max_k``, ``mass``, ``bits``, ``step``). Per position:

* support: the most likely tokens, in order, until their cumulative probability reaches ``mass`` or
  there are ``max_k`` of them, and only tokens at most ``step · (2^bits − 1)`` nats below the top-1
  (at least the top-1) — n tokens. Flat positions keep many tokens, peaked ones few;
* log-probabilities: r_j = log p_top1 − log p_j rounded to a multiple of ``step`` (``bits`` bits each),
  at least one step for every token but the top-1, so that the top-1 stays the unique maximum (on a
  flat teacher many tokens lie within step / 2 of it); the absolute level is not stored: the kept
  tokens are renormalised to the kept mass 1 − m;
* tail mass m = 1 − Σ kept p, as the 8-bit code of its log-odds log(m / (1 − m)) on a grid of
  ``TAIL_STEP`` nats over [``TAIL_LOW``, ``TAIL_HIGH``] (code 0: no tail, m < e^TAIL_LOW stored as 0);
* indices: sorted, as gaps i_0, i_j − i_{j−1} − 1, all in the fewest bits w that hold the largest gap.

A row of T positions is ``<T: uint32><CRC-32: uint32>`` then a bit stream: T fixed-size headers
(n − 1, w, tail code), then the T payloads (n gaps of w bits, n codes of ``bits`` bits), zero-padded
to a byte. The CRC is seeded with the codec's parameters, so a row never decodes under another codec
or other parameters, and a damaged row is refused (:class:`CodecError`).

Error bound. For the n tokens kept at a position, let p be the teacher's distribution rebuilt from the
exact top-n log-probabilities and the exact tail mass (uniform tail, or renormalised), and p̂ the
decoded one. For every class i, |log p̂_i − log p_i| ≤ 1.5 · ``step`` + ``TAIL_STEP`` / 2
(:meth:`TopkCodec.error_bound`) whenever e^TAIL_LOW ≤ m / (1 − m) ≤ e^TAIL_HIGH: each stored r̂_j − r_j
lies in [−step / 2, step] (rounding, or the one-step floor), so their log-sum-exp moves by at most
that too, and the tail grid moves log m and log(1 − m) by at most TAIL_STEP / 2. Tails below that
range (m < 4e-11) are dropped to 0.

Encoding and decoding are vectorised over all positions of a batch (no Python loop over positions).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from hf_kd.losses import SparseLogits
from hf_kd.losses.sparse import top_k

COMPRESSIONS = ("none", "topk-packed")
TAIL_LOW, TAIL_HIGH, TAIL_CODES = -24.0, 12.0, 255
TAIL_STEP = (TAIL_HIGH - TAIL_LOW) / (TAIL_CODES - 1)
TAIL_BITS = 8
ROW_PREFIX = struct.Struct("<II")  # positions, CRC-32 of the bit stream


class CodecError(ValueError):
    """Packed teacher outputs that cannot be decoded: damaged, or written by another codec."""


@dataclass(frozen=True)
class TopkCodec:
    """The ``topk-packed`` codec and its parameters (see the module docstring)."""

    max_k: int
    """The most tokens kept at a position (the cache's ``top_k``)."""
    mass: float = 0.98
    """Keep tokens until their cumulative probability reaches this (1.0: always ``max_k``)."""
    bits: int = 5
    """Bits per log-probability code."""
    step: float = 0.25
    """Nats per log-probability code step: the codes span ``step · (2^bits − 1)`` nats below the top-1."""
    name: ClassVar[str] = "topk-packed"

    def __post_init__(self) -> None:
        checks = {
            "max_k": (self.max_k, isinstance(self.max_k, int) and self.max_k >= 1, "an integer ≥ 1"),
            "mass": (self.mass, 0.0 < self.mass <= 1.0, "in (0, 1]"),
            "bits": (self.bits, isinstance(self.bits, int) and 1 <= self.bits <= 16, "an integer in 1..16"),
            "step": (self.step, 0.0 < self.step <= 4.0, "in (0, 4] nats"),
        }
        for name, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"compression {name}={value!r} must be {expected}")

    @cached_property
    def _seed(self) -> int:
        """CRC-32 start value of the rows: depends on the codec and every parameter."""
        return zlib.crc32(json.dumps(self.spec(), sort_keys=True).encode())

    # ---- description --------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """The codec name and parameters, as recorded in the cache metadata."""
        return {"codec": self.name, **asdict(self)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TopkCodec:
        """The codec a cache's metadata records; a clear error for another codec or unknown fields."""
        spec = dict(spec)
        name = spec.pop("codec", None)
        if name != cls.name:
            raise CodecError(f"compression codec {name!r} is not known; this hf_kd reads {cls.name!r}")
        try:
            return cls(**spec)
        except TypeError as err:
            raise CodecError(
                f"compression parameters {spec} do not describe a {cls.name} codec: {err}"
            ) from err

    def error_bound(self) -> float:
        """Largest |log p̂_i − log p_i| of a decoded distribution (tail odds within the stored range)."""
        return 1.5 * self.step + TAIL_STEP / 2

    @staticmethod
    def _widths(num_classes: int, k: int) -> tuple[int, int, int]:
        """Bits of a class id, of the gap-width field and of the count field."""
        index_bits = max(1, (num_classes - 1).bit_length())
        return index_bits, index_bits.bit_length(), (k - 1).bit_length()

    # ---- encoding -----------------------------------------------------------------------------

    def select(self, logits: torch.Tensor) -> tuple[SparseLogits, torch.Tensor, torch.Tensor]:
        """The kept support of logits [N, V]: top-``max_k`` (log-probs, ids), tail = log of the mass not
        kept, the log-prob codes [N, k] and the count n [N] of kept tokens."""
        log_p = torch.log_softmax(logits.float(), dim=-1)
        k = min(self.max_k, log_p.shape[-1])
        top, idx = top_k(log_p, k)
        codes = torch.round((top[:, :1] - top) / self.step)
        codes[:, 1:] = codes[:, 1:].clamp(min=1)  # the top-1 alone has code 0
        below_mass = (top.exp().cumsum(-1) < self.mass).sum(-1) + 1
        in_range = (codes <= 2**self.bits - 1).sum(-1)
        n = torch.minimum(below_mass, in_range).clamp(max=k)
        keep = torch.arange(k, device=top.device) < n[:, None]
        num_classes = log_p.shape[-1]
        dropped = log_p.scatter_(-1, torch.where(keep, idx, idx[:, :1]), -math.inf)  # log_p is spent
        tail = torch.logsumexp(dropped, dim=-1)
        return SparseLogits(top.masked_fill(~keep, -math.inf), idx, tail, num_classes), codes, n

    def encode(self, logits: torch.Tensor, lengths: list[int]) -> tuple[list[bytes], torch.Tensor]:
        """Packed rows of logits [N, V] (positions of consecutive rows, ``lengths`` per row) and the
        probability mass kept at each position [N]."""
        if sum(lengths) != logits.shape[0]:
            raise ValueError(f"row lengths sum to {sum(lengths)} but there are {logits.shape[0]} positions")
        kept, codes, n = self.select(logits)
        num_classes, k = kept.num_classes, kept.indices.shape[-1]
        index_bits, width_bits, count_bits = self._widths(num_classes, k)
        keep = kept.log_probs > -math.inf
        kept_log = torch.logsumexp(kept.log_probs, dim=-1)
        tail_code = _tail_code(kept.tail_log_mass - kept_log)
        ids, order = torch.where(keep, kept.indices, num_classes).sort(dim=-1)
        codes = codes.gather(-1, order).long()
        gaps = torch.where(keep, ids - F.pad(ids[:, :-1], (1, 0), value=-1) - 1, 0)
        width = (gaps.max(-1).values[:, None] >= 2 ** torch.arange(index_bits + 1)).sum(-1)
        header = torch.stack([n - 1, width, tail_code], dim=-1)
        header_widths = torch.tensor([count_bits, width_bits, TAIL_BITS]).expand_as(header)
        payload = torch.cat([gaps, codes], dim=-1)
        payload_widths = torch.cat([width[:, None] * keep, self.bits * keep], dim=-1)

        device = payload.device
        row_of = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
        )
        row_bits = torch.zeros(len(lengths), dtype=torch.long, device=device).index_add_(
            0, row_of, payload_widths.sum(-1) + header_widths.sum(-1)
        )
        pad_widths = (-row_bits) % 8
        values = torch.cat([header.reshape(-1), payload.reshape(-1), torch.zeros_like(pad_widths)])
        widths = torch.cat([header_widths.reshape(-1), payload_widths.reshape(-1), pad_widths])
        section = torch.cat(
            [
                (row_of * 3)[:, None].expand_as(header).reshape(-1),
                (row_of * 3 + 1)[:, None].expand_as(payload).reshape(-1),
            ]
        )
        section = torch.cat([section, torch.arange(len(lengths), device=device) * 3 + 2])
        order = torch.sort(section, stable=True).indices
        stream = _write_bits(values[order], widths[order])
        body_sizes = ((row_bits + pad_widths) // 8).tolist()
        bodies = np.split(stream, np.cumsum(body_sizes)[:-1]) if lengths else []
        rows = [
            ROW_PREFIX.pack(length, zlib.crc32(body, self._seed)) + body.tobytes()
            for length, body in zip(lengths, bodies, strict=True)
        ]
        return rows, -torch.expm1(kept.tail_log_mass)

    # ---- decoding -----------------------------------------------------------------------------

    def decode(self, rows: list[bytes], lengths: list[int], num_classes: int) -> SparseLogits:
        """The teacher's top-k of packed ``rows`` (``lengths`` positions each) as :class:`SparseLogits`
        [N, k'] over all positions in order; slots past a position's n tokens hold log-prob −inf (the
        loss counts them in the tail). Refuses damaged rows and rows written by another codec."""
        bodies = [
            self._check_row(i, row, length) for i, (row, length) in enumerate(zip(rows, lengths, strict=True))
        ]
        k = min(self.max_k, num_classes)
        index_bits, width_bits, count_bits = self._widths(num_classes, k)
        header_bits = count_bits + width_bits + TAIL_BITS
        sizes = torch.tensor([len(b) for b in bodies], dtype=torch.long)
        words = _words(b"".join(bodies))
        counts = torch.tensor(lengths, dtype=torch.long)
        if bool((sizes * 8 < counts * header_bits).any()):
            raise CodecError(
                f"a packed teacher row is shorter than its {header_bits}-bit position headers: damaged"
            )
        row_start = F.pad(torch.cumsum(sizes * 8, 0)[:-1], (1, 0))
        row_of = torch.repeat_interleave(torch.arange(len(lengths)), counts)
        first = F.pad(torch.cumsum(counts, 0)[:-1], (1, 0))
        position = torch.arange(len(row_of)) - first[row_of]
        starts = (row_start[row_of] + position * header_bits)[:, None] + torch.tensor(
            [0, count_bits, count_bits + width_bits]
        )
        header = _read_bits(
            words, starts, torch.tensor([count_bits, width_bits, TAIL_BITS]).expand_as(starts)
        )
        n, width, tail_code = header[:, 0] + 1, header[:, 1], header[:, 2]
        if bool((n > k).any() | (width > index_bits).any()):
            raise CodecError("a packed teacher row holds a count or index width out of range: damaged")
        payload = n * (width + self.bits)
        total = torch.zeros_like(sizes).index_add_(0, row_of, payload) + counts * header_bits
        if not torch.equal((total + 7) // 8, sizes):
            raise CodecError("a packed teacher row's length does not match its headers: damaged")
        before = torch.cumsum(payload, 0) - payload
        payload_start = row_start[row_of] + counts[row_of] * header_bits + before - before[first][row_of]
        slot = torch.arange(int(n.max()) if len(n) else 0)
        keep = slot < n[:, None]
        gaps = _read_bits(words, payload_start[:, None] + slot * width[:, None], width[:, None] * keep)
        codes = _read_bits(words, (payload_start + n * width)[:, None] + slot * self.bits, self.bits * keep)
        indices = torch.where(keep, torch.cumsum(gaps + 1, -1) - 1, 0)
        if bool((indices >= num_classes).any()):
            raise CodecError(f"a packed teacher row holds a class id ≥ {num_classes}: damaged")
        relative = torch.where(keep, -self.step * codes.float(), -math.inf)
        odds = TAIL_LOW + (tail_code - 1).float() * TAIL_STEP
        kept_log = torch.where(tail_code > 0, -F.softplus(odds), 0.0)
        tail_log = torch.where(tail_code > 0, -F.softplus(-odds), -math.inf)
        log_probs = relative - torch.logsumexp(relative, -1, keepdim=True) + kept_log[:, None]
        return SparseLogits(log_probs, indices, tail_log, num_classes)

    def _check_row(self, i: int, row: bytes, length: int) -> bytes:
        """The bit stream of packed row ``i`` after checking its position count and CRC."""
        if not isinstance(row, bytes | bytearray) or len(row) < ROW_PREFIX.size:
            raise CodecError(
                f"packed teacher row {i} is not a packed row ({type(row).__name__} of {len(row)})"
            )
        positions, crc = ROW_PREFIX.unpack_from(row)
        body = bytes(row[ROW_PREFIX.size :])
        if positions != length:
            raise CodecError(f"packed teacher row {i} holds {positions} positions, its tokens are {length}")
        if zlib.crc32(body, self._seed) != crc:
            raise CodecError(
                f"packed teacher row {i} fails its checksum under codec {self.spec()}: damaged, or written "
                "by another codec or other parameters"
            )
        return body


def _tail_code(odds: torch.Tensor) -> torch.Tensor:
    """8-bit code of the tail's log-odds: 0 for a tail below e^TAIL_LOW, else 1 + its grid step."""
    grid = torch.round((odds.clamp(TAIL_LOW, TAIL_HIGH) - TAIL_LOW) / TAIL_STEP).long() + 1
    return torch.where(odds < TAIL_LOW - TAIL_STEP / 2, 0, grid)


def _write_bits(values: torch.Tensor, widths: torch.Tensor) -> np.ndarray:
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


def _words(stream: bytes) -> torch.Tensor:
    """For each byte of ``stream``, the 8 bytes from it (zeros past the end) as one big-endian int64."""
    data = torch.frombuffer(bytearray(stream) + bytes(7), dtype=torch.uint8).long()
    size = len(stream)
    words = torch.zeros(size, dtype=torch.long)
    for j in range(8):
        words.bitwise_or_(data[j : j + size] << (56 - 8 * j))
    return words


def _read_bits(words: torch.Tensor, starts: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The fields of ``widths`` bits (at most 57) starting at bit ``starts`` (same shapes; width 0 reads
    0) of the stream whose :func:`_words` are ``words``: one read of the word at each field's first byte."""
    if not len(words):
        return torch.zeros_like(starts)
    word = words[(starts >> 3).clamp(0, len(words) - 1)]
    return (word >> (64 - (starts & 7) - widths).clamp(max=63)) & ((1 << widths) - 1)
