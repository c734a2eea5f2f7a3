"""Capturing a teacher cache: run the teacher once over a dataset and write its outputs in the cache
format (:mod:`hf_kd.teachers.cache.format`).

A capture runs shard by shard (``shard_size`` rows); under ``torchrun``/``accelerate launch`` each
process takes every ``world_size``-th shard. Finished shards are renamed into ``<cache>.partial/``, so
an interrupted capture restarts from the shards it has (only for the same settings, rows and teacher
weights: :func:`~hf_kd.teachers.cache.format.weights_hash`); the main process merges them in order into a
temporary directory that is renamed to ``<cache>`` only once complete. Within a shard, one writer
thread turns each batch of teacher outputs into cache rows and appends them, in order, while the
teacher runs on the next batch (:func:`_write_shard`).
"""

from __future__ import annotations

import json
import logging
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
from tqdm.auto import tqdm

from hf_kd.files import write_atomic, write_atomic_dir
from hf_kd.losses import SparseLogits
from hf_kd.tasks.base import CACHE_PREFIX, Task, processor_fingerprint, split_batch
from hf_kd.teachers.cache.advice import sparse_tail_advice
from hf_kd.teachers.cache.format import (
    LOGIT_DTYPES,
    METADATA_FILE,
    SKETCH_COLUMN,
    CacheError,
    CacheMetadata,
    cache_features,
    config_hash,
    content_fingerprint,
    file_record,
    metadata_digests,
    stored_config,
    weights_hash,
)
from hf_kd.teachers.cache.load import read_metadata
from hf_kd.teachers.codec import TopkCodec
from hf_kd.teachers.finite import check_teacher_logits
from hf_kd.teachers.sketch import FIT_POSITIONS, SKETCH_FILE, LogitSketch, check_setting
from hf_kd.vocab import shared_vocab_size

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
LOW_KEPT_MASS = 0.8
"""A capture warns when its top-k keeps less than this probability mass on average."""
KEPT_BINS = 1000
"""Bins of the kept-mass histogram each shard records (the quantiles a capture reports)."""
PIPELINE_DEPTH = 1
"""Batches of teacher outputs a capture lets wait for its writer thread while the teacher runs the next
one (0: the teacher waits for each). At 1 a capture holds two batches of logits at most, as a serial
loop does while it computes the next batch."""


# --------------------------------------------------------------------------------------------
# From teacher outputs to columns
# --------------------------------------------------------------------------------------------


def compress_logits(logits: torch.Tensor, top_k: int | None) -> dict[str, torch.Tensor]:
    """The tensors stored for raw teacher logits [..., K]: the logits themselves, or for ``top_k``

    log_probs = top-k of log_softmax(v),  indices = their class ids,
    tail_log_mass = log(1 − Σ_topk exp(log_probs))   (see :class:`hf_kd.losses.SparseLogits`).
    """
    if top_k is None:
        return {"logits": logits.float()}
    sparse = SparseLogits.from_logits(logits, top_k)
    return {"log_probs": sparse.log_probs, "indices": sparse.indices, "tail_log_mass": sparse.tail_log_mass}


def columns_to_arrow(
    columns: dict[str, torch.Tensor], features: Features, attention_mask: torch.Tensor | None = None
) -> pa.Table:
    """One arrow table row per example from tensors [B, ...]; with ``attention_mask`` [B, T] (per-token
    outputs [B, T, ...]) each row keeps its non-padding positions, in order."""
    arrays = []
    for name, feature in features.items():
        tensor = columns[name[len(CACHE_PREFIX) :]]
        lengths = None
        if attention_mask is not None:
            mask = attention_mask.bool()
            tensor, lengths = tensor[mask], mask.sum(-1)
            feature = feature.feature
        width = getattr(feature, "length", None)
        dtype = np.dtype((feature.feature if width else feature).dtype)
        values = pa.array(tensor.detach().cpu().numpy().astype(dtype, copy=False).reshape(-1))
        array = pa.FixedSizeListArray.from_arrays(values, width) if width else values
        if lengths is not None:
            offsets = np.concatenate([[0], np.cumsum(lengths.cpu().numpy())]).astype(np.int32)
            array = pa.ListArray.from_arrays(pa.array(offsets), array)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=features.arrow_schema)


def packed_to_arrow(
    codec: TopkCodec, logits: torch.Tensor, attention_mask: torch.Tensor, features: Features
) -> tuple[pa.Table, torch.Tensor]:
    """One packed row per example of per-token logits [B, T, K] (its non-padding positions), and the
    probability mass kept at each position."""
    mask = attention_mask.bool()
    positions = logits.flatten(0, -2) if bool(mask.all()) else logits[mask]  # no copy without padding
    rows, kept = codec.encode(positions, mask.sum(-1).tolist())
    return pa.Table.from_arrays([pa.array(rows, pa.binary())], schema=features.arrow_schema), kept


def compression_top_k(task_name: str, compression: TopkCodec | None, top_k: int | None) -> int | None:
    """The top-k a capture stores: ``top_k``, or the ``compression``'s ``max_k`` (a codec packs the
    per-token outputs of a causal LM only); a clear error for settings that do not go together."""
    if compression is None:
        return top_k
    if task_name != "causal-lm":
        raise ValueError(
            f"compression={compression.name!r} packs per-token (causal-lm) caches; task is {task_name!r}"
        )
    if top_k not in (None, compression.max_k):
        raise ValueError(f"top_k={top_k} differs from the compression's max_k={compression.max_k}")
    return compression.max_k


def kept_mass_summary(kept: torch.Tensor) -> np.ndarray:
    """The kept probability masses of positions [N] as [count, sum, histogram over ``KEPT_BINS`` equal
    bins of [0, 1]] (float64): summaries of shards add up to the summary of their union."""
    kept = kept.double().cpu()
    histogram = torch.histc(kept, bins=KEPT_BINS, min=0.0, max=1.0)
    return np.concatenate([[kept.numel(), kept.sum().item()], histogram.numpy()])


def report_kept_mass(
    summary: np.ndarray, top_k: int, compression: TopkCodec | None, sketch_rank: int = 0
) -> dict[str, float]:
    """Log the mean and quantiles (to 1 / ``KEPT_BINS``) of the probability mass a top-k capture kept
    per position (:func:`kept_mass_summary` of all its positions); when the mean is below
    ``LOW_KEPT_MASS`` (a flat teacher), the ``sparse_tail`` to train with
    (:func:`hf_kd.teachers.cache.advice.sparse_tail_advice`: ``sketch`` for a cache with a logit sketch
    of rank ``sketch_rank``, logged as information since that is the recommended setting for a flat
    teacher; else a warning advising ``bucket`` and naming the settings that keep more); returns them."""
    count, total, histogram = summary[0], summary[1], summary[2:]
    if count == 0:
        return {}
    cumulative = np.cumsum(histogram)
    q = [(int(np.searchsorted(cumulative, p * count)) + 0.5) / KEPT_BINS for p in (0.1, 0.5, 0.9)]
    stats = {"mean": total / count, "p10": q[0], "p50": q[1], "p90": q[2]}
    setting = f"top_k={top_k}" + ("" if compression is None else f" ({compression.spec()})")
    logger.info(
        "%s kept %.3f of the teacher's probability mass per position on average over %d positions "
        "(10%%/50%%/90%% quantiles %.3f / %.3f / %.3f)",
        setting,
        stats["mean"],
        count,
        *q,
    )
    if stats["mean"] < LOW_KEPT_MASS and sketch_rank:
        logger.info(
            "%s keeps %.3f of the teacher's probability mass on average (< %.2f: a flat teacher); the rest is "
            "stored as its tail mass. %s",
            setting,
            stats["mean"],
            LOW_KEPT_MASS,
            sparse_tail_advice(True, True, sketch_rank),
        )
    elif stats["mean"] < LOW_KEPT_MASS:
        more = [f"a larger top_k (now {top_k})"]
        if compression is None:
            more.append("compression: topk-golomb (up to top_k tokens per position in far fewer bytes)")
        else:
            if compression.mass < 1.0:
                more.append(f"a compression_mass nearer 1 (now {compression.mass})")
            more.append(
                "a wider code range (tokens more than compression_step × (2^compression_bits − 1) nats below "
                f"the top-1 are dropped; now {compression.step * (2**compression.bits - 1):.3g})"
            )
        logger.warning(
            "%s keeps only %.3f of the teacher's probability mass on average (< %.2f). %s To keep more "
            "tokens for this teacher: %s.",
            setting,
            stats["mean"],
            LOW_KEPT_MASS,
            sparse_tail_advice(False, True),
            ", or ".join(more),
        )
    return stats


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _distributed()[1] > 1:
        torch.distributed.barrier()


def _shard_path(partial: Path, split: str, index: int) -> Path:
    return partial / "shards" / split / f"shard-{index:05d}.arrow"


def _rows_of(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """A batch fetched as columns (``dataset[a:b]``) as the list of row dicts a collator takes."""
    names = list(columns)
    return [
        dict(zip(names, values, strict=True)) for values in zip(*(columns[n] for n in names), strict=True)
    ]


def _check_plan(partial: Path, plan: dict[str, Any]) -> None:
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


def capture_teacher_logits(
    teacher: torch.nn.Module,
    teacher_processor: Any,
    task: Task,
    dataset: DatasetDict | dict[str, Dataset],
    output_dir: str | os.PathLike,
    *,
    teacher_id: str,
    teacher_revision: str | None = None,
    top_k: int | None = None,
    dtype: str = "float32",
    batch_size: int = 64,
    shard_size: int = 4096,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    compression: TopkCodec | None = None,
    sketch_rank: int = 0,
    sketch_bits: int = 4,
) -> CacheMetadata:
    """Run ``teacher`` once over every split of ``dataset`` and write a cache to ``output_dir``.

    The teacher reads its own preprocessing (``task.prepare`` with ``teacher_processor``) in batches of
    ``batch_size`` under ``torch.inference_mode``. ``top_k`` None stores the full logits, else the top-k
    log-probabilities, their indices and the tail mass; ``compression`` packs a per-token top-k with a
    codec (its ``max_k`` is the top-k); ``sketch_rank`` > 0 adds a low-rank sketch of the logits of that
    rank at ``sketch_bits`` bits (:mod:`hf_kd.teachers.sketch`) to a per-token top-k, fitted on the
    first positions of the first split. Every process of an initialised
    ``torch.distributed`` group must call it; the main process merges and returns the metadata (the
    others return it too, read from disk). Resumes an interrupted capture with the same settings.
    """
    output_dir = Path(output_dir)
    if dtype not in LOGIT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {LOGIT_DTYPES}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be a positive number of classes (or None for full logits)")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size={batch_size!r} and shard_size={shard_size!r} must be ≥ 1")
    if not dataset:
        raise ValueError("no split to capture: dataset is empty")
    if (output_dir / METADATA_FILE).is_file() and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a teacher cache; pass overwrite=True to replace it"
        )
    if (
        task.name == "causal-lm"
    ):  # the tokenizer's ids only: rows padded onto the output layer are never targets
        num_classes = shared_vocab_size(
            teacher.config.get_text_config().vocab_size, len(teacher_processor), len(teacher_processor)
        )
    else:
        num_classes = teacher.config.num_labels
    top_k = compression_top_k(task.name, compression, top_k)
    if top_k is not None and top_k > num_classes:
        raise ValueError(f"top_k={top_k} exceeds the teacher's {num_classes} classes")
    if sketch_rank:
        if task.name != "causal-lm" or top_k is None:
            raise ValueError(
                f"sketch_rank={sketch_rank} sketches the tail of a per-token top-k: it needs task causal-lm and "
                f"top_k (task is {task.name!r}, top_k={top_k})"
            )
        check_setting(sketch_rank, sketch_bits, num_classes)

    rank, world_size = _distributed()
    partial = output_dir.with_name(output_dir.name + ".partial")
    metadata = CacheMetadata(
        task=task.name,
        teacher_id=teacher_id,
        teacher_revision=teacher_revision,
        teacher_commit=getattr(teacher.config, "_commit_hash", None),
        teacher_config=stored_config(teacher.config),
        teacher_config_hash=config_hash(teacher.config),
        teacher_weights_hash=weights_hash(teacher),
        processor_hash=None if teacher_processor is None else processor_fingerprint(teacher_processor),
        num_classes=num_classes,
        top_k=top_k,
        dtype=dtype,
        per_token=task.name == "causal-lm",
        max_length=getattr(task, "max_length", None) if task.name == "causal-lm" else None,
        splits={
            name: {"num_rows": len(split), "fingerprint": content_fingerprint(split)}
            for name, split in dataset.items()
        },
        dataset_name=dataset_name,
        dataset_config=dataset_config,
        compression=None if compression is None else compression.spec(),
        sketch={"rank": sketch_rank, "bits": sketch_bits, "file": SKETCH_FILE} if sketch_rank else None,
    )
    if rank == 0:
        plan = {k: v for k, v in asdict(metadata).items() if k not in ("files", "hf_kd_version", "digests")}
        _check_plan(partial, {**plan, "batch_size": batch_size, "shard_size": shard_size})
    _barrier()

    features = cache_features(
        num_classes, top_k, dtype, metadata.per_token, metadata.compression, metadata.sketch
    )
    sketch_features = Features({k: v for k, v in features.items() if k == CACHE_PREFIX + SKETCH_COLUMN})
    output_features = Features({k: v for k, v in features.items() if k not in sketch_features})
    jobs = [
        (name, index, start, min(start + shard_size, len(split)))
        for name, split in dataset.items()
        for index, start in enumerate(range(0, len(split), shard_size))
    ]
    todo = [job for job in jobs[rank::world_size] if not _shard_path(partial, job[0], job[1]).is_file()]
    device = next(teacher.parameters()).device
    teacher.eval()

    def outputs(
        prepared: Dataset, split: str, first_row: int, progress_bar=None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The teacher's outputs over ``prepared`` rows (rows ``first_row``… of ``split``): (logits,
        attention mask or None) a batch."""
        for batch_start in range(0, len(prepared), batch_size):
            batch = task.collate(_rows_of(prepared[batch_start : batch_start + batch_size]))
            inputs = {k: v.to(device) for k, v in split_batch(batch)[0].items()}
            with torch.inference_mode():
                logits = teacher(**inputs).logits[..., :num_classes]
            mask = inputs.get("attention_mask") if metadata.per_token else None
            if metadata.per_token and mask is None:
                raise ValueError("per-token capture needs padded rows with an attention_mask (no packing)")
            check_teacher_logits(
                logits, mask, f"split {split!r}", first_row + batch_start, "refusing to cache it"
            )
            yield logits, mask
            if progress_bar is not None:
                progress_bar.update(len(batch["labels"]) if "labels" in batch else logits.shape[0])

    def first_outputs() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The teacher's outputs over the first rows of the first split (at most ``FIT_POSITIONS``)."""
        name, first = next(iter(dataset.items()))
        rows = first.select(range(min(len(first), FIT_POSITIONS)))
        yield from outputs(task.prepare(rows, student_processor=teacher_processor), name, 0)

    sketch = None if metadata.sketch is None else _sketch_of(partial, metadata, first_outputs(), rank)

    def to_arrow(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[pa.Table, torch.Tensor]:
        """The cache rows of one batch of teacher outputs and the probability mass kept per position."""
        if compression is not None:
            table, kept = packed_to_arrow(compression, logits, mask, output_features)
        else:
            columns = compress_logits(logits, top_k)
            table, kept = columns_to_arrow(columns, output_features, mask), _kept_mass(columns, mask)
        if sketch is not None:
            codes = {SKETCH_COLUMN: sketch.encode(logits.flatten(0, -2)).reshape(*logits.shape[:-1], -1)}
            sketched = columns_to_arrow(codes, sketch_features, mask)
            table = pa.Table.from_arrays(table.columns + sketched.columns, schema=features.arrow_schema)
        return table, kept

    with tqdm(
        total=sum(end - start for _, _, start, end in todo),
        desc=f"Teacher logits (rank {rank})",
        disable=not progress,
    ) as bar:
        for name, index, start, end in todo:
            prepared = task.prepare(
                dataset[name].select(range(start, end)), student_processor=teacher_processor
            )
            path = _shard_path(partial, name, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_shard(path, features, outputs(prepared, name, start, bar), to_arrow)
    _barrier()
    if rank == 0:
        if metadata.per_token and top_k is not None:  # over every shard, whichever process or run wrote it
            kept = [_kept_path(_shard_path(partial, name, index)) for name, index, *_ in jobs]
            report_kept_mass(
                sum((np.load(p) for p in kept if p.is_file()), np.zeros(2 + KEPT_BINS)),
                top_k,
                compression,
                metadata.sketch["rank"] if metadata.sketch else 0,
            )
        _merge(
            partial,
            output_dir,
            dataset,
            metadata,
            num_shards={name: sum(1 for j in jobs if j[0] == name) for name in dataset},
        )
    _barrier()
    return read_metadata(output_dir)


def _sketch_of(
    partial: Path,
    metadata: CacheMetadata,
    outputs: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
    rank: int,
) -> LogitSketch:
    """The capture's logit sketch: fitted by the main process on the first ``FIT_POSITIONS`` positions of
    ``outputs`` and written to ``partial`` (kept there when a capture resumes), then read by every
    process, so that all shards use the same matrices."""
    path = partial / SKETCH_FILE
    if rank == 0 and not path.is_file():
        positions, count = [], 0
        for logits, mask in outputs:
            positions.append(logits[mask.bool()].float().cpu())
            count += len(positions[-1])
            if count >= FIT_POSITIONS:
                break
        spec = metadata.sketch
        fitted = LogitSketch.fit(torch.cat(positions)[:FIT_POSITIONS], spec["rank"], spec["bits"])
        write_atomic(path, fitted.save)
    _barrier()
    return LogitSketch.load(path, metadata.sketch, metadata.num_classes)


def _write_shard(
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
        write_atomic(_kept_path(path), lambda tmp_kept: np.save(tmp_kept, summary))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _kept_path(shard: Path) -> Path:
    """Where a shard's :func:`kept_mass_summary` is kept during a capture."""
    return shard.with_suffix(".kept.npy")


def _kept_mass(columns: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Probability mass of the stored top-k at each (non-padding) position; empty for full logits."""
    if "tail_log_mass" not in columns:
        return torch.empty(0)
    tail = columns["tail_log_mass"] if mask is None else columns["tail_log_mass"][mask.bool()]
    return -torch.expm1(tail.float())


def _merge(
    partial: Path, output_dir: Path, dataset, metadata: CacheMetadata, num_shards: dict[str, int]
) -> None:
    """Join the shards in order to the source rows, write the cache to a temporary directory renamed
    to ``output_dir`` once complete (:func:`hf_kd.files.write_atomic_dir`), and drop the partial capture."""
    merged = {}
    for name, split in dataset.items():
        shards = [_shard_path(partial, name, i) for i in range(num_shards[name])]
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
