"""The distillation model card, and pushing a student through a local Hub endpoint with the real
huggingface_hub client (tests/hub_server.py; nothing mocked)."""

from __future__ import annotations

import logging

import huggingface_hub.constants
import pytest
import yaml
from hub_server import LocalHub

from hf_kd import DataArguments, DistillationConfig, parse_args, run_distillation
from hf_kd.cards.run import run_card_info, with_latest_evaluation
from hf_kd.hub import push_student

SECRET = "hf_local_test_token_0123456789"


def _card_info(tmp_path, **config_overrides):
    data = DataArguments(task="image-classification", dataset_name="ylecun/mnist")
    config = DistillationConfig(
        output_dir=str(tmp_path / "student"),
        hub_model_id="me/vit-tiny-kd",
        teacher_model_name_or_path="google/vit-base-patch16-224",
        teacher_model_revision="abc123",
        divergence="jsd",
        temperature=4.0,
        alpha=0.7,
        **config_overrides,
    )
    return run_card_info(
        data,
        config,
        student_parameters=5_000_000,
        teacher_parameters=86_000_000,
        teacher_metrics={"eval_accuracy": 0.91},
        cache_provenance={
            "teacher_id": "google/vit-base-patch16-224",
            "teacher_revision": "abc123",
            "top_k": 20,
            "dtype": "float16",
        },
        command="python scripts/distill.py --config r.yaml",
        recipe_yaml="alpha: 0.7\ntemperature: 4.0\n",
    )


def test_card_says_how_the_student_was_made(tmp_path):
    logs = [
        {"loss": 1.0, "step": 2},
        {"eval_accuracy": 0.5, "eval_loss": 2.0, "step": 2},
        {"eval_accuracy": 0.875, "eval_loss": 0.5, "eval_runtime": 1.0, "step": 4},
        {"eval_knowledge/level1/teacher_entropy": 0.25, "eval_knowledge/health/histogram/0": 3.0, "step": 4},
    ]
    info = with_latest_evaluation(
        _card_info(tmp_path, synthetic_teacher="kd_pt", teacher_source="cached", teacher_cache="c"), logs
    )
    assert info.student_metrics == {"eval_accuracy": 0.875, "eval_loss": 0.5, "eval_runtime": 1.0}
    from hf_kd.cards.model import render_model_card

    text = str(render_model_card(info))
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["base_model"] == "google/vit-base-patch16-224"
    assert metadata["datasets"] == ["ylecun/mnist"]
    assert {"knowledge-distillation", "hf_kd", "image-classification"} <= set(metadata["tags"])
    assert metadata["metrics"] == ["accuracy"]
    assert metadata["pipeline_tag"] == "image-classification"
    for line in (
        "# me/vit-tiny-kd",
        "`google/vit-base-patch16-224` (revision `abc123`)",
        "- **Divergence D:** `jsd`",
        "- **Temperature τ:** 4 (τ² scaling on)",
        "- **Alpha α:** 0.7",
        "- **Target:** `kd_pt`",
        "cached: the teacher's outputs were computed once",
        "| `top_k` | 20 |",
        "| accuracy | 0.91 | 0.875 |",
        "| parameters | 86,000,000 (86M) | 5,000,000 (5M) |",
        "17.20× fewer parameters",
        "| `level1/teacher_entropy` | 0.25 |",
        "python scripts/distill.py --config r.yaml",
        "alpha: 0.7\ntemperature: 4.0",
    ):
        assert line in text, line
    assert "histogram" not in text and "runtime" not in text


@pytest.fixture
def local_hub(monkeypatch):
    """A local Hub with HF_HUB_OFFLINE lifted for this test only, and a token in the usual env variable."""
    with LocalHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", SECRET)
        yield hub


def test_recipe_push_to_hub_uploads_student_and_card(tmp_path, local_hub, capfd, caplog):
    from distill_run import write_tiny_run

    recipe = write_tiny_run(tmp_path, push_to_hub=True, hub_model_id="local-user/tiny-kd")
    caplog.set_level(logging.DEBUG)
    result = run_distillation(
        *parse_args(["--config", str(recipe)]), command="python scripts/distill.py --config r.yaml"
    )
    files = local_hub.files("local-user/tiny-kd")
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(files)
    assert not [
        name
        for name in files
        if name.startswith(("checkpoint-", "teacher")) or name.endswith((".bin.index.json", ".pt"))
    ]
    local = tmp_path / "out"
    assert files["README.md"] == (local / "README.md").read_bytes()
    assert files["model.safetensors"] == (local / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    accuracy = result.metrics["eval_accuracy"]
    assert "| accuracy | " in card and f" {accuracy:.4g} |" in card
    assert "base_model" not in card  # the teacher is a local path, not a Hub id
    assert local_hub.validated_readmes and not local_hub.unknown_requests
    assert all(auth == f"Bearer {SECRET}" for auth in local_hub.authorizations if auth)
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text


def test_push_student_skips_checkpoints_and_teacher(tmp_path, local_hub):
    from tiny import image_processor, save_model, vit_classifier

    folder = save_model(vit_classifier(), image_processor(), tmp_path / "student")
    save_model(vit_classifier(hidden=32), image_processor(), folder / "teacher")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (folder / "README.md").write_text("---\ntags:\n- knowledge-distillation\n---\n# card\n")
    commit = push_student(folder, "local-user/pushed", revision="v1")
    assert commit.oid == local_hub.commits[-1].oid
    assert local_hub.commits[-1].revision == "v1"
    assert sorted(local_hub.files("local-user/pushed", "v1")) == sorted(
        ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    )
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_student(tmp_path / "empty", "local-user/x")


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    """hf_kd.files.write_atomic (the model card and the knowledge report use it): a failed write leaves the
    old file and no temporary file; a finished one is readable by everyone (mkstemp makes 0o600)."""
    from hf_kd.files import write_atomic

    path = tmp_path / "README.md"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    assert write_atomic(path, lambda tmp: tmp.write_text("new")) == path
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
