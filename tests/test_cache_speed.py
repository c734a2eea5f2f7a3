"""The cache's speed work: a pipelined capture (the rows of one batch are computed and written while
the teacher runs the next, in order, with the same bytes as a serial capture; an error on either side
leaves no shard behind) and the packed-row reader (one word read per field)."""

from __future__ import annotations

import threading

import pytest
import torch
from test_cache import arrow_files, tiny_gpt_and_texts

from hf_kd.tasks import CausalLMTask
from hf_kd.teachers.cache import rows as rows_module
from hf_kd.teachers.cache import shards as shards_module
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.codec import TopkCodec
from hf_kd.teachers.codec.bits import read_bits, words

# 10 rows in shards of 4 + 4 + 2, batches of 3: 2 + 2 + 1 batches
SETTINGS = dict(teacher_id="gpt", top_k=4, batch_size=3, shard_size=4, progress=False)


class SignallingTeacher:
    """The teacher, setting ``started_second`` when its second forward begins."""

    def __init__(self, model):
        self.model, self.calls, self.started_second = model, 0, threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **inputs):
        self.calls += 1
        if self.calls == 2:
            self.started_second.set()
        return self.model(**inputs)


@pytest.mark.parametrize("compression", [None, TopkCodec(4, mass=0.9)])
def test_rows_are_written_while_the_teacher_runs_the_next_batch_with_serial_bytes(
    tmp_path, monkeypatch, compression
):
    tokenizer, model, data = tiny_gpt_and_texts(32)
    teacher = SignallingTeacher(model)
    overlapped = []
    to_rows = "compress_logits" if compression is None else "packed_to_arrow"
    original = getattr(rows_module, to_rows)

    def first_waits_for_the_second_forward(*args, **kwargs):
        if not overlapped:  # the first batch's rows: only done once the teacher has moved on
            overlapped.append(teacher.started_second.wait(timeout=5))
        return original(*args, **kwargs)

    monkeypatch.setattr(rows_module, to_rows, first_waits_for_the_second_forward)
    kwargs = {**SETTINGS, "compression": compression}
    capture_teacher_logits(teacher, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "a", **kwargs)
    assert overlapped == [True]
    monkeypatch.setattr(rows_module, to_rows, original)
    monkeypatch.setattr(shards_module, "PIPELINE_DEPTH", 0)  # the teacher waits for each batch's rows
    capture_teacher_logits(model, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "b", **kwargs)
    pipelined, serial = load_teacher_cache(tmp_path / "a"), load_teacher_cache(tmp_path / "b")
    assert len(pipelined.splits["train"]) == 10
    assert arrow_files(pipelined) == arrow_files(serial)  # byte-identical data files


@pytest.mark.parametrize("failing_call", [1, 3])  # the first shard's first batch; the second shard's first
def test_an_error_while_writing_rows_surfaces_and_leaves_no_shard(tmp_path, monkeypatch, failing_call):
    tokenizer, model, data = tiny_gpt_and_texts(32)
    calls = []
    original = rows_module.compress_logits

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(rows_module, "compress_logits", fails_once)
    with pytest.raises(OSError, match="disk full"):
        capture_teacher_logits(model, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "c", **SETTINGS)
    partial = tmp_path / "c.partial"
    written = sorted(p.name for p in (partial / "shards").rglob("*") if p.is_file())
    finished = ["shard-00000.arrow", "shard-00000.kept.npy"]  # a shard and its kept-mass summary
    assert written == ([] if failing_call == 1 else finished)  # no .tmp left either
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(rows_module, "compress_logits", original)  # resumes from the finished shards
    capture_teacher_logits(model, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "c", **SETTINGS)
    capture_teacher_logits(model, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "d", **SETTINGS)
    assert arrow_files(load_teacher_cache(tmp_path / "c")) == arrow_files(load_teacher_cache(tmp_path / "d"))


def test_the_word_reader_reads_every_width_at_every_bit_offset_up_to_the_streams_end():
    g = torch.Generator().manual_seed(0)
    stream = bytes(torch.randint(0, 256, (40,), generator=g, dtype=torch.uint8).tolist())
    bits = "".join(f"{byte:08b}" for byte in stream)
    widths = torch.arange(58).repeat_interleave(8)  # 0..57 bits, each at 8 starts
    starts = torch.stack([torch.randint(0, len(bits) - int(w) + 1, (), generator=g) for w in widths])
    starts[-8:] = len(bits) - widths[-8:]  # fields ending on the stream's last bit
    expected = [int(bits[s : s + w] or "0", 2) for s, w in zip(starts.tolist(), widths.tolist(), strict=True)]
    assert read_bits(words(stream), starts, widths).tolist() == expected
