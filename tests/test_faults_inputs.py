"""Bad inputs stop before any work, naming what is wrong: an output folder over an input, non-finite
numbers, missing columns, a model that does not fit the task, the tokenizer or max_length; rows that
nothing learns from are dropped out loud; ``eval_split: none`` turns evaluation off."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from datasets import DatasetDict
from distill_run import STUDENT_CONFIG, write_tiny_run
from tiny import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    bert_classifier,
    image_processor,
    save_model,
    sentiment_dataset,
    vit_classifier,
    word_tokenizer,
)

from hf_kd import DataArguments, DistillationConfig, DistillationTrainer, parse_args, run_distillation
from hf_kd.runs.report import build_report
from hf_kd.tasks import TextClassificationTask

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (symlinks not followed), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


BERT_STUDENT = {
    "model_type": "bert",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def write_text_run(root: Path, tokenizer=None, train=None, **overrides) -> Path:
    """A sentiment data set (``save_to_disk``), a tokenizer and a recipe that trains a BERT student from
    ``student_config`` with alpha = 0 (no teacher); returns the recipe path."""
    tokenizer = tokenizer or word_tokenizer()
    train = sentiment_dataset(64) if train is None else train
    DatasetDict(train=train, test=sentiment_dataset(16, seed=1)).save_to_disk(str(root / "data"))
    tokenizer.save_pretrained(root / "tokenizer")
    recipe = {
        "task": "text-classification",
        "dataset_name": str(root / "data"),
        "student_config": BERT_STUDENT,
        "student_processor": str(root / "tokenizer"),
        "alpha": 0.0,
        "max_length": 32,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 5.0e-3,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "output_dir": str(root / "out"),
        **overrides,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(recipe: Path, *flags: str):
    return run_distillation(*parse_args(["--config", str(recipe), *flags]))


# ---- 3. an output folder never overlaps an input ---------------------------------------------------


def output_over_input(root: Path, case: str) -> tuple[dict, str]:
    """Recipe overrides that put output_dir on an input, and the message expected."""
    if case == "teacher":
        return {"output_dir": str(root / "teacher")}, r"output_dir=.*teacher' is teacher_model_name_or_path="
    if case == "teacher through a symlink":
        (root / "link").symlink_to(root / "teacher", target_is_directory=True)
        return {"output_dir": str(root / "link" / "run")}, r"lies inside teacher_model_name_or_path="
    if case == "student checkpoint":
        save_model(vit_classifier(), image_processor(), root / "student_init")
        return (
            {
                "student_config": None,
                "student_model_name_or_path": str(root / "student_init"),
                "output_dir": str(root / "student_init"),
            },
            r"output_dir=.*student_init' is student_model_name_or_path=",
        )
    if case == "student processor":
        return {"output_dir": str(root / "processor")}, r"output_dir=.*processor' is student_processor="
    if case == "dataset":
        return {"output_dir": str(root / "data" / "train")}, r"lies inside dataset_name="
    if case == "teacher cache":
        (root / "cache").mkdir()
        return (
            {
                "teacher_source": "cached",
                "teacher_cache": str(root / "cache"),
                "output_dir": str(root / "cache"),
            },
            r"output_dir=.*cache' is teacher_cache=",
        )
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "teacher",
        "teacher through a symlink",
        "student checkpoint",
        "student processor",
        "dataset",
        "teacher cache",
    ],
)
def test_output_dir_over_an_input_is_refused_before_anything_is_written(tmp_path, case):
    overrides, message = output_over_input(tmp_path, case)
    recipe = write_tiny_run(tmp_path, **overrides)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=message):
        run(recipe)
    assert snapshot(tmp_path) == before  # the teacher (and every other input) byte-identical


def test_output_dir_containing_data_files_is_refused(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    sentiment_dataset(16).to_csv(folder / "train.csv")
    recipe = write_text_run(
        tmp_path,
        dataset_name="csv",
        data_files={"train": str(folder / "train.csv")},
        eval_split="none",
        output_dir=str(folder),
    )
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"output_dir=.*csv' contains data_files\['train'\]\[0\]="):
        run(recipe)
    assert snapshot(tmp_path) == before


def test_cache_capture_into_the_teacher_is_refused_even_with_overwrite(tmp_path):
    write_tiny_run(tmp_path)
    before = snapshot(tmp_path)
    argv = ["--task", "image-classification", "--dataset_name", str(tmp_path / "data")]
    argv += ["--teacher_model_name_or_path", str(tmp_path / "teacher"), "--use_cpu", "true"]
    cache_teacher = load_script("cache_teacher")
    with pytest.raises(ValueError, match=r"output_dir=.*teacher' is teacher_model_name_or_path="):
        cache_teacher.main(argv + ["--output_dir", str(tmp_path / "teacher"), "--overwrite", "true"])
    with pytest.raises(ValueError, match=r"output_dir=.* lies inside dataset_name="):
        cache_teacher.main(argv + ["--output_dir", str(tmp_path / "data" / "cache")])
    assert snapshot(tmp_path) == before


def test_report_into_the_teacher_is_refused(tmp_path):
    recipe = write_tiny_run(tmp_path)
    before = snapshot(tmp_path)
    analyze = load_script("analyze")
    with pytest.raises(ValueError, match=r"report_dir=.*teacher' is teacher="):
        analyze.main(
            ["--config", str(recipe), "--student", "none", "--report_dir", str(tmp_path / "teacher")]
        )
    assert snapshot(tmp_path) == before


def test_build_report_from_python_refuses_a_report_dir_inside_the_dataset(tmp_path):
    """The check lives in build_report, so a Python caller is protected as the script is."""
    recipe = write_tiny_run(tmp_path)
    before = snapshot(tmp_path)
    data_args, _, config = parse_args(["--config", str(recipe)])
    with pytest.raises(ValueError, match=r"report_dir=.* lies inside dataset_name="):
        build_report(
            data_args,
            config,
            teacher=str(tmp_path / "teacher"),
            student=None,
            report_dir=tmp_path / "data" / "r",
        )
    assert snapshot(tmp_path) == before


def test_python_trainer_refuses_to_write_into_the_teacher_it_loads(tmp_path):
    write_tiny_run(tmp_path)
    before = snapshot(tmp_path)
    teacher = str(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"output_dir=.*teacher' is teacher_model="):
        DistillationTrainer(
            model=vit_classifier(),
            teacher_model=teacher,
            args=DistillationConfig(output_dir=teacher, use_cpu=True),
        )
    assert snapshot(tmp_path) == before


# ---- 6. values ---------------------------------------------------------------------------------------

FLOAT_FIELDS = [
    f.name
    for f in fields(DistillationConfig)
    if isinstance(getattr(DistillationConfig(output_dir="x"), f.name), float)
]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_numbers_are_refused_in_every_float_field(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"^{name}={value!r}: expected a finite number"):
        DistillationConfig(output_dir=str(tmp_path), **{name: value})


def test_infinite_temperature_from_a_recipe_stops_before_training(tmp_path):
    assert {"temperature", "learning_rate", "weight_decay", "max_grad_norm"} <= set(FLOAT_FIELDS)
    recipe = write_tiny_run(tmp_path)
    recipe.write_text(recipe.read_text() + "synthetic_sim_temperature: .nan\n")
    with pytest.raises(ValueError, match=r"synthetic_sim_temperature=nan: expected a finite number"):
        parse_args(["--config", str(recipe)])
    with pytest.raises(ValueError, match=r"temperature=inf: expected a finite number"):
        parse_args(["--config", str(write_tiny_run(tmp_path)), "--temperature", "inf"])
    assert not (tmp_path / "out").exists()


# ---- 6. columns ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text_column": "sentence"}, r"split 'train' .* has no column 'sentence' \(text_column\)"),
        (
            {"text_pair_column": "hypothesis"},
            r"split 'train' .* has no column 'hypothesis' \(text_pair_column\)",
        ),
        ({"label_column": "sentiment"}, r"split 'train' .* has no column 'sentiment' \(label_column\)"),
        (
            {"task": "causal-lm", "student_config": TINY_LLAMA, "text_column": "body"},
            r"has neither column 'messages' \(messages_column\) nor 'body' \(text_column\)",
        ),
    ],
)
def test_every_named_column_is_checked_before_any_model_loads(tmp_path, overrides, message):
    recipe = write_text_run(tmp_path, **overrides)
    (tmp_path / "tokenizer" / "tokenizer.json").unlink()  # would fail if the processor were loaded
    with pytest.raises(ValueError, match=message + r".*its columns: \['text', 'label'\]"):
        run(recipe)
    assert not (tmp_path / "out").exists()


def test_a_column_missing_from_the_eval_split_is_named(tmp_path):
    write_text_run(tmp_path)
    DatasetDict(
        train=sentiment_dataset(16), test=sentiment_dataset(8).rename_column("text", "sentence")
    ).save_to_disk(str(tmp_path / "data2"))
    with pytest.raises(
        ValueError, match=r"split 'test' .* has no column 'text' \(text_column\).*\['sentence', 'label'\]"
    ):
        run(tmp_path / "recipe.yaml", "--dataset_name", str(tmp_path / "data2"))


def test_image_data_with_a_text_task_or_a_wrong_image_column(tmp_path):
    recipe = write_tiny_run(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"no column 'text' \(text_column\), which task='text-classification'.*\['image', 'label'\]",
    ):
        run(recipe, "--task", "text-classification")
    with pytest.raises(ValueError, match=r"no column 'img' \(image_column\).*\['image', 'label'\]"):
        run(recipe, "--image_column", "img")
    assert not (tmp_path / "out").exists()


# ---- 6. a model that does not fit the task, the tokenizer or max_length ---------------------------


def test_a_model_without_a_head_for_the_task_is_refused_in_hf_kd_words(tmp_path):
    recipe = write_text_run(tmp_path)
    save_model(vit_classifier(), word_tokenizer(), tmp_path / "vit")
    (tmp_path / "vit" / "model.safetensors").unlink()  # would fail if the weights were loaded
    with pytest.raises(
        ValueError, match=r"the student is a 'vit' model, which has no head for task='text-classification'"
    ):
        run(
            recipe,
            "--student_model_name_or_path",
            str(tmp_path / "vit"),
            "--output_dir",
            str(tmp_path / "o1"),
        )
    with pytest.raises(ValueError, match=r"the student is a 'vit' model, which has no head"):
        run(recipe, "--student_config", json.dumps(STUDENT_CONFIG))
    with pytest.raises(ValueError, match=r"the teacher is a 'vit' model, which has no head"):
        run(recipe, "--alpha", "0.5", "--teacher_model_name_or_path", str(tmp_path / "vit"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "o1").exists()


def test_a_position_table_shorter_than_max_length_is_refused(tmp_path):
    recipe = write_text_run(tmp_path, max_length=100)
    with pytest.raises(
        ValueError,
        match=r"max_length=100 is longer than the student's position table \(max_position_embeddings=64\)",
    ):
        run(recipe)
    save_model(bert_classifier(len(word_tokenizer())), word_tokenizer(), tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"max_length=100 is longer than the teacher's position table"):
        run(
            recipe,
            "--student_config",
            json.dumps({**BERT_STUDENT, "max_position_embeddings": 128}),
            "--alpha",
            "0.5",
            "--teacher_model_name_or_path",
            str(tmp_path / "teacher"),
        )
    assert not (tmp_path / "out").exists()


def big_tokenizer():
    """A tokenizer of 30,622 ids (more than BERT's default vocab_size 30,522) whose filler words come last."""
    return word_tokenizer(POSITIVE + NEGATIVE + [f"w{i}" for i in range(30600)] + FILLER)


def test_student_config_takes_vocab_size_and_pad_id_from_the_tokenizer_and_trains(tmp_path):
    tokenizer = big_tokenizer()
    recipe = write_text_run(tmp_path, tokenizer=tokenizer)
    result = run(recipe)
    assert result.trainer.state.global_step == 8
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["vocab_size"] == len(tokenizer) == 30622
    assert saved["pad_token_id"] == tokenizer.pad_token_id == 0
    with pytest.raises(
        ValueError, match=r"the student's vocab_size=30522 is smaller than its tokenizer \(30622 tokens\)"
    ):
        run(
            recipe,
            "--student_config",
            json.dumps({**BERT_STUDENT, "vocab_size": 30522}),
            "--output_dir",
            str(tmp_path / "o2"),
        )
    assert not (tmp_path / "o2").exists()


# ---- 6. rows nothing learns from -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "soft_term_off", [["--alpha", "0.0"], ["--alpha", "0.5", "--synthetic_teacher", "ls"]]
)
def test_unlabelled_rows_without_a_soft_term_are_dropped_out_loud(tmp_path, caplog, soft_term_off):
    recipe = write_text_run(tmp_path, num_labeled_examples=16)
    labelled_only = run(
        recipe, *soft_term_off, "--use_unlabeled", "false", "--output_dir", str(tmp_path / "a")
    )
    with caplog.at_level(logging.WARNING, logger="hf_kd.runs.rows"):
        default = run(recipe, *soft_term_off, "--output_dir", str(tmp_path / "b"))
    assert labelled_only.trainer.state.global_step == default.trainer.state.global_step == 2  # 16 rows / 8
    assert (
        "dropping the 48 unlabelled training rows" in caplog.text and "16 labelled rows remain" in caplog.text
    )
    # Every row labelled (the demo's teacher and no-KD twin): nothing dropped, the same 64 / 8 steps.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_kd.runs.rows"):
        full = run(
            recipe, *soft_term_off, "--num_labeled_examples", "64", "--output_dir", str(tmp_path / "c")
        )
    assert full.trainer.state.global_step == 8 and "unlabelled" not in caplog.text


def test_unlabelled_image_rows_without_a_soft_term_are_dropped(tmp_path, caplog):
    """Images are transformed on the fly: the labels are read from the stored rows."""
    recipe = write_tiny_run(tmp_path, alpha=0.0, num_labeled_examples=16, max_steps=-1, num_train_epochs=1)
    with caplog.at_level(logging.WARNING, logger="hf_kd.runs.rows"):
        result = run(recipe)
    assert result.trainer.state.global_step == 1  # 16 labelled rows / batch 16, not 64 / 16
    assert "dropping the 48 unlabelled training rows" in caplog.text


def test_python_trainer_warns_of_unlabelled_rows_without_a_soft_term(tmp_path, caplog):
    tokenizer, task = word_tokenizer(), TextClassificationTask(max_length=32)
    rows = task.prepare(sentiment_dataset(16, unlabeled_every=4), student_processor=tokenizer)
    args = DistillationConfig(
        output_dir=str(tmp_path), alpha=0.0, max_steps=1, use_cpu=True, report_to="none", save_strategy="no"
    )
    trainer = DistillationTrainer(
        model=bert_classifier(len(tokenizer)), args=args, task=task, train_dataset=rows
    )
    with caplog.at_level(logging.WARNING, logger="hf_kd.trainer"):
        trainer.train()
    assert "4 of the 16 training rows have no label and alpha=0.0" in caplog.text


# ---- 6. eval_split none ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["none", "None", "null", ""])
def test_eval_split_none_turns_evaluation_off(value):
    assert DataArguments(eval_split=value).eval_split is None


def test_eval_split_none_runs_without_evaluation_even_with_an_eval_strategy(tmp_path):
    recipe = write_text_run(tmp_path, eval_strategy="epoch")
    result = run(recipe, "--eval_split", "none")
    assert result.metrics == {}
    assert not any("eval_loss" in entry for entry in result.trainer.state.log_history)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="load_best_model_at_end needs an evaluation split"):
        run(recipe, "--eval_split", "none", "--save_strategy", "epoch", "--load_best_model_at_end", "true")
