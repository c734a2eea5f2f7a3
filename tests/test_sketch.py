"""The low-rank logit sketch of a top-k cache (``sketch_rank``, ``sparse_tail: sketch``): its round trip
within the stated bound, the loss against a hand computation, capture → collation → training, resume,
two processes, and refusal of a damaged or missing sketch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from processes import cache_teacher
from test_codec import capture, write_lm_setup
from transformers import LlamaForCausalLM

from hf_kd import DataArguments, DistillationConfig, ModelArguments, run_distillation
from hf_kd.losses import DIVERGENCES, SparseLogits, TailSketch, distillation_loss, divergence
from hf_kd.runs.capture import CacheArguments
from hf_kd.tasks import CausalLMTask
from hf_kd.teachers.cache.format import CacheError
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.cached import CachedTeacher
from hf_kd.teachers.sketch import SKETCH_FILE, LogitSketch


def low_rank_logits(n: int, classes: int, rank: int, seed: int = 0) -> torch.Tensor:
    """Logits [n, classes] of exactly ``rank`` directions around a mean, plus a per-position constant."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, rank, generator=g) * torch.linspace(3.0, 0.5, rank)
    return (
        factors @ torch.randn(rank, classes, generator=g)
        + torch.randn(classes, generator=g)
        + torch.randn(n, 1, generator=g)
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_of_low_rank_logits_is_within_the_quantisation_bound(bits):
    z = low_rank_logits(600, 40, 6)
    sketch = LogitSketch.fit(z, 6, bits)
    stored = sketch.encode(z)
    assert stored.dtype == torch.uint8 and stored.shape == (600, 2 + 6 * bits // 8)
    rebuilt = sketch.tail_sketch(stored).logits()
    centred = z - z.mean(-1, keepdim=True)
    # Each whitened coefficient is off by at most half a step s / L (s = the position's largest one,
    # float16): the logits by that times Σ_j σ_j |U_ij|; the rank-6 logits have no other error.
    levels = 2 ** (bits - 1) - 1
    scale = stored[:, :2].contiguous().view(torch.float16).float()
    whitened = ((centred - sketch.mean) @ sketch.directions) / sketch.scales
    step_error = scale / (2 * levels) + (whitened.abs().amax(-1, keepdim=True) - scale).clamp(min=0)
    bound = step_error * (sketch.directions.abs() * sketch.scales).sum(-1) + 1e-4
    assert ((rebuilt - centred).abs() <= bound).all()
    assert (rebuilt - centred).abs().max() > 0.01 * bound.max()  # the bound is not vacuous
    # 8 bits are closer than 4, and both far closer than the spread of the logits.
    assert (rebuilt - centred).abs().mean() < 0.05 * centred.std() * (16 if bits == 4 else 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sketch_of_logits_on_a_gpu_is_stored_on_the_cpu_as_the_cpus():
    z = low_rank_logits(600, 40, 6)
    sketch = LogitSketch.fit(z, 6, 8)
    on_gpu, on_cpu = sketch.encode(z.cuda()), sketch.encode(z)
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.uint8
    step = on_cpu[:, :2].contiguous().view(torch.float16).float() / 127 * sketch.scales  # one code
    assert ((sketch.decode(on_gpu) - sketch.decode(on_cpu)).abs() <= step * 1.5).all()  # rounding + scale ulp


def hand_teacher() -> SparseLogits:
    """Two positions over K = 6 classes: kept classes with their log-probs, the tail mass, and a sketch
    whose logits z̃ are given directly (basis = identity over the classes, mean 0)."""
    log_probs = torch.log(torch.tensor([[0.5, 0.2], [0.6, -1.0]]).clamp(min=0))  # 2nd position keeps 1
    indices = torch.tensor([[2, 4], [0, 5]])
    tail = torch.log(torch.tensor([0.3, 0.4]))
    approx = torch.tensor([[1.0, -0.5, 9.0, 0.3, 9.0, 2.0], [9.0, 0.0, 1.0, -1.0, 0.5, 3.0]])
    return SparseLogits(log_probs, indices, tail, 6, TailSketch(approx, torch.eye(6), torch.zeros(6)))


def hand_distribution(teacher: SparseLogits) -> list[list[float]]:
    """The sketch-tail distribution written out: kept p as stored, the tail mass ∝ exp(z̃) on the rest."""
    rows = []
    for pos in range(2):
        kept = {
            int(i): math.exp(float(lp))
            for i, lp in zip(teacher.indices[pos], teacher.log_probs[pos], strict=True)
            if lp > -math.inf
        }
        approx = teacher.sketch.coefficients[pos].tolist()
        tail_classes = [c for c in range(6) if c not in kept]
        norm = sum(math.exp(approx[c]) for c in tail_classes)
        mass = math.exp(float(teacher.tail_log_mass[pos]))
        rows.append([kept.get(c, mass * math.exp(approx[c]) / norm) for c in range(6)])
    return rows


def test_sketch_tail_loss_equals_a_hand_computation():
    teacher = hand_teacher()
    p = hand_distribution(teacher)
    assert p[0][2] == pytest.approx(0.5) and p[0][0] == pytest.approx(
        0.3 * math.e / (math.e + math.exp(-0.5) + math.exp(0.3) + math.e**2)
    )
    student = torch.tensor([[0.2, 0.1, 1.5, -0.3, 0.7, 0.0], [1.0, -1.0, 0.0, 0.5, 0.2, 0.4]])
    for temperature in (1.0, 2.0):
        q = torch.softmax(student / temperature, -1).tolist()
        expected = []
        for pos in range(2):
            pt = [x ** (1 / temperature) for x in p[pos]]
            pt = [x / sum(pt) for x in pt]
            expected.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, q[pos], strict=True)))
        got = divergence("forward_kl", student, teacher, temperature=temperature, tail="sketch")
        assert got.tolist() == pytest.approx(expected, abs=1e-5)
    # Every divergence reads the same dense teacher; the chunked loss equals the one-piece loss.
    dense = torch.log(torch.tensor(p))
    labels = torch.tensor([2, 0])
    for name in (d for d in DIVERGENCES if d != "mse"):
        assert divergence(name, student, teacher, temperature=2.0, tail="sketch") == pytest.approx(
            divergence(name, student, dense, temperature=2.0), abs=1e-5
        )
        values = []
        for chunk in (None, 1):
            z = student.clone().requires_grad_(True)
            terms = distillation_loss(
                z,
                teacher,
                labels,
                alpha=0.5,
                temperature=2.0,
                divergence_name=name,
                tail="sketch",
                chunk_size=chunk,
            )
            terms.loss.backward()
            values.append((terms.loss.item(), z.grad.clone()))
        assert values[0][0] == pytest.approx(values[1][0], abs=1e-6)
        assert torch.allclose(values[0][1], values[1][1], atol=1e-6)
    with pytest.raises(ValueError, match="captured with a logit sketch"):
        SparseLogits(teacher.log_probs, teacher.indices, teacher.tail_log_mass, 6).to_dense_log_probs(
            "sketch"
        )


# --------------------------------------------------------------------------------------------
# Capture → training
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    return write_lm_setup(tmp_path_factory.mktemp("lm"), head_scale=30.0)


def collated_teacher(cache, tokenizer, rows: int = 6) -> tuple[SparseLogits, torch.Tensor]:
    """The cache's teacher over the first ``rows`` train rows as the collator and CachedTeacher give it,
    at the attended positions, and those rows' input ids [rows, T]."""
    task = CausalLMTask(max_length=48)
    task.cache_decoder = cache.decoder()
    prepared = task.prepare(cache.splits["train"], student_processor=tokenizer)
    batch = task.collate([prepared[i] for i in range(rows)])
    teacher = CachedTeacher(len(tokenizer), sketch=cache.sketch)(batch)
    return teacher[batch["attention_mask"].bool()], batch


def test_sketch_capture_rebuilds_the_tail_and_trains(lm_setup, tmp_path):
    root, data, tokenizer = lm_setup
    codec = dict(top_k=4, compression="topk-golomb", compression_mass=0.99)
    capture(lm_setup, tmp_path / "sketch", sketch_rank=16, sketch_bits=4, **codec)
    capture(lm_setup, tmp_path / "plain", **codec)
    cache, plain = load_teacher_cache(tmp_path / "sketch"), load_teacher_cache(tmp_path / "plain")
    assert cache.metadata.sketch == {"rank": 16, "bits": 4, "file": SKETCH_FILE}
    assert cache.metadata.columns == ["kd_teacher_packed", "kd_teacher_sketch"]
    assert SKETCH_FILE in cache.metadata.files and cache.sketch.rank == 16
    assert plain.sketch is None and plain.metadata.columns == ["kd_teacher_packed"]
    assert "rank-16 sketch of the logits" in (tmp_path / "sketch" / "README.md").read_text()

    # The rebuilt distribution is the teacher's far more closely than the uniform tail's.
    teacher = LlamaForCausalLM.from_pretrained(root / "teacher").eval()
    sparse, batch = collated_teacher(cache, tokenizer)
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits, -1)[
            batch["attention_mask"].bool()
        ]
    kl = {
        tail: (full.exp() * (full - sparse.to_dense_log_probs(tail))).sum(-1).mean().item()
        for tail in ("uniform", "sketch")
    }
    assert kl["sketch"] < 0.3 * kl["uniform"], kl
    uniform_plain, _ = collated_teacher(plain, tokenizer)
    assert torch.equal(uniform_plain.log_probs, sparse.log_probs)  # the top-k is the same with a sketch

    student = dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    data_args = DataArguments(task="causal-lm", dataset_name=str(data), max_length=48, eval_split="test")
    model_args = ModelArguments(student_config=student, student_processor=str(data / "tokenizer"))

    def train(cache_dir: Path, name: str, **fields):
        config = DistillationConfig(
            output_dir=str(tmp_path / f"run-{name}"), teacher_source="cached", teacher_cache=str(cache_dir),
            max_steps=2, per_device_train_batch_size=8, learning_rate=3e-3, alpha=0.5, temperature=2.0,
            sparse_tail="sketch", use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
            **fields,
        )  # fmt: skip
        return run_distillation(data_args, model_args, config).metrics

    for name, fields in (("kl", {}), ("jsd", {"divergence": "jsd", "loss_chunk_size": 50})):
        metrics = train(tmp_path / "sketch", name, **fields)
        assert 0 < metrics["eval_loss_soft"] < math.inf
    with pytest.raises(ValueError, match="has none: capture it with sketch_rank > 0"):
        train(tmp_path / "plain", "no-sketch")

    # A damaged sketch file is refused when the cache is opened.
    path = tmp_path / "sketch" / SKETCH_FILE
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-3] ^= 0x01
    path.write_bytes(bytes(data_bytes))
    with pytest.raises(CacheError, match=f"SHA-256 of {SKETCH_FILE} does not match"):
        load_teacher_cache(tmp_path / "sketch")


def data_files(cache) -> dict:
    """The records (size, SHA-256) of a cache's arrow shards and sketch matrices."""
    return {n: r for n, r in cache.metadata.files.items() if n.endswith((".arrow", SKETCH_FILE))}


def test_sketch_capture_resumes_with_the_same_matrices(lm_setup, tmp_path, monkeypatch):
    import hf_kd.teachers.cache.capture as capture_module

    fields = dict(top_k=4, sketch_rank=6, sketch_bits=8)
    capture(lm_setup, tmp_path / "whole", **fields)
    real_write = capture_module.write_shard
    calls = {"n": 0}

    def crash_on_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(capture_module, "write_shard", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        capture(lm_setup, tmp_path / "resumed", **fields)
    assert (tmp_path / "resumed.partial" / SKETCH_FILE).is_file()
    monkeypatch.setattr(capture_module, "write_shard", real_write)
    with pytest.raises(CacheError, match="started with sketch"):
        capture(lm_setup, tmp_path / "resumed", **{**fields, "sketch_rank": 4})
    capture(lm_setup, tmp_path / "resumed", **fields)
    whole, resumed = load_teacher_cache(tmp_path / "whole"), load_teacher_cache(tmp_path / "resumed")
    assert data_files(whole) == data_files(resumed)  # same bytes, sketch matrices included


def test_sketch_settings_are_refused_before_work(lm_setup, tmp_path):
    with pytest.raises(ValueError, match="needs top_k"):
        CacheArguments(teacher_model_name_or_path="t", output_dir=str(tmp_path / "c"), sketch_rank=8)
    with pytest.raises(ValueError, match="sketch_bits=3 must be one of"):
        CacheArguments(
            teacher_model_name_or_path="t",
            output_dir=str(tmp_path / "c"),
            top_k=4,
            sketch_rank=8,
            sketch_bits=3,
        )
    with pytest.raises(ValueError, match="an even rank"):
        CacheArguments(teacher_model_name_or_path="t", output_dir=str(tmp_path / "c"), top_k=4, sketch_rank=7)
    with pytest.raises(ValueError, match="at most the classes"):
        capture(lm_setup, tmp_path / "big", top_k=4, sketch_rank=100_000)
    assert not (tmp_path / "big.partial").exists()


@pytest.mark.slow
def test_two_process_sketch_capture_equals_one_process(lm_setup, tmp_path):
    root, data, _ = lm_setup
    recipe = tmp_path / "capture.yaml"
    recipe.write_text(
        f"task: causal-lm\ndataset_name: {data}\nmax_length: 48\neval_split: test\n"
        f"teacher_model_name_or_path: {root / 'teacher'}\nshard_size: 8\nbatch_size: 4\ntop_k: 4\n"
        "compression: topk-golomb\nsketch_rank: 8\nuse_cpu: true\n"
    )
    for n in (1, 2):
        cache_teacher(recipe, tmp_path / f"cache{n}", n)
    one, two = load_teacher_cache(tmp_path / "cache1"), load_teacher_cache(tmp_path / "cache2")
    assert data_files(one) == data_files(two)  # every shard and the sketch matrices, byte for byte
    assert one.metadata.sketch == two.metadata.sketch == {"rank": 8, "bits": 4, "file": SKETCH_FILE}


def test_sketch_cache_pushed_to_the_hub_reads_back_with_its_matrices(lm_setup, tmp_path, monkeypatch):
    """Against the local Hub stand-in (tests/hub_server.py): HF_HUB_OFFLINE is lifted for this test only."""
    import huggingface_hub.constants
    from hub_server import LocalHub

    import hf_kd.teachers.cache.load as cache_load
    from hf_kd.hub import push_cache_to_hub

    capture(lm_setup, tmp_path / "cache", top_k=4, sketch_rank=6, sketch_bits=8)
    with LocalHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        push_cache_to_hub(tmp_path / "cache", "local-user/sketch-cache", token="hf_test")
        files = hub.files("local-user/sketch-cache")
    assert files[SKETCH_FILE] == (tmp_path / "cache" / SKETCH_FILE).read_bytes()
    snapshot = tmp_path / "snapshot"
    for path, content in files.items():
        (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / path).write_bytes(content)
    monkeypatch.setattr(cache_load, "snapshot_download", lambda repo, **kw: str(snapshot))
    pulled, local = load_teacher_cache("local-user/sketch-cache"), load_teacher_cache(tmp_path / "cache")
    assert torch.equal(pulled.sketch.directions, local.sketch.directions) and pulled.sketch.rank == 6
