"""The Python API on the Transformers convention: ``DistillationTrainer`` takes what ``transformers.Trainer``
takes (rows the user processed, with ``processing_class`` and/or ``data_collator``; raw rows prepared with
``processing_class``) for text classification, image classification and causal LM. Each test is written
the way a user writes it, with tiny models built from configs."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import load_from_disk
from tiny import (
    bert_classifier,
    image_dataset,
    image_processor,
    sentiment_dataset,
    tiny_llama,
    vit_classifier,
    word_tokenizer,
)
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
)

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.tasks import CausalLMTask
from hf_kd.tasks.classification import ClassificationMetrics

ALPHA, TAU = 0.5, 2.0


def distillation_args(tmp_path, **fields) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=24,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=64,
        learning_rate=3e-2,
        logging_steps=1,
        alpha=ALPHA,
        temperature=TAU,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return DistillationConfig(**{**values, **fields})


def check_distilled(trainer: DistillationTrainer, steps: int = 24) -> None:
    """The run made ``steps`` optimizer steps, each logged loss is finite and is exactly
    (1 − α)·loss_hard + α·τ²·loss_soft with a teacher term that is not zero."""
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == steps and len(logs) == steps
    for entry in logs:
        assert math.isfinite(entry["loss"]) and entry["loss_soft"] > 1e-4
        mixed = (1 - ALPHA) * entry["loss_hard"] + ALPHA * TAU**2 * entry["loss_soft"]
        assert entry["loss"] == pytest.approx(mixed, rel=1e-4)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def sentiment_teacher(tokenizer, tmp_path_factory):
    """A BERT teacher fine-tuned on the sentiment rows (α = 0: labels only, no teacher)."""
    teacher = bert_classifier(len(tokenizer), hidden=32, layers=2, seed=0)
    args = distillation_args(tmp_path_factory.mktemp("teacher"), alpha=0.0, max_steps=48, learning_rate=3e-3)
    DistillationTrainer(
        model=teacher, args=args, train_dataset=sentiment_dataset(128), processing_class=tokenizer
    ).train()
    return teacher.eval()


def test_tokenized_text_with_processing_class(tokenizer, sentiment_teacher, tmp_path):
    """The README example: rows tokenized by the user, padded by the tokenizer given as processing_class."""

    def tokenize(rows):
        return tokenizer(rows["text"], truncation=True)

    train = sentiment_dataset(64).map(tokenize, batched=True)
    test = sentiment_dataset(32, seed=1).map(tokenize, batched=True)
    student = bert_classifier(len(tokenizer), seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=sentiment_teacher,
        args=distillation_args(tmp_path),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        compute_metrics=ClassificationMetrics(["accuracy"]),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    check_distilled(trainer)
    assert after["eval_loss_soft"] < before["eval_loss_soft"] / 2  # the student moved toward the teacher
    assert after["eval_accuracy"] >= 0.9 and after["eval_agreement"] >= 0.9


def test_tokenized_text_without_processing_class_is_padded_with_the_models_pad_id(
    tokenizer, sentiment_teacher, tmp_path
):
    """The issue's example: no processing_class, no data_collator (it failed at the first batch). Rows are
    padded with the student's pad id: the same batches, so the same loss, as with the tokenizer. Every
    fourth row is unlabelled (label −1): no hard term, the soft term only."""
    train = sentiment_dataset(64, unlabeled_every=4).map(lambda rows: tokenizer(rows["text"]), batched=True)
    losses = []
    for processing_class in (None, tokenizer):
        trainer = DistillationTrainer(
            model=bert_classifier(len(tokenizer), seed=1),
            teacher_model=sentiment_teacher,
            args=distillation_args(tmp_path, max_steps=4),
            train_dataset=train,
            processing_class=processing_class,
        )
        trainer.train()
        check_distilled(trainer, steps=4)
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_users_data_collator_is_used(tokenizer, sentiment_teacher, tmp_path):
    train = sentiment_dataset(32).map(lambda rows: tokenizer(rows["text"]), batched=True)
    batches = []

    class CountingCollator(DataCollatorWithPadding):
        def __call__(self, features):
            batch = super().__call__(features)
            batches.append(batch["input_ids"].shape)
            return batch

    trainer = DistillationTrainer(
        model=bert_classifier(len(tokenizer), seed=1),
        teacher_model=sentiment_teacher,
        args=distillation_args(tmp_path, max_steps=4),
        train_dataset=train,
        data_collator=CountingCollator(tokenizer, padding="max_length", max_length=16),
    )
    trainer.train()
    check_distilled(trainer, steps=4)
    assert batches == [torch.Size([8, 16])] * 4


def test_raw_text_prepared_with_processing_class(tokenizer, sentiment_teacher, tmp_path):
    """Raw rows (``text``, ``label``) are tokenized for the user."""
    student = bert_classifier(len(tokenizer), seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=sentiment_teacher,
        args=distillation_args(tmp_path),
        train_dataset=sentiment_dataset(64),
        eval_dataset=sentiment_dataset(32, seed=1),
        processing_class=tokenizer,
        compute_metrics=ClassificationMetrics(["accuracy"]),
    )
    assert trainer.train_dataset[0]["input_ids"] == tokenizer(sentiment_dataset(64)["text"][0])["input_ids"]
    trainer.train()
    check_distilled(trainer)
    assert trainer.evaluate()["eval_accuracy"] >= 0.9


def image_teacher():
    """A ViT whose head reads the mean patch embedding's first feature: brightness → class."""
    teacher = vit_classifier(hidden=16, layers=1, num_labels=3, seed=0)
    with torch.no_grad():
        teacher.classifier.weight.copy_(torch.randn(3, 16) * 3)
    return teacher.eval()


@pytest.mark.parametrize("processing", ["map", "with_transform"])
def test_processed_images(processing, tmp_path):
    """Rows turned into ``pixel_values`` by the user, stored (``map``) or on the fly (``with_transform``, as
    the Transformers image-classification guide does, ``remove_unused_columns`` left on)."""
    processor = image_processor()

    def transform(rows):
        rows["pixel_values"] = processor([image.convert("RGB") for image in rows["image"]])["pixel_values"]
        del rows["image"]
        return rows

    train, test = image_dataset(64), image_dataset(32, seed=1)
    if processing == "map":
        train, test = train.map(transform, batched=True), test.map(transform, batched=True)
    else:
        train, test = train.with_transform(transform), test.with_transform(transform)
    trainer = DistillationTrainer(
        model=vit_classifier(seed=1),
        teacher_model=image_teacher(),
        args=distillation_args(tmp_path),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=ClassificationMetrics(["accuracy"]),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    check_distilled(trainer)
    assert after["eval_loss_soft"] < before["eval_loss_soft"] / 2
    assert after["eval_agreement"] > before["eval_agreement"]


def test_raw_images_prepared_with_image_processor(tmp_path):
    trainer = DistillationTrainer(
        model=vit_classifier(seed=1),
        teacher_model=image_teacher(),
        args=distillation_args(tmp_path),
        train_dataset=image_dataset(64),
        eval_dataset=image_dataset(32, seed=1),
        processing_class=image_processor(),
        compute_metrics=ClassificationMetrics(["accuracy"]),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    check_distilled(trainer)
    assert after["eval_loss_soft"] < before["eval_loss_soft"] / 2
    assert "eval_accuracy" in after


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    path = write_toy_chat(tmp_path_factory.mktemp("data") / "toy_chat", num_train=96, num_test=16)
    return load_from_disk(str(path)), AutoTokenizer.from_pretrained(str(path / "tokenizer"))


def test_tokenized_causal_lm(chat, tmp_path):
    """Rows tokenized by the user (``input_ids``, ``attention_mask``, no labels): the task is inferred from
    the student, the rows are their own targets, padding has none, as Transformers' LM collator does."""
    dataset, tokenizer = chat
    train, test = (
        split.map(lambda rows: tokenizer(rows["text"]), batched=True, remove_columns=split.column_names)
        for split in (dataset["train"], dataset["test"])
    )
    student = tiny_llama(len(tokenizer), seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_llama(len(tokenizer), seed=0),
        args=distillation_args(tmp_path),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
    )
    assert isinstance(trainer.task, CausalLMTask) and trainer.task.pad_token_id == tokenizer.pad_token_id
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    check_distilled(trainer)
    assert after["eval_loss_hard"] < before["eval_loss_hard"] - 0.5
    # the same token cross-entropy as the model's own loss on Transformers' LM batches of these rows
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)(list(test))
    with torch.no_grad():
        own_loss = student.eval()(**batch).loss.item()
    assert after["eval_loss_hard"] == pytest.approx(own_loss, rel=1e-4)


@pytest.mark.parametrize("column", ["text", "messages"])
def test_raw_causal_lm_prepared_with_processing_class(chat, column, tmp_path):
    dataset, tokenizer = chat
    train, test = (dataset[split].select_columns([column]) for split in ("train", "test"))
    trainer = DistillationTrainer(
        model=tiny_llama(len(tokenizer), seed=1),
        teacher_model=tiny_llama(len(tokenizer), seed=0),
        args=distillation_args(tmp_path),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
    )
    labels = trainer.train_dataset[0]["labels"]
    if column == "messages":  # completion-only: the prompt's tokens have no target
        assert labels[0] == -100 and labels[-1] == tokenizer.eos_token_id
    else:
        assert labels == trainer.train_dataset[0]["input_ids"] and labels[-1] == tokenizer.eos_token_id
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    check_distilled(trainer)
    assert after["eval_loss_hard"] < before["eval_loss_hard"] - 0.5


def test_rows_neither_raw_nor_processed_are_refused_naming_the_columns(tokenizer, tmp_path):
    rows = sentiment_dataset(8).rename_column("text", "sentence")
    with pytest.raises(ValueError) as error:
        DistillationTrainer(
            model=bert_classifier(len(tokenizer)),
            args=distillation_args(tmp_path),
            train_dataset=rows,
            processing_class=tokenizer,
        )
    message = str(error.value)
    assert "train_dataset has columns ['sentence', 'label']" in message
    assert "'input_ids'" in message and "'text'" in message


def test_raw_rows_without_processing_class_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"eval_dataset\['test'\] holds raw rows \(column 'image'\)"):
        DistillationTrainer(
            model=vit_classifier(),
            args=distillation_args(tmp_path),
            eval_dataset={"test": image_dataset(8)},
        )
