"""Faults and truth at the Hub's edge, on tiny real runs and the local Hub stand-in (tests/hub_server.py):
no secret in any written or pushed byte, a failed push says in one line how to push again, and the
model card says what the run did (fine-tuning or distillation, teacher and student scored alike)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shlex
import socket
import time
from dataclasses import fields
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
import yaml
from distill_run import write_tiny_run
from hub_server import LocalHub
from transformers import AutoModelForCausalLM

from hf_kd import DataArguments, DistillationConfig, ModelArguments, parse_args, run_distillation
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.hub import HubPushError, push_student
from hf_kd.tasks import split_batch

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {
    "env": "planted-env-secret-4f1c9a",
    "recipe": "hf_PlantedRecipeSecret0123456789abcd",
    "cli": "planted-cli-secret-77e0b2",
    "python": "planted-python-secret-9d3e55",
}
"""One distinctive token per way a user can give one (no two alike, so each way is checked on its own)."""


def _script(name: str):
    """``scripts/<name>.py`` as a module (its ``main`` runs in this process)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port_url() -> str:
    """The URL of a local port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _use_endpoint(monkeypatch, url: str) -> None:
    """Point huggingface_hub at ``url`` with HF_HUB_OFFLINE lifted, for this test only."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def local_hub(monkeypatch):
    with LocalHub() as hub:
        _use_endpoint(monkeypatch, hub.url)
        yield hub


def _card(text: str) -> tuple[dict, str]:
    """(YAML metadata, body) of a model card."""
    _, metadata, body = text.split("---\n", 2)
    return yaml.safe_load(metadata), body


def _model_index(metadata: dict) -> tuple[str, dict[str, float]]:
    """The ``model-index`` name and its metric values by type."""
    (entry,) = metadata["model-index"]
    (result,) = entry["results"]
    return entry["name"], {metric["type"]: metric["value"] for metric in result["metrics"]}


# -- 2. secrets -----------------------------------------------------------------------------------


def test_no_token_in_any_written_or_pushed_byte(tmp_path, local_hub, monkeypatch, capfd, caplog):
    """A token given by env, recipe, command line or Python is used to push and found in no file of
    output_dir (card, training_args.bin, checkpoints, results, log history), no uploaded byte and no log."""
    monkeypatch.setenv("HF_TOKEN", TOKENS["env"])
    caplog.set_level(logging.DEBUG)
    script_run = tmp_path / "script"
    script_run.mkdir()
    recipe = write_tiny_run(
        script_run,
        push_to_hub=True,
        hub_model_id="local-user/from-script",
        hub_token=TOKENS["recipe"],
        save_strategy="steps",
        save_steps=2,
    )
    _script("distill").main(["--config", str(recipe), "--hub_token", TOKENS["cli"]])
    assert {f"Bearer {TOKENS['cli']}"} == {auth for auth in local_hub.authorizations if auth}

    python_run = tmp_path / "python"
    python_run.mkdir()
    recipe = yaml.safe_load(write_tiny_run(python_run).read_text())
    arguments = [
        cls(**{f.name: recipe[f.name] for f in fields(cls) if f.name in recipe})
        for cls in (DataArguments, ModelArguments)
    ]
    config_fields = {f.name for f in fields(DistillationConfig)}
    config = DistillationConfig(
        **{key: value for key, value in recipe.items() if key in config_fields},
        push_to_hub=True,
        hub_model_id="local-user/from-python",
        hub_token=TOKENS["python"],
    )
    run_distillation(*arguments, config)
    assert local_hub.authorizations[-1] == f"Bearer {TOKENS['python']}"

    written = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    written = {path: data for path, data in written.items() if "out" in path.relative_to(tmp_path).parts}
    names = {path.relative_to(tmp_path).as_posix() for path in written}
    assert {"script/out/training_args.bin", "script/out/checkpoint-4/training_args.bin"} <= names
    assert {"python/out/README.md", "python/out/trainer_state.json", "python/out/train_results.json"} <= names
    pushed = {
        f"{repo_id}@{branch}/{name}": data
        for repo_id, repo in local_hub.repos.items()
        for branch, files in repo.branches.items()
        for name, data in files.items()
    }
    assert "local-user/from-script@main/training_args.bin" in pushed
    assert "local-user/from-python@main/README.md" in pushed
    captured = capfd.readouterr()
    texts = [captured.out, captured.err, caplog.text, *(c.summary + c.description for c in local_hub.commits)]
    for way, token in TOKENS.items():
        assert not [path for path, data in written.items() if token.encode() in data], way
        assert not [name for name, data in pushed.items() if token.encode() in data], way
        assert not [text for text in texts if token in text], way
    card = (tmp_path / "script" / "out" / "README.md").read_text()
    assert "--hub_token '<redacted>'" in card or "--hub_token <redacted>" in card
    assert "hub_token: <redacted>" in card and "push_to_hub: true" in card  # the rest of the recipe is kept
    args = torch.load(tmp_path / "python" / "out" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.hub_model_id == "local-user/from-python" and args.alpha == 0.5


# -- 7. Hub failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "said"), [(500, "HTTP 500"), ("close", "disconnected")])
def test_failed_push_says_where_the_student_is_and_how_to_push_again(
    tmp_path, local_hub, monkeypatch, capfd, fault, said
):
    """The Hub answers 500 or drops the connection at push time (after the repository was created before
    training): one line naming the endpoint and the failure, the student saved, and the printed
    scripts/push.py command pushes it once the Hub is back."""
    monkeypatch.setenv("HF_TOKEN", "hf_local_token_for_faults_0000")
    recipe = write_tiny_run(tmp_path, push_to_hub=True, hub_model_id="local-user/faulty")
    local_hub.fail_after(fault, creates=1)
    with pytest.raises(SystemExit) as exit_info:
        _script("distill").main(["--config", str(recipe)])
    message = str(exit_info.value.code)
    out = tmp_path / "out"
    assert message.count("\n") == 0 and message.startswith("error: Hub request to ")
    assert local_hub.url in message and said in message
    assert f"The student is saved in {out}" in message
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert "Traceback" not in capfd.readouterr().err
    command = message.split("push it again with: ", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "scripts/push.py"]
    assert argv[2:] == ["--folder", str(out), "--repo_id", "local-user/faulty"]

    local_hub.fault = None  # the Hub is back
    _script("push").main(argv[2:])
    files = local_hub.files("local-user/faulty")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert _card(files["README.md"].decode())[1].lstrip().startswith("# local-user/faulty\n")


def test_refused_connection_fails_at_once_in_one_line(tmp_path, monkeypatch, capfd):
    """Nothing listens on the endpoint: before training, the run stops at once (nothing trained); a push of
    a saved folder fails at once too, naming the endpoint, the refusal and the command to push again."""
    url = _free_port_url()
    _use_endpoint(monkeypatch, url)
    recipe = write_tiny_run(tmp_path, push_to_hub=True, hub_model_id="local-user/unreachable")
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        _script("distill").main(["--config", str(recipe)])
    message = str(exit_info.value.code)
    assert time.monotonic() - start < 10
    assert message.count("\n") == 0 and url in message and "refused" in message.lower()
    assert "nothing was trained" in message and "scripts/push.py" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()

    folder = tmp_path / "saved"
    from tiny import image_processor, save_model, vit_classifier

    save_model(vit_classifier(), image_processor(), folder)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        _script("push").main(["--folder", str(folder), "--repo_id", "local-user/x", "--revision", "v1"])
    message = str(exit_info.value.code)
    assert time.monotonic() - start < 5
    assert url in message and "refused" in message.lower() and message.count("\n") == 0
    assert message.endswith(
        f"push it again with: python scripts/push.py --folder {folder} --repo_id local-user/x --revision v1"
    )
    assert "Traceback" not in capfd.readouterr().err
    with pytest.raises(HubPushError, match="Connection refused"):
        push_student(folder, "local-user/x")


# -- 8. the model card tells the truth --------------------------------------------------------------


def test_fine_tuning_run_gets_a_fine_tuning_card_and_keeps_its_record(tmp_path, local_hub):
    """α = 0 and no teacher (how the demo trains its teacher): an ordinary fine-tuning card with its scores
    as model-index results; with save_strategy: no, train results and the full log history are kept. A
    later push_student titles the card with the repository, not the folder."""
    recipe = write_tiny_run(tmp_path, alpha=0.0, teacher_model_name_or_path=None)
    result = run_distillation(*parse_args(["--config", str(recipe)]))
    out = tmp_path / "out"
    metadata, body = _card((out / "README.md").read_text())
    assert "knowledge-distillation" not in metadata["tags"] and "hf_kd" in metadata["tags"]
    for claim in ("distilled", "Teacher", "no teacher)", "ran alongside", "τ"):
        assert claim not in body, claim
    assert "fine-tuned from a freshly built model on labelled data, without a teacher" in body
    name, scores = _model_index(metadata)
    assert name == "out" and scores["accuracy"] == pytest.approx(result.metrics["eval_accuracy"])
    assert scores["cross_entropy"] == pytest.approx(result.metrics["eval_loss_hard"])
    assert set(metadata["metrics"]) == set(scores)

    history = result.trainer.state.log_history
    saved = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert saved == history and any(round(e["loss"], 4) != e["loss"] for e in saved if "loss" in e)
    train = json.loads((out / "train_results.json").read_text())
    (end_of_training,) = [entry for entry in history if "train_loss" in entry]
    assert train["train_loss"] == end_of_training["train_loss"] > 0
    assert (
        json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
        == result.metrics["eval_accuracy"]
    )

    push_student(out, "local-user/renamed-student")
    pushed_metadata, pushed_body = _card(local_hub.files("local-user/renamed-student")["README.md"].decode())
    assert pushed_body.lstrip().startswith("# local-user/renamed-student\n")
    assert _model_index(pushed_metadata) == ("local-user/renamed-student", scores)
    assert "# out\n" not in pushed_body


def test_distillation_card_scores_teacher_and_student_alike(tmp_path):
    """Classification: the teacher's accuracy and cross-entropy next to the student's, on the same split;
    the student's as model-index results."""
    recipe = write_tiny_run(tmp_path)
    result = run_distillation(*parse_args(["--config", str(recipe)]))
    metadata, body = _card((tmp_path / "out" / "README.md").read_text())
    assert "knowledge-distillation" in metadata["tags"]
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    teacher_ce = results["teacher_eval_loss_hard"]
    assert 0 < teacher_ce < 5 and teacher_ce != results["eval_loss_hard"]
    student_ce = result.metrics["eval_loss_hard"]
    assert f"| cross_entropy | {teacher_ce:.4g} | {student_ce:.4g} |" in body
    accuracy = f"| accuracy | {results['teacher_eval_accuracy']:.4g} | {results['eval_accuracy']:.4g} |"
    assert accuracy in body and "On the `test` split." in body
    assert _model_index(metadata)[1] == {"accuracy": results["eval_accuracy"], "cross_entropy": student_ce}


def test_causal_lm_card_has_teacher_and_student_perplexity(tmp_path):
    """Causal LM: teacher and student scored by token cross-entropy and perplexity = exp(mean token CE) on
    the same evaluation batches: logged, in eval_results.json, in the card body and its model-index."""
    data = write_toy_chat(tmp_path / "toy_chat", num_train=32, num_test=8)
    common = ["--dataset_name", str(data), "--student_processor", str(data / "tokenizer"), "--max_steps", "2"]
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    config = "recipes/causal_lm/tiny/teacher.yaml"
    teacher_run = run_distillation(
        *parse_args(["--config", config, *common, "--output_dir", str(teacher_dir)])
    )
    teacher_metadata, _ = _card((teacher_dir / "README.md").read_text())
    assert "knowledge-distillation" not in teacher_metadata["tags"]
    assert _model_index(teacher_metadata)[1]["perplexity"] == pytest.approx(
        math.exp(teacher_run.metrics["eval_loss_hard"])
    )

    student_args = ["--config", "recipes/causal_lm/tiny/student.yaml", *common]
    student_args += ["--output_dir", str(student_dir), "--teacher_model_name_or_path", str(teacher_dir)]
    result = run_distillation(*parse_args(student_args))
    student_perplexity = result.metrics["eval_perplexity"]
    assert student_perplexity == pytest.approx(math.exp(result.metrics["eval_loss_hard"]))

    # The teacher's token cross-entropy, computed here on the run's own evaluation batches.
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in result.trainer.get_eval_dataloader():
            logits = teacher(**split_batch(batch)[0]).logits[..., :40]  # the vocabulary both share
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += int((labels != -100).sum())
    teacher_perplexity = math.exp(total / count)

    results = json.loads((student_dir / "eval_results.json").read_text())
    assert results["teacher_eval_perplexity"] == pytest.approx(teacher_perplexity, rel=1e-4)
    assert results["eval_perplexity"] == student_perplexity
    metadata, body = _card((student_dir / "README.md").read_text())
    assert f"| perplexity | {results['teacher_eval_perplexity']:.4g} | {student_perplexity:.4g} |" in body
    assert _model_index(metadata)[1]["perplexity"] == student_perplexity
    assert metadata["metrics"] == ["bits_per_byte", "cross_entropy", "perplexity"]
