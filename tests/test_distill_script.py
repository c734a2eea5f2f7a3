"""scripts/distill.py end to end on local checkpoints: image and text classification, from a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from datasets import DatasetDict
from distill_run import write_tiny_run
from safetensors.torch import load_file
from tiny import (
    bert_classifier,
    save_model,
    sentiment_dataset,
    vit_classifier,
    word_tokenizer,
)

import scripts.distill as distill_script

ROOT = Path(__file__).resolve().parent.parent

COMMON = dict(
    num_train_epochs=2,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=32,
    learning_rate=5.0e-3,
    use_cpu=True,
    save_strategy="no",
    eval_strategy="no",
    disable_tqdm=True,
    report_to="none",
    logging_steps=1,
)


def run_recipe(tmp_path, capsys, **values):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**COMMON, **values}))
    distill_script.main(["--config", str(recipe)])
    return capsys.readouterr().out


def test_image_distillation_from_a_recipe_with_unlabelled_rows(tmp_path, capsys):
    recipe = write_tiny_run(
        tmp_path, num_labeled_examples=12, use_unlabeled=True, output_dir=str(tmp_path / "student")
    )
    distill_script.main(["--config", str(recipe)])
    out = capsys.readouterr().out
    assert "eval_accuracy" in out and "eval_agreement" in out
    saved = tmp_path / "student"
    config = json.loads((saved / "config.json").read_text())
    assert config["hidden_size"] == 16 and config["id2label"] == {"0": "0", "1": "1", "2": "2"}
    assert (saved / "preprocessor_config.json").is_file()
    weights = load_file(saved / "model.safetensors")
    assert len(weights) == len(vit_classifier().state_dict())  # the student alone, no teacher tensors
    assert weights["classifier.weight"].shape == (3, 16)


def test_text_distillation_with_a_teacher_tokenizer_of_its_own(tmp_path, capsys):
    student_tokenizer = word_tokenizer()
    teacher_tokenizer = word_tokenizer(sorted(set(" ".join(sentiment_dataset(64)["text"]).split())))
    DatasetDict(train=sentiment_dataset(64), test=sentiment_dataset(32, seed=1)).save_to_disk(
        tmp_path / "data"
    )
    save_model(bert_classifier(len(teacher_tokenizer), hidden=32), teacher_tokenizer, tmp_path / "teacher")
    save_model(bert_classifier(len(student_tokenizer)), student_tokenizer, tmp_path / "student_init")
    out = run_recipe(
        tmp_path,
        capsys,
        task="text-classification",
        dataset_name=str(tmp_path / "data"),
        teacher_model_name_or_path=str(tmp_path / "teacher"),
        student_model_name_or_path=str(tmp_path / "student_init"),
        alpha=0.5,
        max_length=64,  # the tiny BERTs' position table
        output_dir=str(tmp_path / "student"),
    )
    assert "eval_agreement" in out
    assert (tmp_path / "student" / "tokenizer.json").is_file()
