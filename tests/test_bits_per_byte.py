"""Bits per byte: a causal LM's held-out measure that does not depend on its tokenizer, so that a teacher
and a student of different tokenizers are scored on the same text (the eval metrics, card, run record)."""

import json
import math
import random

import pytest
import tiny
import torch
from datasets import Dataset
from test_cross_tokenizer import byte_level_bpe, cross_args, cross_run, unigram  # noqa: F401 (fixture)
from tiny import tiny_config

from hf_kd import DistillationTrainer, run_distillation
from hf_kd.data.toy_chat import toy_conversation, toy_tokenizer
from hf_kd.runs.distill import teacher_scores
from hf_kd.runs.run_record import read_run
from hf_kd.tasks import CausalLMTask
from hf_kd.tasks.causal_lm import text_bytes

TEXTS = ["the café is open, 日本 🙂", "hello world said the cat"]


def test_each_character_counts_once_whatever_the_offsets_leave_out_or_share():
    text = "héllo 🙂 world"  # 6 + 1 + 4 + 1 + 5 = 17 bytes
    # a trimmed space before each word, the emoji in two byte pieces with the same offsets, an EOS
    offsets = [(0, 5), (6, 7), (6, 7), (8, 13), (13, 13)]
    assert text_bytes(text, offsets) == [6, 5, 0, 6, 0]
    assert sum(text_bytes(text, offsets)) == len(text.encode()) == 17


def hand_nll(model, ids: list[int]) -> float:
    """Σ_t −log p(ids[t] | ids[:t]) for t ≥ 1, by hand from the model's logits on the unpadded row."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()


def test_student_and_teacher_of_two_tokenizers_match_the_hand_computation(tmp_path):
    student_tokenizer, teacher_tokenizer = byte_level_bpe(), unigram()  # no BOS; a BOS
    student = tiny.tiny_llama(len(student_tokenizer), seed=0, pad_token_id=student_tokenizer.pad_token_id)
    teacher = tiny.tiny_llama(len(teacher_tokenizer), seed=1, pad_token_id=teacher_tokenizer.pad_token_id)
    task = CausalLMTask(max_length=64)
    rows = task.prepare(
        Dataset.from_dict({"text": TEXTS}),
        student_processor=student_tokenizer,
        teacher_processor=teacher_tokenizer,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_config(tmp_path, alpha=0.5, per_device_eval_batch_size=2),
        task=task,
        eval_dataset=rows,
        processing_class=student_tokenizer,
    )
    student_nll = teacher_nll = student_bytes = teacher_bytes = 0.0
    for text in TEXTS:
        s_ids = student_tokenizer(text)["input_ids"] + [student_tokenizer.eos_token_id]
        t_ids = teacher_tokenizer(text)["input_ids"] + [teacher_tokenizer.eos_token_id]
        assert t_ids[0] == teacher_tokenizer.bos_token_id and s_ids[0] != student_tokenizer.bos_token_id
        student_nll += hand_nll(student, s_ids)
        teacher_nll += hand_nll(teacher, t_ids)
        first = student_tokenizer.decode(s_ids[:1])  # no predictor: its text is not scored
        assert text.startswith(first) and first in ("the", "he")
        student_bytes += len(text[len(first) :].encode())
        teacher_bytes += len(text.encode())  # after the BOS every token is predicted
    assert (student_bytes, teacher_bytes) == (27 + 22, 30 + 24)
    metrics = trainer.evaluate()
    assert metrics["eval_bits_per_byte"] == pytest.approx(
        student_nll / (math.log(2) * student_bytes), rel=1e-5
    )
    scores = teacher_scores(trainer, rows, cross_tokenizer=True)
    assert scores == {
        "eval_bits_per_byte": pytest.approx(teacher_nll / (math.log(2) * teacher_bytes), rel=1e-5)
    }


def test_with_one_tokenizer_bits_per_byte_is_token_cross_entropy_times_tokens_per_byte(tmp_path):
    tokenizer = byte_level_bpe()
    student = tiny.tiny_llama(len(tokenizer), seed=0, pad_token_id=tokenizer.pad_token_id)
    teacher = tiny.tiny_llama(len(tokenizer), seed=2, pad_token_id=tokenizer.pad_token_id)
    rows = Dataset.from_dict({"text": TEXTS})
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_config(tmp_path, alpha=0.5, per_device_eval_batch_size=2),
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    encoded = [tokenizer(text)["input_ids"] for text in TEXTS]
    tokens = sum(len(ids) for ids in encoded)  # every token but the first of a row, and the EOS
    scored = sum(
        len(text.encode()) - len(tokenizer.decode(ids[:1]).encode())
        for text, ids in zip(TEXTS, encoded, strict=True)
    )
    for scores in (trainer.evaluate(), teacher_scores(trainer, trainer.eval_dataset)):
        expected = scores["eval_loss_hard"] * tokens / (math.log(2) * scored)
        assert scores["eval_bits_per_byte"] == pytest.approx(expected, rel=1e-5)
        assert scores["eval_perplexity"] == pytest.approx(math.exp(scores["eval_loss_hard"]), rel=1e-6)


def test_completion_only_rows_count_the_bytes_of_the_replies_on_both_sides():
    rng = random.Random(0)
    conversations = [toy_conversation(rng) for _ in range(6)]
    student = toy_tokenizer([f"{c[0]['content']} = {c[1]['content']}" for c in conversations])
    texts = [student.apply_chat_template(c, tokenize=False) for c in conversations]
    teacher = byte_level_bpe(texts, vocab_size=280, special=("<pad>", "<|end|>"))
    teacher.eos_token, teacher.pad_token = "<|end|>", "<pad>"
    rows = CausalLMTask(max_length=64).prepare(
        Dataset.from_dict({"messages": conversations}), student_processor=student, teacher_processor=teacher
    )
    for row, conversation in zip(rows, conversations, strict=True):
        reply = conversation[1]["content"]
        # the reply's words and end marker, each with the space before it; the byte-level teacher has a
        # token for the newline that closes the turn, the word-level student (split on spaces) has none
        expected = len(f" {reply} <|end|>".encode())
        student_bytes = sum(
            count
            for t, (count, label) in enumerate(zip(row["kd_text_bytes"], row["labels"], strict=True))
            if t > 0 and label != -100
        )
        teacher_bytes = sum(count for count in row["kd_text_bytes_teacher"][1:] if count >= 0)
        assert (student_bytes, teacher_bytes) == (expected, expected + 1)
        assert -1 in row["kd_text_bytes_teacher"]  # the user's turn is not scored


def test_cross_tokenizer_run_scores_the_teacher_by_bits_per_byte_in_card_and_record(cross_run):  # noqa: F811
    root, _, _ = cross_run
    result = run_distillation(*cross_args(root, output_dir=str(root / "bpb")))
    out = root / "bpb"
    student_score = result.metrics["eval_bits_per_byte"]
    results = json.loads((out / "eval_results.json").read_text())
    teacher_score = results["teacher_eval_bits_per_byte"]
    assert 0 < student_score < 30 and 0 < teacher_score < 30 and teacher_score != student_score
    assert "teacher_eval_loss_hard" not in results and "teacher_eval_perplexity" not in results
    card = (out / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| bits_per_byte"))
    assert f"{teacher_score:.4g}" in row and f"{student_score:.4g}" in row
    assert "type: bits_per_byte" in card  # model-index
    record = json.loads((out / "run_record.json").read_text())
    assert record["card"]["teacher_metrics"] == {"eval_bits_per_byte": teacher_score}
    facts = read_run(out, metric="eval_bits_per_byte")
    assert (facts.metric, facts.teacher_metric) == (student_score, teacher_score)
