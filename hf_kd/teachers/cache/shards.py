"""A capture's shards on disk: ``<cache>.partial/`` with the capture's plan, each shard written by one
writer thread while the teacher runs on (:func:`write_shard`) and renamed into place once complete, and the
merge of all shards, in order, into the cache (:func:`merge`)."""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, Features, concatenate_datasets
from datasets.arrow_writer import ArrowWriter

from hf_kd.files import write_atomic, write_atomic_dir
from hf_kd.tasks.base import CACHE_PREFIX
from hf_kd.teachers.cache.format import (
    METADATA_FILE,
    CacheError,
    CacheMetadata,
    file_record,
    metadata_digests,
)
from hf_kd.teachers.cache.kept_mass import kept_mass_summary
from hf_kd.teachers.sketch import SKETCH_FILE

PLAN_FILE = "plan.json"
PIPELINE_DEPTH = 1
"""Batches of teacher outputs a capture lets wait for its writer thread while the teacher runs the next
one (0: the teacher waits for each). At 1 a capture holds two batches of logits at most, as a serial
loop does while it computes the next batch."""


def shard_path(partial: Path, split: str, index: int) -> Path:
    """Where shard ``index`` of ``split`` is kept during a capture."""
    return partial / "shards" / split / f"shard-{index:05d}.arrow"


def kept_path(shard: Path) -> Path:
    """Where a shard's :func:`~hf_kd.teachers.cache.kept_mass.kept_mass_summary` is kept during a capture."""
    return shard.with_suffix(".kept.npy")


def check_plan(partial: Path, plan: dict[str, Any]) -> None:
    """Start ``partial`` with ``plan``, or check that the partial capture found there used the same plan."""
    path = partial / PLAN_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        for key in sorted(set(plan) | set(previous)):
            if previous.get(key) != plan.get(key):
                raise CacheError(
                    f"an interrupted capture at {str(partial)!r} was started with {key}={previous.get(key)!r}, this run has "
                    f"{key}={plan.get(key)!r}: its rows cannot be mixed with this run's. Rerun with the same settings "
                    "and teacher to resume, or start a fresh cache (delete that directory, or choose another output_dir)"
                )
        return
    partial.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(plan, indent=2, sort_keys=True)))


def write_shard(
    path: Path,
    features: Features,
    outputs: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
    to_arrow: Callable[[torch.Tensor, torch.Tensor | None], tuple[pa.Table, torch.Tensor]],
) -> None:
    """Write the shard ``path`` from the teacher's ``outputs`` (a generator running the teacher batch by
    batch), and beside it (first) the :func:`kept_mass_summary` of its positions' kept probability
    masses (``to_arrow``'s second value).

    Each batch is turned into rows (``to_arrow``) and appended by one writer thread, in order, while the
    caller's thread runs the teacher on the next batch: at most ``PIPELINE_DEPTH`` batches wait for the
    writer, so memory stays bounded. The rows go to ``<path>.tmp``, renamed to ``path`` once complete; on
    any error (the teacher's or the writer's) the temporary file is removed and the error raised.
    """
    tmp = path.with_name(path.name + ".tmp")

    def append(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            table, kept = to_arrow(logits, mask)
        writer.write_table(table)
        return kept.cpu()

    kept_mass, pending = [], deque()
    try:
        with (
            ArrowWriter(features=features, path=str(tmp)) as writer,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_kd-capture-writer") as pool,
        ):
            try:
                for logits, mask in outputs:
                    pending.append(pool.submit(append, logits, mask))
                    while len(pending) > PIPELINE_DEPTH:
                        kept_mass.append(pending.popleft().result())
                while pending:
                    kept_mass.append(pending.popleft().result())
            finally:
                for job in pending:
                    job.cancel()
            writer.finalize()
        summary = kept_mass_summary(torch.cat(kept_mass) if kept_mass else torch.empty(0))
        write_atomic(kept_path(path), lambda tmp_kept: np.save(tmp_kept, summary))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def merge(
    partial: Path, output_dir: Path, dataset, metadata: CacheMetadata, num_shards: dict[str, int]
) -> None:
    """Join the shards in order to the source rows, write the cache to a temporary directory renamed
    to ``output_dir`` once complete (:func:`hf_kd.files.write_atomic_dir`), and drop the partial capture."""
    merged = {}
    for name, split in dataset.items():
        shards = [shard_path(partial, name, i) for i in range(num_shards[name])]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise CacheError(f"capture of split {name!r} is incomplete, missing shards {missing}")
        teacher_columns = (
            concatenate_datasets([Dataset.from_file(str(p)) for p in shards]) if shards else None
        )
        if teacher_columns is None or len(teacher_columns) != len(split):
            raise CacheError(
                f"split {name!r}: the shards hold {0 if teacher_columns is None else len(teacher_columns)} rows, expected {len(split)}"
            )
        source = split.remove_columns([c for c in split.column_names if c.startswith(CACHE_PREFIX)])
        merged[name] = concatenate_datasets([source, teacher_columns], axis=1)
    extra = [partial / SKETCH_FILE] if metadata.sketch is not None else []
    write_atomic_dir(output_dir, lambda folder: _write_cache(folder, DatasetDict(merged), metadata, extra))
    shutil.rmtree(partial)


def _write_cache(folder: Path, splits: DatasetDict, metadata: CacheMetadata, extra: list[Path]) -> None:
    """Write ``splits`` and a copy of the ``extra`` files into ``folder``, then the metadata with the files
    just written and its digests (the dataset card is the orchestration's:
    ``hf_kd.cards.dataset.write_dataset_card``)."""
    splits.save_to_disk(str(folder))
    for file in extra:
        shutil.copyfile(file, folder / file.name)
    metadata.files = {
        str(p.relative_to(folder)): file_record(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }
    metadata.digests = metadata_digests(asdict(metadata))
    (folder / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2, sort_keys=True))
