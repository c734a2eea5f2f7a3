"""On-policy distillation, the rest of issue 14: prompts from a ``prompt_column`` (with or without
completions; a chat template when the tokenizer has one), refused before any model loads when the
column is missing, not text, or without completions while some batches keep the data's; and
``log_completions``: sampled completions with the teacher's and the student's per-token log-probs,
read back and checked against direct forwards."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from test_on_policy import FixedGenerator, tiny_llama, toy, trainer_for  # noqa: F401 (toy: a fixture)
from tiny import tiny_config
from transformers import AutoTokenizer

from hf_kd import DistillationConfig, DistillationTrainer, parse_args, run_distillation
from hf_kd.completion_log import FILE_NAME
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.on_policy import prompt_lengths
from hf_kd.tasks import CausalLMTask

PROMPTS = ["reverse a b c", "sort c a", "add 3 4"]
COMPLETIONS = ["c b a", "a c", "7"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_toy_chat(tmp_path_factory.mktemp("data") / "toy_chat", num_train=24, num_test=4)


@pytest.fixture
def tokenizer(toy_data):
    return AutoTokenizer.from_pretrained(str(toy_data / "tokenizer"))


def labelled(row) -> list[int]:
    return [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]


# ---- prompt_column: the rows ---------------------------------------------------------------------


def test_prompt_rows_are_a_user_turn_and_its_reply_with_a_chat_template(tokenizer):
    task = CausalLMTask(max_length=64, prompt_column="prompt")
    rows = Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS})
    prepared = task.prepare(rows, student_processor=tokenizer)
    row = prepared[0]
    assert tokenizer.decode(row["input_ids"]) == "<|user|> reverse a b c <|end|> <|assistant|> c b a <|end|>"
    assert tokenizer.decode(labelled(row)) == "c b a <|end|>"  # the reply and its end-of-turn only
    prompt_only = task.prepare(Dataset.from_dict({"prompt": PROMPTS}), student_processor=tokenizer)
    assert tokenizer.decode(prompt_only[0]["input_ids"]) == "<|user|> reverse a b c <|end|> <|assistant|>"
    assert set(prompt_only[0]["labels"]) == {-100}
    # the prompt of a prompt/completion row is exactly the prompt-only row (what generation continues)
    for full, bare in zip(prepared, prompt_only, strict=True):
        start = int(prompt_lengths(torch.tensor([full["labels"]]))[0])
        assert full["input_ids"][:start] == bare["input_ids"]


def test_prompt_rows_are_prompt_then_completion_tokens_without_a_chat_template(tokenizer):
    tokenizer.chat_template = None
    task = CausalLMTask(max_length=64, prompt_column="question", completion_column="answer")
    rows = Dataset.from_dict({"question": PROMPTS, "answer": COMPLETIONS})
    row = task.prepare(rows, student_processor=tokenizer)[1]
    prompt, completion = tokenizer("sort c a")["input_ids"], tokenizer("a c")["input_ids"]
    assert row["input_ids"] == prompt + completion + [tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(prompt) + completion + [tokenizer.eos_token_id]


def test_prompt_only_rows_are_prompts_as_a_whole():
    labels = torch.full((2, 5), -100)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert prompt_lengths(labels, mask).tolist() == [3, 5]
    with pytest.raises(ValueError, match="needs a prompt in every row"):
        prompt_lengths(labels)  # without the mask a row without labels has no known prompt


def test_prompt_only_rows_train_on_the_students_completions(toy_data, tmp_path):
    """Raw prompt-only rows through the Python API, lmbda 1: the generator gets exactly the prompts
    (left-padded), the student learns on what it wrote."""
    tokenizer = AutoTokenizer.from_pretrained(str(toy_data / "tokenizer"))
    generator = FixedGenerator(torch.tensor([[7, 8, 5], [9, 5, 0], [10, 11, 12]]))
    student = tiny_llama(40, seed=0)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_llama(48, seed=1),
        args=tiny_config(tmp_path, max_steps=1, per_device_train_batch_size=3, lmbda=1.0, learning_rate=0.1),
        task=CausalLMTask(max_length=64, prompt_column="prompt"),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        generator=generator,
    )
    trainer.train()
    ((prompt_ids, _, _),) = generator.calls
    expected = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROMPTS
    ]
    got = sorted(ids[ids != tokenizer.pad_token_id].tolist() for ids in prompt_ids)
    assert got == sorted(tokenizer(text, add_special_tokens=False)["input_ids"] for text in expected)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert trainer.state.log_history[0]["completion_length"] == pytest.approx((3 + 2 + 3) / 3)


def test_prompt_only_rows_need_every_completion_generated(toy_data, tmp_path):
    with pytest.raises(
        ValueError, match=r"prompt_column='prompt' without completions .* set lmbda: 1 or seq_kd"
    ):
        DistillationTrainer(
            model=tiny_llama(40),
            teacher_model=tiny_llama(48, seed=1),
            args=tiny_config(tmp_path, lmbda=0.5),
            task=CausalLMTask(prompt_column="prompt"),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=AutoTokenizer.from_pretrained(str(toy_data / "tokenizer")),
        )


# ---- prompt_column: refused before anything loads --------------------------------------------------


@pytest.fixture
def prompt_run(toy_data, tmp_path):
    """A prompt/completion (and a prompt-only) copy of the toy chat data, and script arguments whose
    tokenizer and teacher cannot be loaded: an error raised by a check shows it ran before any processor
    or model."""
    splits = load_from_disk(str(toy_data))

    def as_prompts(split):
        return Dataset.from_dict(
            {
                "prompt": [m[0]["content"] for m in split["messages"]],
                "completion": [m[1]["content"] for m in split["messages"]],
                "messages": split["messages"],
            }
        )

    pairs = DatasetDict({name: as_prompts(split) for name, split in splits.items()})
    pairs.save_to_disk(str(tmp_path / "pairs"))
    pairs.remove_columns(["completion"]).save_to_disk(str(tmp_path / "prompts"))
    broken = tmp_path / "tokenizer"
    shutil.copytree(toy_data / "tokenizer", broken)
    (broken / "tokenizer.json").unlink()
    tiny_llama(48).config.save_pretrained(tmp_path / "teacher")  # a config without weights
    argv = ["--config", "recipes/causal_lm/tiny/on_policy.yaml", "--student_processor", str(broken)]
    argv += ["--teacher_model_name_or_path", str(tmp_path / "teacher"), "--prompt_column", "prompt"]
    return tmp_path, argv + ["--output_dir", str(tmp_path / "out")]


@pytest.mark.parametrize(
    "dataset, flags, message",
    [
        ("pairs", ["--prompt_column", "question"], r"has no column 'question' \(prompt_column\)"),
        (
            "pairs",
            ["--prompt_column", "messages"],
            r"prompt_column='messages': column 'messages' of split 'train' .* must hold plain-text strings",
        ),
        (
            "pairs",
            ["--completion_column", "messages"],
            r"completion_column='messages': column 'messages' .* must hold plain-text strings",
        ),
        ("prompts", ["--lmbda", "0.5"], r"prompt_column='prompt' without completions .*\(lmbda=0.5"),
    ],
)
def test_bad_prompt_columns_are_refused_before_anything_loads(prompt_run, dataset, flags, message):
    root, argv = prompt_run
    with pytest.raises(ValueError, match=message):
        run_distillation(*parse_args([*argv, "--dataset_name", str(root / dataset), *flags]))
    assert not (root / "out").exists()


# ---- log_completions ------------------------------------------------------------------------------


def direct_log_probs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion token | everything before it), one unpadded row through ``model``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("from_hidden", [False, True])
def test_logged_completions_hold_the_teachers_and_students_log_probs(toy, tmp_path, from_hidden):  # noqa: F811
    """Two steps, two completions logged per step: read back, each completion's teacher log-probs are a
    direct teacher forward on its prompt and completion; the student's (step 1: before any update) a
    direct forward of the initial student; the texts decode the ids."""
    _, _, tokenizer = toy
    fields = dict(log_completions=True, num_completions_to_log=2, logging_steps=1, lmbda=1.0)
    hidden = dict(student_logits_from_hidden_states=True, loss_chunk_size=5) if from_hidden else {}
    trainer = trainer_for(toy, tmp_path, **hidden, **fields)
    initial_student = copy.deepcopy(trainer.model)
    trainer.train()
    entries = [json.loads(line) for line in (tmp_path / FILE_NAME).read_text().splitlines()]
    assert [(e["step"], e["writer"]) for e in entries] == [(1, "student")] * 2 + [(2, "student")] * 2
    for entry in entries:
        prompt, completion = entry["prompt_ids"], entry["completion_ids"]
        assert 1 <= len(completion) <= trainer.args.max_new_tokens
        assert entry["completion"] == tokenizer.decode(completion)
        assert entry["prompt"] == tokenizer.decode(prompt)
        teacher = direct_log_probs(trainer.teacher_model, prompt, completion)
        torch.testing.assert_close(torch.tensor(entry["teacher_logprobs"]), teacher, rtol=1e-5, atol=1e-5)
        assert entry["teacher_nll"] == pytest.approx(-teacher.mean().item(), abs=1e-5)
    for entry in entries[:2]:
        student = direct_log_probs(initial_student, entry["prompt_ids"], entry["completion_ids"])
        torch.testing.assert_close(torch.tensor(entry["student_logprobs"]), student, rtol=1e-5, atol=1e-5)
    later = direct_log_probs(initial_student, entries[2]["prompt_ids"], entries[2]["completion_ids"])
    assert not torch.allclose(torch.tensor(entries[2]["student_logprobs"]), later)  # step 2: trained student


def test_a_resumed_run_logs_each_step_once_and_a_fresh_run_starts_a_new_file(toy, tmp_path):  # noqa: F811
    """Three steps with a checkpoint at step 1, then a run resumed from it: the steps after the checkpoint
    are logged again, and only once; a fresh run into the same folder forgets the earlier lines."""
    fields = dict(log_completions=True, num_completions_to_log=1, logging_steps=1, lmbda=1.0, max_steps=3)
    fields.update(save_strategy="steps", save_steps=1, save_total_limit=None)
    trainer_for(toy, tmp_path, **fields).train()
    first = (tmp_path / FILE_NAME).read_text().splitlines()
    assert [json.loads(line)["step"] for line in first] == [1, 2, 3]
    trainer_for(toy, tmp_path, **fields).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    again = (tmp_path / FILE_NAME).read_text().splitlines()
    assert [json.loads(line)["step"] for line in again] == [1, 2, 3]
    assert again[0] == first[0]
    trainer_for(toy, tmp_path, **{**fields, "max_steps": 1}).train()
    assert [json.loads(line)["step"] for line in (tmp_path / FILE_NAME).read_text().splitlines()] == [1]


def test_completions_are_not_logged_by_default(toy, tmp_path):  # noqa: F811
    trainer_for(toy, tmp_path, max_steps=1, lmbda=1.0).train()
    assert not (tmp_path / FILE_NAME).exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(log_completions=True),
            r"log_completions: true with lmbda=0 and seq_kd: false: nothing is sampled",
        ),
        (
            dict(lmbda=1.0, log_completions=True, num_completions_to_log=0),
            r"num_completions_to_log=0 must be ≥ 1",
        ),
    ],
)
def test_bad_log_completions_fields_are_refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, **fields)
