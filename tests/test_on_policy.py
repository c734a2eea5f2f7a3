"""On-policy distillation: sampled completions replace the data's before the loss (hf_kd.on_policy).

The loss on fixed sampled completions is the per-token formula on the completion tokens only (every
divergence, the chunked and hidden-state paths); everything after a completion's EOS is masked;
``lmbda: 0`` is today's off-policy run exactly; sampling is seeded, so a resumed run ends where the
uninterrupted one does."""

from __future__ import annotations

import pytest
import tiny
import torch
from datasets import load_from_disk
from formulas import divergence_by_hand
from test_resume import Interrupt
from tiny import tiny_config
from transformers import AutoTokenizer

from hf_kd import DistillationConfig, DistillationTrainer, parse_args, run_distillation
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.generation import SamplingSettings
from hf_kd.losses import DIVERGENCES
from hf_kd.on_policy import completion_batch, left_padded_prompts, prompt_lengths
from hf_kd.tasks import CausalLMTask

EOS, PAD = 5, 0
SETTINGS = SamplingSettings(
    max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, eos_token_ids=(EOS,), pad_token_id=PAD
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = write_toy_chat(tmp_path_factory.mktemp("data") / "toy_chat", num_train=24, num_test=4)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    task = CausalLMTask(max_length=64)
    return task, task.prepare(load_from_disk(str(path))["train"], student_processor=tokenizer), tokenizer


def tiny_llama(vocab_size, seed=0):
    return tiny.tiny_llama(vocab_size, seed, pad_token_id=PAD, eos_token_id=EOS)


class FixedGenerator:
    """Returns the given completions (a test's "sampled" tokens), recording every call."""

    def __init__(self, completions: torch.Tensor | None = None, table: dict | None = None):
        self.completions, self.table, self.calls = completions, table, []

    def __call__(self, model, prompt_ids, prompt_mask, settings, seed):
        self.calls.append((prompt_ids.clone(), seed, model.training))
        if self.table is None:
            return self.completions[: len(prompt_ids)]
        rows = [
            self.table[tuple(ids[mask.bool()].tolist())]
            for ids, mask in zip(prompt_ids, prompt_mask, strict=True)
        ]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def trainer_for(toy, tmp_path, generator=None, **fields) -> DistillationTrainer:
    task, train, tokenizer = toy
    defaults = dict(
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        alpha=0.5,
        temperature=2.0,
        beta=0.3,
        skew=0.2,
        lmbda=1.0,
        max_new_tokens=SETTINGS.max_new_tokens,
    )
    return DistillationTrainer(
        model=tiny_llama(40, seed=0),
        teacher_model=tiny_llama(48, seed=1),
        args=tiny_config(tmp_path, **{**defaults, **fields}),
        task=task,
        train_dataset=train,
        processing_class=tokenizer,
        generator=generator,
    )


# ---- the batch ----------------------------------------------------------------------------------


def test_prompt_is_the_conversation_before_its_last_reply():
    labels = torch.tensor(
        [[-100, -100, 7, 5, -100, -100, 8, 9, 5], [-100, 3, 4, 5, -100, -100, -100, -100, -100]]
    )
    assert prompt_lengths(labels).tolist() == [6, 1]
    ids, mask = left_padded_prompts(torch.arange(18).reshape(2, 9), prompt_lengths(labels), PAD)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5], [PAD] * 5 + [9]]
    assert mask.tolist() == [[1] * 6, [0] * 5 + [1]]
    with pytest.raises(ValueError, match="needs a prompt in every row"):
        prompt_lengths(torch.tensor([[3, 4, 5], [-100, 4, 5]]))  # plain text: labels from the first token


def test_completions_are_masked_after_their_first_eos():
    prompt_ids = torch.tensor([[PAD, 11, 12], [13, 14, 15]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completions = torch.tensor([[21, EOS, 22, EOS], [23, 24, 25, 26]])  # row 1 never stops
    batch = completion_batch(prompt_ids, prompt_mask, completions, SETTINGS)
    assert batch["input_ids"].tolist() == [[11, 12, 21, EOS, PAD, PAD, PAD], [13, 14, 15, 23, 24, 25, 26]]
    assert batch["labels"].tolist() == [
        [-100, -100, 21, EOS, -100, -100, -100],
        [-100, -100, -100, 23, 24, 25, 26],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]


# ---- the loss -----------------------------------------------------------------------------------


def loss_by_hand(trainer, prompts, completions, name) -> torch.Tensor:
    """(1 − α) · mean CE + α · τ² · mean D over the completion tokens (through the first EOS) of each
    prompt + completion, every row run alone and unpadded: no batch, padding or mask logic involved."""
    args, ce, soft = trainer.args, [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        kept = (
            completion.tolist()[: completion.tolist().index(EOS) + 1]
            if EOS in completion
            else completion.tolist()
        )
        ids = torch.tensor([prompt + kept])
        with torch.no_grad():
            z = trainer.model(input_ids=ids).logits[0, len(prompt) - 1 : -1, :40]
            v = trainer.teacher_model(input_ids=ids).logits[0, len(prompt) - 1 : -1, :40]
        targets = torch.tensor(kept)
        ce.append(torch.nn.functional.cross_entropy(z, targets, reduction="none"))
        soft.append(divergence_by_hand(name, z, v, args.temperature, beta=args.beta, skew=args.skew))
    ce, soft = torch.cat(ce), torch.cat(soft)
    return (1 - args.alpha) * ce.mean() + args.alpha * args.temperature**2 * soft.mean()


@pytest.mark.parametrize(
    "name, chunked",
    [(name, None) for name in DIVERGENCES] + [("jsd", "chunks"), ("reverse_kl", "hidden"), ("tvd", "hidden")],
)
def test_loss_on_sampled_completions_is_the_formula(toy, tmp_path, name, chunked):
    completions = torch.tensor(
        [[7, 8, EOS, 9, 9, 9], [10, 11, 12, 13, 14, 15], [EOS, 7, 7, 7, 7, 7], [16, EOS, EOS, 3, 4, 5]]
    )
    fields = {"divergence": name}
    if chunked:
        fields["loss_chunk_size"] = 3
        fields["student_logits_from_hidden_states"] = chunked == "hidden"
    generator = FixedGenerator(completions)
    trainer = trainer_for(toy, tmp_path, generator, **fields)
    data = [trainer.train_dataset[i] for i in range(4)]
    trainer.model.train()  # as in training
    batches, counts = trainer.get_batch_samples(iter([trainer.task.collate(data)]), 1, torch.device("cpu"))
    ((_, seed, was_training),) = generator.calls
    assert not was_training  # the generator gets the model in eval mode ...
    assert trainer.model.training  # ... and the trainer has it back in train mode
    assert counts.tolist() == [3 + 6 + 1 + 2] * 2  # the completion tokens through EOS, nothing else
    loss = trainer.compute_loss(trainer.model, batches[0], num_items_in_batch=counts)
    prompts = [row["input_ids"][: prompt_lengths(torch.tensor([row["labels"]]))[0]] for row in data]
    torch.testing.assert_close(loss, loss_by_hand(trainer, prompts, completions, name), rtol=1e-5, atol=1e-6)


# ---- runs ---------------------------------------------------------------------------------------


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_lmbda_zero_is_todays_off_policy_run(toy, tmp_path):
    never = FixedGenerator(torch.zeros(4, 1, dtype=torch.long))
    today = trainer_for(toy, tmp_path / "a", lmbda=0.0, max_new_tokens=128)
    fields = dict(lmbda=0.0, top_k=3, top_p=0.5, generation_temperature=0.7)
    with_fields = trainer_for(toy, tmp_path / "b", never, **fields)
    today.train(), with_fields.train()
    assert not never.calls
    torch.testing.assert_close(weights(with_fields.model), weights(today.model), rtol=0, atol=0)


def test_student_writing_the_data_replies_equals_off_policy(toy, tmp_path):
    """lmbda: 1 with a generator that writes exactly the data's replies takes the off-policy steps: the
    on-policy batch, its counts and its loss are the data's."""
    _, train, _ = toy
    table = {}
    for row in train:
        start = int(prompt_lengths(torch.tensor([row["labels"]]))[0])
        table[tuple(row["input_ids"][:start])] = row["input_ids"][start:]
    replay = FixedGenerator(table=table)
    on_policy = trainer_for(toy, tmp_path / "on", replay, divergence="jsd", lmbda=1.0)
    off_policy = trainer_for(toy, tmp_path / "off", divergence="jsd", lmbda=0.0)
    on_policy.train(), off_policy.train()
    assert len(replay.calls) == 2
    assert not torch.equal(weights(off_policy.model), weights(tiny_llama(40, seed=0)))
    torch.testing.assert_close(weights(on_policy.model), weights(off_policy.model), rtol=1e-5, atol=1e-7)
    logged = [entry for entry in on_policy.state.log_history if "loss_soft_generated" in entry]
    assert logged and "loss_soft_data" not in logged[0]


def test_resume_continues_to_the_same_weights(toy, tmp_path):
    fields = dict(max_steps=4, save_steps=2, save_strategy="steps", lmbda=0.5, logging_steps=2)
    straight = trainer_for(toy, tmp_path / "straight", **fields)
    straight.train()
    interrupted = trainer_for(toy, tmp_path / "resumed", **fields)
    interrupted.add_callback(Interrupt(3))
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = trainer_for(toy, tmp_path / "resumed", **fields)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    torch.testing.assert_close(weights(resumed.model), weights(straight.model), rtol=0, atol=0)
    logs = [entry for entry in straight.state.log_history if "completion_length" in entry]
    assert logs and all(1 <= entry["completion_length"] <= SETTINGS.max_new_tokens for entry in logs)
    writers = [straight.on_policy.writer(step, 0) for step in range(4)]
    assert "student" in writers and None in writers  # lmbda 0.5 mixed both kinds of step here


def test_generation_is_seeded(toy, tmp_path):
    trainer = trainer_for(toy, tmp_path)
    batch = trainer.task.collate([trainer.train_dataset[i] for i in range(4)])
    args = dict(student=trainer.model, teacher=trainer.teacher_model, index=0)
    first, again, other = (trainer.on_policy(batch, step=step, **args) for step in (0, 0, 1))
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"], other["input_ids"])
    rng_state = torch.random.get_rng_state()
    trainer.on_policy(batch, step=2, **args)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global stream is untouched


def test_seq_kd_has_the_teacher_write(toy, tmp_path):
    generator = FixedGenerator(torch.full((4, 2), EOS))
    trainer = trainer_for(toy, tmp_path, generator, lmbda=0.0, seq_kd=True, alpha=0.0)
    batch = trainer.task.collate([trainer.train_dataset[i] for i in range(4)])
    trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert len(generator.calls) == 1
    assert trainer.on_policy.writer(0, 0) == "teacher"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(lmbda=1.5), r"lmbda=1.5 is out of range"),
        (dict(lmbda=0.5, alpha=0.0), r"lmbda=0.5 with alpha=0.0 .* only the teacher's soft term"),
        (dict(top_p=0.0), r"top_p=0.0 is out of range"),
        (dict(max_new_tokens=0), r"max_new_tokens=0 must be a positive"),
        (dict(generation_temperature=0.0), r"generation_temperature=0.0 must be > 0"),
        (dict(top_k=-1), r"top_k=-1 must be ≥ 0"),
        (
            dict(lmbda=1.0, teacher_source="cached", teacher_cache="somewhere"),
            r"a cached teacher cannot score",
        ),
        (dict(seq_kd=True, teacher_source="cached", teacher_cache="x"), r"a cached teacher cannot"),
    ],
)
def test_bad_on_policy_fields_are_refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, **fields)


def test_packed_rows_are_refused(toy, tmp_path):
    _, train, tokenizer = toy
    with pytest.raises(ValueError, match="causal-lm without packing"):
        DistillationTrainer(
            model=tiny_llama(40),
            teacher_model=tiny_llama(48, seed=1),
            args=tiny_config(tmp_path, lmbda=1.0),
            task=CausalLMTask(max_length=64, packing=True),
            train_dataset=train,
            processing_class=tokenizer,
        )


def test_tiny_on_policy_recipe_runs_from_the_script(tmp_path):
    """scripts/distill.py with the on-policy recipe: the teacher scores the student's samples, the
    on-policy logs are written, the student is saved."""
    data = write_toy_chat(tmp_path / "toy_chat", num_train=32, num_test=8)
    teacher_dir = tmp_path / "teacher"
    tiny_llama(48, seed=1).save_pretrained(teacher_dir)
    AutoTokenizer.from_pretrained(str(data / "tokenizer")).save_pretrained(teacher_dir)
    argv = ["--config", "recipes/causal_lm/tiny/on_policy.yaml", "--dataset_name", str(data)]
    argv += ["--student_processor", str(data / "tokenizer"), "--teacher_model_name_or_path", str(teacher_dir)]
    argv += ["--output_dir", str(tmp_path / "student"), "--max_steps", "2", "--logging_steps", "1"]
    argv += ["--lmbda", "1.0"]
    result = run_distillation(*parse_args(argv))
    logged = [entry for entry in result.trainer.state.log_history if "loss_soft_generated" in entry]
    assert len(logged) == 2 and all(entry["loss_soft_generated"] > 0 for entry in logged)
    assert all(1 <= entry["completion_length"] <= 12 for entry in logged)
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_sampled_batch_is_what_the_student_wrote_under_the_training_forward(toy, tmp_path):
    """The real sampler (left-padded, KV cache) at a near-zero temperature writes the student's argmax
    over the tokenizer's ids:
    the right-padded training batch built from it must then have, at every labelled position, the token
    the student's training forward ranks first (a shifted label, a wrong position id or attention mask,
    or left padding leaking into the batch breaks this); the student is back in train mode."""
    task, train, _ = toy
    trainer = trainer_for(toy, tmp_path, generation_temperature=1e-4)
    data = task.collate([train[i] for i in range(8)])
    assert len(set(prompt_lengths(data["labels"]).tolist())) > 1  # rows of the batch are left-padded
    student = trainer.model
    student.train()
    batch = trainer.on_policy(dict(data), student=student, teacher=trainer.teacher_model, step=0, index=0)
    assert student.training and batch.pop("kd_generated_by") == "student"
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labelled = batch["labels"][:, 1:] != -100
    assert int(labelled.sum()) >= 8
    predicted = logits[:, :-1, : trainer.on_policy.settings.vocab_size].argmax(-1)  # the tokenizer's ids
    assert torch.equal(predicted[labelled], batch["labels"][:, 1:][labelled])
