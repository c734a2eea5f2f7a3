"""The on-policy benchmark's tasks (scripts/bench_on_policy.py, ``--task``): which replies are right, the
data they generate, and the metric that scores a student's greedy replies against any right answer."""

from __future__ import annotations

import random

import pytest
import tiny
import torch
from datasets import Dataset

from hf_kd.data.toy_chat import toy_tokenizer
from hf_kd.tasks import CausalLMTask
from scripts import bench_on_policy as bench


def test_permute_accepts_every_order_of_the_digits_and_nothing_else():
    right = bench.TASKS["permute"].is_right
    request = [3, 1, 4, 1]
    assert right(request, [1, 1, 3, 4]) and right(request, [4, 1, 3, 1]) and right(request, request)
    assert not right(request, [3, 1, 4])  # a digit left out
    assert not right(request, [3, 4, 4, 1])  # one written twice, one left out
    assert not right(request, [3, 1, 4, 1, 1])
    reverse = bench.TASKS["reverse"].is_right
    assert reverse(request, [1, 4, 1, 3]) and not reverse(request, [1, 1, 3, 4])


@pytest.mark.parametrize("name", sorted(bench.TASKS))
def test_every_data_reply_is_right_and_requests_are_distinct(name):
    task = bench.TASKS[name]
    rows = bench.conversations(task, 300, random.Random(0))
    held_out = bench.conversations(task, 50, random.Random(1), exclude={r[0]["content"] for r in rows})
    questions = [r[0]["content"] for r in rows + held_out]
    assert len(set(questions)) == len(questions)
    for user, assistant in rows:
        verb, *items = user["content"].split()
        assert verb == task.verb and task.lengths[0] <= len(items) <= task.lengths[1]
        assert task.is_right(items, assistant["content"].split())


def test_permute_data_are_multi_modal():
    """The data's orders are random: neither the request's order, nor its reverse, nor sorted dominates."""
    rows = bench.conversations(bench.TASKS["permute"], 300, random.Random(0))
    orders = [(r[0]["content"].split()[1:], r[1]["content"].split()) for r in rows]
    for canonical in (lambda items: items, lambda items: items[::-1], sorted):
        assert sum(reply == canonical(items) for items, reply in orders) < 30


class WritesFixedReplies:
    """A student whose greedy replies are given, as ``generate`` returns them: every row as wide as the
    longest (a row that never wrote EOS), padding after an EOS."""

    def __init__(self, replies: list[list[int]]):
        self.replies = replies

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        return torch.cat([input_ids, torch.tensor(self.replies)], dim=1)


def test_evaluate_counts_any_right_order_ending_in_eos_and_the_teachers_nll():
    digit_task = bench.TASKS["permute"]
    rows = [
        [{"role": "user", "content": "shuffle 3 1 4"}, {"role": "assistant", "content": "4 3 1"}],
        [{"role": "user", "content": "shuffle 2 2 7"}, {"role": "assistant", "content": "2 7 2"}],
        [{"role": "user", "content": "shuffle 5 6 8 6"}, {"role": "assistant", "content": "8 6 5 6"}],
        [{"role": "user", "content": "shuffle 9 0 1"}, {"role": "assistant", "content": "0 1 9"}],
        [{"role": "user", "content": "shuffle 7 3"}, {"role": "assistant", "content": "7 3"}],
    ]
    tokenizer = toy_tokenizer([r[0]["content"] + " " + r[1]["content"] for r in rows])
    task = CausalLMTask(max_length=64)
    test_set = task.prepare(Dataset.from_dict({"messages": rows}), student_processor=tokenizer)
    requests = [tokenizer.convert_tokens_to_ids(r[0]["content"].split()[1:]) for r in rows]
    ids = tokenizer.convert_tokens_to_ids
    eos = bench.EOS
    replies = [
        ids(["1", "3", "4"]) + [eos],  # an order the data did not use: right
        ids(["2", "7", "7"]) + [eos],  # a digit written twice: wrong
        ids(["5", "6", "8", "6"]),  # right digits, no EOS (cut at the length limit): wrong
        ids(["9", "0", "1"]) + [eos],  # the request's own order: right
        ids(["3", "7"]) + [eos, 0],  # right, then padding
    ]
    teacher = tiny.tiny_llama(len(tokenizer), 0, pad_token_id=0, eos_token_id=eos).eval()
    scores = bench.evaluate(WritesFixedReplies(replies), teacher, test_set, task, digit_task, requests)
    assert scores["exact_match"] == 0.6
    total, tokens = 0.0, 0
    for row, reply in zip(rows, replies, strict=True):
        reply = reply[: reply.index(eos) + 1] if eos in reply else reply
        prompt = tokenizer.apply_chat_template(row[:1], add_generation_prompt=True)["input_ids"]
        labels = [-100] * len(prompt) + reply
        with torch.no_grad():
            loss = teacher(input_ids=torch.tensor([prompt + reply]), labels=torch.tensor([labels])).loss
        total, tokens = total + loss.item() * len(reply), tokens + len(reply)
    assert scores["teacher_nll"] == pytest.approx(total / tokens, rel=1e-5)
