"""On-policy distillation on the inputs a new user brings: models whose embeddings are padded past the
tokenizer (or bigger than the other model's), checkpoints with their own generation settings, several
EOS ids, prompts near or past ``max_length``, conversations that do not end with the assistant's reply,
plain text, a teacher of another tokenizer, a temperature of 0, batches padded on the left, and an
evaluation set of prompts only. Each is either handled (the sampled rows are right) or refused before
training with what to change."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
from datasets import Dataset, load_from_disk
from test_on_policy import EOS, SETTINGS, FixedGenerator, tiny_llama, toy, trainer_for  # noqa: F401 (toy: a fixture)
from test_on_policy_features import prompt_run, toy_data  # noqa: F401 (fixtures)
from tiny import tiny_config

from hf_kd import DistillationConfig, DistillationTrainer, parse_args, run_distillation
from hf_kd.data.toy_chat import toy_byte_tokenizer, write_toy_chat
from hf_kd.generation import TransformersGenerator
from hf_kd.on_policy import on_policy_batches
from hf_kd.tasks import CausalLMTask


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The toy chat splits, unprocessed."""
    return load_from_disk(str(write_toy_chat(tmp_path_factory.mktemp("data") / "toy_chat", 24, 4)))


def sampled_ids(batch) -> torch.Tensor:
    return batch["input_ids"][batch["labels"] != -100]


@pytest.mark.parametrize("writer", ["student", "teacher"])
def test_only_ids_the_tokenizer_and_both_models_read_are_sampled(toy, tmp_path, writer):  # noqa: F811
    """The student's embedding has 40 rows, the teacher's 48, the tokenizer 31 tokens: the rows past 31
    decode to nothing, and a teacher (seq_kd) sampling an id past 40 crashed the student's forward."""
    task, train, tokenizer = toy
    fields = dict(lmbda=1.0) if writer == "student" else dict(lmbda=0.0, seq_kd=True)
    trainer = trainer_for(toy, tmp_path, max_new_tokens=12, **fields)
    batch = task.collate([train[i] for i in range(8)])
    (generated,), _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert generated["kd_generated_by"] == writer
    ids = sampled_ids(generated)
    assert len(ids) >= 16 and int(ids.max()) < len(tokenizer) == 31
    if writer == "teacher":
        trainer.train()  # the student reads every id the teacher wrote
        assert trainer.state.global_step == 2


def test_a_checkpoints_own_generation_settings_do_not_reshape_the_samples(toy):  # noqa: F811
    """A Hub checkpoint's generation_config (repetition penalty, no repeated n-grams, a minimum length,
    suppressed tokens) must not change what is sampled: the loss assumes the model's own distribution."""
    task, train, _ = toy
    batch = task.collate([train[i] for i in range(8)])
    prompts, mask = batch["input_ids"][:, :6], batch["attention_mask"][:, :6]
    settings = SETTINGS.__class__(**{**SETTINGS.__dict__, "max_new_tokens": 12})
    plain, styled = tiny_llama(40, seed=0).eval(), tiny_llama(40, seed=0).eval()
    own = styled.generation_config
    own.update(repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=12, suppress_tokens=[EOS, 7])
    expected = TransformersGenerator()(plain, prompts, mask, settings, seed=3)
    got = TransformersGenerator()(styled, prompts, mask, settings, seed=3)
    assert torch.equal(got, expected)
    assert (expected == EOS).any() or (expected == 7).any()  # what the saved settings would have suppressed
    assert styled.generation_config is own and own.repetition_penalty == 3.0  # left as it was


def test_every_eos_id_of_the_generation_config_ends_a_completion(toy, tmp_path):  # noqa: F811
    """Llama 3 / Qwen chat models stop on a list of ids (end of turn, end of text): the tokenizer's EOS
    is 5, the generation config's [5, 9]; a completion ending on 9 is masked after it."""
    task, train, tokenizer = toy
    student = tiny_llama(40)
    student.generation_config.eos_token_id = [EOS, 9]
    generator = FixedGenerator(torch.tensor([[7, 9, 8, 8], [7, 8, EOS, 8]]))
    batches = on_policy_batches(
        tiny_config(tmp_path, lmbda=1.0), task, student, tokenizer, generator=generator
    )
    assert batches.settings.eos_token_ids == (EOS, 9)
    generated = batches(task.collate([train[0], train[1]]), student=student, teacher=None, step=0, index=0)
    assert [row[row != -100].tolist() for row in generated["labels"]] == [[7, 9], [7, 8, EOS]]


def test_the_chat_templates_end_of_turn_ends_a_completion(toy, tmp_path):  # noqa: F811
    """A tokenizer whose EOS is not the template's end-of-turn (a base model's tokenizer with a ChatML
    template: EOS <|endoftext|>, turns end on <|im_end|>): the data's replies end on the end-of-turn, so
    a sampled reply stops there too (it ran on to max_new_tokens before)."""
    task, train, tokenizer = toy
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = "<|system|>"  # here id 2; the template's turns end on <|end|> (5)
    student = tiny.tiny_llama(40)  # its config's EOS is 2, as the tokenizer's
    batches = on_policy_batches(tiny_config(tmp_path, lmbda=1.0), task, student, tokenizer)
    assert batches.settings.eos_token_ids == (2, EOS)
    tokenizer.chat_template = None
    assert on_policy_batches(
        tiny_config(tmp_path, lmbda=1.0), task, student, tokenizer
    ).settings.eos_token_ids == (2,)


class RecordingGenerator:
    """Writes the longest completion it is allowed (no EOS), recording the allowance."""

    def __init__(self):
        self.allowed = []

    def __call__(self, model, prompt_ids, prompt_mask, settings, seed):
        self.allowed.append(settings.max_new_tokens)
        return torch.full((len(prompt_ids), settings.max_new_tokens), 7)


def test_generated_rows_are_no_longer_than_max_length(toy, raw, tmp_path):  # noqa: F811
    """max_new_tokens 64 with max_length 20: a generated row is capped as a data row is (no longer than
    max_length, hence never past a position table that holds max_length: checked when models load)."""
    _, _, tokenizer = toy
    short = CausalLMTask(max_length=20)
    rows = short.prepare(raw["train"], student_processor=tokenizer)
    generator = RecordingGenerator()
    trainer = DistillationTrainer(
        model=tiny_llama(40),
        teacher_model=tiny_llama(48, seed=1),
        args=tiny_config(tmp_path, max_steps=1, per_device_train_batch_size=8, lmbda=1.0, max_new_tokens=64),
        task=short,
        train_dataset=rows,
        processing_class=tokenizer,
        generator=generator,
    )
    batch = short.collate([rows[i] for i in range(8)])
    (generated,), _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    longest_prompt = int((batch["labels"] == -100).logical_and(batch["attention_mask"] == 1).sum(1).max())
    assert generator.allowed == [20 - longest_prompt]
    assert generated["input_ids"].shape[1] == 20 and int(generated["attention_mask"].sum(1).max()) == 20


def on_policy_trainer(tmp_path, tokenizer, rows, task=None, generator=None, teacher=None, **fields):
    """A trainer on ``rows`` (raw or prepared), fully on-policy unless ``fields`` say otherwise."""
    return DistillationTrainer(
        model=tiny_llama(40),
        teacher_model=teacher or tiny_llama(48, seed=1),
        args=tiny_config(
            tmp_path, **{"max_steps": 1, "per_device_train_batch_size": 2, "lmbda": 1.0, **fields}
        ),
        task=task or CausalLMTask(max_length=24),
        train_dataset=rows,
        processing_class=tokenizer,
        generator=generator,
    )


USER, REPLY = {"role": "user", "content": "reverse a b c"}, {"role": "assistant", "content": "c b a"}
LONG = {"role": "user", "content": "sort " + " ".join("abcdefgh" * 3)}


@pytest.mark.parametrize(
    "rows, message",
    [
        (  # the prompt is cut by max_length: the generation prompt is gone, no room is left
            {"messages": [[USER, REPLY], [LONG, REPLY]]},
            r"row 1 of the training set: its prompt is 24 tokens: cut at max_length=24, with no room left",
        ),
        (  # the user's last turn would be dropped and the first reply resampled
            {"messages": [[USER, REPLY], [USER, REPLY, USER]]},
            r"row 1 of the training set: it goes on for 6 tokens after its last labelled token .* not the "
            r"assistant's",
        ),
        (
            {"text": ["reverse a b = b a", "add 1 2 = 3"]},
            r"needs a prompt in every row.*\(row 0 of the training set\)",
        ),
    ],
)
def test_rows_on_policy_cannot_sample_for_are_refused_before_training(toy, tmp_path, rows, message):  # noqa: F811
    _, _, tokenizer = toy
    generator = FixedGenerator(torch.tensor([[7, EOS]] * 2))
    with pytest.raises(ValueError, match=message):
        on_policy_trainer(tmp_path, tokenizer, Dataset.from_dict(rows), generator=generator)
    assert not generator.calls


def test_a_conversation_without_a_reply_is_a_prompt_ending_with_the_generation_prompt(toy, tmp_path):  # noqa: F811
    """A user-only conversation is a prompt, as a prompt_column row without completion: the student's reply
    follows the assistant header, which the template adds (it wrote the header itself before)."""
    _, _, tokenizer = toy
    generator = FixedGenerator(torch.tensor([[7, EOS]] * 2))
    trainer = on_policy_trainer(
        tmp_path,
        tokenizer,
        Dataset.from_dict({"messages": [[USER], [{"role": "user", "content": "add 1 2"}]]}),
        generator=generator,
    )
    as_prompt = CausalLMTask(prompt_column="prompt").prepare(
        Dataset.from_dict({"prompt": [USER["content"]]}), student_processor=tokenizer
    )
    assert trainer.train_dataset[0]["input_ids"] == as_prompt[0]["input_ids"]
    assert tokenizer.decode(as_prompt[0]["input_ids"]).endswith("<|assistant|>")
    trainer.train()
    ((prompts, _, _),) = generator.calls
    assert all(row[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>") for row in prompts.tolist())
    off_policy = CausalLMTask().prepare(
        Dataset.from_dict({"messages": [[USER, REPLY]]}), student_processor=tokenizer
    )
    assert (
        tokenizer.decode(off_policy[0]["input_ids"])
        == "<|user|> reverse a b c <|end|> <|assistant|> c b a <|end|>"
    )


def test_a_teacher_of_another_tokenizer_is_refused_before_training(toy, raw, tmp_path):  # noqa: F811
    """Sampled tokens have no alignment to a teacher of another tokenizer (the script refused it; the
    Python API failed at the first sampled batch)."""
    _, _, tokenizer = toy
    task = CausalLMTask(max_length=64)
    other = toy_byte_tokenizer(raw["train"]["text"])
    rows = task.prepare(raw["train"], student_processor=tokenizer, teacher_processor=other)
    with pytest.raises(
        ValueError, match=r"tokenizer differs .* support lmbda=1.0 \(sampled tokens have no teacher"
    ):
        on_policy_trainer(tmp_path, tokenizer, rows, task=task, teacher=tiny_llama(300, seed=1))


def test_a_zero_generation_temperature_is_refused_with_greedy_named(tmp_path):
    with pytest.raises(ValueError, match=r"generation_temperature=0.0 must be > 0 .* greedy, set top_k: 1"):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, lmbda=1.0, generation_temperature=0.0)


def test_a_batch_padded_on_the_left_gives_the_same_prompts(toy, tmp_path):  # noqa: F811
    """A collator padding on the left (a tokenizer with padding_side='left'): the prompts are the attended
    tokens before the reply, never the padding (which was read as prompt tokens before)."""
    task, train, _ = toy
    generator = FixedGenerator(torch.tensor([[7, EOS]] * 4))
    trainer = trainer_for(toy, tmp_path, generator)
    right = task.collate([train[i] for i in range(4)])
    lengths = right["attention_mask"].sum(dim=1)
    shift = right["input_ids"].shape[1] - lengths  # each row rolled right by its padding
    left = {
        key: torch.stack([row.roll(int(n)) for row, n in zip(right[key], shift, strict=True)])
        for key in ("input_ids", "attention_mask", "labels")
    }
    assert not bool(left["attention_mask"][:, 0].all())  # some rows start with padding
    batches = [
        trainer.on_policy(b, student=trainer.model, teacher=None, step=0, index=0) for b in (right, left)
    ]
    (from_right, *_), (from_left, *_) = generator.calls
    assert torch.equal(from_left, from_right)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batches[1][key], batches[0][key])


def test_an_evaluation_set_of_prompts_only_is_refused(toy, tmp_path):  # noqa: F811
    """Evaluation scores the data's completions (it never samples): a prompt-only evaluation set read
    eval_loss 0 at every evaluation, as if the student were perfect."""
    _, _, tokenizer = toy
    prompts = Dataset.from_dict({"prompt": ["sort b a", "add 1 2"]})
    with pytest.raises(
        ValueError, match=r"eval_dataset; its columns: \['prompt'\]\): evaluation scores the data"
    ):
        DistillationTrainer(
            model=tiny_llama(40),
            teacher_model=tiny_llama(48, seed=1),
            args=tiny_config(tmp_path, lmbda=1.0, eval_strategy="steps", eval_steps=1),
            task=CausalLMTask(prompt_column="prompt"),
            train_dataset=prompts,
            eval_dataset=prompts,
            processing_class=tokenizer,
        )


def test_an_evaluation_split_of_prompts_only_is_refused_before_anything_loads(prompt_run):  # noqa: F811
    root, argv = prompt_run  # its tokenizer and teacher cannot be loaded: the check runs before them
    with pytest.raises(
        ValueError, match=r"in split 'test'; its columns: \['prompt', 'messages'\]\): evaluation"
    ):
        run_distillation(*parse_args([*argv, "--dataset_name", str(root / "prompts"), "--lmbda", "1.0"]))
    assert not (root / "out").exists()
