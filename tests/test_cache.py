"""Teacher cache: capture, the stored format, training from it, checks against the run, integrity,
resume, multi-process capture and the Hub."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from processes import cache_teacher
from tiny import (
    bert_classifier,
    image_dataset,
    image_processor,
    save_model,
    sentiment_dataset,
    tiny_config,
    vit_classifier,
    word_tokenizer,
)

from hf_kd import DataArguments, ModelArguments, run_distillation
from hf_kd.hub import push_cache_to_hub
from hf_kd.losses import SparseLogits, divergence, teacher_log_probs
from hf_kd.tasks import CausalLMTask, ImageClassificationTask, TextClassificationTask
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.cache.format import METADATA_FILE, CacheError, CacheMismatchError, cache_features
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.cache.rows import columns_to_arrow, compress_logits
from hf_kd.teachers.cached import CachedTeacher

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """A saved BERT teacher with its tokenizer, and a saved 40/12-row sentiment dataset."""
    root = tmp_path_factory.mktemp("text")
    tokenizer = word_tokenizer()
    teacher = bert_classifier(len(tokenizer), hidden=16, seed=0)
    save_model(teacher, tokenizer, root / "teacher")
    data = DatasetDict(train=sentiment_dataset(40, seed=0), test=sentiment_dataset(12, seed=1))
    data.save_to_disk(str(root / "data"))
    return root, teacher.eval(), tokenizer, load_from_disk(str(root / "data"))


def capture_text(setup, out, **kwargs):
    root, teacher, tokenizer, data = setup
    kwargs = {"shard_size": 16, "batch_size": 8, "progress": False, **kwargs}
    return capture_teacher_logits(
        teacher, tokenizer, TextClassificationTask(), data, out, teacher_id="tiny-bert", **kwargs
    )


def teacher_outputs(setup, cache, split="train"):
    """Teacher logits over ``split`` recomputed one row at a time (no padding)."""
    _, teacher, tokenizer, data = setup
    with torch.no_grad():
        return torch.cat(
            [teacher(**tokenizer(text, return_tensors="pt")).logits for text in data[split]["text"]]
        )


def arrow_files(cache):
    """Size and SHA-256 of each data file (``state.json`` holds a per-run datasets fingerprint)."""
    return {name: record for name, record in cache.metadata.files.items() if name.endswith(".arrow")}


def cached_batch(cache, split="train"):
    rows = cache.splits[split].select_columns(cache.metadata.columns).with_format("torch")[:]
    return dict(rows)


# --------------------------------------------------------------------------------------------
# Format and sparse targets
# --------------------------------------------------------------------------------------------


def test_full_logit_cache_holds_the_teacher_logits_and_rows(text_setup, tmp_path):
    capture_text(text_setup, tmp_path / "cache")
    cache = load_teacher_cache(tmp_path / "cache")
    data = text_setup[3]
    assert (
        cache.splits["train"]["text"] == data["train"]["text"]
        and cache.splits["test"]["label"] == data["test"]["label"]
    )
    signal = CachedTeacher(cache.metadata.num_classes)
    logits = signal(cached_batch(cache))
    torch.testing.assert_close(logits, teacher_outputs(text_setup, cache), atol=1e-5, rtol=1e-5)
    assert cache.metadata.num_classes == 2 and cache.metadata.top_k is None
    assert cache.metadata.splits["train"]["num_rows"] == 40


def test_topk_with_k_equal_K_equals_dense(text_setup, tmp_path):
    capture_text(text_setup, tmp_path / "dense")
    capture_text(text_setup, tmp_path / "topk", top_k=2)
    dense, sparse = load_teacher_cache(tmp_path / "dense"), load_teacher_cache(tmp_path / "topk")
    dense_logits = CachedTeacher(2)(cached_batch(dense))
    sparse_logits = CachedTeacher(2)(cached_batch(sparse))
    assert isinstance(sparse_logits, SparseLogits) and torch.isinf(sparse_logits.tail_log_mass).all()
    student = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        for tail in ("uniform", "renormalize"):
            torch.testing.assert_close(
                divergence(name, student, sparse_logits, temperature=2.0, tail=tail),
                divergence(name, student, dense_logits, temperature=2.0),
                atol=1e-6,
                rtol=1e-5,
            )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_modes_match_hand_computed_probabilities(tmp_path, temperature):
    """v = (2, 1, 0, −1), k = 2: uniform → (p0, p1, (p2+p3)/2, (p2+p3)/2); renormalize → (p0, p1, 0, 0)/(p0+p1);
    then p^τ ∝ ρ^(1/τ). Stored through the arrow format and read back by CachedTeacher."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [-1.0, 0.0, 3.0, 0.5]])
    features = cache_features(4, 2, "float32", per_token=False)
    table = columns_to_arrow(compress_logits(logits, 2), features)
    batch = {name: torch.tensor(table[name].to_pylist()) for name in features}
    sparse = CachedTeacher(4)(batch)
    for row, (a, b, c, d) in enumerate([(0, 1, 2, 3), (2, 3, 1, 0)]):  # classes in decreasing order
        p = torch.softmax(logits[row].double(), -1)
        tail = p[c] + p[d]
        uniform = torch.zeros(4, dtype=torch.double)
        uniform[[a, b, c, d]] = torch.stack([p[a], p[b], tail / 2, tail / 2])
        renorm = torch.zeros(4, dtype=torch.double)
        renorm[[a, b]] = torch.stack([p[a], p[b]]) / (p[a] + p[b])
        for mode, rho in (("uniform", uniform), ("renormalize", renorm)):
            expected = rho ** (1 / temperature) / (rho ** (1 / temperature)).sum()
            got = teacher_log_probs(sparse, temperature, mode)[row].exp().double()
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sparse.tail_log_mass.exp()[0], (torch.softmax(logits[0], -1)[2:]).sum())


def test_tail_below_float_precision_keeps_its_mass():
    """v = (30, 30, 0, 0), k = 2: the tail mass 2/(2e³⁰ + 2) ≈ e⁻³⁰ is far below float32's resolution of
    1 − (p₀ + p₁), yet log of it is stored, not −inf."""
    sparse = SparseLogits(**compress_logits(torch.tensor([[30.0, 30.0, 0.0, 0.0]]), 2), num_classes=4)
    torch.testing.assert_close(sparse.tail_log_mass, torch.tensor([-30.0]))
    assert torch.isfinite(sparse.to_dense_log_probs("uniform")).all()


def test_per_token_columns_keep_each_rows_positions():
    """Causal-LM format: one list per row over its non-padding positions (attention_mask = 1)."""
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    features = cache_features(5, 2, "float16", per_token=True)
    table = columns_to_arrow(compress_logits(logits, 2), features, mask)
    sparse = SparseLogits.from_logits(logits, 2)
    assert [len(r) for r in table["kd_teacher_indices"].to_pylist()] == [3, 2]
    assert table["kd_teacher_indices"].to_pylist()[1] == sparse.indices[1, :2].tolist()
    stored = torch.tensor(table["kd_teacher_log_probs"].to_pylist()[0])
    torch.testing.assert_close(stored, sparse.log_probs[0].half().float())
    assert (
        str(table.schema.field("kd_teacher_indices").type) == "list<item: fixed_size_list<item: uint16>[2]>"
    )


# --------------------------------------------------------------------------------------------
# Training from the cache == online training
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    processor = image_processor()
    save_model(vit_classifier(hidden=16, layers=1, seed=0), processor, root / "teacher")
    DatasetDict(train=image_dataset(48, seed=0), test=image_dataset(16, seed=1)).save_to_disk(
        str(root / "data")
    )
    processor.save_pretrained(root / "processor")
    return root


def run(root: Path, out: Path, **config):
    data_args = DataArguments(
        task="image-classification", dataset_name=str(root / "data"), eval_split=None, num_labeled_examples=24
    )
    student = dict(
        model_type="vit", image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1
    )
    student.update(
        num_attention_heads=2, intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model_args = ModelArguments(student_config=student, student_processor=str(root / "processor"))
    args = tiny_config(
        out, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1, alpha=0.7,
        temperature=2.0, **config,
    )  # fmt: skip
    return run_distillation(data_args, model_args, args)


def test_training_from_full_logit_cache_reproduces_online_training(image_setup, tmp_path):
    root = image_setup
    task, processor = ImageClassificationTask(), image_processor()
    teacher = vit_classifier(hidden=16, layers=1, seed=0).eval()
    capture_teacher_logits(
        teacher,
        processor,
        task,
        load_from_disk(str(root / "data")),
        tmp_path / "cache",
        teacher_id="t",
        progress=False,
    )
    online = run(root, tmp_path / "online", teacher_model_name_or_path=str(root / "teacher"))
    cached = run(root, tmp_path / "cached", teacher_source="cached", teacher_cache=str(tmp_path / "cache"))
    assert isinstance(cached.trainer.teacher_signal, CachedTeacher) and cached.trainer.teacher_model is None
    losses = [[log["loss"] for log in r.trainer.state.log_history if "loss" in log] for r in (online, cached)]
    assert len(losses[0]) == 6
    for a, b in zip(*losses, strict=True):
        assert abs(a - b) <= 1e-5
    soft = [
        [log["loss_soft"] for log in r.trainer.state.log_history if "loss_soft" in log]
        for r in (online, cached)
    ]
    assert soft[0] and max(abs(a - b) for a, b in zip(*soft, strict=True)) <= 1e-5
    for (name, a), b in zip(
        online.trainer.model.state_dict().items(), cached.trainer.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------
# Checks against the run
# --------------------------------------------------------------------------------------------


def test_each_metadata_mismatch_names_field_cache_and_run_values(text_setup, tmp_path):
    capture_text(text_setup, tmp_path / "cache")
    cache = load_teacher_cache(tmp_path / "cache")
    data = text_setup[3]

    def mismatch(call) -> CacheMismatchError:
        with pytest.raises(CacheMismatchError) as info:
            call()
        return info.value

    err = mismatch(lambda: cache.join(data, "image-classification", ["train"]))
    assert (err.field_name, err.cache_value, err.run_value) == (
        "task",
        "text-classification",
        "image-classification",
    )
    fewer = DatasetDict(train=data["train"].select(range(39)))
    err = mismatch(lambda: cache.join(fewer, "text-classification", ["train"]))
    assert (err.field_name, err.cache_value, err.run_value) == ("splits.train.num_rows", 40, 39)
    assert "splits.train.num_rows is 40 in the cache but 39 in the run" in str(err)
    edited = data["train"].map(
        lambda row, i: {"text": row["text"] + (" good" if i == 5 else "")}, with_indices=True
    )
    err = mismatch(lambda: cache.join(DatasetDict(train=edited), "text-classification", ["train"]))
    assert (
        err.field_name == "splits.train.fingerprint"
        and err.cache_value == cache.metadata.splits["train"]["fingerprint"]
    )
    assert err.run_value != err.cache_value
    err = mismatch(
        lambda: cache.join(DatasetDict(validation=data["test"]), "text-classification", ["validation"])
    )
    assert (err.field_name, err.run_value) == ("splits", "validation") and err.cache_value == [
        "test",
        "train",
    ]

    args = tiny_config(tmp_path / "o")
    three = bert_classifier(len(text_setup[2]), labels=["a", "b", "c"]).config
    with pytest.raises(
        CacheError,
        match=r"label spaces differ: the teacher has 2 labels \['negative', 'positive'\].*3 labels",
    ):
        cache.check_run(TextClassificationTask(), three, text_setup[2], args)
    per_token = dataclasses.replace(
        cache, metadata=dataclasses.replace(cache.metadata, per_token=True, max_length=128)
    )
    other_tokenizer = word_tokenizer(["other", "words"])
    err = mismatch(lambda: per_token.check_run(TextClassificationTask(), three, other_tokenizer, args))
    assert err.field_name == "processor_hash" and err.cache_value == cache.metadata.processor_hash


def test_label_order_of_the_run_is_applied_to_cached_logits(text_setup, tmp_path):
    capture_text(text_setup, tmp_path / "cache")
    capture_text(text_setup, tmp_path / "topk", top_k=1)
    args = tiny_config(tmp_path / "o")
    swapped = bert_classifier(len(text_setup[2]), labels=["positive", "negative"]).config
    for name in ("cache", "topk"):
        cache = load_teacher_cache(tmp_path / name)
        output_map = cache.check_run(TextClassificationTask(), swapped, text_setup[2], args)
        assert output_map == [1, 0]
        plain = CachedTeacher(2)(cached_batch(cache))
        mapped = CachedTeacher(2, output_map)(cached_batch(cache))
        if name == "cache":
            torch.testing.assert_close(mapped, plain.flip(-1))
        else:
            assert torch.equal(mapped.indices, 1 - plain.indices)


# --------------------------------------------------------------------------------------------
# Integrity and resume
# --------------------------------------------------------------------------------------------


def test_truncated_or_corrupt_cache_is_refused(text_setup, tmp_path):
    capture_text(text_setup, tmp_path / "good")
    arrow = "train/data-00000-of-00001.arrow"

    def broken(name, damage):
        path = tmp_path / name
        shutil.copytree(tmp_path / "good", path)
        damage(path)
        return path

    def truncate(p):
        data = (p / arrow).read_bytes()
        (p / arrow).write_bytes(data[: len(data) // 2])

    def flip(p):
        data = bytearray((p / arrow).read_bytes())
        data[-100] ^= 0xFF
        (p / arrow).write_bytes(bytes(data))

    cases = {
        "truncated": (truncate, f"corrupt: {arrow} has \\d+ bytes, expected"),
        "flipped": (flip, f"the SHA-256 of {arrow} does not match"),
        "no_metadata": (lambda p: (p / METADATA_FILE).unlink(), "not a complete hf_kd teacher cache"),
        "bad_metadata": (
            lambda p: (p / METADATA_FILE).write_text('{"task": '),
            "hf_kd_cache.json is corrupt",
        ),
        "missing_file": (
            lambda p: (p / "test/state.json").unlink(),
            "incomplete: test/state.json is missing",
        ),
    }
    for name, (damage, message) in cases.items():
        with pytest.raises(CacheError, match=message):
            load_teacher_cache(broken(name, damage))
    assert load_teacher_cache(tmp_path / "good").metadata.splits["train"]["num_rows"] == 40


class CrashingTeacher(torch.nn.Module):
    """The teacher, killed at its ``crash_at``-th forward pass (as a crashed process would stop)."""

    def __init__(self, model, crash_at=None):
        super().__init__()
        self.model, self.config, self.crash_at, self.calls = model, model.config, crash_at, 0

    def forward(self, **inputs):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("killed")
        return self.model(**inputs)


def test_resume_after_killed_capture_equals_uninterrupted(text_setup, tmp_path):
    root, teacher, tokenizer, data = text_setup
    task = TextClassificationTask()
    kwargs = dict(
        teacher_id="tiny-bert", shard_size=16, batch_size=8, progress=False, top_k=1, dtype="float16"
    )
    capture_teacher_logits(teacher, tokenizer, task, data, tmp_path / "whole", **kwargs)
    # shards: train 16+16+8 rows (2+2+1 batches), test 12 rows (2 batches); crash in the 2nd train shard
    with pytest.raises(RuntimeError, match="killed"):
        capture_teacher_logits(
            CrashingTeacher(teacher, crash_at=4), tokenizer, task, data, tmp_path / "resumed", **kwargs
        )
    partial = tmp_path / "resumed.partial"
    assert sorted(p.name for p in (partial / "shards").rglob("*.arrow")) == ["shard-00000.arrow"]
    with pytest.raises(FileNotFoundError, match="no such directory"):  # only the .partial directory exists
        load_teacher_cache(tmp_path / "resumed")
    with pytest.raises(CacheError, match="started with top_k=1, this run has top_k=2"):
        capture_teacher_logits(teacher, tokenizer, task, data, tmp_path / "resumed", **{**kwargs, "top_k": 2})
    counting = CrashingTeacher(teacher)
    capture_teacher_logits(counting, tokenizer, task, data, tmp_path / "resumed", **kwargs)
    assert counting.calls == 5 - 2 + 2  # the unfinished train shards (2 + 1 batches) and the test shard
    assert not partial.exists()
    whole, resumed = load_teacher_cache(tmp_path / "whole"), load_teacher_cache(tmp_path / "resumed")
    for split in ("train", "test"):
        assert whole.splits[split].to_dict() == resumed.splits[split].to_dict()
    assert arrow_files(whole) == arrow_files(resumed)  # byte-identical data files


@pytest.mark.slow
def test_two_process_capture_equals_one_process(text_setup, tmp_path):
    root = text_setup[0]
    recipe = tmp_path / "capture.yaml"
    recipe.write_text(
        f"task: text-classification\ndataset_name: {root / 'data'}\nteacher_model_name_or_path: {root / 'teacher'}\n"
        "shard_size: 8\nbatch_size: 4\ntop_k: 1\nuse_cpu: true\n"
    )
    for n in (1, 2):
        cache_teacher(recipe, tmp_path / f"cache{n}", n)
    one, two = load_teacher_cache(tmp_path / "cache1"), load_teacher_cache(tmp_path / "cache2")
    for split in ("train", "test"):
        assert one.splits[split].to_dict() == two.splits[split].to_dict()
    assert arrow_files(one) == arrow_files(two)


# --------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_cache_with_dataset_card(text_setup, tmp_path, monkeypatch):
    """Against the local Hub stand-in (tests/hub_server.py): HF_HUB_OFFLINE is lifted for this test only."""
    import huggingface_hub.constants
    from hub_server import LocalHub

    capture_text(text_setup, tmp_path / "cache", top_k=1)
    with LocalHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        push_cache_to_hub(tmp_path / "cache", "local-user/tiny-bert-cache", token="hf_test")
        files = hub.files("local-user/tiny-bert-cache")
        assert hub.repos["local-user/tiny-bert-cache"].repo_type == "dataset" and not hub.unknown_requests
    local = {str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert set(files) == local
    assert (
        files["train/data-00000-of-00001.arrow"]
        == (tmp_path / "cache/train/data-00000-of-00001.arrow").read_bytes()
    )
    card = files["README.md"].decode()
    metadata = json.loads(files[METADATA_FILE])
    assert "teacher-logits" in card and "path: train/*.arrow" in card
    for key in ("teacher_id", "teacher_config_hash", "processor_hash", "top_k", "dtype", "hf_kd_version"):
        assert f"`{key}`" in card
    assert metadata["processor_hash"] in card and "| `top_k` | 1 |" in card


def test_capture_rejects_bad_settings_before_work(text_setup, tmp_path):
    with pytest.raises(ValueError, match="dtype='bfloat16' is not one of"):
        capture_text(text_setup, tmp_path / "c", dtype="bfloat16")
    with pytest.raises(ValueError, match="top_k=3 exceeds the teacher's 2 classes"):
        capture_text(text_setup, tmp_path / "c", top_k=3)
    capture_text(text_setup, tmp_path / "c")
    with pytest.raises(FileExistsError, match="already holds a teacher cache"):
        capture_text(text_setup, tmp_path / "c")
    capture_text(text_setup, tmp_path / "c", top_k=1, overwrite=True)
    assert load_teacher_cache(tmp_path / "c").metadata.top_k == 1


def tiny_gpt_and_texts(vocab_size: int):
    """A 32-token word-level tokenizer, a tiny GPT-2 whose output layer has ``vocab_size`` rows (≥ 32:
    padded beyond the tokenizer), and 10 short texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1
    )
    teacher = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 9, (10,), generator=g).tolist()
    texts = [" ".join(f"w{i}" for i in torch.randint(0, 29, (n,), generator=g).tolist()) for n in lengths]
    data = DatasetDict(train=Dataset.from_dict({"text": texts}))
    return tokenizer, teacher, data


def test_causal_lm_capture_stores_per_token_topk_read_back_by_the_lm_collator(tmp_path):
    """Per-token top-k of a tiny GPT-2 over padded rows equals top-k of its logits at every real position."""
    tokenizer, teacher, data = tiny_gpt_and_texts(32)
    task = CausalLMTask(max_length=6)
    kwargs = dict(teacher_id="gpt", top_k=4, batch_size=3, shard_size=4, progress=False)
    capture_teacher_logits(teacher, tokenizer, task, data, tmp_path / "cache", **kwargs)
    cache = load_teacher_cache(tmp_path / "cache")
    assert cache.metadata.per_token and cache.metadata.max_length == 6 and cache.metadata.num_classes == 32
    prepared = CausalLMTask(max_length=6).prepare(cache.splits["train"], student_processor=tokenizer)
    batch = task.collate([prepared[i] for i in range(10)])
    sparse = CachedTeacher(32)(batch)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference, real = SparseLogits.from_logits(logits, 4), batch["attention_mask"].bool()
    assert torch.equal(sparse.indices[real], reference.indices[real])
    torch.testing.assert_close(sparse.log_probs[real], reference.log_probs[real], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        sparse.tail_log_mass[real], reference.tail_log_mass[real], atol=1e-6, rtol=1e-5
    )
    args = tiny_config(tmp_path / "o")
    with pytest.raises(CacheMismatchError, match="max_length is 6 in the cache but 8 in the run"):
        cache.check_run(CausalLMTask(max_length=8), teacher.config, tokenizer, args)


def test_causal_lm_capture_keeps_only_the_tokenizers_ids_of_a_padded_output_layer(tmp_path):
    """A teacher whose output layer is padded beyond the tokenizer (48 rows, 32 tokens): the cache covers
    the 32 real ids, renormalised over them, as the online path slices logits to the shared prefix."""
    from hf_kd.tasks.causal_lm import CausalLMTask

    tokenizer, teacher, data = tiny_gpt_and_texts(48)
    task = CausalLMTask(max_length=6)
    capture_teacher_logits(
        teacher, tokenizer, task, data, tmp_path / "cache", teacher_id="gpt", top_k=4, progress=False
    )
    cache = load_teacher_cache(tmp_path / "cache")
    assert cache.metadata.num_classes == 32
    prepared = task.prepare(cache.splits["train"], student_processor=tokenizer)
    batch = task.collate([prepared[i] for i in range(10)])
    sparse = CachedTeacher(32)(batch)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            ..., :32
        ]
    reference, real = SparseLogits.from_logits(logits, 4), batch["attention_mask"].bool()
    assert torch.equal(sparse.indices[real], reference.indices[real])
    torch.testing.assert_close(sparse.log_probs[real], reference.log_probs[real], atol=1e-6, rtol=1e-5)
