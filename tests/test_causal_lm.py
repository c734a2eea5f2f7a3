"""Causal-LM distillation: preprocessing and masks, per-token normalisation, vocabulary alignment, and a
tiny Llama teacher → student run from the offline recipes."""

import json
import logging
import math
import re

import pytest
import tiny
import torch
from datasets import Dataset, load_from_disk
from tiny import tiny_config
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CohereConfig,
    CohereForCausalLM,
    LlamaConfig,
)

from hf_kd import DistillationConfig, DistillationTrainer, parse_args, run_distillation
from hf_kd.data.toy_chat import toy_tokenizer, write_toy_chat
from hf_kd.losses import SparseLogits, distillation_loss
from hf_kd.tasks import CausalLMTask, TextClassificationTask
from hf_kd.vocab import first_difference, same_vocabulary, shared_vocab_size


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = write_toy_chat(tmp_path_factory.mktemp("data") / "toy_chat", num_train=96, num_test=16)
    return path, load_from_disk(str(path)), AutoTokenizer.from_pretrained(str(path / "tokenizer"))


def tiny_llama(vocab_size, seed=0, layers=1):
    return tiny.tiny_llama(vocab_size, seed, num_hidden_layers=layers, pad_token_id=0, use_cache=False).eval()


def one_step_config(output_dir, **fields) -> DistillationConfig:
    """One plain SGD step of the jsd-distillation on CPU (tests compare two ways of making that step)."""
    defaults = dict(
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        alpha=0.5,
        temperature=2.0,
        divergence="jsd",
        loss_chunk_size=5,
    )
    return tiny_config(output_dir, **{**defaults, **fields})


# ---- preprocessing --------------------------------------------------------------------------------


def test_completion_only_keeps_exactly_the_assistant_tokens(toy):
    _, data, tokenizer = toy
    rows = data["train"].select(range(8))
    prepared = CausalLMTask(max_length=64).prepare(rows, student_processor=tokenizer)
    for row, messages in zip(prepared, rows["messages"], strict=True):
        kept = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        assert [label for label in row["labels"] if label != -100] == kept
        assert tokenizer.decode(kept) == messages[1]["content"] + " <|end|>"
        assert (
            row["input_ids"]
            == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
                "input_ids"
            ]
        )
    everything = CausalLMTask(max_length=64, completion_only_loss=False).prepare(
        rows, student_processor=tokenizer
    )
    assert all(row["labels"] == row["input_ids"] for row in everything)


def test_template_that_is_not_prefix_stable_is_refused(toy):
    _, data, tokenizer = toy
    tokenizer = AutoTokenizer.from_pretrained(str(toy[0] / "tokenizer"))
    tokenizer.chat_template = (
        "{{ messages | length }} " + tokenizer.chat_template
    )  # the prefix changes with each turn
    with pytest.raises(ValueError, match="prefix by prefix"):
        CausalLMTask().prepare(data["train"].select(range(2)), student_processor=tokenizer)


def test_plain_text_gets_eos_and_is_truncated(toy):
    _, data, tokenizer = toy
    rows = data["train"].select(range(4)).remove_columns("messages")
    prepared = CausalLMTask(max_length=6).prepare(rows, student_processor=tokenizer)
    for row, text in zip(prepared, rows["text"], strict=True):
        full = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"] == full[:6] and row["labels"] == row["input_ids"]
    with pytest.raises(ValueError, match="'body'"):
        CausalLMTask(text_column="body", messages_column="chat").prepare(rows, student_processor=tokenizer)


def test_packed_rows_equal_separate_forwards(toy):
    """Packed examples see only themselves (position_ids restart → block-diagonal mask) and the first token
    of each example has no target; padded rows match unpadded forwards at the real positions."""
    _, data, tokenizer = toy
    rows = data["train"].select(range(6))
    separate = CausalLMTask(max_length=64).prepare(rows, student_processor=tokenizer)
    task = CausalLMTask(max_length=40, packing=True)
    packed = task.prepare(rows, student_processor=tokenizer)
    assert len(packed) < len(separate)
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(r["input_ids"]) for r in separate)
    model = tiny_llama(len(tokenizer), layers=2)
    batch = task.collate(list(packed))
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        examples = iter(separate)
        for r, row in enumerate(packed):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
            for start, end in zip(starts, starts[1:] + [len(row["input_ids"])], strict=True):
                example = next(examples)
                alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
                torch.testing.assert_close(packed_logits[r, start:end], alone, rtol=1e-4, atol=1e-5)
                assert (
                    batch["labels"][r, start] == -100
                    and row["labels"][start + 1 : end] == example["labels"][1:]
                )
        padded = CausalLMTask(max_length=64).collate([separate[0], separate[3]])
        short = min(len(separate[0]["input_ids"]), len(separate[3]["input_ids"]))
        index = 0 if len(separate[0]["input_ids"]) == short else 1
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        alone = model(input_ids=padded["input_ids"][index : index + 1, :short]).logits[0]
        torch.testing.assert_close(logits[index, :short], alone, rtol=1e-4, atol=1e-5)


def test_kd_items_shift_and_count(toy):
    _, data, tokenizer = toy
    task = CausalLMTask(max_length=64)
    batch = task.collate(list(task.prepare(data["train"].select(range(3)), student_processor=tokenizer)))
    B, T = batch["input_ids"].shape
    student, teacher = torch.randn(B, T, 40), torch.randn(B, T, 64)
    items = task.kd_items(student, teacher, batch["labels"])
    assert items.student_logits.shape == (B * T, 40) and items.teacher.shape == (B * T, 40)
    assert items.student_logits.data_ptr() == student.data_ptr()  # a view, not a copy
    torch.testing.assert_close(items.teacher.reshape(B, T, 40), teacher[..., :40])
    assert torch.equal(items.labels.reshape(B, T)[:, :-1], batch["labels"][:, 1:])
    assert torch.all(items.labels.reshape(B, T)[:, -1] == -100)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert task.count_items(batch).tolist() == [n, n] and int(items.soft_mask.sum()) == n


# ---- normalisation ---------------------------------------------------------------------------------


def test_per_token_normalisation_across_accumulation_and_padding(toy, tmp_path):
    """One step over 3 examples of different lengths: batch 3 (padded), or 3 micro-batches of 1 accumulated,
    gives the same update — the loss is a mean over the window's target tokens, not over micro-batches."""
    _, data, tokenizer = toy
    task = CausalLMTask(max_length=64)
    train = task.prepare(data["train"].select([0, 3, 7]), student_processor=tokenizer)
    assert len({sum(label != -100 for label in r["labels"]) for r in train}) > 1
    teacher = tiny_llama(48, seed=1)
    updated = []
    for batch_size, accumulation in ((3, 1), (1, 3)):
        student = tiny_llama(40, seed=0)
        args = one_step_config(
            tmp_path / f"run{batch_size}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, task=task, train_dataset=train
        )
        trainer.train()
        updated.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    initial = torch.cat([p.detach().flatten() for p in tiny_llama(40, seed=0).parameters()])
    assert not torch.allclose(updated[0], initial)
    torch.testing.assert_close(updated[0], updated[1], rtol=1e-4, atol=1e-6)


# ---- vocabulary -----------------------------------------------------------------------------------


def test_padded_vocabularies_are_sliced_to_the_shared_prefix(caplog):
    task = CausalLMTask()
    with caplog.at_level(logging.INFO, logger="hf_kd.vocab"):
        task.teacher_output_map(LlamaConfig(vocab_size=64), LlamaConfig(vocab_size=40), None)
    assert "shared first 40 token ids" in caplog.text
    assert shared_vocab_size(152064, 151936, 151665) == 151936
    with pytest.raises(ValueError, match="tokenizer has 41 tokens but the student scores only 40"):
        shared_vocab_size(64, 40, 41)
    # The loss on sliced logits is the loss of the teacher restricted (renormalised) to the shared ids.
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 64, generator=g)
    labels = torch.randint(0, 36, (2, 5), generator=g)
    items = task.kd_items(student, teacher, labels)
    got = distillation_loss(
        items.student_logits, items.teacher, items.labels, alpha=1.0, temperature=1.0
    ).loss
    p = torch.softmax(teacher[:, :-1, :40], -1)
    q = torch.softmax(student[:, :-1], -1)
    torch.testing.assert_close(got, (p * (p.log() - q.log())).sum(-1).mean())


def test_different_tokenizers_are_told_apart_with_the_first_differing_tokens(toy):
    _, _, tokenizer = toy
    other = toy_tokenizer(["zebra yak xylophone", "add 1 2 = 3"])
    assert not same_vocabulary(other, tokenizer)
    assert re.search(r"id \d+: teacher '[^']+' vs student '[^']+'", first_difference(other, tokenizer))
    same_ids = AutoTokenizer.from_pretrained(str(toy[0] / "tokenizer"))
    same_ids.add_special_tokens({"eos_token": "<|user|>"})  # another EOS choice: the ids mean the same tokens
    assert same_vocabulary(same_ids, tokenizer)


# ---- end to end -----------------------------------------------------------------------------------


def test_tiny_recipes_run_end_to_end(toy, tmp_path, caplog):
    path, _, tokenizer = toy
    data = ["--dataset_name", str(path), "--student_processor", str(path / "tokenizer")]
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    run_distillation(
        *parse_args(
            [
                "--config",
                "recipes/causal_lm/tiny/teacher.yaml",
                *data,
                "--output_dir",
                str(teacher_dir),
                "--max_steps",
                "6",
            ]
        )
    )
    student_args = [
        "--config",
        "recipes/causal_lm/tiny/student.yaml",
        *data,
        "--output_dir",
        str(student_dir),
    ]
    student_args += ["--teacher_model_name_or_path", str(teacher_dir), "--max_steps", "6"]
    with caplog.at_level(logging.INFO, logger="hf_kd.vocab"):
        result = run_distillation(*parse_args(student_args))
    assert "teacher vocab_size 64 and student vocab_size 40" in caplog.text
    metrics = result.metrics
    assert 0 < metrics["eval_loss_soft"] < math.inf
    assert metrics["eval_loss_hard"] < math.log(len(tokenizer))  # better than a uniform guess
    saved = AutoModelForCausalLM.from_pretrained(str(student_dir))
    assert saved.config.vocab_size == 40 and saved.config.use_cache

    # A teacher whose tokenizer differs is distilled across tokenizers, which refuses packing before the
    # teacher's weights are read (this one has none).
    impostor = tmp_path / "impostor"
    AutoModelForCausalLM.from_pretrained(str(teacher_dir)).config.save_pretrained(str(impostor))
    toy_tokenizer(["zebra yak", "add 1 2 = 3"]).save_pretrained(str(impostor))
    assert not any(impostor.glob("*.safetensors"))
    student_args[-3] = str(impostor)
    with pytest.raises(
        ValueError, match="packing: true is not supported with a teacher whose tokenizer differs"
    ):
        run_distillation(*parse_args(student_args + ["--output_dir", str(tmp_path / "never")]))
    assert json.loads((impostor / "config.json").read_text())["vocab_size"] == 64

    # Same tokenizer, but an output layer smaller than it: refused before the weights are read too.
    small = tmp_path / "small"
    config = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).config
    config.vocab_size = 30
    config.save_pretrained(str(small))
    tokenizer.save_pretrained(str(small))
    student_args[-3] = str(small)
    with pytest.raises(
        ValueError, match=f"the tokenizer has {len(tokenizer)} tokens but the teacher scores only 30"
    ):
        run_distillation(*parse_args(student_args + ["--output_dir", str(tmp_path / "never")]))


def test_unknown_column_and_chat_without_template(toy):
    _, data, tokenizer = toy
    no_template = AutoTokenizer.from_pretrained(str(toy[0] / "tokenizer"))
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        CausalLMTask().prepare(data["train"].select(range(2)), student_processor=no_template)
    with pytest.raises(ValueError, match="max_length=1"):
        CausalLMTask(max_length=1)
    assert (
        len(
            CausalLMTask(max_length=8).prepare(
                Dataset.from_dict({"text": ["a b"]}), student_processor=tokenizer
            )
        )
        == 1
    )


def test_cached_top_k_columns_are_padded_and_distilled(toy):
    """Per-token cached top-k rows (one entry per real token) are padded to the batch length with a valid
    distribution; the sparse teacher is shifted like the dense one, and padded positions change nothing."""
    _, data, tokenizer = toy
    k, vocab = 3, 40
    rows = data["train"].select(range(3))
    lengths = [
        len(r["input_ids"]) for r in CausalLMTask(max_length=64).prepare(rows, student_processor=tokenizer)
    ]
    g = torch.Generator().manual_seed(0)
    cached = {
        "kd_teacher_log_probs": [
            torch.log_softmax(torch.randn(n, k, generator=g), -1).tolist() for n in lengths
        ],
        "kd_teacher_indices": [torch.randint(0, vocab, (n, k), generator=g).tolist() for n in lengths],
        "kd_teacher_tail_log_mass": [[-1.0] * n for n in lengths],
    }
    task = CausalLMTask(max_length=64)
    prepared = task.prepare(
        rows.add_column("kd_teacher_log_probs", cached["kd_teacher_log_probs"])
        .add_column("kd_teacher_indices", cached["kd_teacher_indices"])
        .add_column("kd_teacher_tail_log_mass", cached["kd_teacher_tail_log_mass"]),
        student_processor=tokenizer,
    )
    batch = task.collate(list(prepared))
    T = batch["input_ids"].shape[1]
    assert batch["kd_teacher_log_probs"].shape == (3, T, k)
    short = lengths.index(min(lengths))
    assert torch.all(batch["kd_teacher_tail_log_mass"][short, lengths[short] :] == -math.inf)
    torch.testing.assert_close(
        batch["kd_teacher_log_probs"][short, lengths[short] :].exp().sum(-1), torch.ones(T - lengths[short])
    )
    teacher = SparseLogits(
        batch["kd_teacher_log_probs"], batch["kd_teacher_indices"], batch["kd_teacher_tail_log_mass"], vocab
    )
    student = torch.randn(3, T, vocab, generator=g, requires_grad=True)
    items = task.kd_items(student, teacher, batch["labels"])
    terms = distillation_loss(
        items.student_logits, items.teacher, items.labels, alpha=1.0, temperature=1.0, chunk_size=7
    )
    terms.loss.backward()
    assert torch.isfinite(terms.loss) and torch.all(student.grad[short, lengths[short] :] == 0)
    with pytest.raises(ValueError, match="packing"):
        CausalLMTask(packing=True).prepare(
            rows.add_column("kd_teacher_tail_log_mass", cached["kd_teacher_tail_log_mass"]),
            student_processor=tokenizer,
        )


# ---- student logits from hidden states ----------------------------------------------------------
# student_logits_from_hidden_states: the loss from the student's final hidden states and output layer
# (logits made chunk by chunk) equals the loss from its full logits, in value and gradients.
def hidden_states_config(tmp_path, from_hidden: bool, **fields) -> DistillationConfig:
    return one_step_config(
        tmp_path / f"run-{from_hidden}",
        **{"per_device_train_batch_size": 4, "student_logits_from_hidden_states": from_hidden, **fields},
    )


def prepared_rows(toy, rows):
    _, data, tokenizer = toy
    task = CausalLMTask(max_length=64)
    return task, task.prepare(data["train"].select(rows), student_processor=tokenizer)


@pytest.mark.parametrize(
    "student_vocab, teacher_vocab, tied", [(40, 48, False), (48, 40, False), (40, 48, True)]
)
def test_loss_and_every_gradient_equal_the_full_logits_path(
    toy, tmp_path, student_vocab, teacher_vocab, tied
):
    """Padded rows of different lengths; output layers padded to different sizes (sliced to 40 ids); an
    output layer tied to the input embeddings (SmolLM2, Llama 3.2)."""
    task, rows = prepared_rows(toy, [0, 3, 7, 11])
    batch = task.collate(list(rows))
    assert (batch["attention_mask"] == 0).any()
    teacher = tiny_llama(teacher_vocab, seed=1)
    results = []
    for from_hidden in (False, True, True):  # the second hidden-state call skips the first batch's check
        student = tiny_llama(student_vocab, seed=0, layers=2).train()
        if tied:
            student.lm_head.weight = student.model.embed_tokens.weight
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=hidden_states_config(tmp_path, from_hidden), task=task
        )
        trainer._output_layer_checked = len(results) == 2
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in student.named_parameters()}))
    (reference, grads), *hidden_runs = results
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for loss, hidden_grads in hidden_runs:
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
        assert hidden_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(hidden_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_training_step_and_evaluation_match(toy, tmp_path):
    """Through Trainer.train (accumulation of 2) and Trainer.evaluate: same update, same eval loss."""
    task, rows = prepared_rows(toy, range(8))
    teacher = tiny_llama(48, seed=1)
    runs = []
    for from_hidden in (False, True):
        student = tiny_llama(40, seed=0)
        args = hidden_states_config(
            tmp_path, from_hidden, per_device_train_batch_size=2, gradient_accumulation_steps=2
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, task=task, train_dataset=rows, eval_dataset=rows
        )
        trainer.train()
        metrics = trainer.evaluate()
        runs.append((torch.cat([p.detach().flatten() for p in student.parameters()]), metrics))
    (params, metrics), (hidden_params, hidden_metrics) = runs
    initial = torch.cat([p.detach().flatten() for p in tiny_llama(40, seed=0).parameters()])
    assert not torch.allclose(params, initial)
    torch.testing.assert_close(hidden_params, params, rtol=1e-5, atol=1e-6)
    for key in ("eval_loss", "eval_loss_hard", "eval_loss_soft"):
        assert hidden_metrics[key] == pytest.approx(metrics[key], rel=1e-5)


def test_bad_combinations_are_refused(toy, tmp_path):
    task, rows = prepared_rows(toy, range(4))
    with pytest.raises(ValueError, match="student_logits_from_hidden_states: true needs loss_chunk_size"):
        hidden_states_config(tmp_path, True, loss_chunk_size=None)
    with pytest.raises(ValueError, match="needs the causal-lm task, got 'text-classification'"):
        DistillationTrainer(
            model=tiny_llama(40),
            args=hidden_states_config(tmp_path, True, alpha=0.0),
            task=TextClassificationTask(),
        )
    with pytest.raises(ValueError, match="never makes the student's logits, which compute_metrics needs"):
        DistillationTrainer(
            model=tiny_llama(40),
            args=hidden_states_config(tmp_path, True, alpha=0.0),
            task=task,
            compute_metrics=lambda p: {},
        )
    # Cohere multiplies its logits by logit_scale after the output layer: caught on the first batch.
    torch.manual_seed(0)
    cohere = CohereForCausalLM(
        CohereConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            logit_scale=0.5,
            pad_token_id=0,
            use_cache=False,
        )
    )
    trainer = DistillationTrainer(
        model=cohere, args=hidden_states_config(tmp_path, True, alpha=0.0), task=task
    )
    with pytest.raises(ValueError, match="logits are not its last hidden state times its output layer"):
        trainer.compute_loss(cohere, task.collate(list(rows)))
