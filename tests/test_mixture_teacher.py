"""Several teachers (teacher_source: mixture): one teacher of weight 1 is that teacher; two teachers of
different sources (online, cached) mix in probability space by their weights; routing by a column gives
each row its own teacher's distribution; bad teacher lists are refused before training; a whole run
trains from a mixture."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, DatasetDict
from test_served_teacher import WORDS, gpt, texts, tokenizer_of
from tiny import save_model, tiny_config
from transformers import AutoTokenizer

from hf_kd import DataArguments, ModelArguments, run_distillation
from hf_kd.losses import distillation_loss
from hf_kd.tasks import CausalLMTask
from hf_kd.tasks.base import processor_fingerprint
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.mixture import MixtureTeacher
from hf_kd.teachers.signal import build_teacher_signal, open_teacher_source


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two saved tiny GPT-2 teachers (seeds 0 and 2) with the student's tokenizer, 16 texts in two
    domains, and a top-4 cache of teacher b."""
    root = tmp_path_factory.mktemp("mixture")
    tokenizer = tokenizer_of(WORDS)
    a, b = gpt(0).eval(), gpt(2).eval()
    save_model(a, tokenizer, root / "a")
    save_model(b, tokenizer, root / "b")
    rows = texts(16, 3)
    data = DatasetDict(
        train=Dataset.from_dict({"text": rows, "domain": ["a" if i % 3 else "b" for i in range(16)]}),
        test=Dataset.from_dict({"text": texts(8, 4), "domain": ["a", "b"] * 4}),
    )
    data.save_to_disk(str(root / "data"))
    capture_teacher_logits(
        b,
        tokenizer,
        CausalLMTask(max_length=8),
        data,
        root / "cache_b",
        teacher_id="b",
        top_k=4,
        progress=False,
    )
    return root, tokenizer, a, b, data


def mixture(setup, tmp_path, teachers, **fields):
    root, tokenizer, _, _, data = setup
    config = tiny_config(tmp_path, teacher_source="mixture", teachers=teachers, alpha=0.5, **fields)
    task = CausalLMTask(max_length=8)
    task.use_processor(tokenizer)
    opened, splits = open_teacher_source(config, task, data, ["train", "test"])
    signal = build_teacher_signal(config, task, gpt(1), resource=opened, student_processor=tokenizer)
    rows = task.prepare(splits["train"], student_processor=tokenizer)
    batch = signal.collator(task.collate)([rows[i] for i in range(len(rows))])
    return signal, batch


def log_probs(model, batch):
    with torch.no_grad():
        return torch.log_softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1
        )


def test_one_teacher_of_weight_one_is_that_teacher(setup, tmp_path):
    root, _, a, _, _ = setup
    signal, batch = mixture(
        setup, tmp_path, [{"name": "a", "source": "online", "model": str(root / "a"), "weight": 1}]
    )
    assert isinstance(signal, MixtureTeacher)
    mixed = signal(batch)
    torch.testing.assert_close(mixed, log_probs(a, batch), atol=1e-6, rtol=1e-6)
    student = torch.randn(*mixed.shape)
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    labels = batch["labels"].reshape(-1)
    settings = dict(alpha=1.0, temperature=2.0, divergence_name="forward_kl", soft_mask=labels != -100)
    loss_mixed = distillation_loss(flat(student), flat(mixed), labels, **settings).loss
    loss_alone = distillation_loss(flat(student), flat(log_probs(a, batch)), labels, **settings).loss
    torch.testing.assert_close(loss_mixed, loss_alone)


def test_an_online_and_a_cached_teacher_mix_in_probability_space(setup, tmp_path):
    """p = (1·p_a + 3·p_b) / 4, p_b the cache's top-4 with its tail spread uniformly."""
    root, _, a, b, _ = setup
    teachers = [
        {"name": "a", "source": "online", "model": str(root / "a"), "weight": 1},
        {"name": "b", "source": "cached", "cache": str(root / "cache_b"), "weight": 3},
    ]
    signal, batch = mixture(setup, tmp_path, teachers)
    from hf_kd.losses import SparseLogits

    p_b = SparseLogits.from_logits(log_probs(b, batch), 4).to_dense_log_probs().exp()
    expected = torch.log(0.25 * log_probs(a, batch).exp() + 0.75 * p_b)
    real = batch["attention_mask"].bool()
    real[:, -1] = False
    real[:, :-1] &= batch["attention_mask"][:, 1:].bool()  # positions with a next token (the cache's)
    torch.testing.assert_close(signal(batch)[real], expected[real], atol=1e-5, rtol=1e-5)


def test_routing_gives_each_row_its_own_teacher(setup, tmp_path):
    root, _, a, b, data = setup
    teachers = [
        {"name": "a", "source": "online", "model": str(root / "a")},
        {"name": "b", "source": "online", "model": str(root / "b")},
    ]
    signal, batch = mixture(setup, tmp_path, teachers, teacher_routing_column="domain")
    routed = signal(batch)
    domains = data["train"]["domain"]
    assert sorted(set(domains)) == ["a", "b"]
    for row, domain in enumerate(domains):
        expected = log_probs(a if domain == "a" else b, batch)[row]
        torch.testing.assert_close(routed[row], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "teachers, fields, message",
    [
        ([{"name": "a", "source": "online"}], {}, r"teachers\['a'\]: an online teacher needs model"),
        ([{"name": "a", "model": "x"}, {"name": "a", "model": "y"}], {}, "every entry needs a distinct name"),
        (
            [{"name": "a", "source": "mixture"}],
            {},
            r"source='mixture': expected one of \('online', 'cached', 'served'\)",
        ),
        ([{"name": "a", "model": "x", "weight": 0}], {}, r"weight=0 must be a number > 0"),
        ([{"name": "a", "model": "x", "colour": 1}], {}, r"unknown keys \['colour'\]"),
        ([{"name": "a", "model": "x"}], {"teacher_routing_column": "topic"}, "'topic' is not a column"),
    ],
)
def test_bad_teacher_lists_are_refused_before_any_model_loads(setup, tmp_path, teachers, fields, message):
    root, tokenizer, _, _, data = setup
    teachers = [{**t, "model": str(root / "a")} if t.get("model") == "x" else t for t in teachers]
    config = tiny_config(tmp_path, teacher_source="mixture", teachers=teachers, alpha=0.5, **fields)
    with pytest.raises(ValueError, match=message):
        open_teacher_source(config, CausalLMTask(max_length=8), data, ["train"])


def test_a_route_naming_no_teacher_is_refused(setup, tmp_path):
    """(Teachers of other tokenizers: tests/test_mixture_tokenizers.py.)"""
    root, tokenizer, a, _, data = setup
    teachers = [{"name": "a", "model": str(root / "a")}, {"name": "c", "model": str(root / "a")}]
    config = tiny_config(
        tmp_path, teacher_source="mixture", teachers=teachers, teacher_routing_column="domain"
    )
    with pytest.raises(ValueError, match=r"names teachers \['b'\]; the teachers are \['a', 'c'\]"):
        open_teacher_source(config, CausalLMTask(max_length=8), data, ["train"])


def test_a_teacher_saved_after_truncating_still_reads_the_students_tokenizer(setup, tmp_path):
    """A run saves its tokenizer with the truncation it used (``max_length`` in ``tokenizer.json``): the
    fingerprint leaves that state out, so the mixture accepts such a teacher; another vocabulary differs."""
    root, tokenizer, a, _, _ = setup
    used = tokenizer_of(WORDS)
    used(["w1 w2 w3"], truncation=True, max_length=2, padding="max_length")  # as a run's preprocessing
    assert used.backend_tokenizer.truncation is not None
    save_model(a, used, tmp_path / "a_saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "a_saved")
    assert saved.backend_tokenizer.truncation == {**used.backend_tokenizer.truncation}
    assert processor_fingerprint(saved) == processor_fingerprint(tokenizer)
    assert saved.backend_tokenizer.truncation is not None  # the processor itself is left as it was
    other = tokenizer_of(WORDS[:-1] + ["w99"])
    assert processor_fingerprint(other) != processor_fingerprint(tokenizer)
    teachers = [{"name": "a", "model": str(tmp_path / "a_saved")}, {"name": "b", "model": str(root / "b")}]
    signal, _ = mixture(setup, tmp_path, teachers)
    assert signal.names == ["a", "b"]


def test_a_run_trains_from_a_mixture_and_its_card_names_the_source(setup, tmp_path):
    root, tokenizer, *_ = setup
    tokenizer.save_pretrained(root / "tokenizer")
    data_args = DataArguments(task="causal-lm", dataset_name=str(root / "data"), max_length=8)
    model_args = ModelArguments(
        student_processor=str(root / "tokenizer"),
        student_config={"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32},
    )
    teachers = [
        {"name": "a", "source": "online", "model": str(root / "a"), "weight": 1},
        {"name": "b", "source": "cached", "cache": str(root / "cache_b"), "weight": 1},
    ]
    config = tiny_config(
        tmp_path / "run",
        teacher_source="mixture",
        teachers=teachers,
        teacher_routing_column="domain",
        alpha=1.0,
        max_steps=3,
        per_device_train_batch_size=8,
        logging_steps=1,
        eval_strategy="no",
    )
    result = run_distillation(data_args, model_args, config)
    history = result.trainer.state.log_history
    assert [round(h["loss_soft"], 6) > 0 for h in history if "loss_soft" in h] == [True] * 3
    card = (tmp_path / "run" / "README.md").read_text()
    assert "- **Teacher signal:** mixture: several teachers" in card
    assert f"a (online {root / 'a'}, weight 1), b (cached {root / 'cache_b'}, weight 1)" in card


def test_the_card_reports_the_students_agreement_with_each_teacher(tmp_path):
    """A classification run from two teachers logs, at its evaluation, the student's top-1 agreement, KL and
    the teacher's accuracy for each teacher (``eval_knowledge/teachers/<name>/...``), equal to the same
    measures computed here from the saved student and each teacher; the card's table shows them."""
    from tiny import bert_classifier, sentiment_dataset, word_tokenizer

    tokenizer = word_tokenizer()
    teachers = {
        name: bert_classifier(len(tokenizer), seed=seed).eval() for name, seed in (("x", 3), ("y", 4))
    }
    for name, model in teachers.items():
        save_model(model, tokenizer, tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    DatasetDict(train=sentiment_dataset(32), test=sentiment_dataset(16, seed=1)).save_to_disk(
        tmp_path / "data"
    )
    data_args = DataArguments(
        task="text-classification", dataset_name=str(tmp_path / "data"), eval_split="test", max_length=16
    )
    model_args = ModelArguments(
        student_processor=str(tmp_path / "tokenizer"),
        student_config={"model_type": "bert", "vocab_size": len(tokenizer), "hidden_size": 16,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                        "max_position_embeddings": 64},
    )  # fmt: skip
    members = [{"name": n, "model": str(tmp_path / n), "weight": w} for n, w in (("x", 1), ("y", 3))]
    config = tiny_config(
        tmp_path / "run", teacher_source="mixture", teachers=members, alpha=0.5, max_steps=4,
        per_device_train_batch_size=8, eval_strategy="no",
    )  # fmt: skip
    result = run_distillation(data_args, model_args, config)
    logged = {k: v for entry in result.trainer.state.log_history for k, v in entry.items()}
    test = sentiment_dataset(16, seed=1)
    enc = tokenizer(list(test["text"]), truncation=True, max_length=16, padding=True, return_tensors="pt")
    student = result.trainer.model.cpu().eval()
    with torch.no_grad():
        z = student(**enc).logits
        for name, teacher in teachers.items():
            v = teacher(**enc).logits
            prefix = f"eval_knowledge/teachers/{name}/"
            agree = (z.argmax(-1) == v.argmax(-1)).double().mean().item()
            kl = torch.nn.functional.kl_div(
                z.log_softmax(-1), v.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            assert logged[prefix + "top1_agreement"] == pytest.approx(agree)
            assert logged[prefix + "kl"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
            accuracy = (v.argmax(-1) == torch.tensor(list(test["label"]))).double().mean().item()
            assert logged[prefix + "teacher_accuracy"] == pytest.approx(accuracy)
    assert logged["eval_knowledge/teachers/x/kl"] != logged["eval_knowledge/teachers/y/kl"]
    card = (tmp_path / "run" / "README.md").read_text()
    assert (
        f"| `teachers/y/top1_agreement` | {logged['eval_knowledge/teachers/y/top1_agreement']:.4g} |" in card
    )
