"""Compressed teacher caches on the cases a demanding user meets: peaked positions (compression_mass 1,
tails below the tail grid), a broken teacher (NaN / +inf / all −inf logits), settings refused before the
teacher loads, and the kept-mass report of resumed and multi-process captures."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import DatasetDict
from processes import cache_teacher
from test_cache import CrashingTeacher, arrow_files, tiny_gpt_and_texts
from tiny import sentiment_dataset

import hf_kd.runs.capture as run_capture_module
from hf_kd import DataArguments
from hf_kd.losses import SparseLogits, divergence
from hf_kd.losses.divergences import DIVERGENCES
from hf_kd.runs.capture import CacheArguments, run_capture
from hf_kd.tasks import CausalLMTask
from hf_kd.teachers.cache.capture import capture, capture_teacher_logits
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.cache.spec import CaptureSpec
from hf_kd.teachers.codec import ROW_PREFIX, TAIL_LOW, GolombTopkCodec, TopkCodec

V = 3000


def peaked_logits(n: int = 8) -> torch.Tensor:
    """Positions whose top-16 lie within 20 nats of each other and 40+ nats above the other classes: the
    top-1 holds all but ~1e-9 of the mass (1.0 in float32) and the tail is ~e^−52, below the tail grid."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, V, generator=g)
    logits[:, :16] += 40 + torch.linspace(0, 20, 16)
    return logits


@pytest.mark.parametrize("codec_class", [TopkCodec, GolombTopkCodec])
def test_compression_mass_one_keeps_the_top_k_at_peaked_positions(codec_class):
    """compression_mass 1.0 means "always max_k" (within the code range): it kept the top-1 alone once the
    float32 cumulative sum rounded to 1.0."""
    codec = codec_class(16, mass=1.0, bits=8, step=0.1)  # a 25.5-nat code range holds all 16
    logits = peaked_logits()
    decoded = codec.decode(codec.encode(logits, [8])[0], [8], V)
    exact = SparseLogits.from_logits(logits, 16)
    assert torch.equal((decoded.log_probs > -math.inf).sum(-1), torch.full((8,), 16))
    assert torch.equal(decoded.indices.sort(-1).values, exact.indices.sort(-1).values)


@pytest.mark.parametrize("codec_class", [TopkCodec, GolombTopkCodec])
def test_a_tail_below_the_grid_is_never_read_as_log_zero(codec_class):
    """A non-zero tail below e^TAIL_LOW odds decodes as the grid's lowest mass, not 0: reverse KL (uniform
    or bucket tail) from the compressed cache stays at most the uncompressed top-k's, where log 0 read
    as e^LOG_ZERO made it ~10,000 nats per unit of student tail mass. Every divergence × tail: finite value
    and gradient, and the other divergences within the codec's bound of the uncompressed top-k's."""
    codec = codec_class(16, mass=1.0, bits=8, step=0.1)
    logits = peaked_logits()
    decoded = codec.decode(codec.encode(logits, [8])[0], [8], V)
    exact = SparseLogits.from_logits(logits, 16)
    assert bool((exact.tail_log_mass < TAIL_LOW - 20).all())
    torch.testing.assert_close(decoded.tail_log_mass, torch.full((8,), TAIL_LOW), atol=1e-3, rtol=0)
    eta = codec.error_bound()
    student = torch.randn(8, V, generator=torch.Generator().manual_seed(1)) * 2
    log_p, log_q = exact.to_dense_log_probs(), torch.log_softmax(student, -1)
    spread = (log_p.exp() * (log_p - log_q).abs()).sum(-1)
    for name in (d for d in DIVERGENCES if d != "mse"):
        for tail in ("uniform", "renormalize", "bucket"):
            z = student.clone().requires_grad_(True)
            value = divergence(name, z, decoded, temperature=2.0, tail=tail)
            (grad,) = torch.autograd.grad(value.sum(), z)
            assert bool(torch.isfinite(value).all() & torch.isfinite(grad).all()), (name, tail)
            value, plain = (
                divergence(name, student, decoded, tail=tail),
                divergence(name, student, exact, tail=tail),
            )
            if name == "reverse_kl":
                assert bool(((value > 0) & (value <= plain + eta)).all()), (tail, value, plain)
            elif name == "forward_kl":
                assert bool(((value - plain).abs() <= eta + math.expm1(eta) * spread).all()), tail
            else:  # jsd, tvd, skew: the tail holds ~e^-52 of the teacher's mass, the kept part moves ≤ η
                assert (value - plain).abs().max() <= 2 * eta, (name, tail)


class BrokenTeacher(torch.nn.Module):
    """The teacher, with logits ``value`` at row 1, position 2 of its second batch (``whole``: every class
    of that position, else class 5), or at every padding position (``padding``)."""

    def __init__(self, model, value: float, whole: bool = False, padding: bool = False):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0
        self.value, self.whole, self.padding = value, whole, padding

    def forward(self, **inputs):
        out = self.model(**inputs)
        self.calls += 1
        if self.padding:
            out.logits[inputs["attention_mask"] == 0] = self.value
        elif self.calls == 2:
            out.logits[1, 2, slice(None) if self.whole else 5] = self.value
        return out


@pytest.mark.parametrize(
    "value, whole, held",
    [
        (math.nan, False, "a NaN logit"),
        (math.inf, False, r"a \+inf logit"),
        (-math.inf, True, "only −inf logits"),
    ],
)
@pytest.mark.parametrize("storage", ["logits", "top_k", "topk-golomb"])
def test_a_teacher_output_that_is_no_distribution_is_refused_naming_the_position(
    tmp_path, value, whole, held, storage
):
    """It was written: NaN into plain columns, and packed rows that the collator then called damaged."""
    tokenizer, teacher, data = tiny_gpt_and_texts(32)
    settings = {"logits": {}, "top_k": {"top_k": 4}, "topk-golomb": {"compression": GolombTopkCodec(4)}}
    kwargs = dict(teacher_id="gpt", batch_size=3, progress=False, **settings[storage])
    broken = BrokenTeacher(teacher, value, whole)
    message = f"split 'train', row 4, position 2 holds {held}: not a distribution"
    with pytest.raises(ValueError, match=message):
        capture_teacher_logits(broken, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "c", **kwargs)
    assert broken.calls == 2 and not (tmp_path / "c").exists()
    assert not list((tmp_path / "c.partial").rglob("*.arrow"))


def test_masked_classes_and_broken_padding_positions_are_not_refused(tmp_path):
    """−inf logits of some classes (a masked vocabulary) are a distribution; NaN at padding positions
    (fully masked attention rows) is never stored, so neither stops a capture."""
    tokenizer, teacher, data = tiny_gpt_and_texts(32)
    kwargs = dict(teacher_id="gpt", batch_size=3, progress=False, compression=GolombTopkCodec(4))
    task = CausalLMTask(max_length=6)
    capture_teacher_logits(
        BrokenTeacher(teacher, math.nan, padding=True), tokenizer, task, data, tmp_path / "a", **kwargs
    )
    capture_teacher_logits(BrokenTeacher(teacher, -math.inf), tokenizer, task, data, tmp_path / "b", **kwargs)
    for name in ("a", "b"):
        cache = load_teacher_cache(tmp_path / name)
        task.cache_decoder = cache.decoder()
        prepared = task.prepare(cache.splits["train"], student_processor=tokenizer)
        batch = task.collate([prepared[i] for i in range(10)])
        assert bool(
            torch.isfinite(batch["kd_teacher_log_probs"][batch["attention_mask"].bool()]).any(-1).all()
        )
    with pytest.raises(ValueError, match="position 2 are no distribution"):
        GolombTopkCodec(4).encode(torch.tensor([[0.0, 1.0]] * 2 + [[math.nan, 1.0]]), [3])


def test_settings_that_cannot_work_are_refused_before_the_teacher_loads(tmp_path, monkeypatch):
    DatasetDict(train=sentiment_dataset(8)).save_to_disk(str(tmp_path / "data"))

    def load_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(run_capture_module, "load_teacher", load_teacher)
    data_args = DataArguments(
        task="text-classification", dataset_name=str(tmp_path / "data"), eval_split=None
    )
    cache_args = CacheArguments(
        teacher_model_name_or_path="hub-user/tiny-teacher", output_dir=str(tmp_path / "c"), top_k=2,
        compression="topk-golomb", use_cpu=True,
    )  # fmt: skip
    with pytest.raises(
        ValueError, match="packs per-token \\(causal-lm\\) caches; task is 'text-classification'"
    ):
        run_capture(data_args, cache_args)
    with pytest.raises(ValueError, match="top_k=0 must be a positive number of classes"):
        CacheArguments(teacher_model_name_or_path="hub-user/tiny-teacher", output_dir="c", top_k=0)


def test_the_kept_mass_report_of_a_resumed_capture_covers_every_position(tmp_path, caplog):
    """Reported over the shards of the interrupted run too (it covered the resumed shards alone), once;
    the warning names the settings that keep more."""
    tokenizer, teacher, data = tiny_gpt_and_texts(32)
    codec = GolombTopkCodec(2, mass=0.9)
    kwargs = dict(teacher_id="gpt", batch_size=2, shard_size=4, progress=False, compression=codec)
    task = CausalLMTask(max_length=6)
    with caplog.at_level(logging.INFO, logger="hf_kd.teachers.cache.kept_mass"):
        capture_teacher_logits(teacher, tokenizer, task, data, tmp_path / "whole", **kwargs)
    whole = [r.getMessage() for r in caplog.records]
    caplog.clear()
    with pytest.raises(RuntimeError, match="killed"):
        capture_teacher_logits(
            CrashingTeacher(teacher, crash_at=3), tokenizer, task, data, tmp_path / "r", **kwargs
        )
    with caplog.at_level(logging.INFO, logger="hf_kd.teachers.cache.kept_mass"):
        capture_teacher_logits(teacher, tokenizer, task, data, tmp_path / "r", **kwargs)
    resumed = [r.getMessage() for r in caplog.records]
    assert arrow_files(load_teacher_cache(tmp_path / "whole")) == arrow_files(
        load_teacher_cache(tmp_path / "r")
    )
    rows = load_teacher_cache(tmp_path / "r").splits["train"]["kd_teacher_packed"]
    positions = sum(ROW_PREFIX.unpack_from(row)[0] for row in rows)
    assert resumed == whole and len(resumed) == 2
    assert f"on average over {positions} positions" in resumed[0]
    assert (
        "a compression_mass nearer 1 (now 0.9)" in resumed[1]
        and "the top-1 are dropped; now 6)" in resumed[1]
    )


@pytest.mark.slow
def test_two_process_compressed_capture_reports_the_whole_cache_once(tmp_path):
    tokenizer, teacher, data = tiny_gpt_and_texts(32)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    data.save_to_disk(str(tmp_path / "data"))
    recipe = tmp_path / "capture.yaml"
    recipe.write_text(
        f"task: causal-lm\ndataset_name: {tmp_path / 'data'}\nmax_length: 6\neval_split: null\n"
        f"teacher_model_name_or_path: {tmp_path / 'teacher'}\nshard_size: 2\nbatch_size: 2\ntop_k: 4\n"
        "compression: topk-golomb\nuse_cpu: true\n"
    )
    outputs = {}
    for n in (1, 2):
        result = cache_teacher(recipe, tmp_path / f"c{n}", n)
        outputs[n] = [line for line in (result.stdout + result.stderr).splitlines() if " kept " in line]
        assert "top-4 (topk-golomb) of" in result.stdout
    assert arrow_files(load_teacher_cache(tmp_path / "c1")) == arrow_files(
        load_teacher_cache(tmp_path / "c2")
    )
    assert len(outputs[2]) == 1 and outputs[1] == outputs[2]


def test_the_card_of_a_compressed_cache_names_its_codes_not_a_float_dtype(tmp_path):
    from hf_kd.cards.dataset import write_dataset_card

    tokenizer, teacher, data = tiny_gpt_and_texts(32)
    codec = GolombTopkCodec(4, bits=5, step=0.25)
    kwargs = dict(teacher_id="gpt", progress=False, compression=codec, dtype="float16")
    metadata = capture_teacher_logits(
        teacher, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "c", **kwargs
    )
    write_dataset_card(tmp_path / "c", metadata)
    card = (tmp_path / "c" / "README.md").read_text()
    assert (
        "packed by the `topk-golomb` codec as 5-bit log-probability codes (columns `kd_teacher_packed`)"
        in card
    )
    assert "in `float16`" not in card
    assert load_teacher_cache(tmp_path / "c").metadata.compression == codec.spec()  # the card is not listed


@pytest.mark.parametrize("name", [d for d in DIVERGENCES if d != "mse"])
def test_bucket_tail_gradients_stay_finite_when_the_kept_classes_hold_all_the_students_mass(name):
    """sparse_tail: bucket from a compressed cache whose top-k is the whole vocabulary (k ≥ V), and from a
    top-k cache with a student confident on the teacher's kept classes: Σ_kept q rounds to 1, and the
    gradient of the student's tail log(1 − Σ_kept q) was NaN (the values were finite)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    codec = GolombTopkCodec(64, mass=1.0, bits=8, step=0.1)
    whole = codec.decode(codec.encode(logits, [4])[0], [4], 50)
    top8 = SparseLogits.from_logits(logits, 8)
    confident = torch.full((4, 50), -30.0).scatter_(-1, top8.indices, 0.0)
    for teacher, student in ((whole, torch.randn(4, 50)), (top8, confident)):
        for temperature in (0.5, 2.0):
            z = student.clone().requires_grad_(True)
            value = divergence(name, z, teacher, temperature=temperature, tail="bucket")
            (grad,) = torch.autograd.grad(value.sum(), z)
            assert bool(torch.isfinite(value).all()) and bool(torch.isfinite(grad).all()), temperature
            assert grad.abs().sum() > 0


def test_a_capture_spec_checks_itself_and_captures_as_the_keyword_call_does(tmp_path):
    """The spec refuses bad settings when it is made (before the teacher runs) and settles what the
    capture stores: the codec's top-k, the tokenizer's classes (not the padded output layer's 40 rows)."""
    tokenizer, teacher, data = tiny_gpt_and_texts(40)
    task = CausalLMTask(max_length=6)
    with pytest.raises(ValueError, match="dtype='float8' is not one of"):
        CaptureSpec(teacher, tokenizer, task, data, tmp_path / "bad", teacher_id="gpt", dtype="float8")
    with pytest.raises(ValueError, match="top_k=3 differs from the compression's max_k=4"):
        CaptureSpec(
            teacher,
            tokenizer,
            task,
            data,
            tmp_path / "bad",
            teacher_id="gpt",
            top_k=3,
            compression=TopkCodec(4),
        )
    assert not (tmp_path / "bad.partial").exists()
    settings = dict(
        teacher_id="gpt", compression=TopkCodec(4, mass=0.9), batch_size=3, shard_size=4, progress=False
    )
    spec = CaptureSpec(teacher, tokenizer, task, data, tmp_path / "spec", **settings)
    assert (spec.top_k, spec.num_classes, spec.per_token) == (4, 32, True)
    metadata = capture(spec)
    assert (metadata.top_k, metadata.num_classes) == (4, 32)
    capture_teacher_logits(teacher, tokenizer, task, data, tmp_path / "keywords", **settings)
    assert arrow_files(load_teacher_cache(tmp_path / "spec")) == arrow_files(
        load_teacher_cache(tmp_path / "keywords")
    )
