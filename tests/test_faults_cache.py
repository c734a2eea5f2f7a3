"""Teacher cache faults: every recorded fact that training or the card depends on is verified when a
cache is read. Each case is a real capture of a tiny BERT teacher, tampered with the way a user or a
broken copy would, then read or trained from: a clear error naming what disagrees, before training."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from datasets import DatasetDict, load_from_disk
from test_cache import CrashingTeacher
from tiny import bert_classifier, save_model, sentiment_dataset, word_tokenizer

from hf_kd import DataArguments, DistillationConfig, ModelArguments, run_distillation
from hf_kd.hub import push_cache_to_hub
from hf_kd.tasks import TextClassificationTask
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.cache.format import METADATA_FILE, CacheError, CacheMismatchError, metadata_digests
from hf_kd.teachers.cache.load import load_teacher_cache

ARROW = "train/data-00000-of-00001.arrow"
CAPTURE = {"shard_size": 16, "batch_size": 8, "progress": False}


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A saved tiny BERT teacher, a saved 40/12-row sentiment dataset and a full-logit cache of it."""
    root = tmp_path_factory.mktemp("faults_cache")
    tokenizer = word_tokenizer()
    teacher = bert_classifier(len(tokenizer), hidden=16, seed=0).eval()
    save_model(teacher, tokenizer, root / "teacher")
    DatasetDict(train=sentiment_dataset(40, seed=0), test=sentiment_dataset(12, seed=1)).save_to_disk(
        str(root / "data")
    )
    data = load_from_disk(str(root / "data"))
    capture_teacher_logits(
        teacher,
        tokenizer,
        TextClassificationTask(),
        data,
        root / "cache",
        teacher_id=str(root / "teacher"),
        teacher_revision="main",
        **CAPTURE,
    )
    return root, teacher, tokenizer, data


def copy_cache(captured, tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    shutil.copytree(captured[0] / "cache", path)
    return path


def edit_metadata(cache: Path, edit, reseal: bool = False) -> None:
    """Apply ``edit`` to the cache's metadata dict; with ``reseal`` also rewrite its digests, as a
    tool that rewrites the metadata consistently would."""
    path = cache / METADATA_FILE
    data = json.loads(path.read_text())
    edit(data)
    if reseal:
        data["digests"] = metadata_digests(data)
    path.write_text(json.dumps(data, indent=2))


def distill(captured, out: Path, cache: Path, **config):
    """Two steps of a tiny BERT student trained from ``cache`` (evaluated on the test split)."""
    root, _, tokenizer, _ = captured
    data_args = DataArguments(
        task="text-classification", dataset_name=str(root / "data"), eval_split="test", max_length=64
    )  # the student's position table
    student = dict(
        model_type="bert", vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, max_position_embeddings=64,
    )  # fmt: skip
    model_args = ModelArguments(student_config=student, student_processor=str(root / "teacher"))
    args = DistillationConfig(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=8, use_cpu=True, seed=0,
        save_strategy="no", report_to="none", disable_tqdm=True, alpha=0.5,
        teacher_source="cached", teacher_cache=str(cache), **config,
    )  # fmt: skip
    return run_distillation(data_args, model_args, args)


def test_edited_teacher_config_is_refused_naming_the_field(captured, tmp_path):
    """Swapping the teacher's label names permutes its classes for the student: refused before training."""
    cache = copy_cache(captured, tmp_path)
    swap = lambda d: d["teacher_config"].update(id2label={"0": "positive", "1": "negative"})  # noqa: E731
    edit_metadata(cache, swap)
    with pytest.raises(CacheError, match=r"differ from what it recorded: teacher_config\.id2label;"):
        distill(captured, tmp_path / "out", cache)
    assert not (tmp_path / "out").exists()
    edit_metadata(cache, lambda d: None, reseal=True)  # digests rewritten: the config hash still disagrees
    with pytest.raises(CacheError, match="teacher_config does not match teacher_config_hash"):
        load_teacher_cache(cache)


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("num_classes", lambda d: d.update(num_classes=3)),
        ("top_k", lambda d: d.update(top_k=1)),
        ("dtype", lambda d: d.update(dtype="float16")),
        ("processor_hash", lambda d: d.update(processor_hash="0" * 64)),
        ("splits.train", lambda d: d["splits"]["train"].update(num_rows=39)),
        ("splits.test", lambda d: d["splits"]["test"].update(fingerprint="f" * 64)),
        ("teacher_revision", lambda d: d.update(teacher_revision="v2")),
        ("teacher_weights_hash", lambda d: d.update(teacher_weights_hash="0" * 64)),
        ("teacher_config.num_labels", lambda d: d["teacher_config"].update(num_labels=3)),
        ("teacher_config.problem_type", lambda d: d["teacher_config"].pop("problem_type")),
        (f"files.{ARROW}", lambda d: d["files"].pop(ARROW)),
    ],
)
def test_any_edited_metadata_field_is_named(captured, tmp_path, field, edit):
    cache = copy_cache(captured, tmp_path)
    edit_metadata(cache, edit)
    with pytest.raises(CacheError, match=rf"differ from what it recorded: {re.escape(field)};"):
        load_teacher_cache(cache)


def test_every_file_of_the_folder_must_be_listed_and_intact(captured, tmp_path):
    """A file the ``files`` list leaves out is refused, so dropping an entry cannot drop its checksum."""
    cache = copy_cache(captured, tmp_path)
    edit_metadata(cache, lambda d: d["files"].pop(ARROW), reseal=True)
    data = bytearray((cache / ARROW).read_bytes())
    data[-100] ^= 0xFF
    (cache / ARROW).write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"files that its hf_kd_cache.json does not list: \['{ARROW}'\]"):
        load_teacher_cache(cache)

    extra = copy_cache(captured, tmp_path / "extra")
    shutil.copy(extra / ARROW, extra / "train/data-00001-of-00001.arrow")
    with pytest.raises(CacheError, match=r"does not list: \['train/data-00001-of-00001.arrow'\]"):
        distill(captured, tmp_path / "out", extra)
    assert not (tmp_path / "out").exists()


def test_resume_after_the_teachers_weights_changed_refuses_to_mix_rows(captured, tmp_path):
    root, teacher, tokenizer, data = captured
    task, out = TextClassificationTask(), tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed"):  # killed in the 2nd train shard: shard 0 is kept
        capture_teacher_logits(
            CrashingTeacher(teacher, crash_at=4), tokenizer, task, data, out, teacher_id="t", **CAPTURE
        )
    retrained = copy.deepcopy(teacher)  # the same config, other weights
    with torch.no_grad():
        retrained.classifier.bias.add_(0.5)
    with pytest.raises(
        CacheError, match=r"started with teacher_weights_hash='[0-9a-f]{64}'.*start a fresh cache"
    ):
        capture_teacher_logits(retrained, tokenizer, task, data, out, teacher_id="t", **CAPTURE)
    assert not out.exists() and len(list((tmp_path / "cache.partial/shards").rglob("*.arrow"))) == 1
    capture_teacher_logits(retrained, tokenizer, task, data, tmp_path / "fresh", teacher_id="t", **CAPTURE)
    fresh = load_teacher_cache(tmp_path / "fresh")
    with torch.no_grad():
        first = retrained(**tokenizer(data["train"]["text"][0], return_tensors="pt")).logits[0]
    torch.testing.assert_close(torch.tensor(fresh.splits["train"]["kd_teacher_logits"][0]), first)


def test_a_recipe_naming_another_teacher_is_refused_before_work(captured, tmp_path):
    root, _, tokenizer, _ = captured
    other = save_model(bert_classifier(len(tokenizer), hidden=16, seed=1), tokenizer, tmp_path / "other")
    cache = root / "cache"
    with pytest.raises(CacheMismatchError) as info:
        distill(captured, tmp_path / "out", cache, teacher_model_name_or_path=str(other))
    assert (info.value.field_name, info.value.cache_value, info.value.run_value) == (
        "teacher_id",
        str(root / "teacher"),
        str(other),
    )
    with pytest.raises(
        CacheMismatchError, match="teacher_revision is 'main' in the cache but 'v2' in the run"
    ):
        distill(
            captured,
            tmp_path / "out",
            cache,
            teacher_model_name_or_path=str(root / "teacher"),
            teacher_model_revision="v2",
        )
    assert not (tmp_path / "out").exists()


def test_the_card_names_the_caches_teacher_and_the_cache_stays_valid(captured, tmp_path):
    """The happy path: the recipe names the cache's teacher by another spelling of its directory; the
    student trains, its card names the teacher as the cache recorded it, and the cache is left intact."""
    root = captured[0]
    result = distill(
        captured, tmp_path / "out", root / "cache", teacher_model_name_or_path=f"{root / 'teacher'}/."
    )
    assert result.trainer.state.global_step == 2 and "eval_accuracy" in result.metrics
    card = (tmp_path / "out/README.md").read_text()
    assert f"`{root / 'teacher'}` (revision `main`)" in card and "teacher/." not in card
    assert load_teacher_cache(root / "cache").metadata.splits["train"]["num_rows"] == 40


def test_a_cache_read_by_hub_id_is_verified_the_same(captured, tmp_path, monkeypatch):
    """Pushed to the local Hub stand-in, then read back by its id: the snapshot (with the attributes file
    the Hub adds to every repository) loads; the same snapshot with an edited label name is refused."""
    import huggingface_hub.constants
    from hub_server import LocalHub

    import hf_kd.teachers.cache.load as cache_load

    repo_id = "local-user/tiny-bert-cache"
    with LocalHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        push_cache_to_hub(captured[0] / "cache", repo_id, token="hf_test")
        files = {".gitattributes": b"*.arrow filter=lfs diff=lfs merge=lfs -text\n", **hub.files(repo_id)}

    def snapshot(name, tamper=None):
        """The repository's files in a snapshot folder, as ``snapshot_download`` returns them."""
        folder = tmp_path / name
        for path, content in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
        if tamper:
            edit_metadata(folder, tamper)
        return folder

    calls = []
    for name, tamper in (
        ("intact", None),
        ("edited", lambda d: d["teacher_config"]["id2label"].update({"0": "x"})),
    ):
        folder = snapshot(name, tamper)
        monkeypatch.setattr(
            cache_load,
            "snapshot_download",
            lambda repo, folder=folder, **kw: calls.append(repo) or str(folder),
        )
        if tamper is None:
            assert load_teacher_cache(repo_id).metadata.num_classes == 2
        else:
            with pytest.raises(CacheError, match=r"differ from what it recorded: teacher_config\.id2label;"):
                load_teacher_cache(repo_id)
    assert calls == [repo_id, repo_id]
