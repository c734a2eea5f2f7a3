"""Runs that would learn nothing, or learn from garbage, stop with a named error instead of saving a
student and ending in success: a teacher with non-finite weights or outputs, a teacher missing weights of
the model it is loaded as, a non-finite loss or gradient, and rows or windows with nothing to learn."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from safetensors.torch import load_file
from tiny import bert_classifier, save_model, sentiment_dataset, tiny_config, tiny_llama, word_tokenizer
from transformers import TrainerCallback

from hf_kd import DistillationTrainer, parse_args, run_distillation
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.modeling import TeacherWeightsError
from hf_kd.tasks import CausalLMTask
from hf_kd.tasks.lm_targets import NoTargetError
from hf_kd.teachers.finite import NonFiniteTeacherError
from hf_kd.training_guard import NonFiniteTrainingError, NothingToLearnError, check_window

LLAMA_STUDENT = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The toy chat data and a saved tiny Llama teacher of its tokenizer."""
    root = tmp_path_factory.mktemp("chat")
    data = write_toy_chat(root / "toy_chat", num_train=32, num_test=8)
    tokenizer = load_tokenizer(data)
    save_model(tiny_llama(len(tokenizer), seed=1, pad_token_id=0), tokenizer, root / "teacher")
    return root


def load_tokenizer(data: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(data / "tokenizer"))


def lm_args(root: Path, out: Path, *flags: str) -> list[str]:
    return [
        "--task", "causal-lm",
        "--dataset_name", str(root / "toy_chat"),
        "--student_processor", str(root / "toy_chat" / "tokenizer"),
        "--student_config", json.dumps(LLAMA_STUDENT),
        "--teacher_model_name_or_path", str(root / "teacher"),
        "--alpha", "0.5",
        "--max_length", "48",
        "--max_steps", "2",
        "--per_device_train_batch_size", "8",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--output_dir", str(out),
        *flags,
    ]  # fmt: skip


def nothing_saved(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*.safetensors"))


# ---- a broken teacher --------------------------------------------------------------------------------


def test_a_teacher_with_a_nan_in_one_bias_is_refused_before_training(tmp_path):
    tokenizer = word_tokenizer()
    teacher = bert_classifier(len(tokenizer), seed=1)
    with torch.no_grad():
        teacher.bert.encoder.layer[0].attention.output.dense.bias[3] = float("nan")
    save_model(teacher, tokenizer, tmp_path / "teacher")
    DatasetDict(train=sentiment_dataset(32), test=sentiment_dataset(8, seed=1)).save_to_disk(
        str(tmp_path / "data")
    )
    args = [
        "--task", "text-classification",
        "--dataset_name", str(tmp_path / "data"),
        "--student_model_name_or_path", str(tmp_path / "teacher"),
        "--teacher_model_name_or_path", str(tmp_path / "teacher"),
        "--alpha", "0.5", "--max_steps", "2", "--use_cpu", "true", "--max_length", "32",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(
        NonFiniteTeacherError, match=r"1 non-finite value.*'bert.encoder.layer.0.attention.output.dense.bias'"
    ):
        run_distillation(*parse_args(args))
    assert nothing_saved(tmp_path / "out")


def test_a_teacher_whose_outputs_turn_non_finite_stops_the_first_step(tmp_path):
    """A teacher given as a model (no loader to check its weights): its first NaN output stops the run."""
    tokenizer = word_tokenizer()
    teacher = bert_classifier(len(tokenizer), seed=1)
    with torch.no_grad():
        teacher.classifier.bias[0] = float("inf") - float("inf")
    trainer = DistillationTrainer(
        model=bert_classifier(len(tokenizer)),
        teacher_model=teacher,
        args=tiny_config(tmp_path / "out", alpha=0.5, max_steps=2),
        train_dataset=sentiment_dataset(16),
        processing_class=tokenizer,
    )
    with pytest.raises(
        NonFiniteTeacherError, match=r"the teacher's output for a batch, row 0 holds a NaN logit"
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_causal_lm_loaded_as_a_classifier_teacher_is_refused_naming_the_missing_head(chat, tmp_path):
    DatasetDict(train=sentiment_dataset(32), test=sentiment_dataset(8, seed=1)).save_to_disk(
        str(tmp_path / "data")
    )
    tokenizer = word_tokenizer()
    save_model(tiny_llama(len(tokenizer), seed=1, pad_token_id=0), tokenizer, tmp_path / "lm")
    args = [
        "--task", "text-classification",
        "--dataset_name", str(tmp_path / "data"),
        "--student_model_name_or_path", str(tmp_path / "lm"),
        "--teacher_model_name_or_path", str(tmp_path / "lm"),
        "--alpha", "0.5", "--max_steps", "2", "--use_cpu", "true", "--max_length", "32",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(TeacherWeightsError, match=r"LlamaForSequenceClassification.*missing: score.weight"):
        run_distillation(*parse_args(args))
    assert nothing_saved(tmp_path / "out")


# ---- a non-finite loss or gradient -------------------------------------------------------------------


class PoisonAt(TrainerCallback):
    """Puts a NaN into one student weight after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_a_non_finite_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, alpha):
    tokenizer = word_tokenizer()
    out = tmp_path / "out"
    trainer = DistillationTrainer(
        model=bert_classifier(len(tokenizer)),
        teacher_model=bert_classifier(len(tokenizer), seed=1) if alpha else None,
        args=tiny_config(out, alpha=alpha, max_steps=8, save_strategy="steps", save_steps=2, logging_steps=1),
        train_dataset=sentiment_dataset(64),
        processing_class=tokenizer,
        callbacks=[PoisonAt(3)],
    )
    with pytest.raises(
        NonFiniteTrainingError, match=r"optimizer step 4: non-finite gradient norm nan"
    ) as error:
        trainer.train()
    assert str(out / "checkpoint-2") in str(error.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    saved = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


# ---- nothing to learn ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "rows"),
    [
        (["--max_length", "4"], None),  # every assistant reply cut off
        ([], "no assistant"),  # conversations without an assistant turn
    ],
)
def test_causal_lm_rows_without_any_target_are_refused_before_training(chat, tmp_path, flags, rows):
    root = chat
    if rows is not None:
        data = load_from_disk(str(chat / "toy_chat"))
        prompts = data.map(lambda row: {"messages": row["messages"][:1]})
        root = tmp_path
        prompts.save_to_disk(str(tmp_path / "toy_chat"))
        load_tokenizer(chat / "toy_chat").save_pretrained(str(tmp_path / "toy_chat" / "tokenizer"))
        (tmp_path / "teacher").symlink_to(chat / "teacher")
    with pytest.raises(NoTargetError, match=r"none of the 32 rows of split 'train' has a token to learn"):
        run_distillation(*parse_args(lm_args(root, tmp_path / "out", *flags)))
    assert nothing_saved(tmp_path / "out")


def test_rows_without_a_target_are_dropped_out_loud(chat, tmp_path, caplog):
    data = load_from_disk(str(chat / "toy_chat"))
    cut = data["train"].map(
        lambda row, i: {"messages": row["messages"][:1] if i % 4 == 0 else row["messages"]}, with_indices=True
    )
    DatasetDict(train=cut, test=data["test"]).save_to_disk(str(tmp_path / "toy_chat"))
    load_tokenizer(chat / "toy_chat").save_pretrained(str(tmp_path / "toy_chat" / "tokenizer"))
    (tmp_path / "teacher").symlink_to(chat / "teacher")
    with caplog.at_level(logging.WARNING, logger="hf_kd.tasks.causal_lm"):
        run_distillation(*parse_args(lm_args(tmp_path, tmp_path / "out")))
    assert "dropping 8 of the 32 rows of split 'train'" in caplog.text and "24 remain" in caplog.text


def test_a_prompt_only_evaluation_set_of_the_on_policy_recipe_is_refused(chat, tmp_path):
    data = load_from_disk(str(chat / "toy_chat"))
    prompts = data["test"].map(lambda row: {"messages": row["messages"][:1]})
    DatasetDict(train=data["train"], test=prompts).save_to_disk(str(tmp_path / "toy_chat"))
    load_tokenizer(chat / "toy_chat").save_pretrained(str(tmp_path / "toy_chat" / "tokenizer"))
    (tmp_path / "teacher").symlink_to(chat / "teacher")
    args = [
        "--config", "recipes/causal_lm/tiny/on_policy.yaml",
        *lm_args(tmp_path, tmp_path / "out", "--eval_strategy", "steps", "--eval_steps", "1"),
    ]  # fmt: skip
    with pytest.raises(NoTargetError, match=r"none of the 8 rows of split 'test' has a token to learn"):
        run_distillation(*parse_args(args))
    assert nothing_saved(tmp_path / "out")


def test_a_window_without_targets_stops_a_python_run(chat, tmp_path):
    """Rows prepared by hand (no run_distillation to drop them): the first empty window stops the run."""
    task = CausalLMTask(max_length=16)
    rows = Dataset.from_dict({"input_ids": [[3, 4, 5, 6]] * 8, "labels": [[-100] * 4] * 8})
    trainer = DistillationTrainer(
        model=tiny_llama(40, pad_token_id=0),
        args=tiny_config(tmp_path / "out", alpha=0.0, max_steps=2),
        task=task,
        train_dataset=rows,
    )
    with pytest.raises(
        NothingToLearnError, match=r"optimizer step 1: its batches hold no item with a target"
    ):
        trainer.train()
    assert nothing_saved(tmp_path / "out")


@pytest.mark.parametrize(
    ("counts", "hard_term", "soft_term", "said"),
    [
        ([0, 0], True, False, "no item with a target"),
        ([3, 0], True, True, "no position for the soft term"),  # α in (0, 1): the soft term is asked for
        ([0, 0], False, True, "no position for the soft term"),  # α = 1
    ],
)
def test_a_window_is_refused_when_every_term_asked_for_is_empty(tmp_path, counts, hard_term, soft_term, said):
    with pytest.raises(NothingToLearnError, match=rf"optimizer step 7: its batches hold {said}"):
        check_window(counts, hard_term=hard_term, soft_term=soft_term, step=7, output_dir=str(tmp_path))
    check_window(
        [0, 4], hard_term=True, soft_term=True, step=7, output_dir=str(tmp_path)
    )  # unlabelled rows, α > 0
    check_window([2, 0], hard_term=True, soft_term=False, step=7, output_dir=str(tmp_path))  # labels only


@pytest.mark.parametrize(
    "flags",
    [
        ["--num_labeled_examples", "0"],  # alpha 0: every row inert, dropped
        ["--num_labeled_examples", "0", "--use_unlabeled", "false", "--alpha", "0.5"],
        ["--max_train_samples", "0"],
    ],
)
def test_a_classification_run_left_without_a_row_to_learn_is_refused_before_loading(tmp_path, flags):
    DatasetDict(train=sentiment_dataset(16), test=sentiment_dataset(8, seed=1)).save_to_disk(
        str(tmp_path / "data")
    )
    args = [
        "--task", "text-classification", "--dataset_name", str(tmp_path / "data"),
        "--student_model_name_or_path", str(tmp_path / "missing"),  # never loaded
        "--teacher_model_name_or_path", str(tmp_path / "missing"),
        "--alpha", "0", "--use_cpu", "true", "--output_dir", str(tmp_path / "out"), *flags,
    ]  # fmt: skip
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no training row is left to learn from in split 'train'"):
        run_distillation(*parse_args(args))
    assert not (tmp_path / "out").exists()
