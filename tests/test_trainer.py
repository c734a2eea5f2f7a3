"""DistillationTrainer: the loss it differentiates, gradient accumulation, teacher handling, evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from formulas import kd_logit_gradient, kd_loss
from safetensors.torch import load_file
from tiny import FILLER, NEGATIVE, POSITIVE, bert_classifier, sentiment_dataset, tiny_config, word_tokenizer

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.tasks import TextClassificationTask
from hf_kd.tasks.classification import ClassificationMetrics


def make_config(tmp_path, **overrides) -> DistillationConfig:
    """One epoch of batch 8 at α = 0.5, τ = 2, logging every step."""
    values = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-2,
        num_train_epochs=1,
        logging_steps=1,
        alpha=0.5,
        temperature=2.0,
    )
    return tiny_config(tmp_path / "out", **{**values, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def prepared(tokenizer, n=32, unlabeled_every=0, seed=0):
    task = TextClassificationTask()
    return task, task.prepare(
        sentiment_dataset(n, seed=seed, unlabeled_every=unlabeled_every), student_processor=tokenizer
    )


def trainer_for(tmp_path, tokenizer, *, n=32, unlabeled_every=0, student_seed=1, **overrides):
    task, data = prepared(tokenizer, n, unlabeled_every)
    teacher = bert_classifier(len(tokenizer), hidden=32, layers=2, seed=0)
    with torch.no_grad():  # an opinionated teacher: its distribution differs clearly from the student's
        teacher.classifier.bias.copy_(torch.tensor([1.5, -1.0]))
    student = bert_classifier(len(tokenizer), seed=student_seed)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_config(tmp_path, **overrides),
        task=task,
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=ClassificationMetrics(["accuracy"]),
    )
    return trainer, data


def hand_loss(student_logits, target, labels, alpha, tau):
    """(1 − α)·mean CE over labelled rows + α·τ²·mean KL(ρ ‖ q^τ) over all rows (classification: every
    row takes the soft term); ρ = ``target`` as probabilities."""
    every_row = torch.ones_like(labels, dtype=torch.bool)
    return kd_loss(student_logits, target, labels, alpha=alpha, tau=tau, soft_rows=every_row)


@pytest.mark.parametrize("unlabeled_every", [0, 3, 1])
def test_compute_loss_equals_the_kd_formula(tmp_path, tokenizer, unlabeled_every):
    """(1−α)·CE + α·τ²·KL on a mixed batch; all-unlabelled rows contribute exactly α·τ²·D and no CE."""
    trainer, data = trainer_for(tmp_path, tokenizer, unlabeled_every=unlabeled_every)
    batch = trainer.task.collate([data[i] for i in range(8)])
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        z, v = trainer.model(**inputs).logits, trainer.teacher_model(**inputs).logits
    expected = hand_loss(z, torch.softmax(v / 2.0, -1), batch["labels"], 0.5, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if unlabeled_every == 1:  # no label at all: the soft term alone
        p = torch.softmax(v / 2, -1)
        kl = F.kl_div(torch.log_softmax(z / 2, -1), p, reduction="batchmean")
        assert loss.item() == pytest.approx(0.5 * 4 * kl.item(), rel=1e-5)


def test_gradient_on_logits_matches_the_paper(tmp_path, tokenizer):
    """∂L/∂z_i = (1−α)(q_i − y_i) + ατ(q^τ_i − p^τ_i), per row, divided by the batch size."""
    trainer, data = trainer_for(tmp_path, tokenizer, alpha=0.3, temperature=3.0)
    batch = trainer.task.collate([data[i] for i in range(8)])
    student_logits = []

    def keep(module, inputs, out):
        out.retain_grad()
        student_logits.append(out)

    handle = trainer.model.classifier.register_forward_hook(keep)
    trainer.compute_loss(trainer.model, batch).backward()
    handle.remove()
    z = student_logits[0]
    with torch.no_grad():
        v = trainer.teacher_model(**{k: t for k, t in batch.items() if k != "labels"}).logits
    expected = kd_logit_gradient(z.detach(), v, batch["labels"], alpha=0.3, tau=3.0)
    torch.testing.assert_close(z.grad, expected / 8, rtol=1e-4, atol=1e-7)


def test_training_end_to_end(tmp_path, tokenizer):
    """Parameters change, the loss falls, both parts are logged, the teacher stays frozen and unsaved."""
    trainer, _ = trainer_for(
        tmp_path, tokenizer, n=64, num_train_epochs=6, save_strategy="epoch", save_total_limit=1
    )
    teacher_before = copy.deepcopy(trainer.teacher_model.state_dict())
    student_before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    losses = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])
    first_epoch, last_epoch = losses[:8].mean(), losses[-8:].mean()
    assert last_epoch < 0.7 * first_epoch, (first_epoch, last_epoch)
    assert all("loss_hard" in h and "loss_soft" in h for h in trainer.state.log_history if "loss" in h)
    assert any(not torch.equal(student_before[k], v) for k, v in trainer.model.state_dict().items())
    for k, v in trainer.teacher_model.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert not trainer.teacher_model.training
    checkpoint = next((tmp_path / "out").glob("checkpoint-*"))
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(trainer.model.state_dict())  # the student's tensors, nothing of the teacher's
    assert saved["classifier.weight"].shape == (2, 16)  # the student's width (the teacher's is 32)

    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_agreement", "eval_loss_hard", "eval_loss_soft"} <= set(metrics)


def test_agreement_of_a_student_identical_to_its_teacher_is_one(tmp_path, tokenizer):
    task, data = prepared(tokenizer)
    teacher = bert_classifier(len(tokenizer), seed=3)
    trainer = DistillationTrainer(
        model=copy.deepcopy(teacher),
        teacher_model=teacher,
        args=make_config(tmp_path),
        task=task,
        eval_dataset=data,
        compute_metrics=ClassificationMetrics(["accuracy"]),
    )
    metrics = trainer.evaluate()
    assert metrics["eval_agreement"] == 1.0
    assert metrics["eval_loss_soft"] == pytest.approx(0.0, abs=1e-6)


def test_gradient_accumulation_gives_the_same_update(tmp_path, tokenizer):
    """Batch 8 × 1 step and batch 4 × 2 accumulation steps: same weights after the step, although the
    two micro-batches hold different numbers of labelled rows."""
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        trainer, data = trainer_for(
            tmp_path / f"b{batch_size}",
            tokenizer,
            n=8,
            unlabeled_every=3,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            max_steps=1,
        )
        labels = torch.tensor(data["labels"])
        assert (labels[:4] >= 0).sum() != (labels[4:] >= 0).sum()
        trainer.train()
        results.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_teacher_with_its_own_tokenizer_reads_its_own_inputs(tmp_path, tokenizer):
    """Different preprocessing: the teacher gets teacher_* columns from its own tokenizer."""
    teacher_tokenizer = word_tokenizer(list(reversed(POSITIVE + NEGATIVE + FILLER)))
    assert teacher_tokenizer.get_vocab() != tokenizer.get_vocab()
    task = TextClassificationTask()
    data = task.prepare(
        sentiment_dataset(8), student_processor=tokenizer, teacher_processor=teacher_tokenizer
    )
    assert "teacher_input_ids" in data.column_names
    teacher = bert_classifier(len(teacher_tokenizer), seed=5)
    trainer = DistillationTrainer(
        model=bert_classifier(len(tokenizer)),
        teacher_model=teacher,
        args=make_config(tmp_path),
        task=task,
        train_dataset=data,
    )
    batch = task.collate([data[i] for i in range(4)])
    own = teacher_tokenizer(sentiment_dataset(8)["text"][:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = teacher(**own).logits
    torch.testing.assert_close(trainer.teacher_signal(batch), expected)


def test_label_spaces_must_match(tmp_path, tokenizer):
    task, data = prepared(tokenizer)
    teacher = bert_classifier(len(tokenizer), labels=["cat", "dog", "bird"])
    with pytest.raises(
        ValueError,
        match=r"teacher has 3 labels \['cat', 'dog', 'bird'\].*2 labels \['negative', 'positive'\]",
    ):
        DistillationTrainer(
            model=bert_classifier(len(tokenizer)),
            teacher_model=teacher,
            args=make_config(tmp_path),
            task=task,
            train_dataset=data,
        )
    swapped = bert_classifier(len(tokenizer), labels=["neg", "pos"])
    with pytest.raises(ValueError, match="teacher_label_mapping"):
        DistillationTrainer(
            model=bert_classifier(len(tokenizer)),
            teacher_model=swapped,
            args=make_config(tmp_path),
            task=task,
            train_dataset=data,
        )


def test_label_mapping_reorders_teacher_classes(tmp_path, tokenizer):
    task, data = prepared(tokenizer)
    teacher = bert_classifier(len(tokenizer), labels=["pos", "neg"], seed=2)
    trainer = DistillationTrainer(
        model=bert_classifier(len(tokenizer)),
        teacher_model=teacher,
        args=make_config(tmp_path, teacher_label_mapping={"pos": "positive", "neg": "negative"}),
        task=task,
        train_dataset=data,
    )
    batch = task.collate([data[i] for i in range(4)])
    with torch.no_grad():
        raw = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(trainer.teacher_signal(batch), raw[:, [1, 0]])


def test_label_smoothing_arm_equals_cross_entropy_with_label_smoothing(tmp_path, tokenizer):
    """synthetic_teacher='ls' at τ = 1: the loss is F.cross_entropy(label_smoothing=α) less the constant
    α·H(u) = α·log K, since D is KL(u ‖ q) = H(u, q) − H(u) (docs/knowledge.md#universe-level; same gradient).
    No teacher–student agreement is reported for the uniform teacher."""
    task, data = prepared(tokenizer)
    trainer = DistillationTrainer(
        model=bert_classifier(len(tokenizer), seed=4),
        args=make_config(tmp_path, synthetic_teacher="ls", alpha=0.3, temperature=1.0),
        task=task,
        eval_dataset=data,
        compute_metrics=ClassificationMetrics(["accuracy"]),
    )
    batch = task.collate([data[i] for i in range(8)])
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        z = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    smoothed = F.cross_entropy(z, batch["labels"], label_smoothing=0.3) - 0.3 * math.log(2)
    assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert "eval_agreement" not in trainer.evaluate()


def test_synthetic_teachers_from_python(tmp_path, tokenizer):
    """The trainer honours synthetic_teacher without the pipeline: kd_pt / kd_topk build their target,
    'none' ignores the teacher (labels only), kd_sim without its class similarity refuses to train."""
    from hf_kd.teachers.synthetic import synthetic_target

    trainer, data = trainer_for(tmp_path, tokenizer, synthetic_teacher="kd_pt", alpha=0.4, temperature=2.0)
    batch = trainer.task.collate([data[i] for i in range(8)])
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        z, v = trainer.model(**inputs).logits, trainer.teacher_model(**inputs).logits
    rho = synthetic_target("kd_pt", v, batch["labels"], temperature=2.0)
    expected = hand_loss(z, rho, batch["labels"], 0.4, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    trainer, _ = trainer_for(tmp_path, tokenizer, synthetic_teacher="none")
    assert trainer.teacher_signal is None
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(
        F.cross_entropy(z, batch["labels"]).item(), rel=1e-5
    )

    trainer, _ = trainer_for(tmp_path, tokenizer, synthetic_teacher="kd_sim")
    with pytest.raises(ValueError, match="synthetic_teacher='kd_sim' needs target_fn"):
        trainer.train()
