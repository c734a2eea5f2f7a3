"""Compressed per-token teacher caches (``compression: topk-packed``): the codec's error bound, losses
from a compressed cache, refusal of damaged rows and of another codec, and capture → training."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_kd import DataArguments, DistillationConfig, ModelArguments, run_distillation
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.losses import SparseLogits, divergence, divergence_from_log_probs, teacher_log_probs
from hf_kd.runs.capture import CacheArguments, run_capture
from hf_kd.tasks import CausalLMTask
from hf_kd.teachers.cache.format import METADATA_FILE, CacheError
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.cached import CachedTeacher
from hf_kd.teachers.codec import CodecError, TopkCodec
from hf_kd.teachers.codec.bits import write_bits

V = 512


def lm_like_logits(n: int, seed: int = 0) -> torch.Tensor:
    """Positions from very flat to very peaked: Zipf over a random ranking with sharpness 0.3–4."""
    g = torch.Generator().manual_seed(seed)
    sharpness = torch.linspace(0.3, 4.0, n)[:, None]
    by_rank = -sharpness * torch.log(torch.arange(1, V + 1.0)) + 0.3 * torch.randn(n, V, generator=g)
    ranking = torch.argsort(torch.rand(n, V, generator=g), dim=-1)
    return torch.empty_like(by_rank).scatter_(-1, ranking, by_rank)


def exact_support(codec: TopkCodec, logits: torch.Tensor) -> SparseLogits:
    """The tokens the codec keeps, with their exact log-probabilities and exact tail mass."""
    return codec.select(logits)[0]


@pytest.mark.parametrize(
    "codec",
    [
        TopkCodec(32, mass=0.95, bits=5, step=0.25),
        TopkCodec(16, mass=1.0, bits=4, step=0.5),
        TopkCodec(64, mass=0.9, bits=8, step=0.05),
    ],
)
def test_round_trip_is_within_the_stated_error_bound(codec):
    logits = lm_like_logits(200)
    lengths = [60, 0, 1, 139]
    rows, kept = codec.encode(logits, lengths)
    assert [len(r) for r in rows][1] == 8  # an empty row is its prefix alone
    decoded = codec.decode(rows, lengths, V)
    exact = exact_support(codec, logits)
    stored = exact.log_probs > -math.inf
    assert torch.equal((decoded.log_probs > -math.inf).sum(-1), stored.sum(-1))
    chosen = torch.where(stored, exact.indices, -1).sort(-1).values[:, -decoded.indices.shape[-1] :]
    got = torch.where(decoded.log_probs > -math.inf, decoded.indices, -1).sort(-1).values
    assert torch.equal(got, chosen)  # the same tokens are kept
    for tail in ("uniform", "renormalize"):
        a, b = exact.to_dense_log_probs(tail), decoded.to_dense_log_probs(tail)
        finite = a > -math.inf
        assert torch.equal(finite, b > -math.inf)
        error = (a - b)[finite].abs().max().item()
        assert error <= codec.error_bound() + 1e-5, (tail, error)
        assert error > codec.step / 10  # the bound is met by a lossy code, not by storing exact values
    torch.testing.assert_close(kept, -torch.expm1(exact.tail_log_mass))


def test_support_follows_the_mass_up_to_the_cap():
    codec = TopkCodec(32, mass=0.9, bits=8, step=0.05)
    logits = lm_like_logits(100)
    kept, _, n = codec.select(logits)
    kept_mass = kept.log_probs.exp().sum(-1)
    assert n[0] == 32 and kept_mass[0] < 0.9  # the flattest position hits the cap
    assert n[-1] <= 3 and kept_mass[-1] >= 0.9  # the most peaked keeps a few tokens
    below = kept.log_probs.exp().masked_fill(kept.log_probs == -math.inf, 0)
    without_last = kept_mass - below.gather(-1, (n - 1)[:, None]).squeeze(-1)
    assert bool(((n == 32) | (without_last < 0.9)).all())  # no token beyond what reaches the mass


def test_losses_from_compressed_equal_uncompressed_topk_within_the_bound():
    """mass 1 and a wide code range: the codec keeps exactly the top-k, so its losses differ from the
    float32 top-k's by at most what the bound η on every log p allows:
    forward KL ≤ η + (e^η − 1)·Σ p|log p/q|, reverse KL ≤ η, TVD ≤ (e^η − 1)/2."""
    codec = TopkCodec(16, mass=1.0, bits=8, step=0.1)
    logits = lm_like_logits(120, seed=1)
    exact = SparseLogits.from_logits(logits, 16)
    rows, _ = codec.encode(logits, [120])
    decoded = codec.decode(rows, [120], V)
    student = torch.randn(120, V, generator=torch.Generator().manual_seed(2))
    eta = codec.error_bound()
    log_p, log_q = exact.to_dense_log_probs(), torch.log_softmax(student, -1)
    spread = (log_p.exp() * (log_p - log_q).abs()).sum(-1)
    bounds = {"forward_kl": eta + math.expm1(eta) * spread, "reverse_kl": eta, "tvd": math.expm1(eta) / 2}
    for name, bound in bounds.items():
        for tail in ("uniform", "renormalize"):
            gap = (
                divergence(name, student, decoded, tail=tail) - divergence(name, student, exact, tail=tail)
            ).abs()
            assert bool((gap <= torch.as_tensor(bound) + 1e-5).all()), (name, tail)
            assert gap.max() > 0
    for name in ("jsd", "skew_kl", "skew_rkl"):
        assert torch.isfinite(divergence(name, student, decoded, temperature=2.0)).all()


def test_damaged_rows_are_refused():
    codec = TopkCodec(32)
    rows, _ = codec.encode(lm_like_logits(30), [30])
    row = rows[0]
    flipped = bytearray(row)
    flipped[len(row) // 2] ^= 0x10
    with pytest.raises(CodecError, match="fails its checksum"):
        codec.decode([bytes(flipped)], [30], V)
    with pytest.raises(CodecError, match="fails its checksum"):
        codec.decode([row[:-3]], [30], V)
    with pytest.raises(CodecError, match="fails its checksum"):
        codec.decode([row + b"\x00"], [30], V)
    with pytest.raises(CodecError, match="holds 30 positions, its tokens are 31"):
        codec.decode([row], [31], V)
    with pytest.raises(CodecError, match="is not a packed row"):
        codec.decode([b"\x01\x02"], [30], V)


def test_another_codec_never_decodes_the_rows():
    rows, _ = TopkCodec(32, step=0.25).encode(lm_like_logits(10), [10])
    for other in (TopkCodec(32, step=0.3), TopkCodec(16, step=0.25), TopkCodec(32, mass=0.9)):
        with pytest.raises(CodecError, match="another codec or other parameters"):
            other.decode(rows, [10], V)
    with pytest.raises(CodecError, match="codec 'zstd-topk' is not known"):
        TopkCodec.from_spec({"codec": "zstd-topk", "max_k": 32})
    with pytest.raises(CodecError, match="do not describe a topk-packed codec"):
        TopkCodec.from_spec({"codec": "topk-packed", "max_k": 32, "levels": 3})
    assert TopkCodec.from_spec(TopkCodec(8, 0.5, 6, 0.1).spec()) == TopkCodec(8, 0.5, 6, 0.1)
    with pytest.raises(ValueError, match="compression bits=0 must be an integer in 1..16"):
        TopkCodec(8, bits=0)


# --------------------------------------------------------------------------------------------
# Capture → training
# --------------------------------------------------------------------------------------------


def write_lm_setup(root: Path, head_scale: float = 1.0):
    """The toy chat data, its tokenizer and a saved 1-layer Llama teacher over it (random, its output
    layer × ``head_scale``: logits far from uniform, as a trained teacher's, when > 1), under ``root``."""
    data = write_toy_chat(root / "data", num_train=48, num_test=8)
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, use_cache=False,
    )  # fmt: skip
    teacher = LlamaForCausalLM(config)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(head_scale)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return root, data, tokenizer


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    return write_lm_setup(tmp_path_factory.mktemp("lm"))


def capture(lm_setup, out, **cache_fields):
    root, data, _ = lm_setup
    data_args = DataArguments(task="causal-lm", dataset_name=str(data), max_length=48, eval_split="test")
    cache_args = CacheArguments(
        teacher_model_name_or_path=str(root / "teacher"), output_dir=str(out), batch_size=8, shard_size=16,
        use_cpu=True, **cache_fields,
    )  # fmt: skip
    return run_capture(data_args, cache_args)


def collated_log_probs(cache, tokenizer, rows: int = 6) -> torch.Tensor:
    """The dense teacher log-probs [tokens, V] of the first ``rows`` of a cache's train split, as the
    collator decodes and pads them, at the real (attended) positions."""
    task = CausalLMTask(max_length=48)
    task.cache_decoder = cache.decoder()
    prepared = task.prepare(cache.splits["train"], student_processor=tokenizer)
    batch = task.collate([prepared[i] for i in range(rows)])
    return CachedTeacher(len(tokenizer))(batch)[batch["attention_mask"].bool()].to_dense_log_probs()


def test_compressed_capture_decodes_in_the_collator_and_trains(lm_setup, tmp_path, caplog):
    root, data, tokenizer = lm_setup
    with caplog.at_level(logging.INFO, logger="hf_kd.teachers.cache.kept_mass"):
        capture(lm_setup, tmp_path / "packed", top_k=8, compression="topk-packed", compression_mass=0.9)
    assert "top_k=8 ({'codec': 'topk-packed'" in caplog.text and "quantiles" in caplog.text
    assert "acts like label smoothing" in caplog.text  # a random 1-layer teacher is flat: 8 tokens keep < 0.8
    capture(lm_setup, tmp_path / "plain", top_k=8)
    packed, plain = load_teacher_cache(tmp_path / "packed"), load_teacher_cache(tmp_path / "plain")
    assert packed.metadata.compression == TopkCodec(8, 0.9).spec()
    assert packed.metadata.columns == ["kd_teacher_packed"]
    packed_size = sum(r["size"] for n, r in packed.metadata.files.items() if n.endswith(".arrow"))
    plain_size = sum(r["size"] for n, r in plain.metadata.files.items() if n.endswith(".arrow"))
    assert packed_size < plain_size

    # The collator decodes to the top-k the uncompressed cache holds, within the bound.
    a, b = collated_log_probs(plain, tokenizer), collated_log_probs(packed, tokenizer)
    assert (a - b).abs().max() <= TopkCodec(8, 0.9).error_bound() + 1e-3  # plain's log-probs are float32

    # A cache whose metadata names another codec is refused when opened (the metadata's digests name the field).
    meta = json.loads((tmp_path / "packed" / METADATA_FILE).read_text())
    meta["compression"]["codec"] = "topk-other"
    (tmp_path / "packed" / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="compression"):
        load_teacher_cache(tmp_path / "packed")
    meta["compression"]["codec"] = "topk-packed"
    (tmp_path / "packed" / METADATA_FILE).write_text(json.dumps(meta))

    student = dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    results = {}
    for divergence_name in ("forward_kl", "jsd"):
        args = DistillationConfig(
            output_dir=str(tmp_path / divergence_name), teacher_source="cached", teacher_cache=str(tmp_path / "packed"),
            max_steps=3, per_device_train_batch_size=8, learning_rate=3e-3, alpha=0.5, temperature=2.0,
            divergence=divergence_name, sparse_tail="renormalize" if divergence_name == "jsd" else "uniform",
            use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        )  # fmt: skip
        data_args = DataArguments(task="causal-lm", dataset_name=str(data), max_length=48, eval_split="test")
        model_args = ModelArguments(student_config=student, student_processor=str(data / "tokenizer"))
        results[divergence_name] = run_distillation(data_args, model_args, args).metrics
    for metrics in results.values():
        assert 0 < metrics["eval_loss_soft"] < math.inf
        assert metrics["eval_loss_hard"] < math.log(len(tokenizer)) + 0.5
    assert load_from_disk(str(tmp_path / "packed"))["train"].features["kd_teacher_packed"].dtype == "binary"


@pytest.mark.parametrize("tail", ["uniform", "renormalize"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_sparse_loss_equals_the_dense_rebuild_without_building_it(monkeypatch, name, tail):
    """forward/reverse KL from a decoded cache (padding slots; a position with no tail mass) on the
    sparse support plus a closed-form tail: same values and gradients as on the dense rebuild."""
    codec = TopkCodec(32, mass=0.9, bits=5, step=0.25)
    logits = lm_like_logits(40)
    decoded = codec.decode(codec.encode(logits, [40])[0], [40], V)
    assert bool((decoded.log_probs == -math.inf).any())  # some positions keep fewer than 32 tokens
    no_tail = SparseLogits.from_logits(torch.full((1, V), -math.inf).index_fill(1, torch.arange(20), 1.0), 32)
    assert no_tail.tail_log_mass.item() == -math.inf
    teacher = SparseLogits(
        torch.cat([decoded.log_probs, no_tail.log_probs]),
        torch.cat([decoded.indices, no_tail.indices]),
        torch.cat([decoded.tail_log_mass, no_tail.tail_log_mass]),
        V,
    )
    student = torch.randn(41, V, generator=torch.Generator().manual_seed(3)) * 2
    for temperature in (0.5, 1.0, 2.0):
        dense_value, dense_grad = value_and_grad(
            lambda z, t=temperature: divergence_from_log_probs(
                name, torch.log_softmax(z / t, -1), teacher_log_probs(teacher, t, tail)
            ),
            student,
        )
        with monkeypatch.context() as patch:
            patch.setattr(SparseLogits, "to_dense_log_probs", None)  # the fast path never rebuilds
            value, grad = value_and_grad(
                lambda z, t=temperature: divergence(name, z, teacher, temperature=t, tail=tail), student
            )
        # float32 round-off, relative to the largest entry (renormalised reverse KL: e^−LOG_ZERO penalties)
        torch.testing.assert_close(value, dense_value, rtol=1e-5, atol=1e-6 * dense_value.abs().max())
        torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-5 * dense_grad.abs().max())


def value_and_grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(z) per position, and the gradient of its sum."""
    z = z.clone().requires_grad_(True)
    value = fn(z)
    return value.detach(), torch.autograd.grad(value.sum(), z)[0]


def test_bucket_tail_matches_the_tail_mass_and_leaves_its_shape_to_the_student():
    """sparse_tail: bucket is the divergence over the kept classes plus the tail as one outcome: by hand
    at τ = 1; its gradient scales the student's tail classes all alike (their shape is the student's)."""
    codec = TopkCodec(16, mass=0.9, bits=5, step=0.25)
    logits = lm_like_logits(8)
    teacher = codec.decode(codec.encode(logits, [8])[0], [8], V)
    student = torch.randn(8, V, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    loss = divergence("forward_kl", student, teacher, temperature=1.0, tail="bucket")
    q = torch.softmax(student.detach().double(), -1)
    stored = teacher.log_probs > -math.inf
    for row in range(8):
        ids = teacher.indices[row][stored[row]]
        p_kept, q_kept = teacher.log_probs[row][stored[row]].double().exp(), q[row, ids]
        m, q_tail = teacher.tail_log_mass[row].double().exp(), 1 - q_kept.sum()
        by_hand = (p_kept * (p_kept / q_kept).log()).sum() + m * (m / q_tail).log()
        torch.testing.assert_close(loss[row].double(), by_hand, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    tail = torch.ones(8, V, dtype=torch.bool).scatter_(-1, torch.where(stored, teacher.indices, 0), False)
    ratio = torch.where(tail, grad.double() / q, math.nan)
    spread = ratio.nan_to_num(0).amax(-1) - torch.where(tail, ratio, math.inf).amin(-1)
    assert spread.max() < 1e-4 * ratio.nan_to_num(0).abs().amax()  # ∂L/∂z_i = c · q_i on the tail
    uniform = divergence("forward_kl", student, teacher, temperature=1.0, tail="uniform")
    (grad_uniform,) = torch.autograd.grad(uniform.sum(), student)
    ratio_uniform = torch.where(tail, grad_uniform.double() / q, math.nan)
    assert (
        ratio_uniform.nan_to_num(0).amax(-1) - torch.where(tail, ratio_uniform, math.inf).amin(-1)
    ).min() > 1.0


def _write_bits_bit_by_bit(values: torch.Tensor, widths: torch.Tensor) -> bytes:
    """The previous writer, one bit at a time: each field's low ``widths`` bits, most significant first."""
    bits = [
        (int(v) >> (int(w) - 1 - b)) & 1 for v, w in zip(values, widths, strict=True) for b in range(int(w))
    ]
    bits += [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


@pytest.mark.parametrize("seed", range(4))
def test_packed_bytes_are_unchanged_by_the_faster_bit_writer(seed):
    """The vectorised bit writer writes the bytes a per-bit writer writes, for fields of 0 to 40 bits
    (zero-width fields and values wider than their field included), at any alignment."""
    g = torch.Generator().manual_seed(seed)
    widths = torch.randint(0, 41, (300,), generator=g)
    widths[::7] = 0
    values = torch.randint(0, 2**45, (300,), generator=g)
    assert write_bits(values, widths).tobytes() == _write_bits_bit_by_bit(values, widths)
