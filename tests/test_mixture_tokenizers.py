"""Several teachers of different tokenizers (teacher_source: mixture): a member of another tokenizer than
the student's gets its own columns and is distilled across tokenizers; the soft term is the weighted sum
of each teacher's own (real numbers against each teacher alone); for the forward KL at τ = 1 the sum has
the gradient of the probability-space mixture; a whole run trains and names both teachers; what a
teacher of another tokenizer does not support is refused naming the member."""

from __future__ import annotations

import copy
import dataclasses
import random
from types import SimpleNamespace

import pytest
import tiny
import torch
from datasets import Dataset, DatasetDict
from test_cross_tokenizer import byte_level_bpe, unigram
from tiny import save_model, tiny_config

from hf_kd import DataArguments, ModelArguments, run_distillation
from hf_kd.cards.markdown import format_value
from hf_kd.data.toy_chat import toy_conversation, toy_tokenizer
from hf_kd.losses import AlignedLogits, WeightedTeachers, distillation_loss
from hf_kd.predictions import teacher_agreements
from hf_kd.tasks import CausalLMTask
from hf_kd.teachers import mixture as mixture_module
from hf_kd.teachers.mixture import MixtureTeacher
from hf_kd.teachers.online import cross_tokenizer_teacher
from hf_kd.teachers.signal import build_teacher_signal, open_teacher_source

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Toy-corpus texts; the student's word-level tokenizer; three tiny Llama teachers: ``s`` with the
    student's tokenizer, ``b`` with a byte-level BPE (pad id 2), ``u`` with a SentencePiece-style unigram
    (pad id 0)."""
    root = tmp_path_factory.mktemp("mixtok")
    rng = random.Random(0)
    texts = [f"{c[0]['content']} = {c[1]['content']}" for c in (toy_conversation(rng) for _ in range(40))]
    data = DatasetDict(
        train=Dataset.from_dict({"text": texts[:32], "domain": ["s", "b"] * 16}),
        test=Dataset.from_dict({"text": texts[32:], "domain": ["s", "b"] * 4}),
    )
    data.save_to_disk(str(root / "data"))
    student = toy_tokenizer(texts + ["a b c d e f g h"])
    student.save_pretrained(root / "student_tokenizer")
    tokenizers = {
        "s": student,
        "b": byte_level_bpe(texts, vocab_size=268),
        "u": unigram(texts, vocab_size=70),
    }
    models = {}
    for seed, (name, tokenizer) in enumerate(tokenizers.items(), start=1):
        models[name] = tiny.tiny_llama(len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id).eval()
        with torch.no_grad():
            models[name].lm_head.weight.mul_(20.0)  # confident teachers
        save_model(models[name], tokenizer, root / name)
    return root, student, tokenizers, models, data


def member(root, name, weight=1):
    return {"name": name, "source": "online", "model": str(root / name), "weight": weight}


def mixture_batch(setup, tmp_path, teachers, **fields):
    """The mixture's signal, its task and a batch of every training row, prepared after the signal."""
    root, student, _, _, data = setup
    config = tiny_config(tmp_path, teacher_source="mixture", teachers=teachers, alpha=1.0, **fields)
    task = CausalLMTask(max_length=MAX_LENGTH)
    task.use_processor(student)
    opened, splits = open_teacher_source(config, task, data, ["train"])
    signal = build_teacher_signal(
        config, task, tiny.tiny_llama(len(student)), resource=opened, student_processor=student
    )
    rows = task.prepare(splits["train"], student_processor=student)
    return signal, task, signal.collator(task.collate)([rows[i] for i in range(len(rows))])


def alone_batch(setup, name, split="train"):
    """A single teacher ``name`` alone (as a run with ``teacher_model_name_or_path`` has it): its signal, task
    and the batch of the same rows."""
    _, student, tokenizers, models, data = setup
    task = CausalLMTask(max_length=MAX_LENGTH)
    task.use_processor(student)
    task.use_teacher_tokenizer(tokenizers[name])
    rows = task.prepare(data[split], student_processor=student)
    batch = task.collate([rows[i] for i in range(len(rows))])
    if task.vocabulary is None:  # the student's tokenizer: its plain logits
        return (
            (lambda b: models[name](input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits),
            task,
            batch,
        )
    config = tiny_config(setup[0] / "unused", alpha=1.0)  # the part weights' defaults, as the mixture's
    return cross_tokenizer_teacher(config, models[name], task.vocabulary), task, batch


SETTINGS = dict(alpha=0.5, temperature=2.0, divergence_name="forward_kl")


def loss_and_grad(task, batch, teacher_output, z, **settings):
    """The loss terms and the gradient wrt the student's logits ``z`` [B, T, V] of one batch."""
    z = z.detach().requires_grad_(True)
    items = task.kd_items(z, teacher_output, batch["labels"])
    terms = distillation_loss(
        items.student_logits,
        items.teacher,
        items.labels,
        **({"soft_mask": items.soft_mask} | SETTINGS | settings),
    )
    (grad,) = torch.autograd.grad(terms.loss, z)
    return terms, grad


def student_logits(batch, vocab, seed=0):
    return torch.randn(*batch["input_ids"].shape, vocab, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_one_member_of_another_tokenizer_is_that_teacher_alone(setup, tmp_path, chunk_size):
    root, student, tokenizers, _, _ = setup
    signal, task, batch = mixture_batch(setup, tmp_path, [member(root, "b")])
    alone, alone_task, alone_batch_ = alone_batch(setup, "b")
    assert isinstance(signal, MixtureTeacher) and signal.returns == ("several",)
    for column in ("teacher_input_ids", "teacher_attention_mask", "kd_alignment_teacher_position"):
        assert torch.equal(batch["kd_member0_" + column], alone_batch_[column])  # the same columns, prefixed
    assert "teacher_input_ids" not in batch
    output = signal(batch)
    assert isinstance(output, WeightedTeachers) and output.weights == [1.0] and output.names == ["b"]
    assert isinstance(output.outputs[0], AlignedLogits)
    z = student_logits(batch, len(student))
    mixed, mixed_grad = loss_and_grad(task, batch, output, z, chunk_size=chunk_size)
    single, single_grad = loss_and_grad(
        alone_task, alone_batch_, alone(alone_batch_), z, chunk_size=chunk_size
    )
    assert single.soft_sum > 0 and single.parts["soft_matched"][1] > 0
    torch.testing.assert_close(mixed.loss, single.loss)
    torch.testing.assert_close(mixed_grad, single_grad)
    assert mixed_grad.abs().sum() > 0
    torch.testing.assert_close(mixed.parts["soft_teacher_b"][0], single.soft_sum)
    torch.testing.assert_close(mixed.parts["soft_teacher_b_matched"][0], single.parts["soft_matched"][0])
    torch.testing.assert_close(mixed.parts["soft_teacher_b_unmatched"][0], single.parts["soft_unmatched"][0])


@pytest.mark.parametrize("names", [("s", "b"), ("b", "u")])
@pytest.mark.parametrize("divergence_name", ["forward_kl", "reverse_kl"])
def test_members_of_different_tokenizers_sum_each_ones_soft_term(setup, tmp_path, names, divergence_name):
    """Weights 1 and 3: the soft sum is ¼ S_first + ¾ S_second, S_i that teacher's soft sum alone, and the
    gradient wrt the student's logits is the same mix of theirs (α = 1: the soft term only)."""
    root, student, tokenizers, _, _ = setup
    first, second = names
    signal, task, batch = mixture_batch(setup, tmp_path, [member(root, first, 1), member(root, second, 3)])
    assert [bool(p) for p in signal.prefixes] == [first != "s", True]
    pads = {
        prefix: tokenizers[n].pad_token_id for prefix, n in zip(signal.prefixes, names, strict=True) if prefix
    }
    for prefix, pad in pads.items():  # each member's inputs padded with its own pad id
        ids, mask = batch[prefix + "teacher_input_ids"], batch[prefix + "teacher_attention_mask"]
        assert (mask == 0).any() and bool((ids[mask == 0] == pad).all())
    output = signal(batch)
    assert output.names == list(names) and output.weights == [0.25, 0.75]
    z = student_logits(batch, len(student), seed=1)
    settings = dict(alpha=1.0, divergence_name=divergence_name, chunk_size=11)
    mixed, mixed_grad = loss_and_grad(task, batch, output, z, **settings)
    expected_soft, expected_grad = 0.0, torch.zeros_like(z)
    for name, weight in zip(names, (0.25, 0.75), strict=True):
        alone, alone_task, own_batch = alone_batch(setup, name)
        terms, grad = loss_and_grad(alone_task, own_batch, alone(own_batch), z, **settings)
        assert terms.soft_sum > 0
        torch.testing.assert_close(
            mixed.parts[f"soft_teacher_{name}"][0], terms.soft_sum, rtol=1e-5, atol=1e-5
        )
        expected_soft, expected_grad = expected_soft + weight * terms.soft_sum, expected_grad + weight * grad
    torch.testing.assert_close(mixed.soft_sum, expected_soft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed_grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence_name, same", [("forward_kl", True), ("reverse_kl", False)])
def test_with_one_vocabulary_the_sum_has_the_mixtures_gradient_for_the_forward_kl_only(divergence_name, same):
    """Σ w_i KL(p_i ‖ q) = KL(p̄ ‖ q) + a constant of the teachers (τ = 1): the same gradient wrt the
    student's logits; for the reverse KL the two differ."""
    g = torch.Generator().manual_seed(0)
    z, a, b = (3 * torch.randn(12, 9, generator=g) for _ in range(3))
    labels = torch.zeros(12, dtype=torch.long)
    mixed = torch.log(0.25 * a.softmax(-1) + 0.75 * b.softmax(-1))
    settings = dict(alpha=1.0, temperature=1.0, divergence_name=divergence_name)

    def grad(teacher):
        x = z.clone().requires_grad_(True)
        return torch.autograd.grad(distillation_loss(x, teacher, labels, **settings).loss, x)[0]

    summed, of_mixture = grad(WeightedTeachers([a, b], [0.25, 0.75], ["a", "b"])), grad(mixed)
    assert torch.allclose(summed, of_mixture, atol=1e-6) == same
    assert summed.abs().sum() > 0


def test_routing_across_tokenizers_gives_each_row_its_own_teachers_soft_term(setup, tmp_path):
    """Rows routed alternately to s (the student's tokenizer) and b (another): the soft sum and the gradient
    are S_s over s's rows plus S_b over b's rows, each teacher alone restricted to its rows."""
    root, student, *_ = setup
    teachers = [member(root, "s"), member(root, "b", 3)]  # weights do not apply to routed rows
    signal, task, batch = mixture_batch(setup, tmp_path, teachers, teacher_routing_column="domain")
    output = signal(batch)
    assert output.weights == [1.0, 1.0]
    routed_to_s = torch.tensor(
        [i % 2 == 0 for i in range(batch["input_ids"].shape[0])]
    )  # domains s, b, s, ...
    assert torch.equal(output.rows[0], routed_to_s) and torch.equal(output.rows[1], ~routed_to_s)
    z = student_logits(batch, len(student), seed=2)
    settings = dict(alpha=1.0, chunk_size=9)
    mixed, mixed_grad = loss_and_grad(task, batch, output, z, **settings)
    expected_soft, expected_grad = 0.0, torch.zeros_like(z)
    for name, rows in (("s", routed_to_s), ("b", ~routed_to_s)):
        alone, alone_task, own_batch = alone_batch(setup, name)
        items = alone_task.kd_items(z, alone(own_batch), own_batch["labels"])
        mask = items.soft_mask & rows[:, None].expand(own_batch["labels"].shape).reshape(-1)
        terms, grad = loss_and_grad(
            alone_task,
            own_batch,
            alone(own_batch),
            z,
            soft_mask=mask,
            num_soft=items.soft_mask.sum(),
            **settings,
        )
        assert 0 < mask.sum() < items.soft_mask.sum() and terms.soft_sum > 0
        torch.testing.assert_close(mixed.parts[f"soft_teacher_{name}"], (terms.soft_sum, mask.sum()))
        expected_soft, expected_grad = expected_soft + terms.soft_sum, expected_grad + grad
    torch.testing.assert_close(mixed.soft_sum, expected_soft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed_grad, expected_grad, rtol=1e-5, atol=1e-7)


def run_arguments(root):
    """The data and model arguments of a tiny causal-LM run on ``setup``'s data, from a fresh student."""
    data_args = DataArguments(task="causal-lm", dataset_name=str(root / "data"), max_length=MAX_LENGTH)
    model_args = ModelArguments(
        student_processor=str(root / "student_tokenizer"),
        student_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                        "max_position_embeddings": 64},
    )  # fmt: skip
    return data_args, model_args


def test_a_run_trains_from_teachers_of_different_tokenizers(setup, tmp_path):
    root, *_ = setup
    data_args, model_args = run_arguments(root)
    config = tiny_config(
        tmp_path / "run", teacher_source="mixture", teachers=[member(root, "s"), member(root, "b", 3)],
        alpha=1.0, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
        eval_strategy="no", loss_chunk_size=32,
    )  # fmt: skip
    result = run_distillation(data_args, model_args, config)
    history = [h for h in result.trainer.state.log_history if "loss_soft" in h]
    assert len(history) == 6
    for entry in history:  # each teacher's part, and the loss the weighted sum of them
        parts = entry["loss_soft_teacher_s"], entry["loss_soft_teacher_b"]
        assert min(parts) > 0 and entry["loss_soft_teacher_b_matched"] > 0
        assert entry["loss_soft"] == pytest.approx(0.25 * parts[0] + 0.75 * parts[1], rel=1e-4)
    assert history[-1]["loss_soft"] < history[0]["loss_soft"]
    assert result.metrics["eval_loss_soft_teacher_b"] > 0  # the evaluation reports each teacher's part too
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"s (online {root / 's'}, weight 1), b (online {root / 'b'}, weight 3)" in card
    for name in ("s", "b"):  # what each teacher contributed: the student's divergence from it, evaluated
        value = result.metrics[f"eval_loss_soft_teacher_{name}"]
        assert f"| loss_soft_teacher_{name} | — | {format_value(value)} |" in card


def direct_agreement(setup, student_model, name, teacher, max_items=None):
    """The student's agreement with ``teacher`` (of ``name``'s tokenizer) on the evaluation rows, computed here from the two
    models' logits: at every scored position (the student's tokenizer), or at the matched span starts
    (another tokenizer: the student's top-1 mapped to the teacher's id, KL on the shared tokens)."""
    _, task, batch = alone_batch(setup, name, "test")
    with torch.no_grad():
        z = student_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if task.vocabulary is None:
            v = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        else:
            v = teacher(
                input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
            ).logits
    targets = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
    z, targets = z.reshape(-1, z.shape[-1]), targets.reshape(-1)
    if task.vocabulary is None:
        keep = torch.nonzero(targets >= 0).squeeze(-1)[:max_items]
        z, v, targets = z[keep], v.reshape(-1, v.shape[-1])[keep], targets[keep]
        top = v.argmax(-1)
        agree, right = z.argmax(-1) == top, top == targets
    else:
        position, matched = batch["kd_alignment_teacher_position"], batch["kd_alignment_matched"].bool()
        length = v.shape[1]
        teacher_row = torch.where(
            position >= 0, position + torch.arange(len(position))[:, None] * length, -1
        ).reshape(-1)
        keep = torch.nonzero(matched.reshape(-1) & (teacher_row >= 0) & (targets >= 0)).squeeze(-1)[
            :max_items
        ]
        student_ids, teacher_ids = task.vocabulary.tensors
        to_teacher = dict(zip(student_ids.tolist(), teacher_ids.tolist(), strict=True))
        z, targets = z[keep], targets[keep]
        v = v.reshape(-1, v.shape[-1])[teacher_row[keep]]
        top = v.argmax(-1)
        agree = torch.tensor([to_teacher.get(i, -1) for i in z.argmax(-1).tolist()]) == top
        right = torch.tensor([to_teacher.get(i, -1) for i in targets.tolist()]) == top
        z, v = z[:, student_ids], v[:, teacher_ids]  # the shared tokens, in the same order
    kl = torch.nn.functional.kl_div(
        z.log_softmax(-1), v.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert len(z) >= 10
    return {
        "top1_agreement": agree.double().mean().item(),
        "kl": kl.item(),
        "teacher_accuracy": right.double().mean().item(),
    }


def test_a_run_reports_the_students_agreement_with_each_teacher(setup, tmp_path):
    """A causal-LM run from teachers of the student's tokenizer and of two others logs, at its evaluation,
    the student's agreement with each (``eval_knowledge/teachers/<name>/...``), equal to what is computed
    here from the student's and that teacher's logits on the evaluation rows (another tokenizer: at the
    matched span starts); the card shows them."""
    root, _, tokenizers, models, _ = setup
    _, task, _ = alone_batch(setup, "u")
    shared = copy.deepcopy(models["u"])  # u's top-1 among the tokens it shares with the student
    with torch.no_grad():
        outside = torch.ones(len(tokenizers["u"]), dtype=torch.bool)
        outside[task.vocabulary.tensors[1]] = False
        shared.lm_head.weight[outside] = 0.0
    save_model(shared, tokenizers["u"], tmp_path / "u")
    teachers = [member(root, "s"), member(root, "b"), member(tmp_path, "u", 4)]
    data_args, model_args = run_arguments(root)
    config = tiny_config(
        tmp_path / "run", teacher_source="mixture", teachers=teachers, alpha=1.0, max_steps=20, per_device_train_batch_size=8, per_device_eval_batch_size=3,
        learning_rate=1e-2, eval_strategy="no",
    )  # fmt: skip
    result = run_distillation(data_args, model_args, config)
    logged = {k: v for entry in result.trainer.state.log_history for k, v in entry.items()}
    student_model = result.trainer.model.cpu().eval()
    card = (tmp_path / "run" / "README.md").read_text()
    for name, teacher in (("s", models["s"]), ("b", models["b"]), ("u", shared)):
        expected = direct_agreement(setup, student_model, name, teacher)
        for measure, value in expected.items():
            assert logged[f"eval_knowledge/teachers/{name}/{measure}"] == pytest.approx(
                value, rel=1e-4, abs=1e-6
            ), (name, measure)
        agreement = logged[f"eval_knowledge/teachers/{name}/top1_agreement"]
        assert f"| `teachers/{name}/top1_agreement` | {agreement:.4g} |" in card
    kls = [logged[f"eval_knowledge/teachers/{name}/kl"] for name in ("s", "b", "u")]
    assert len(set(kls)) == 3 and min(kls) > 0  # teachers that disagree: different agreements
    assert logged["eval_knowledge/teachers/u/teacher_accuracy"] > 0  # u's top-1, mapped, is the target's
    first = teacher_agreements(  # at most max_items scored positions, the first ones
        result.trainer.eval_dataset,
        result.trainer.task,
        student=student_model,
        teacher_signal=result.trainer.teacher_signal,
        batch_size=3,
        max_items=10,
    )
    for name, teacher in (("s", models["s"]), ("u", shared)):
        expected = direct_agreement(setup, student_model, name, teacher, max_items=10)
        assert first[name] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert first["s"]["kl"] != pytest.approx(logged["eval_knowledge/teachers/s/kl"])
    signal = result.trainer.teacher_signal

    def no_match(batch):
        aligned = signal.teachers["b"](batch)
        return dataclasses.replace(aligned, matched=torch.zeros_like(aligned.matched))

    never = teacher_agreements(  # no matched span: nothing measured, nothing logged, no error
        result.trainer.eval_dataset,
        result.trainer.task,
        student=student_model,
        teacher_signal=SimpleNamespace(teachers={"b": no_match}),
    )
    assert never == {"b": {}}


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"student_logits_from_hidden_states": True, "loss_chunk_size": 8},
            "does not support student_logits_from_hidden_states",
        ),
        ({"synthetic_teacher": "kd_pt"}, "does not support synthetic_teacher='kd_pt'"),
    ],
)
def test_what_a_member_of_another_tokenizer_does_not_support_is_refused_before_its_weights_load(
    setup, tmp_path, monkeypatch, fields, message
):
    root, *_ = setup

    def never(*args, **kwargs):
        raise AssertionError("a member's weights loaded before its refusal")

    monkeypatch.setattr(mixture_module, "load_teacher", never)
    with pytest.raises(ValueError, match=message) as refused:
        mixture_batch(setup, tmp_path, [member(root, "s"), member(root, "b")], **fields)
    assert str(refused.value).startswith(f"teachers['b'] (model '{root / 'b'}'): ")


def test_packing_is_refused_naming_the_member(setup, tmp_path):
    root, student, _, _, data = setup
    config = tiny_config(tmp_path, teacher_source="mixture", teachers=[member(root, "u")], alpha=1.0)
    task = CausalLMTask(max_length=MAX_LENGTH, packing=True)
    opened, _ = open_teacher_source(config, task, data, ["train"])
    with pytest.raises(
        ValueError, match=r"packing: true is not supported with teachers\['u'\] whose tokenizer"
    ):
        build_teacher_signal(
            config, task, tiny.tiny_llama(len(student)), resource=opened, student_processor=student
        )


def test_a_task_that_cannot_align_tokenizers_refuses_the_member(setup, tmp_path):
    from tiny import sentiment_dataset, word_tokenizer

    from hf_kd.tasks import TextClassificationTask

    root, *_ = setup
    tokenizer = word_tokenizer()
    config = tiny_config(tmp_path, teacher_source="mixture", teachers=[member(root, "b")], alpha=1.0)
    task = TextClassificationTask(max_length=8)
    opened, _ = open_teacher_source(config, task, DatasetDict(train=sentiment_dataset(4)), ["train"])
    with pytest.raises(ValueError, match=r"teachers\['b'\] reads another tokenizer than the student; the "):
        build_teacher_signal(
            config, task, tiny.bert_classifier(len(tokenizer)), resource=opened, student_processor=tokenizer
        )


def test_temperature_auto_is_refused_with_a_teacher_of_another_tokenizer_in_the_mixture(setup, tmp_path):
    """``temperature: auto`` reads each true token's probability over the student's vocabulary, which a
    teacher of another tokenizer has not: refused by name before the first step, as for such a teacher alone."""
    root, *_ = setup
    data_args, model_args = run_arguments(root)
    config = tiny_config(
        tmp_path / "run", teacher_source="mixture", teachers=[member(root, "s"), member(root, "b")],
        alpha=1.0, max_steps=2, per_device_train_batch_size=8, temperature="auto", eval_strategy="no",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"another tokenizer \(alone or in a mixture\).*set a number"):
        run_distillation(data_args, model_args, config)
    assert not (tmp_path / "run" / "model.safetensors").exists()
