"""Resume and checkpoint faults, through scripts/distill.py: a run killed after a checkpoint and resumed
from it ends with exactly the weights of the run never interrupted (every task, a cached teacher too);
a checkpoint is visible only when whole; a full disk says so and leaves no partial checkpoint."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import DatasetDict
from distill_run import STUDENT_CONFIG, write_tiny_run
from safetensors.torch import load_file
from tiny import bert_classifier, save_model, sentiment_dataset, word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, TrainerState

from hf_kd import DistillationTrainer, parse_args
from hf_kd.checkpoints import STAGING_FOLDER
from hf_kd.data.hierarchy import write_hierarchy_dataset
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.tasks.features import MLPClassifierConfig, MLPForFeatureClassification

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


distill = _script("distill")

# Runs scripts/distill.py in a process that SIGKILLs itself (no cleanup, as a killed job) when the
# trainer method ``argv[1]`` is entered at global step ``argv[2]``.
KILLED_RUN = """
import os, runpy, signal, sys
from hf_kd.trainer import DistillationTrainer
hook, step = sys.argv[1], int(sys.argv[2])
original = getattr(DistillationTrainer, hook)
def killed(self, *args, **kwargs):
    if self.state.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
setattr(DistillationTrainer, hook, killed)
sys.argv = ["scripts/distill.py", *sys.argv[3:]]
runpy.run_path("scripts/distill.py", run_name="__main__")
"""

# 8 optimizer steps, a checkpoint every 3 (mid-epoch), dropout in the student: data order, RNG,
# optimizer and scheduler must all be restored for the weights to match.
SCHEDULE = dict(
    max_steps=8, save_strategy="steps", save_steps=3, eval_strategy="no", logging_steps=1, use_cpu=True
)


def _recipe(root: Path, values: dict) -> Path:
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({**values, **SCHEDULE, "seed": 0, "disable_tqdm": True}))
    return path


def image_recipe(root: Path) -> Path:
    student = {**STUDENT_CONFIG, "hidden_dropout_prob": 0.1}
    return write_tiny_run(root, **SCHEDULE, student_config=student, num_labeled_examples=24)


def cached_image_recipe(root: Path) -> Path:
    recipe = yaml.safe_load(image_recipe(root).read_text())
    _script("cache_teacher").main(
        ["--task", "image-classification", "--dataset_name", recipe["dataset_name"], "--use_cpu", "true"]
        + ["--teacher_model_name_or_path", recipe["teacher_model_name_or_path"]]
        + ["--output_dir", str(root / "cache")]
    )
    return _recipe(root, {**recipe, "teacher_source": "cached", "teacher_cache": str(root / "cache")})


def text_recipe(root: Path) -> Path:
    tokenizer = word_tokenizer()
    DatasetDict(train=sentiment_dataset(64), test=sentiment_dataset(16, seed=1)).save_to_disk(root / "data")
    save_model(bert_classifier(len(tokenizer), hidden=32, seed=1), tokenizer, root / "teacher")
    tokenizer.save_pretrained(root / "tokenizer")
    student = dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1)
    student.update(num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    return _recipe(
        root,
        dict(task="text-classification", dataset_name=str(root / "data"), max_length=16,
             student_config=student, student_processor=str(root / "tokenizer"),
             teacher_model_name_or_path=str(root / "teacher"), alpha=0.5, temperature=2.0,
             per_device_train_batch_size=16, learning_rate=5.0e-3),
    )  # fmt: skip


def causal_lm_recipe(root: Path) -> Path:
    data = write_toy_chat(root / "data", num_train=48, num_test=8)
    llama = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    llama.update(num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=5)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=40, **llama)).save_pretrained(root / "teacher")
    return _recipe(
        root,
        dict(task="causal-lm", dataset_name=str(data), student_processor=str(data / "tokenizer"),
             max_length=64, student_config=dict(model_type="llama", vocab_size=40, attention_dropout=0.1, **llama),
             teacher_model_name_or_path=str(root / "teacher"), teacher_processor=str(data / "tokenizer"),
             alpha=0.5, temperature=1.0, per_device_train_batch_size=8, learning_rate=3.0e-3),
    )  # fmt: skip


def features_recipe(root: Path) -> Path:
    data = write_hierarchy_dataset(root / "data", num_groups=2, classes_per_group=2, n_per_class=20)
    labels = DatasetDict.load_from_disk(str(data))["train"].features["label"].names
    torch.manual_seed(1)
    teacher = MLPForFeatureClassification(
        MLPClassifierConfig(
            input_dim=32,
            hidden_size=16,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
    )
    teacher.save_pretrained(root / "teacher")
    return _recipe(
        root,
        dict(task="feature-classification", dataset_name=str(data),
             student_config=dict(model_type="hf_kd_mlp", input_dim=32, hidden_size=16, dropout=0.2),
             teacher_model_name_or_path=str(root / "teacher"), alpha=0.5, temperature=2.0,
             per_device_train_batch_size=16, learning_rate=1.0e-2),
    )  # fmt: skip


RECIPES = {
    "image": image_recipe,
    "image-cached-teacher": cached_image_recipe,
    "text": text_recipe,
    "causal-lm": causal_lm_recipe,
    "features": features_recipe,
}


class Killed(BaseException):
    """Ends an in-process run the way a kill does: nothing catches it, nothing after it runs."""


def interrupt(recipe: Path, out: Path, hook: str, step: int, *, real_kill: bool, monkeypatch) -> None:
    """scripts/distill.py stopped when the trainer method ``hook`` is entered at global step ``step``:
    killed (SIGKILL) in its own process, or interrupted in this one."""
    argv = ["--config", str(recipe), "--output_dir", str(out)]
    if not real_kill:
        original = getattr(DistillationTrainer, hook)

        def killed(self, *args, **kwargs):
            if self.state.global_step == step:
                raise Killed
            return original(self, *args, **kwargs)

        with monkeypatch.context() as patch, pytest.raises(Killed):
            patch.setattr(DistillationTrainer, hook, killed)
            distill.main(argv)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same float sums as this process
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, hook, str(step), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == -9, done.stderr[-3000:]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max |Δ| {(a[name] - b[name]).abs().max():.3g}"


@pytest.mark.parametrize("task", list(RECIPES))
def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
    task, tmp_path, caplog, monkeypatch
):
    recipe = RECIPES[task](tmp_path)
    distill.main(["--config", str(recipe), "--output_dir", str(tmp_path / "straight")])
    out = tmp_path / "killed"
    if task == "image":  # killed in the middle of saving checkpoint-6 (model and optimizer written)
        interrupt(recipe, out, "_save_rng_state", 6, real_kill=True, monkeypatch=monkeypatch)
        assert (out / STAGING_FOLDER / "checkpoint-6" / "optimizer.pt").is_file()
        (out / "checkpoint-7").mkdir()  # and a partial checkpoint as an older version left them
        (out / "checkpoint-7" / "config.json").write_text("{}")
    else:  # killed during step 5, after checkpoint-3 (in this process: faster)
        interrupt(recipe, out, "compute_loss", 4, real_kill=False, monkeypatch=monkeypatch)
    assert not (out / "checkpoint-6").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3

    with caplog.at_level(logging.INFO, logger="hf_kd.checkpoints"):
        distill.main(["--config", str(recipe), "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert f"Resuming from the latest checkpoint, {out / 'checkpoint-3'}" in caplog.text
    if task == "image":
        assert f"Skipping {out / 'checkpoint-7'}: an incomplete checkpoint" in caplog.text
        assert not (out / STAGING_FOLDER).exists()
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    final, reference = weights(out), weights(tmp_path / "straight")
    assert_same_weights(final, reference)
    assert_same_weights(weights(out / "checkpoint-6"), weights(tmp_path / "straight" / "checkpoint-6"))
    assert any(not torch.equal(weights(out / "checkpoint-3")[k], reference[k]) for k in reference)


def test_resume_flag_from_the_command_line_and_the_recipe(tmp_path):
    recipe = yaml.safe_load(write_tiny_run(tmp_path).read_text())
    for value, expected in [
        ("true", True),
        ("True", True),
        ("false", None),
        ("out/checkpoint-3", "out/checkpoint-3"),
    ]:
        config = parse_args(["--config", str(tmp_path / "recipe.yaml"), "--resume_from_checkpoint", value])[2]
        assert config.resume_from_checkpoint == expected
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump({**recipe, "resume_from_checkpoint": True}))
    assert parse_args(["--config", str(tmp_path / "resume.yaml")])[2].resume_from_checkpoint is True


def test_resume_without_a_checkpoint_is_refused_before_loading(tmp_path):
    recipe = write_tiny_run(tmp_path, dataset_name=str(tmp_path / "no_such_data"))
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)  # incomplete: no trainer_state.json
    with pytest.raises(
        FileNotFoundError,
        match=r"resume_from_checkpoint: true, but output_dir=.*/out'? holds no complete checkpoint",
    ):
        distill.main(["--config", str(recipe), "--resume_from_checkpoint", "true"])
    with pytest.raises(
        ValueError, match=r"checkpoint-5' is an incomplete checkpoint \(no trainer_state.json"
    ):
        distill.main(
            ["--config", str(recipe), "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-5")]
        )


def _fill_disk_while_saving(monkeypatch, how: str, step: int) -> None:
    """At global step ``step`` the checkpoint save hits a full disk: half of trainer_state.json is written
    then ENOSPC (``json``), or torch's writer fails with no errno while the disk has 0 bytes free (``torch``)."""
    if how == "json":
        save = TrainerState.save_to_json

        def save_to_json(self, path):
            if self.global_step != step:
                return save(self, path)
            Path(path).write_text('{"best_global_step": null, "best_metric": nu')
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    else:
        import transformers.trainer

        save = transformers.trainer.torch.save
        usage = __import__("shutil").disk_usage

        def torch_save(obj, path, *args, **kwargs):
            if Path(path).name == "optimizer.pt" and Path(path).parent.name == f"checkpoint-{step}":
                Path(path).write_bytes(b"PK\x03\x04")
                monkeypatch.setattr("shutil.disk_usage", lambda p: usage(p)._replace(free=0))
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            return save(obj, path, *args, **kwargs)

        monkeypatch.setattr(transformers.trainer.torch, "save", torch_save)


@pytest.mark.parametrize("how", ["json", "torch"])
def test_full_disk_while_saving_a_checkpoint(how, tmp_path, monkeypatch):
    recipe = write_tiny_run(tmp_path, **SCHEDULE)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _fill_disk_while_saving(patch, how, 6)
        with pytest.raises(OSError) as failure:
            distill.main(["--config", str(recipe)])
    message = str(failure.value)
    assert failure.value.errno == errno.ENOSPC
    assert f"disk full: no space left on the device of '{out}' while saving checkpoint-6" in message
    assert "the latest complete checkpoint is checkpoint-3" in message
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "_"))) == ["checkpoint-3"]

    distill.main(["--config", str(recipe), "--resume_from_checkpoint", "true"])
    distill.main(["--config", str(recipe), "--output_dir", str(tmp_path / "straight")])
    assert_same_weights(weights(out), weights(tmp_path / "straight"))


def test_best_checkpoint_is_loaded_whole_at_the_end(tmp_path):
    """load_best_model_at_end reads the best checkpoint as from_pretrained does (ViT's saved names)."""
    schedule = {**SCHEDULE, "eval_strategy": "steps", "eval_steps": 3, "load_best_model_at_end": True}
    # The worst loss counts as best here, so the best checkpoint is an early one, not the last.
    recipe = write_tiny_run(tmp_path, **schedule, metric_for_best_model="loss", greater_is_better=True)
    distill.main(["--config", str(recipe)])
    out = tmp_path / "out"
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.parent == out and best.name != "checkpoint-8"
    assert_same_weights(weights(out), weights(best))
