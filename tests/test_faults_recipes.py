"""Weak inputs answered in one line, before anything loads, naming what is wrong: a recipe value of the
wrong type, a key written twice, a flag of the wrong type, a truncated weights file, a model of another
modality than the task, a named column the data lacks; and a final save that fills the disk leaves no
half-written student."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from datasets import DatasetDict
from distill_run import write_tiny_run
from tiny import bert_classifier, image_processor, save_model, word_tokenizer

from hf_kd import parse_args, run_distillation
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.modeling import DamagedWeightsError


def recipe_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nstudent_model_name_or_path: some/model\n{text}")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_steps: 6.7", "max_steps: 6.7 (float) in recipe '{path}': expected an integer"),
        ("learning_rate: fast", "learning_rate: 'fast' (str) in recipe '{path}': expected a number"),
        ("alpha: true", "alpha: True (bool) in recipe '{path}': expected a number"),
        ("use_cpu: maybe", "use_cpu: 'maybe' (str) in recipe '{path}': expected true or false"),
        (
            "per_device_train_batch_size: [8]",
            "per_device_train_batch_size: [8] (list) in recipe '{path}': expected an integer",
        ),
        ("eval_strategy: sometimes", "eval_strategy: 'sometimes' (str) in recipe '{path}': expected one of"),
        ("max_length: 1.0e+2", "max_length: 100.0 (float) in recipe '{path}': expected an integer"),
    ],
)
def test_a_recipe_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(tmp_path, line, message):
    path = recipe_with(tmp_path, line)
    with pytest.raises(ValueError) as error:
        parse_args(["--config", str(path)])
    assert str(error.value).startswith(message.format(path=path)) and "\n" not in str(error.value)


def test_recipe_numbers_written_as_yaml_strings_are_read_as_numbers(tmp_path):
    _, _, config = parse_args(
        ["--config", str(recipe_with(tmp_path, "learning_rate: 1e-5\nmax_steps: '12'\n"))]
    )
    assert config.learning_rate == 1e-5 and config.max_steps == 12


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("alpha: 0.5\ntemperature: 2.0\nalpha: 0.9\n", "alpha", (3, 5)),
        (
            "student_config:\n  model_type: bert\n  hidden_size: 16\n  hidden_size: 32\n",
            "hidden_size",
            (5, 6),
        ),
    ],
)
def test_a_key_written_twice_is_refused_naming_it(tmp_path, text, key, lines):
    path = recipe_with(tmp_path, text)
    with pytest.raises(
        ValueError, match=rf"key '{key}' is written twice \(lines {lines[0]} and {lines[1]}\)"
    ) as error:
        parse_args(["--config", str(path)])
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_flag_of_the_wrong_type_is_one_line_not_a_usage_dump(tmp_path):
    with pytest.raises(ValueError) as error:
        parse_args(["--output_dir", str(tmp_path), "--max_steps", "6.7"])
    assert str(error.value) == "argument --max_steps/--max-steps: invalid int value: '6.7'"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_teacher_file_is_named_before_training(tmp_path):
    recipe = write_tiny_run(tmp_path)
    truncate(tmp_path / "teacher" / "model.safetensors")
    with pytest.raises(
        DamagedWeightsError, match=r"teacher/model.safetensors' \(\d+ bytes\) is not a whole safetensors file"
    ):
        run_distillation(*parse_args(["--config", str(recipe)]))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.safetensors"))


def test_a_truncated_checkpoint_is_named_on_resume(tmp_path):
    recipe = write_tiny_run(tmp_path, save_strategy="steps", save_steps=2)
    run_distillation(*parse_args(["--config", str(recipe)]))
    truncate(tmp_path / "out" / "checkpoint-4" / "model.safetensors")
    with pytest.raises(
        DamagedWeightsError, match=r"checkpoint-4/model.safetensors' \(\d+ bytes\) is not a whole"
    ):
        run_distillation(
            *parse_args(["--config", str(recipe), "--resume_from_checkpoint", "true", "--max_steps", "6"])
        )


def test_a_full_disk_during_the_final_save_leaves_no_half_written_student(tmp_path, monkeypatch):
    import transformers.modeling_utils

    recipe = write_tiny_run(tmp_path, save_strategy="steps", save_steps=2)
    out = tmp_path / "out"
    save = transformers.modeling_utils.safe_save_file

    def safe_save_file(state, filename, *args, **kwargs):
        if Path(filename).parent.name == "_partial_model":
            Path(filename).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(state, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safe_save_file)
    with pytest.raises(OSError) as failure:
        run_distillation(*parse_args(["--config", str(recipe)]))
    assert failure.value.errno == errno.ENOSPC
    assert f"disk full: no space left on the device of '{out}' while saving the final model" in str(
        failure.value
    )
    assert "the latest complete checkpoint is checkpoint-4" in str(failure.value)
    left = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in left and "config.json" not in left and "_partial_model" not in left
    assert (out / "checkpoint-4" / "model.safetensors").is_file()


def test_a_text_model_as_teacher_of_an_image_task_is_named_as_such(tmp_path):
    recipe = write_tiny_run(tmp_path)
    save_model(
        bert_classifier(len(word_tokenizer()), labels=["a", "b", "c"]), word_tokenizer(), tmp_path / "bert"
    )
    with pytest.raises(
        ValueError, match=r"the teacher is a 'bert' model, which has no head for task='image-classification'"
    ):
        run_distillation(
            *parse_args(["--config", str(recipe), "--teacher_model_name_or_path", str(tmp_path / "bert")])
        )
    save_model(bert_classifier(len(word_tokenizer())), image_processor(), tmp_path / "bert_student")
    with pytest.raises(
        ValueError, match=r"the student is a 'bert' model, which has no head for task='image-classification'"
    ):
        run_distillation(
            *parse_args(
                ["--config", str(recipe), "--student_model_name_or_path", str(tmp_path / "bert_student")]
            )
        )


def test_a_named_messages_column_the_data_lacks_is_refused(tmp_path):
    data = write_toy_chat(tmp_path / "toy_chat", num_train=8, num_test=4)  # columns: messages, text
    renamed = DatasetDict.load_from_disk(str(data))
    renamed.save_to_disk(str(tmp_path / "chat"))
    args = [
        "--task", "causal-lm", "--dataset_name", str(tmp_path / "chat"),
        "--student_processor", str(data / "tokenizer"),
        "--student_config", json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                         "num_hidden_layers": 1, "num_attention_heads": 2}),
        "--alpha", "0", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
    ]  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"messages_column='conversation': split 'train' of dataset .* has no such column \(its columns: \['messages', 'text'\]\); it would be read from 'text' \(text_column\) instead",
    ):
        run_distillation(*parse_args([*args, "--messages_column", "conversation"]))
    with pytest.raises(
        ValueError, match=r"text_column='body': .*it would be read from 'messages' \(messages_column\)"
    ):
        run_distillation(*parse_args([*args, "--text_column", "body"]))
    assert not (tmp_path / "out").exists()
