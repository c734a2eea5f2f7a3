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
  ``TAIL_STEP`` nats over [``TAIL_LOW``, ``TAIL_HIGH``] (code 0: no tail, m = 0 exactly; odds beyond the
  grid stored as its ends);
* indices: sorted, as gaps i_0, i_j − i_{j−1} − 1, all in the fewest bits w that hold the largest gap.

A row of T positions is ``<T: uint32><CRC-32: uint32>`` then a bit stream: T fixed-size headers
(n − 1, w, tail code), then the T payloads (n gaps of w bits, n codes of ``bits`` bits), zero-padded
to a byte. The CRC is seeded with the codec's name and parameters, so a row never decodes under
another codec or other parameters, and a damaged row is refused (:class:`CodecError`).

Error bound. For the n tokens kept at a position, let p be the teacher's distribution rebuilt from the
exact top-n log-probabilities and the exact tail mass (uniform tail, or renormalised), and p̂ the
decoded one. For every class i, |log p̂_i − log p_i| ≤ 1.5 · ``step`` + ``TAIL_STEP`` / 2
(:meth:`TopkCodec.error_bound`) whenever e^TAIL_LOW ≤ m / (1 − m) ≤ e^TAIL_HIGH: each stored r̂_j − r_j
lies in [−step / 2, step] (rounding, or the one-step floor), so their log-sum-exp moves by at most
that too, and the tail grid moves log m and log(1 − m) by at most TAIL_STEP / 2. Tails below that
range (0 < m < 4e-11) are stored as m ≈ 4e-11: never as 0, which a reverse KL would read as log 0.

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
from hf_kd.teachers.codec import bits

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
    mass: float = 0.99
    """Keep tokens until their cumulative probability reaches this (1.0: always ``max_k``)."""
    bits: int = 4
    """Bits per log-probability code."""
    step: float = 0.4
    """Nats per log-probability code step: the codes span ``step · (2^bits − 1)`` nats below the top-1."""
    name: ClassVar[str] = "topk-packed"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        CODECS[cls.name] = cls

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
        if name not in CODECS:
            raise CodecError(f"compression codec {name!r} is not known; this hf_kd reads {sorted(CODECS)}")
        try:
            return CODECS[name](**spec)
        except TypeError as err:
            raise CodecError(f"compression parameters {spec} do not describe a {name} codec: {err}") from err

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
        broken = ~torch.isfinite(top[:, 0])  # a NaN or +inf logit, or all −inf: no distribution
        if bool(broken.any()):
            raise ValueError(
                f"logits at position {int(broken.nonzero()[0])} are no distribution (NaN, +inf or all −inf)"
            )
        codes = torch.round((top[:, :1] - top) / self.step)
        codes[:, 1:] = codes[:, 1:].clamp(min=1)  # the top-1 alone has code 0
        in_range = (codes <= 2**self.bits - 1).sum(-1)
        # mass 1: every token (a float32 cumulative sum reaches 1.0 before the last token at peaked positions)
        below_mass = (top.exp().cumsum(-1) < self.mass).sum(-1) + 1 if self.mass < 1.0 else in_range
        n = torch.minimum(below_mass, in_range).clamp(max=k)
        keep = torch.arange(k, device=top.device) < n[:, None]
        num_classes = log_p.shape[-1]
        dropped = log_p.scatter_(-1, torch.where(keep, idx, idx[:, :1]), -math.inf)  # log_p is spent
        tail = torch.logsumexp(dropped, dim=-1)
        return SparseLogits(top.masked_fill(~keep, -math.inf), idx, tail, num_classes), codes, n

    def _select_rows(
        self, logits: torch.Tensor, lengths: list[int]
    ) -> tuple[SparseLogits, torch.Tensor, torch.Tensor]:
        """:meth:`select` of logits [N, V] that are the positions of rows of ``lengths`` positions, on the
        logits' device; what it keeps comes back on the CPU, where the rows are bit-packed."""
        if sum(lengths) != logits.shape[0]:
            raise ValueError(f"row lengths sum to {sum(lengths)} but there are {logits.shape[0]} positions")
        kept, codes, n = self.select(logits)
        kept = SparseLogits(
            kept.log_probs.cpu(), kept.indices.cpu(), kept.tail_log_mass.cpu(), kept.num_classes
        )
        return kept, codes.cpu(), n.cpu()

    def encode(self, logits: torch.Tensor, lengths: list[int]) -> tuple[list[bytes], torch.Tensor]:
        """Packed rows of logits [N, V] (positions of consecutive rows, ``lengths`` per row) and the
        probability mass kept at each position [N]."""
        kept, codes, n = self._select_rows(logits, lengths)
        num_classes, k = kept.num_classes, kept.indices.shape[-1]
        index_bits, width_bits, count_bits = self._widths(num_classes, k)
        keep, gaps, codes, tail_code = _sorted_support(kept, codes)
        width = (gaps.max(-1).values[:, None] >= 2 ** torch.arange(index_bits + 1)).sum(-1)
        header = torch.stack([n - 1, width, tail_code], dim=-1)
        header_widths = torch.tensor([count_bits, width_bits, TAIL_BITS]).expand_as(header)
        payload = torch.cat([gaps, codes], dim=-1)
        payload_widths = torch.cat([width[:, None] * keep, self.bits * keep], dim=-1)

        rows = self._pack([(header, header_widths), (payload, payload_widths)], lengths)
        return rows, -torch.expm1(kept.tail_log_mass)

    def _pack(self, sections: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]) -> list[bytes]:
        """Rows of positions' bit fields: each section is (values, widths) [N, F] per position; a row
        holds section 0 of its positions (in order, fields in order), then section 1, …, zero-padded to
        a byte, behind its prefix (positions, CRC)."""
        device = sections[0][0].device
        row_of = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
        )
        row_bits = torch.zeros(len(lengths), dtype=torch.long, device=device).index_add_(
            0, row_of, sum(widths.sum(-1) for _, widths in sections)
        )
        pad_widths = (-row_bits) % 8
        values = torch.cat([v.reshape(-1) for v, _ in sections] + [torch.zeros_like(pad_widths)])
        widths = torch.cat([w.reshape(-1) for _, w in sections] + [pad_widths])
        stride = len(sections) + 1
        section = torch.cat(
            [(row_of * stride + s)[:, None].expand_as(v).reshape(-1) for s, (v, _) in enumerate(sections)]
            + [torch.arange(len(lengths), device=device) * stride + len(sections)]
        )
        order = torch.sort(section, stable=True).indices
        stream = bits.write_bits(values[order], widths[order])
        body_sizes = ((row_bits + pad_widths) // 8).tolist()
        bodies = np.split(stream, np.cumsum(body_sizes)[:-1]) if lengths else []
        return [
            ROW_PREFIX.pack(length, zlib.crc32(body, self._seed)) + body.tobytes()
            for length, body in zip(lengths, bodies, strict=True)
        ]

    # ---- decoding -----------------------------------------------------------------------------

    def decode(self, rows: list[bytes], lengths: list[int], num_classes: int) -> SparseLogits:
        """The teacher's top-k of packed ``rows`` (``lengths`` positions each) as :class:`SparseLogits`
        [N, k'] over all positions in order; slots past a position's n tokens hold log-prob −inf (the
        loss counts them in the tail). Refuses damaged rows and rows written by another codec."""
        k = min(self.max_k, num_classes)
        index_bits, width_bits, count_bits = self._widths(num_classes, k)
        unpacked = self._unpack(rows, lengths, [count_bits, width_bits, TAIL_BITS])
        n, width, tail_code = unpacked.header[:, 0] + 1, unpacked.header[:, 1], unpacked.header[:, 2]
        if bool((n > k).any() | (width > index_bits).any()):
            raise CodecError("a packed teacher row holds a count or index width out of range: damaged")
        payload = n * (width + self.bits)
        unpacked.check_length(unpacked.row_total(payload))
        payload_start = unpacked.data_start[unpacked.row_of] + unpacked.within_row(payload)
        slot = torch.arange(int(n.max()) if len(n) else 0)
        keep = slot < n[:, None]
        words = unpacked.words
        gaps = bits.read_bits(words, payload_start[:, None] + slot * width[:, None], width[:, None] * keep)
        codes = bits.read_bits(
            words, (payload_start + n * width)[:, None] + slot * self.bits, self.bits * keep
        )
        return self._distribution(gaps, codes, keep, tail_code, num_classes)

    def _unpack(self, rows: list[bytes], lengths: list[int], header_widths: list[int]) -> _Unpacked:
        """The checked rows' bits and their positions' headers (fields of ``header_widths`` bits)."""
        bodies = [
            self._check_row(i, row, length) for i, (row, length) in enumerate(zip(rows, lengths, strict=True))
        ]
        header_bits = sum(header_widths)
        sizes = torch.tensor([len(b) for b in bodies], dtype=torch.long)
        stream = b"".join(bodies)
        words = bits.words(stream)
        counts = torch.tensor(lengths, dtype=torch.long)
        if bool((sizes * 8 < counts * header_bits).any()):
            raise CodecError(
                f"a packed teacher row is shorter than its {header_bits}-bit position headers: damaged"
            )
        row_start = F.pad(torch.cumsum(sizes * 8, 0)[:-1], (1, 0))
        row_of = torch.repeat_interleave(torch.arange(len(lengths)), counts)
        first = F.pad(torch.cumsum(counts, 0)[:-1], (1, 0))
        position = torch.arange(len(row_of)) - first[row_of]
        offsets = torch.tensor(header_widths)
        starts = (row_start[row_of] + position * header_bits)[:, None] + torch.cumsum(offsets, 0) - offsets
        header = bits.read_bits(words, starts, offsets.expand_as(starts))
        data_start = row_start + counts * header_bits
        return _Unpacked(stream, words, row_start, sizes, row_of, first, data_start, header)

    def _distribution(
        self,
        gaps: torch.Tensor,
        codes: torch.Tensor,
        keep: torch.Tensor,
        tail_code: torch.Tensor,
        num_classes: int,
    ) -> SparseLogits:
        """The decoded positions from their id gaps, log-prob codes [N, k'] and tail codes [N]."""
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


CODECS: dict[str, type[TopkCodec]] = {TopkCodec.name: TopkCodec}
"""The codecs a cache's metadata may name, by name: every one this hf_kd ever wrote stays readable. A
subclass of :class:`TopkCodec` with its own ``name`` is added when its module is imported."""


@dataclass
class _Unpacked:
    """Checked packed rows as one stream, with where each row and its positions' data start."""

    stream: bytes
    """All rows' bodies, one after the other."""
    words: torch.Tensor
    """The stream's :func:`bits.words` (what :func:`bits.read_bits` reads)."""
    row_start: torch.Tensor
    """First bit of each row [R]."""
    sizes: torch.Tensor
    """Bytes of each row's body [R]."""
    row_of: torch.Tensor
    """Row of each position [N]."""
    first: torch.Tensor
    """First position of each row [R]."""
    data_start: torch.Tensor
    """First bit after each row's position headers [R]."""
    header: torch.Tensor
    """The positions' header fields [N, F]."""

    @cached_property
    def bits(self) -> torch.Tensor:
        """The stream one bit per element [B] (made only when a codec asks for it)."""
        return torch.from_numpy(np.unpackbits(np.frombuffer(self.stream, dtype=np.uint8)))

    def row_total(self, per_position: torch.Tensor) -> torch.Tensor:
        """Per-row sums [R] of a per-position count [N]."""
        return torch.zeros_like(self.sizes).index_add_(0, self.row_of, per_position)

    def within_row(self, per_position: torch.Tensor) -> torch.Tensor:
        """Per-position sums [N] of a per-position count over the earlier positions of its row."""
        before = torch.cumsum(per_position, 0) - per_position
        return before - before[self.first[self.row_of]]

    def check_length(self, data_bits: torch.Tensor) -> None:
        """Refuse rows whose bytes are not their headers plus ``data_bits`` [R], padded to a byte."""
        total = self.data_start - self.row_start + data_bits
        if not torch.equal((total + 7) // 8, self.sizes):
            raise CodecError("a packed teacher row's length does not match its headers: damaged")


def _sorted_support(
    kept: SparseLogits, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept tokens in id order: keep mask, id gaps (i_0, i_j − i_{j−1} − 1; 0 past n) and log-prob
    codes [N, k], and the tail code [N]."""
    keep = kept.log_probs > -math.inf
    tail_code = _tail_code(kept.tail_log_mass - torch.logsumexp(kept.log_probs, dim=-1))
    ids, order = torch.where(keep, kept.indices, kept.num_classes).sort(dim=-1)
    gaps = torch.where(keep, ids - F.pad(ids[:, :-1], (1, 0), value=-1) - 1, 0)
    return keep, gaps, codes.gather(-1, order).long(), tail_code


def _tail_code(odds: torch.Tensor) -> torch.Tensor:
    """8-bit code of the tail's log-odds: 0 for no tail (mass exactly 0), else 1 + its grid step (the
    grid's ends for odds beyond them: a tiny tail stays a tiny tail, never log 0)."""
    grid = torch.round((odds.clamp(TAIL_LOW, TAIL_HIGH) - TAIL_LOW) / TAIL_STEP).long() + 1
    return torch.where(odds == -math.inf, 0, grid)
