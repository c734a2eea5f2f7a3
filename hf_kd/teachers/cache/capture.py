"""Capturing a teacher cache: run the teacher once over a dataset and write its outputs in the cache
format (:mod:`hf_kd.teachers.cache.format`).

A capture (:func:`capture`, of one :class:`~hf_kd.teachers.cache.spec.CaptureSpec`) runs shard by shard
(``shard_size`` rows); under ``torchrun``/``accelerate launch`` each process takes every
``world_size``-th shard. Finished shards are renamed into ``<cache>.partial/``, so an interrupted capture
restarts from the shards it has (only for the same settings, rows and teacher weights:
:func:`~hf_kd.teachers.cache.format.weights_hash`); the main process merges them in order into a
temporary directory that is renamed to ``<cache>`` only once complete. Its parts: the settings checked
(:mod:`~hf_kd.teachers.cache.spec`), the teacher's outputs of each batch (:func:`_teacher_outputs`) turned
into rows (:mod:`~hf_kd.teachers.cache.rows`) by one writer thread while the teacher runs on the next batch
(:mod:`~hf_kd.teachers.cache.shards`), and the kept-mass report (:mod:`~hf_kd.teachers.cache.kept_mass`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from hf_kd.files import write_atomic
from hf_kd.tasks.base import split_batch
from hf_kd.teachers.cache.format import CacheMetadata, cache_features
from hf_kd.teachers.cache.kept_mass import KEPT_BINS, report_kept_mass
from hf_kd.teachers.cache.load import read_metadata
from hf_kd.teachers.cache.rows import BatchRows
from hf_kd.teachers.cache.shards import check_plan, kept_path, merge, shard_path, write_shard
from hf_kd.teachers.cache.spec import CaptureSpec
from hf_kd.teachers.finite import check_teacher_logits
from hf_kd.teachers.sketch import FIT_POSITIONS, SKETCH_FILE, LogitSketch

Outputs = Iterator[tuple[torch.Tensor, torch.Tensor | None]]
"""The teacher's outputs, a batch at a time: (logits, attention mask or None)."""


def capture_teacher_logits(*args: Any, **kwargs: Any) -> CacheMetadata:
    """:func:`capture` of ``CaptureSpec(*args, **kwargs)``: ``capture_teacher_logits(teacher, processor,
    task, dataset, output_dir, teacher_id=..., top_k=...)`` with the fields of
    :class:`~hf_kd.teachers.cache.spec.CaptureSpec`."""
    return capture(CaptureSpec(*args, **kwargs))


def capture(spec: CaptureSpec) -> CacheMetadata:
    """Run ``spec.teacher`` once over every split of ``spec.dataset`` and write a cache to
    ``spec.output_dir``; resumes an interrupted capture with the same settings. Every process of an
    initialised ``torch.distributed`` group must call it; the main process merges and returns the metadata
    (the others return it too, read from disk)."""
    rank, world_size = _distributed()
    partial = spec.output_dir.with_name(spec.output_dir.name + ".partial")
    metadata = spec.metadata()
    if rank == 0:
        plan = {k: v for k, v in asdict(metadata).items() if k not in ("files", "hf_kd_version", "digests")}
        check_plan(partial, {**plan, "batch_size": spec.batch_size, "shard_size": spec.shard_size})
    _barrier()

    jobs = [
        (name, index, start, min(start + spec.shard_size, len(split)))
        for name, split in spec.dataset.items()
        for index, start in enumerate(range(0, len(split), spec.shard_size))
    ]
    todo = [job for job in jobs[rank::world_size] if not shard_path(partial, job[0], job[1]).is_file()]
    spec.teacher.eval()
    features = cache_features(
        spec.num_classes, spec.top_k, spec.dtype, metadata.per_token, metadata.compression, metadata.sketch
    )
    sketch = None if metadata.sketch is None else _sketch_of(spec, partial, metadata, rank)
    to_rows = BatchRows(features, spec.top_k, spec.compression, sketch)
    with tqdm(
        total=sum(end - start for _, _, start, end in todo),
        desc=f"Teacher logits (rank {rank})",
        disable=not spec.progress,
    ) as bar:
        for name, index, start, end in todo:
            rows = spec.task.prepare(
                spec.dataset[name].select(range(start, end)), student_processor=spec.teacher_processor
            )
            path = shard_path(partial, name, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_shard(path, features, _teacher_outputs(spec, rows, name, start, bar), to_rows)
    _barrier()
    if rank == 0:
        if (
            metadata.per_token and spec.top_k is not None
        ):  # over every shard, whichever process or run wrote it
            kept = [kept_path(shard_path(partial, name, index)) for name, index, *_ in jobs]
            report_kept_mass(
                sum((np.load(p) for p in kept if p.is_file()), np.zeros(2 + KEPT_BINS)),
                spec.top_k,
                spec.compression,
                spec.sketch_rank,
            )
        num_shards = {name: sum(1 for job in jobs if job[0] == name) for name in spec.dataset}
        merge(partial, spec.output_dir, spec.dataset, metadata, num_shards=num_shards)
    _barrier()
    return read_metadata(spec.output_dir)


def _teacher_outputs(
    spec: CaptureSpec, prepared: Dataset, split: str, first_row: int, progress_bar=None
) -> Outputs:
    """The teacher's outputs over ``prepared`` rows (rows ``first_row``… of ``split``), a batch of
    ``spec.batch_size`` at a time, each checked finite: (logits over ``spec.num_classes``, attention mask
    for per-token outputs, else None)."""
    device = next(spec.teacher.parameters()).device
    for batch_start in range(0, len(prepared), spec.batch_size):
        batch = spec.task.collate(_rows_of(prepared[batch_start : batch_start + spec.batch_size]))
        inputs = {k: v.to(device) for k, v in split_batch(batch)[0].items()}
        with torch.inference_mode():
            logits = spec.teacher(**inputs).logits[..., : spec.num_classes]
        mask = inputs.get("attention_mask") if spec.per_token else None
        if spec.per_token and mask is None:
            raise ValueError("per-token capture needs padded rows with an attention_mask (no packing)")
        check_teacher_logits(
            logits, mask, f"split {split!r}", first_row + batch_start, "refusing to cache it"
        )
        yield logits, mask
        if progress_bar is not None:
            progress_bar.update(len(batch["labels"]) if "labels" in batch else logits.shape[0])


def _sketch_of(spec: CaptureSpec, partial: Path, metadata: CacheMetadata, rank: int) -> LogitSketch:
    """The capture's logit sketch: fitted by the main process on the teacher's outputs over the first
    ``FIT_POSITIONS`` positions of the first split and written to ``partial`` (kept there when a capture
    resumes), then read by every process, so that all shards use the same matrices."""
    path = partial / SKETCH_FILE
    if rank == 0 and not path.is_file():
        name, first = next(iter(spec.dataset.items()))
        rows = spec.task.prepare(
            first.select(range(min(len(first), FIT_POSITIONS))), student_processor=spec.teacher_processor
        )
        positions, count = [], 0
        for logits, mask in _teacher_outputs(spec, rows, name, 0):
            positions.append(logits[mask.bool()].float().cpu())
            count += len(positions[-1])
            if count >= FIT_POSITIONS:
                break
        fitted = LogitSketch.fit(torch.cat(positions)[:FIT_POSITIONS], spec.sketch_rank, spec.sketch_bits)
        write_atomic(path, fitted.save)
    _barrier()
    return LogitSketch.load(path, metadata.sketch, metadata.num_classes)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _distributed()[1] > 1:
        torch.distributed.barrier()


def _rows_of(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """A batch fetched as columns (``dataset[a:b]``) as the list of row dicts a collator takes."""
    names = list(columns)
    return [
        dict(zip(names, values, strict=True)) for values in zip(*(columns[n] for n in names), strict=True)
    ]
