"""Reading a teacher cache back (a local directory or a Hub dataset) and checking it against a run.

Every recorded fact is verified when a cache is read (:func:`load_teacher_cache`): the metadata against
the digests stored in it (an edit anywhere is named), the teacher config against its hash, the folder's
files against the complete ``files`` list (sizes and SHA-256), and the splits' rows and column types
against the metadata.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig

from hf_kd.tasks.base import Task, processor_fingerprint
from hf_kd.teachers.cache.advice import recommended_sparse_tail, sparse_tail_advice
from hf_kd.teachers.cache.format import (
    DERIVED_FILE,
    FORMAT_VERSION,
    METADATA_FILE,
    UNLISTED_FILES,
    CacheError,
    CacheMetadata,
    CacheMismatchError,
    cache_features,
    content_fingerprint,
    file_record,
    json_sha256,
    metadata_digests,
)
from hf_kd.teachers.codec import CodecError, TopkCodec
from hf_kd.teachers.sketch import LogitSketch

logger = logging.getLogger(__name__)


def read_metadata(path: str | os.PathLike) -> CacheMetadata:
    """The verified metadata of a complete cache directory: its format, the digests of its fields
    (:func:`check_digests`) and the teacher config against its hash; a clear error for anything else."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise CacheError(f"{str(path)!r} is not a complete hf_kd teacher cache: it has no {METADATA_FILE}")
    try:
        data = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{meta_path} is corrupt: {err}") from err
    if not isinstance(data, dict):
        raise CacheError(f"{meta_path} is corrupt: it holds a {type(data).__name__}, not an object")
    if data.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{str(path)!r} has cache format {data.get('format_version')!r}; this hf_kd reads format "
            f"{FORMAT_VERSION} (capture the cache again with this version)"
        )
    check_digests(meta_path, data)
    try:
        metadata = CacheMetadata.from_dict(data)
    except TypeError as err:
        raise CacheError(f"{meta_path} is corrupt: {err}") from err
    if json_sha256(metadata.teacher_config) != metadata.teacher_config_hash:
        raise CacheError(
            f"{meta_path} was changed after capture: teacher_config does not match teacher_config_hash "
            f"{metadata.teacher_config_hash!r}; capture the cache again instead of editing it"
        )
    return metadata


def check_digests(meta_path: Path, data: dict[str, Any]) -> None:
    """The metadata ``data`` read from ``meta_path`` is what the capture wrote: each field and each entry
    of a dict field has its recorded digest (:func:`metadata_digests`); names the ones that differ."""
    recorded = data.get("digests")
    if not isinstance(recorded, dict) or not recorded:
        raise CacheError(f"{meta_path} is corrupt: it has no digests of its fields")
    computed = metadata_digests(data)
    changed = sorted(k for k in recorded.keys() | computed.keys() if recorded.get(k) != computed.get(k))
    named = [k for k in changed if not any(other.startswith(k + ".") for other in changed)]
    if named:
        raise CacheError(
            f"{meta_path} was changed after capture, these fields differ from what it recorded: "
            f"{', '.join(named)}; capture the cache again instead of editing it"
        )


def verify_files(path: Path, metadata: CacheMetadata) -> None:
    """The directory holds exactly the files the metadata lists (besides :data:`UNLISTED_FILES`), each
    with its size and SHA-256."""
    if not metadata.files:
        raise CacheError(f"{METADATA_FILE} of {str(path)!r} lists no files")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    unlisted = sorted(
        name for name in present - set(metadata.files) - set(UNLISTED_FILES) if not DERIVED_FILE.search(name)
    )
    if unlisted:
        raise CacheError(
            f"teacher cache {str(path)!r} holds files that its {METADATA_FILE} does not list: {unlisted}; "
            "every file of a cache is listed with its checksum (remove them, or capture the cache again)"
        )
    for name, record in metadata.files.items():
        file = path / name
        if not file.is_file():
            raise CacheError(f"teacher cache {str(path)!r} is incomplete: {name} is missing")
        if file.stat().st_size != record["size"]:
            raise CacheError(
                f"teacher cache {str(path)!r} is corrupt: {name} has {file.stat().st_size} bytes, expected {record['size']}"
            )
        if file_record(file)["sha256"] != record["sha256"]:
            raise CacheError(
                f"teacher cache {str(path)!r} is corrupt: the SHA-256 of {name} does not match its metadata"
            )


def check_teacher(path: Path, metadata: CacheMetadata, teacher: str, revision: str | None) -> None:
    """A run that names its teacher (``teacher_model_name_or_path``, ``teacher_model_revision``) while
    reading a cache names the cache's teacher: the same id or local directory, and the same revision
    when the cache records one."""
    recorded, named = Path(metadata.teacher_id).expanduser(), Path(teacher).expanduser()
    same_dir = recorded.exists() and named.exists() and recorded.resolve() == named.resolve()
    if teacher != metadata.teacher_id and not same_dir:
        raise CacheMismatchError(
            str(path),
            "teacher_id",
            metadata.teacher_id,
            teacher,
            hint="with teacher_source: cached the teacher is the one whose outputs the cache holds; "
            "drop teacher_model_name_or_path or name that teacher",
        )
    if metadata.teacher_revision is not None and revision != metadata.teacher_revision:
        raise CacheMismatchError(
            str(path),
            "teacher_revision",
            metadata.teacher_revision,
            revision,
            hint="set teacher_model_revision to the cache's or drop teacher_model_name_or_path",
        )


@dataclass
class TeacherCache:
    """A verified cache: where it is, its metadata and its splits."""

    path: Path
    metadata: CacheMetadata
    splits: DatasetDict
    sketch: LogitSketch | None = None
    """The low-rank sketch of the teacher's logits stored with a per-token top-k, if any."""

    def provenance(self) -> dict:
        """What a student's model card lists about the cache it was trained from."""
        return self.metadata.provenance()

    def check_split(self, name: str, rows: Dataset) -> None:
        """The run's rows of split ``name`` are the rows the teacher saw (count and content)."""
        cached = self.metadata.splits.get(name)
        if cached is None:
            raise CacheMismatchError(
                str(self.path),
                "splits",
                sorted(self.metadata.splits),
                name,
                hint="capture this split too (or set eval_split: null)",
            )
        if cached["num_rows"] != len(rows):
            raise CacheMismatchError(str(self.path), f"splits.{name}.num_rows", cached["num_rows"], len(rows))
        fingerprint = content_fingerprint(rows)
        if cached["fingerprint"] != fingerprint:
            raise CacheMismatchError(
                str(self.path), f"splits.{name}.fingerprint", cached["fingerprint"], fingerprint
            )

    def join(self, splits: DatasetDict, task_name: str, names: Iterable[str]) -> DatasetDict:
        """``splits`` with the teacher columns added to each split in ``names``, after checking the task
        and that the rows are the ones captured."""
        if task_name != self.metadata.task:
            raise CacheMismatchError(str(self.path), "task", self.metadata.task, task_name)
        joined = DatasetDict(splits)
        for name in names:
            self.check_split(name, splits[name])
            joined[name] = concatenate_datasets(
                [splits[name], self.splits[name].select_columns(self.metadata.columns)], axis=1
            )
        return joined

    def check_sparse_tail(self, sparse_tail: str) -> None:
        """A clear error when ``sparse_tail`` needs what this cache does not hold (a logit sketch); a
        warning when the cache holds a sketch that ``sparse_tail`` leaves unused."""
        if sparse_tail == "sketch" and self.sketch is None:
            raise ValueError(
                f"sparse_tail='sketch' spreads the tail like the cache's logit sketch, but teacher cache "
                f"{str(self.path)!r} has none: capture it with sketch_rank > 0 (sketch_rank: 32 is the "
                "recommended cache of README.md), or train with another sparse_tail: "
                f"{recommended_sparse_tail(False, True)[0]!r} on a flat teacher (its top-k keeps little of the "
                f"mass), {recommended_sparse_tail(False, False)[0]!r} on a peaked one"
            )
        if self.sketch is not None and sparse_tail != "sketch":
            logger.warning(
                "teacher cache %r holds a rank-%d logit sketch that sparse_tail=%r leaves unused. %s",
                str(self.path),
                self.sketch.rank,
                sparse_tail,
                sparse_tail_advice(True, True, self.sketch.rank),
            )

    def decoder(self):
        """For a compressed cache: ``decode(rows, lengths)`` of its codec over its classes, else None."""
        if self.metadata.compression is None:
            return None
        return partial(
            TopkCodec.from_spec(self.metadata.compression).decode, num_classes=self.metadata.num_classes
        )

    def teacher_config(self):
        """The teacher's config, rebuilt from the metadata (no weights are loaded)."""
        data = dict(self.metadata.teacher_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)

    def check_run(self, task: Task, student_config, student_processor, args) -> list[int] | None:
        """Label space / vocabulary (through ``task.teacher_output_map``) and, for per-token caches,
        the tokenizer; returns the index map from the teacher's classes to the student's."""
        if self.metadata.per_token:
            if self.metadata.max_length != getattr(task, "max_length", None):
                raise CacheMismatchError(
                    str(self.path), "max_length", self.metadata.max_length, getattr(task, "max_length", None)
                )
            run_hash = processor_fingerprint(student_processor)
            if run_hash != self.metadata.processor_hash:
                raise CacheMismatchError(
                    str(self.path),
                    "processor_hash",
                    self.metadata.processor_hash,
                    run_hash,
                    hint="per-token targets need the same tokenizer (a teacher with another tokenizer runs online: "
                    "teacher_source: online)",
                )
        try:
            return task.teacher_output_map(self.teacher_config(), student_config, args)
        except ValueError as err:
            raise CacheError(f"teacher cache {str(self.path)!r} does not match this run: {err}") from err


def resolve_cache_path(name_or_path: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """A local cache directory, or the snapshot of a Hub dataset repository."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    try:
        validate_repo_id(name_or_path)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"teacher_cache={name_or_path!r}: no such directory, and not a Hub dataset id"
        ) from err
    return Path(snapshot_download(name_or_path, repo_type="dataset", revision=revision, token=token))


def load_teacher_cache(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    teacher: str | None = None,
    teacher_revision: str | None = None,
) -> TeacherCache:
    """Open a cache (local directory or Hub dataset id) after verifying every recorded fact: metadata
    (:func:`read_metadata`), files (:func:`verify_files`), splits and column types. ``teacher`` (with
    ``teacher_revision``): the teacher a run names, checked against the cache's before the files are read."""
    path = resolve_cache_path(str(name_or_path), revision=revision, token=token)
    metadata = read_metadata(path)
    if teacher is not None:
        check_teacher(path, metadata, teacher, teacher_revision)
    verify_files(path, metadata)
    try:
        splits = load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a damaged directory
        raise CacheError(f"teacher cache {str(path)!r} cannot be read: {err}") from err
    if metadata.compression is not None:
        try:
            TopkCodec.from_spec(metadata.compression)
        except (CodecError, ValueError) as err:
            raise CacheError(f"teacher cache {str(path)!r}: {err}") from err
        if not metadata.per_token:
            raise CacheError(
                f"teacher cache {str(path)!r}: compression is recorded for a cache that is not per-token"
            )
    sketch = None
    if metadata.sketch is not None:
        if not metadata.per_token or metadata.top_k is None:
            raise CacheError(
                f"teacher cache {str(path)!r}: a logit sketch is recorded for a cache that is not a per-token top-k"
            )
        try:
            sketch = LogitSketch.load(path / metadata.sketch["file"], metadata.sketch, metadata.num_classes)
        except (KeyError, TypeError, ValueError) as err:
            raise CacheError(f"teacher cache {str(path)!r}: {err}") from err
    expected = cache_features(
        metadata.num_classes,
        metadata.top_k,
        metadata.dtype,
        metadata.per_token,
        metadata.compression,
        metadata.sketch,
    )
    for name, record in metadata.splits.items():
        if name not in splits or len(splits[name]) != record["num_rows"]:
            raise CacheError(
                f"teacher cache {str(path)!r}: split {name!r} does not hold the {record['num_rows']} rows its metadata lists"
            )
        for column, feature in expected.items():
            if splits[name].features.get(column) != feature:
                raise CacheError(
                    f"teacher cache {str(path)!r}: split {name!r} column {column!r} is {splits[name].features.get(column)}, expected {feature}"
                )
    return TeacherCache(path, metadata, splits, sketch)
