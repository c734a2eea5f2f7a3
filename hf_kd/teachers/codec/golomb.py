"""Codec ``topk-golomb`` (:class:`GolombTopkCodec`, same parameters; the one to write): the same support,
log-prob codes and tail code, but each gap g in an exp-Golomb code of order r (r from 0..7, the one
that makes the position's ids shortest): x = g + 2^r has h + 1 bits; h − r zeros and a 1 (the prefix),
then the h bits of x below its leading 1 (the mantissa) — 2h − r + 1 bits. A tokenizer's frequent
tokens, which a teacher's top-k favours, crowd its low ids (BPE numbers merges by frequency), so most
gaps are short: on the real LM of ``scripts/bench_cache.py`` ~5.5 bits an id against ~8.7 for the
fixed width. A row of T positions is ``<T><CRC>``, then T headers (n − 1, r, tail code), then every
position's n log-prob codes, then every id's prefix, then every id's mantissa, zero-padded to a byte.
Decoding finds where each prefix ends as the row's j-th 1 bit after its codes (one list of the 1 bits,
indexed by rank), so it stays vectorised. Error bound as ``topk-packed``'s; ids are exact.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from hf_kd.losses import SparseLogits
from hf_kd.teachers.codec import bits
from hf_kd.teachers.codec.packed import TAIL_BITS, CodecError, TopkCodec, _sorted_support

ORDER_BITS = 3  # exp-Golomb orders 0..7


class GolombTopkCodec(TopkCodec):
    """The ``topk-golomb`` codec: :class:`TopkCodec`'s support, log-prob codes and tail code, with each
    id gap in an exp-Golomb code of an order chosen per position (see the module docstring)."""

    name: ClassVar[str] = "topk-golomb"

    def encode(self, logits: torch.Tensor, lengths: list[int]) -> tuple[list[bytes], torch.Tensor]:
        """As :meth:`TopkCodec.encode`, ids exp-Golomb coded."""
        kept, codes, n = self._select_rows(logits, lengths)
        count_bits = self._widths(kept.num_classes, kept.indices.shape[-1])[2]
        keep, gaps, codes, tail_code = _sorted_support(kept, codes)
        cost = torch.stack(  # [N, orders]: bits of the position's ids, prefixes and mantissas
            [((2 * bits.bit_length(gaps + (1 << r)) - r - 1) * keep).sum(-1) for r in range(2**ORDER_BITS)],
            -1,
        )
        order = cost.argmin(-1)
        high = bits.bit_length(gaps + (1 << order[:, None])) - 1  # bits below the leading 1
        header = torch.stack([n - 1, order, tail_code], dim=-1)
        header_widths = torch.tensor([count_bits, ORDER_BITS, TAIL_BITS]).expand_as(header)
        sections = [
            (header, header_widths),
            (codes, self.bits * keep),
            (torch.ones_like(gaps), (high - order[:, None] + 1) * keep),  # prefix: zeros, then a 1
            (gaps + (1 << order[:, None]), high * keep),  # mantissa: the bits below the leading 1
        ]
        return self._pack(sections, lengths), -torch.expm1(kept.tail_log_mass)

    def decode(self, rows: list[bytes], lengths: list[int], num_classes: int) -> SparseLogits:
        """As :meth:`TopkCodec.decode`, ids exp-Golomb coded."""
        k = min(self.max_k, num_classes)
        count_bits = self._widths(num_classes, k)[2]
        unpacked = self._unpack(rows, lengths, [count_bits, ORDER_BITS, TAIL_BITS])
        n, order, tail_code = unpacked.header[:, 0] + 1, unpacked.header[:, 1], unpacked.header[:, 2]
        if bool((n > k).any()):
            raise CodecError("a packed teacher row holds a count out of range: damaged")
        words, row_of = unpacked.words, unpacked.row_of
        slot = torch.arange(int(n.max()) if len(n) else 0)
        keep = slot < n[:, None]
        code_bits = n * self.bits
        codes_start = unpacked.data_start[row_of] + unpacked.within_row(code_bits)
        codes = bits.read_bits(words, codes_start[:, None] + slot * self.bits, self.bits * keep)

        # Prefixes: the j-th id of a row ends at the j-th 1 bit after the row's codes.
        prefix_start = unpacked.data_start + unpacked.row_total(code_bits)
        row_end = unpacked.row_start + unpacked.sizes * 8
        if bool((prefix_start > row_end).any()):
            raise CodecError("a packed teacher row is shorter than its log-prob codes: damaged")
        ones = unpacked.bits.nonzero().squeeze(1)  # where every 1 bit is, in order
        first_one = torch.searchsorted(ones, prefix_start)[row_of]  # the row's first prefix end
        rank = (first_one + unpacked.within_row(n))[:, None] + slot
        if bool(((rank >= len(ones)) & keep).any()):
            raise CodecError("a packed teacher row ends inside an id code: damaged")
        last = len(ones) - 1  # slots past n are clamped; empty only with no ids (or refused above)
        end = ones[rank.clamp(max=last)]
        previous = torch.where(
            rank == first_one[:, None], prefix_start[row_of][:, None] - 1, ones[(rank - 1).clamp(0, last)]
        )
        high = (end - previous - 1 + order[:, None]) * keep  # mantissa bits of each id
        if bool(
            ((end >= row_end[row_of][:, None]) & keep).any()
            | (high > bits.bit_length(torch.tensor(num_classes - 1 + 2**ORDER_BITS))).any()
        ):
            raise CodecError("a packed teacher row holds an id code past its end or out of range: damaged")

        prefix_bits = ((high - order[:, None] + 1) * keep).sum(-1)
        mantissa_start = prefix_start + unpacked.row_total(prefix_bits)
        before = torch.cumsum(high, -1) - high
        starts = (mantissa_start[row_of] + unpacked.within_row(high.sum(-1)))[:, None] + before
        gaps = (bits.read_bits(words, starts, high) + (1 << high) - (1 << order[:, None])) * keep
        unpacked.check_length(unpacked.row_total(code_bits + prefix_bits + high.sum(-1)))
        return self._distribution(gaps, codes, keep, tail_code, num_classes)
