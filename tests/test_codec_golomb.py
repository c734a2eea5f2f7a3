"""The ``topk-golomb`` codec: exp-Golomb-coded token ids, the same support and quantised log-probs as
``topk-packed``; round trips within the bound, damaged rows refused, older caches still readable."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from hf_kd.losses import divergence
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.codec import ROW_PREFIX, CodecError, GolombTopkCodec, TopkCodec
from tests.test_codec import (  # noqa: F401 (lm_setup: a fixture)
    V,
    capture,
    collated_log_probs,
    exact_support,
    lm_like_logits,
    lm_setup,
)


def clustered_logits(n: int, seed: int = 0) -> torch.Tensor:
    """LM-like positions whose likely tokens crowd the low ids, as a BPE vocabulary's frequent tokens do."""
    g = torch.Generator().manual_seed(seed)
    return lm_like_logits(n, seed) - 0.02 * torch.arange(V) + 0.5 * torch.randn(n, V, generator=g)


@pytest.mark.parametrize(
    "codec",
    [
        GolombTopkCodec(32, mass=0.95, bits=5, step=0.25),
        GolombTopkCodec(64, mass=0.98, bits=3, step=0.5),
        GolombTopkCodec(V, mass=1.0, bits=8, step=0.05),  # every id, gaps of 0
    ],
)
def test_golomb_round_trip_is_within_the_stated_error_bound(codec):
    logits = clustered_logits(120)
    lengths = [50, 0, 1, 69]
    rows, kept = codec.encode(logits, lengths)
    assert len(rows[1]) == ROW_PREFIX.size  # an empty row is its prefix alone
    decoded = codec.decode(rows, lengths, V)
    exact = exact_support(codec, logits)
    stored = exact.log_probs > -math.inf
    width = decoded.indices.shape[-1]
    chosen = torch.where(stored, exact.indices, -1).sort(-1).values[:, -width:]
    assert torch.equal(
        torch.where(decoded.log_probs > -math.inf, decoded.indices, -1).sort(-1).values, chosen
    )
    for tail in ("uniform", "renormalize"):
        a, b = exact.to_dense_log_probs(tail), decoded.to_dense_log_probs(tail)
        finite = a > -math.inf
        assert torch.equal(finite, b > -math.inf)
        error = (a - b)[finite].abs().max().item()
        assert codec.step / 10 < error <= codec.error_bound() + 1e-5, (tail, error)
    torch.testing.assert_close(kept, -torch.expm1(exact.tail_log_mass))


def test_golomb_decodes_what_topk_packed_decodes_in_fewer_bytes():
    """Same parameters: the same tokens, log-probs and tail as ``topk-packed``, in fewer bytes when the
    likely ids cluster (as a BPE vocabulary's frequent tokens do); losses from either are equal."""
    logits = clustered_logits(200, seed=3)
    lengths = [120, 80]
    packed, golomb = TopkCodec(48, 0.98, 3, 0.5), GolombTopkCodec(48, 0.98, 3, 0.5)
    packed_rows, packed_kept = packed.encode(logits, lengths)
    golomb_rows, golomb_kept = golomb.encode(logits, lengths)
    a, b = packed.decode(packed_rows, lengths, V), golomb.decode(golomb_rows, lengths, V)
    for field in ("log_probs", "indices", "tail_log_mass"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(packed_kept, golomb_kept)
    packed_bytes, golomb_bytes = sum(map(len, packed_rows)), sum(map(len, golomb_rows))
    assert golomb_bytes < 0.8 * packed_bytes, (golomb_bytes, packed_bytes)
    student = torch.randn(200, V, generator=torch.Generator().manual_seed(4))
    for tail in ("uniform", "bucket"):
        assert torch.equal(
            divergence("forward_kl", student, a, tail=tail), divergence("forward_kl", student, b, tail=tail)
        )


def resealed(codec: GolombTopkCodec, row: bytes, body: bytes) -> bytes:
    """``body`` behind ``row``'s position count and a valid checksum: damage the CRC cannot see."""
    positions, _ = ROW_PREFIX.unpack_from(row)
    return ROW_PREFIX.pack(positions, zlib.crc32(body, codec._seed)) + body


def test_golomb_damaged_rows_are_refused():
    codec = GolombTopkCodec(32, mass=0.95, bits=4, step=0.4)
    rows, _ = codec.encode(clustered_logits(30), [30])
    row = rows[0]
    flipped = bytearray(row)
    flipped[len(row) // 2] ^= 0x10
    for damaged in (bytes(flipped), row[:-3], row + b"\x00"):
        with pytest.raises(CodecError, match="fails its checksum"):
            codec.decode([damaged], [30], V)
    # Damage behind a valid checksum is refused by the structure checks, never an IndexError or a wrong row.
    body = row[ROW_PREFIX.size :]
    g = torch.Generator().manual_seed(0)
    damaged_bodies = [
        body[:-1],
        body + b"\x00",
        body[: len(body) // 2],
        b"\xff" * len(body),
        b"\x00" * len(body),
    ]
    for _ in range(40):
        at = int(torch.randint(0, len(body), (1,), generator=g))
        damaged_bodies.append(
            body[:at]
            + bytes([body[at] ^ (1 << int(torch.randint(0, 8, (1,), generator=g)))])
            + body[at + 1 :]
        )
    refused = 0
    for damaged in damaged_bodies:
        try:
            decoded = codec.decode([resealed(codec, row, damaged)], [30], V)
        except CodecError:
            refused += 1
            continue
        assert bool((decoded.indices < V).all() & (decoded.indices >= 0).all())
    assert refused >= 5  # every truncated, extended or blanked body, and the flips that break the layout


def test_codecs_never_decode_each_other_and_older_caches_stay_readable():
    logits = clustered_logits(10)
    v1_rows, _ = TopkCodec(32, 0.98, 4, 0.4).encode(logits, [10])
    golomb_rows, _ = GolombTopkCodec(32, 0.98, 4, 0.4).encode(logits, [10])
    with pytest.raises(CodecError, match="another codec or other parameters"):
        GolombTopkCodec(32, 0.98, 4, 0.4).decode(v1_rows, [10], V)
    with pytest.raises(CodecError, match="another codec or other parameters"):
        TopkCodec(32, 0.98, 4, 0.4).decode(golomb_rows, [10], V)
    # A cache's metadata picks its codec: the first format (recorded before topk-golomb existed) still reads.
    old_spec = {"codec": "topk-packed", "max_k": 32, "mass": 0.98, "bits": 4, "step": 0.4}
    old = TopkCodec.from_spec(old_spec)
    assert type(old) is TopkCodec and old.spec() == old_spec
    assert type(TopkCodec.from_spec(GolombTopkCodec(32, 0.98, 4, 0.4).spec())) is GolombTopkCodec
    assert torch.equal(
        old.decode(v1_rows, [10], V).indices, TopkCodec(32, 0.98, 4, 0.4).decode(v1_rows, [10], V).indices
    )
    with pytest.raises(
        CodecError, match=r"codec 'topk-zstd' is not known; this hf_kd reads \['topk-golomb', 'topk-packed'\]"
    ):
        TopkCodec.from_spec({"codec": "topk-zstd", "max_k": 32})


def test_golomb_capture_decodes_in_the_collator(lm_setup, tmp_path):  # noqa: F811 (the fixture)
    _, _, tokenizer = lm_setup
    capture(lm_setup, tmp_path / "golomb", top_k=8, compression="topk-golomb", compression_mass=0.9)
    capture(lm_setup, tmp_path / "plain", top_k=8)
    golomb, plain = load_teacher_cache(tmp_path / "golomb"), load_teacher_cache(tmp_path / "plain")
    assert golomb.metadata.compression == GolombTopkCodec(8, 0.9).spec()
    a, b = collated_log_probs(plain, tokenizer), collated_log_probs(golomb, tokenizer)
    error = (a - b).abs().max().item()
    assert 0 < error <= GolombTopkCodec(8, 0.9).error_bound() + 1e-3  # plain's log-probs are float32


PINNED_ROWS = [  # GolombTopkCodec(8, 0.95, 4, 0.4) over rows of 2 and 4 positions of 40 classes
    "020000008132ccf4e6b79a81121022234303444fa55db2fa46e0",
    "04000000c3929c41e2791956a4c39508574873102105803226951355c9fba18f00",
]
PINNED_IDS = [
    [0, 1, 3, 4, 6, 12, 25, 30],
    [3, 6, 7, 9, 14, 16, 22, 23],
    [4, 5, 12, 21, 25, 26, 29, 36],
    [5, 10, 39],
    [20, 22, 31, 39],
    [20],
]
PINNED_LOG_PROBS = [
    [-2.8702, -2.8702, -3.2702, -2.8702, -2.4702, -3.2702, -3.2702, -3.2702],
    [-2.7388, -3.1388, -2.7388, -1.5388, -2.7388, -3.1388, -3.1388, -3.1388],
    [-0.7711, -3.9711, -2.7711, -3.5711, -2.3711, -3.9711, -3.5711, -1.9711],
    [-1.1987, -0.7987, -1.5987],
    [-1.0492, -0.6492, -2.6492, -3.8492],
    [-0.0475],
]
PINNED_TAILS = [-0.5219, -0.8721, -1.9085, -3.0711, -3.3431, -3.0711]


def _pinned_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0])[:, None]
    return torch.randn(6, 40, generator=g) * scale - 0.05 * torch.arange(40)


def _check_pinned(decoded) -> None:
    for position, (ids, log_probs) in enumerate(zip(PINNED_IDS, PINNED_LOG_PROBS, strict=True)):
        n = len(ids)
        assert decoded.indices[position, :n].tolist() == ids
        assert torch.isneginf(decoded.log_probs[position, n:]).all()
        torch.testing.assert_close(
            decoded.log_probs[position, :n], torch.tensor(log_probs), atol=2e-4, rtol=0
        )
    torch.testing.assert_close(decoded.tail_log_mass, torch.tensor(PINNED_TAILS), atol=2e-4, rtol=0)


def test_golomb_bytes_are_pinned():
    """The format caches are written in today: rows written once decode to the same ids, log-probs and
    tail masses, and today's encoder writes rows that decode to them. A change here makes every existing
    topk-golomb cache unreadable: give it a new name."""
    codec = GolombTopkCodec(8, 0.95, 4, 0.4)
    _check_pinned(codec.decode([bytes.fromhex(row) for row in PINNED_ROWS], [2, 4], 40))
    rows, _ = codec.encode(_pinned_logits(), [2, 4])
    _check_pinned(codec.decode(rows, [2, 4], 40))
