"""Cached teacher logits: capture them once into a self-describing ``datasets`` dataset, check them
against a run, read them back, push them to the Hub.

On disk a cache is a ``DatasetDict.save_to_disk`` directory (``load_from_disk`` reads it) plus two files:

    <cache>/dataset_dict.json, <split>/...   the original rows + the teacher columns below
    <cache>/hf_kd_cache.json                 :class:`CacheMetadata` (written last; sizes and SHA-256 of every file)
    <cache>/README.md                        the dataset card (metadata table, how to train from it)

Every recorded fact is verified when a cache is read (:func:`load_teacher_cache`): the metadata against
the digests stored in it (an edit anywhere is named), the teacher config against its hash, the folder's
files against the complete ``files`` list (sizes and SHA-256), and the splits' rows and column types
against the metadata.

Teacher columns (prefix ``kd_teacher_``, raw outputs at τ = 1; the temperature is applied when training):

    full logits   ``kd_teacher_logits``         K values (float32 or float16)
    top-k         ``kd_teacher_log_probs``      k values, log p of the k most likely classes (float32 or float16)
                  ``kd_teacher_indices``        k class ids (uint16 when K ≤ 65,536, else int32)
                  ``kd_teacher_tail_log_mass``  log(1 − Σ_topk p), float32 (−inf when k = K)
    compressed    ``kd_teacher_packed``         per-token top-k packed by a codec (``compression`` in the
                                                metadata, see :mod:`hf_kd.teachers.codec`), one value per row

For one output per row (classification) each column holds that row's values. For one output per token
(causal LM) each column holds a list over the row's non-padding positions t (``attention_mask`` = 1),
position t being the teacher's distribution of token t + 1 given tokens ≤ t; such a cache lines up
with a student only when both use the same tokenizer (``processor_hash``, checked when training).

A capture runs shard by shard (``shard_size`` rows); under ``torchrun``/``accelerate launch`` each
process takes every ``world_size``-th shard. Finished shards are renamed into ``<cache>.partial/``, so
an interrupted capture restarts from the shards it has (only for the same settings, rows and teacher
weights: :func:`weights_hash`); the main process merges them in order into a
temporary directory that is renamed to ``<cache>`` only once complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets, load_from_disk
from datasets.arrow_writer import ArrowWriter
from huggingface_hub import CommitInfo, DatasetCard, DatasetCardData, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm
from transformers import AutoConfig

from hf_kd.hub import format_value, markdown_table, upload_folder_to_repo
from hf_kd.losses import SparseLogits
from hf_kd.tasks.base import CACHE_PREFIX, Task, processor_fingerprint, split_batch
from hf_kd.teachers.codec import COMPRESSIONS, CodecError, TopkCodec
from hf_kd.vocab import shared_vocab_size

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
METADATA_FILE = "hf_kd_cache.json"
UNLISTED_FILES = (METADATA_FILE, "README.md", ".gitattributes")
"""The files of a cache directory that its ``files`` list leaves out, none of them read when training:
the metadata itself, the dataset card and the attributes file of a Hub repository."""
DERIVED_FILE = re.compile(r"(^|/)cache-[0-9a-f]+\.arrow$")
"""Files ``datasets.Dataset.map`` writes beside the arrow shards it reads (a user's ``prepare`` of the
cache's splits): ``load_from_disk`` reads only the shards its ``state.json`` lists, never these."""
PLAN_FILE = "plan.json"
LOGIT_DTYPES = ("float32", "float16")
DENSE_COLUMNS = ("logits",)
SPARSE_COLUMNS = ("log_probs", "indices", "tail_log_mass")
PACKED_COLUMN = "packed"
LOW_KEPT_MASS = 0.8
"""A capture warns when its top-k keeps less than this probability mass on average."""
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")


class CacheError(ValueError):
    """A teacher cache that cannot be used: incomplete, corrupt, or not made for this run."""


class CacheMismatchError(CacheError):
    """A cache field whose value differs from the run's."""

    def __init__(self, cache: str, field_name: str, cache_value: Any, run_value: Any, hint: str = ""):
        self.field_name, self.cache_value, self.run_value = field_name, cache_value, run_value
        super().__init__(
            f"teacher cache {cache!r} does not match this run: {field_name} is {cache_value!r} in the cache "
            f"but {run_value!r} in the run{'; ' + hint if hint else ''}"
        )


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


@dataclass
class CacheMetadata:
    """What a cache holds and how it was made (``hf_kd_cache.json``)."""

    task: str
    teacher_id: str
    teacher_revision: str | None
    teacher_commit: str | None
    teacher_config: dict[str, Any]
    """The teacher's full config (label names, vocabulary size) for checks without loading the teacher."""
    teacher_config_hash: str
    """:func:`config_hash` of the teacher's config (the SHA-256 of ``teacher_config``)."""
    teacher_weights_hash: str
    """:func:`weights_hash` of the teacher's weights (an interrupted capture resumes only with the same)."""
    processor_hash: str | None
    """SHA-256 of the teacher's tokenizer / image processor (:func:`hf_kd.tasks.processor_fingerprint`);
    None for tasks whose inputs are dataset columns as they are."""
    num_classes: int
    """K, the size of the teacher's output space (labels or vocabulary)."""
    top_k: int | None
    """k of the top-k columns, or None for full logits."""
    dtype: str
    per_token: bool
    splits: dict[str, dict[str, Any]]
    """Per split: ``num_rows`` and ``fingerprint`` (:func:`content_fingerprint` of the source rows)."""
    max_length: int | None = None
    """Per-token caches: the token limit of the rows (a run must cut its rows at the same length)."""
    dataset_name: str | None = None
    dataset_config: str | None = None
    compression: dict[str, Any] | None = None
    """Per-token top-k packed by a codec: its :meth:`TopkCodec.spec` (name and parameters); None when
    the top-k (or full logits) are stored as plain columns."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per file of the cache directory (relative path): ``size`` in bytes and ``sha256``."""
    hf_kd_version: str = field(default_factory=lambda: version("hf_kd"))
    format_version: int = FORMAT_VERSION
    digests: dict[str, str] = field(default_factory=dict)
    """:func:`metadata_digests` of every other field, written last and verified by :func:`read_metadata`."""

    @property
    def columns(self) -> list[str]:
        """The teacher columns, with their ``kd_teacher_`` prefix."""
        if self.compression is not None:
            return [CACHE_PREFIX + PACKED_COLUMN]
        return [CACHE_PREFIX + name for name in (DENSE_COLUMNS if self.top_k is None else SPARSE_COLUMNS)]

    def provenance(self) -> dict[str, Any]:
        """The fields a student's model card lists about the cache it was trained from."""
        skip = {"teacher_config", "files", "digests"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheMetadata:
        known = {f.name for f in fields(cls)}
        missing = sorted(
            f.name
            for f in fields(cls)
            if f.name not in data and f.default is MISSING and f.default_factory is MISSING
        )
        unknown = sorted(set(data) - known)
        if missing or unknown:
            raise CacheError(f"{METADATA_FILE}: missing fields {missing}, unknown fields {unknown}")
        return cls(**data)


def json_sha256(value: Any) -> str:
    """SHA-256 of a JSON value in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stored_config(config) -> dict[str, Any]:
    """A model config as a cache stores it: its full JSON, without the fields that name where it was
    loaded from."""
    data = json.loads(config.to_json_string(use_diff=False))
    return {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}


def config_hash(config) -> str:
    """SHA-256 of a model config as a cache stores it (:func:`stored_config`)."""
    return json_sha256(stored_config(config))


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: every ``state_dict`` tensor in order, its dtype, shape and bytes
    (one tensor at a time on the CPU; parameter names are left out, so a wrapper hashes the same)."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        tensor = tensor.detach().reshape(-1).cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def metadata_digests(data: dict[str, Any]) -> dict[str, str]:
    """:func:`json_sha256` of each metadata field but ``digests``, and of each entry of a dict field
    (``teacher_config.id2label``, ``splits.train``, ``files.<path>``), so that an edit is named."""
    digests = {}
    for key, value in data.items():
        if key == "digests":
            continue
        digests[key] = json_sha256(value)
        if isinstance(value, dict):
            digests.update({f"{key}.{name}": json_sha256(entry) for name, entry in value.items()})
    return digests


def content_fingerprint(dataset: Dataset, batch_size: int = 1024) -> str:
    """SHA-256 of a dataset's rows (every column, in order; images as their encoded bytes).

    Unlike ``Dataset._fingerprint`` it depends only on the data, not on where the files are cached,
    so a cache made on one machine can be checked on another.
    """
    digest = hashlib.sha256(json.dumps(dataset.column_names).encode())
    for table in dataset.with_format("arrow").iter(batch_size=batch_size):
        digest.update(pickle.dumps(table.to_pydict(), protocol=4))
    return digest.hexdigest()


def index_dtype(num_classes: int) -> str:
    """The smallest integer type that holds every class id."""
    return "uint16" if num_classes <= 2**16 else "int32"


def cache_features(
    num_classes: int, top_k: int | None, dtype: str, per_token: bool, compression: dict | None = None
) -> Features:
    """The ``datasets`` features of the teacher columns (see the module docstring)."""
    if compression is not None:
        return Features({CACHE_PREFIX + PACKED_COLUMN: Value("binary")})
    if top_k is None:
        columns = {"logits": List(Value(dtype), length=num_classes)}
    else:
        columns = {
            "log_probs": List(Value(dtype), length=top_k),
            "indices": List(Value(index_dtype(num_classes)), length=top_k),
            "tail_log_mass": Value("float32"),
        }
    return Features(
        {CACHE_PREFIX + name: List(feature) if per_token else feature for name, feature in columns.items()}
    )


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
    rows, kept = codec.encode(logits[mask], mask.sum(-1).tolist())
    return pa.Table.from_arrays([pa.array(rows, pa.binary())], schema=features.arrow_schema), kept


def report_kept_mass(kept: torch.Tensor, setting: str) -> dict[str, float]:
    """Log the mean and quantiles of the probability mass a top-k capture kept per position, with a
    warning when the mean is below ``LOW_KEPT_MASS``; returns them."""
    if kept.numel() == 0:
        return {}
    q = torch.quantile(kept.double()[:1_000_000], torch.tensor([0.1, 0.5, 0.9], dtype=torch.double)).tolist()
    stats = {"mean": kept.double().mean().item(), "p10": q[0], "p50": q[1], "p90": q[2]}
    logger.info(
        "%s kept %.3f of the teacher's probability mass per position on average (10%%/50%%/90%% quantiles %.3f / %.3f / %.3f)",
        setting,
        stats["mean"],
        *q,
    )
    if stats["mean"] < LOW_KEPT_MASS:
        logger.warning(
            "%s keeps only %.3f of the teacher's probability mass on average (< %.2f): the rest is spread "
            "uniformly over the other classes, which acts like label smoothing. Keep more tokens (a larger "
            "top_k, or compression: topk-packed with a higher compression_mass) for this teacher.",
            setting,
            stats["mean"],
            LOW_KEPT_MASS,
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=2, sort_keys=True))
    os.replace(tmp, path)


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
) -> CacheMetadata:
    """Run ``teacher`` once over every split of ``dataset`` and write a cache to ``output_dir``.

    The teacher reads its own preprocessing (``task.prepare`` with ``teacher_processor``) in batches of
    ``batch_size`` under ``torch.inference_mode``. ``top_k`` None stores the full logits, else the top-k
    log-probabilities, their indices and the tail mass; ``compression`` packs a per-token top-k with a
    codec (its ``max_k`` is the top-k). Every process of an initialised
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
    if compression is not None:
        if task.name != "causal-lm":
            raise ValueError(
                f"compression={compression.name!r} packs per-token (causal-lm) caches; task is {task.name!r}"
            )
        if top_k not in (None, compression.max_k):
            raise ValueError(f"top_k={top_k} differs from the compression's max_k={compression.max_k}")
        top_k = compression.max_k
    if top_k is not None and top_k > num_classes:
        raise ValueError(f"top_k={top_k} exceeds the teacher's {num_classes} classes")

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
    )
    if rank == 0:
        plan = {k: v for k, v in asdict(metadata).items() if k not in ("files", "hf_kd_version", "digests")}
        _check_plan(partial, {**plan, "batch_size": batch_size, "shard_size": shard_size})
    _barrier()

    features = cache_features(num_classes, top_k, dtype, metadata.per_token, metadata.compression)
    kept_mass = []
    jobs = [
        (name, index, start, min(start + shard_size, len(split)))
        for name, split in dataset.items()
        for index, start in enumerate(range(0, len(split), shard_size))
    ]
    todo = [job for job in jobs[rank::world_size] if not _shard_path(partial, job[0], job[1]).is_file()]
    device = next(teacher.parameters()).device
    teacher.eval()
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
            tmp = path.with_name(path.name + ".tmp")
            with ArrowWriter(features=features, path=str(tmp)) as writer:
                for batch_start in range(0, end - start, batch_size):
                    batch = task.collate(_rows_of(prepared[batch_start : batch_start + batch_size]))
                    inputs = {k: v.to(device) for k, v in split_batch(batch)[0].items()}
                    with torch.inference_mode():
                        logits = teacher(**inputs).logits[..., :num_classes]
                    mask = inputs.get("attention_mask") if metadata.per_token else None
                    if metadata.per_token and mask is None:
                        raise ValueError(
                            "per-token capture needs padded rows with an attention_mask (no packing)"
                        )
                    if compression is not None:
                        table, kept = packed_to_arrow(compression, logits, mask, features)
                    else:
                        columns = compress_logits(logits, top_k)
                        table = columns_to_arrow(columns, features, mask)
                        kept = _kept_mass(columns, mask)
                    writer.write_table(table)
                    kept_mass.append(kept.cpu())
                    bar.update(len(batch["labels"]) if "labels" in batch else logits.shape[0])
                writer.finalize()
            os.replace(tmp, path)
    if metadata.per_token and top_k is not None and kept_mass:
        setting = f"top_k={top_k}" + ("" if compression is None else f" ({compression.spec()})")
        report_kept_mass(torch.cat(kept_mass), setting)
    _barrier()
    if rank == 0:
        _merge(
            partial,
            output_dir,
            dataset,
            metadata,
            num_shards={name: sum(1 for j in jobs if j[0] == name) for name in dataset},
        )
    _barrier()
    return read_metadata(output_dir)


def _kept_mass(columns: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Probability mass of the stored top-k at each (non-padding) position; empty for full logits."""
    if "tail_log_mass" not in columns:
        return torch.empty(0)
    tail = columns["tail_log_mass"] if mask is None else columns["tail_log_mass"][mask.bool()]
    return -torch.expm1(tail.float())


def _merge(
    partial: Path, output_dir: Path, dataset, metadata: CacheMetadata, num_shards: dict[str, int]
) -> None:
    """Join the shards in order to the source rows, write data + metadata + card to a temporary
    directory, then rename it to ``output_dir`` and drop the partial capture."""
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
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        DatasetDict(merged).save_to_disk(str(tmp))
        metadata.files = {
            str(p.relative_to(tmp)): _file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        metadata.digests = metadata_digests(asdict(metadata))
        (tmp / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2, sort_keys=True))
        dataset_card(metadata).save(tmp / "README.md")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(partial)


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------


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
        if _file_record(file)["sha256"] != record["sha256"]:
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
                    hint="per-token targets need the same tokenizer",
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
    expected = cache_features(
        metadata.num_classes, metadata.top_k, metadata.dtype, metadata.per_token, metadata.compression
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
    return TeacherCache(path, metadata, splits)


# --------------------------------------------------------------------------------------------
# scripts/cache_teacher.py
# --------------------------------------------------------------------------------------------


@dataclass
class CacheArguments:
    """Arguments of ``scripts/cache_teacher.py`` (with a ``hf_kd.config.DataArguments`` for the data)."""

    teacher_model_name_or_path: str = field(
        metadata={"help": "Teacher: a Hub model id or a local directory."}
    )
    output_dir: str = field(
        metadata={"help": "Cache directory to write (a run reads it with teacher_cache: <this path>)."}
    )
    teacher_model_revision: str = field(
        default="main", metadata={"help": "Teacher revision (branch, tag or commit)."}
    )
    teacher_processor: str | None = field(
        default=None, metadata={"help": "Teacher tokenizer/image processor (default: the teacher's own)."}
    )
    splits: list[str] | None = field(
        default=None, metadata={"help": "Splits to capture (default: train_split and eval_split)."}
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "Keep the top-k log-probabilities and the tail mass (default: full logits)."},
    )
    logits_dtype: str = field(
        default="float32",
        metadata={"help": f"Storage dtype of logits / log-probabilities, one of {LOGIT_DTYPES}."},
    )
    compression: str = field(
        default="none",
        metadata={
            "help": f"Per-token top-k storage, one of {COMPRESSIONS}: topk-packed keeps up to top_k tokens per "
            "position until compression_mass, quantised and bit-packed (hf_kd.teachers.codec)."
        },
    )
    compression_mass: float = field(
        default=TopkCodec.mass,
        metadata={"help": "topk-packed: keep tokens until this cumulative probability."},
    )
    compression_bits: int = field(
        default=TopkCodec.bits, metadata={"help": "topk-packed: bits per quantised log-probability."}
    )
    compression_step: float = field(
        default=TopkCodec.step, metadata={"help": "topk-packed: nats per quantisation step below the top-1."}
    )
    batch_size: int = field(default=64, metadata={"help": "Rows per teacher forward pass."})
    shard_size: int = field(
        default=4096, metadata={"help": "Rows per shard (the unit of resuming and of work per process)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing cache at output_dir."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the cache as a Hub dataset (hub_dataset_id)."}
    )
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repository of push_to_hub."}
    )
    hub_private: bool | None = field(default=None, metadata={"help": "Create the Hub repository private."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the Hub. Off unless you trust the repository."},
    )
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when an accelerator is present."})

    def __post_init__(self) -> None:
        if self.logits_dtype not in LOGIT_DTYPES:
            raise ValueError(f"logits_dtype={self.logits_dtype!r} is not one of {LOGIT_DTYPES}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression={self.compression!r} is not one of {COMPRESSIONS}")
        if self.compression != "none" and self.top_k is None:
            raise ValueError(
                f"compression={self.compression!r} needs top_k (the most tokens kept per position)"
            )
        self.codec()  # checks the parameters
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError(
                "push_to_hub needs hub_dataset_id (the Hub dataset repository to create or update)"
            )

    def codec(self) -> TopkCodec | None:
        """The codec of ``compression`` with its parameters, or None."""
        if self.compression == "none":
            return None
        return TopkCodec(self.top_k, self.compression_mass, self.compression_bits, self.compression_step)


def run_capture(data_args, cache_args: CacheArguments) -> CacheMetadata:
    """What ``scripts/cache_teacher.py`` does: load the data and the teacher, capture, optionally push."""
    from accelerate import PartialState

    from hf_kd.data.loading import check_columns, dataset_inputs, load_splits
    from hf_kd.modeling import check_model_source, load_teacher
    from hf_kd.paths import refuse_overlap
    from hf_kd.tasks import build_task

    refuse_overlap(
        "output_dir",
        cache_args.output_dir,
        {
            "teacher_model_name_or_path": cache_args.teacher_model_name_or_path,
            "teacher_processor": cache_args.teacher_processor,
            **dataset_inputs(data_args),
        },
    )
    check_model_source("teacher_model_name_or_path", cache_args.teacher_model_name_or_path)
    state = PartialState(cpu=cache_args.use_cpu)
    task = build_task(data_args)
    raw = load_splits(data_args)
    names = cache_args.splits or [name for name in (data_args.train_split, data_args.eval_split) if name]
    unknown = [name for name in names if name not in raw]
    if unknown:
        raise ValueError(
            f"splits {unknown} are not in dataset {data_args.dataset_name!r}; it has {sorted(raw)}"
        )
    check_columns(raw, data_args, names)
    teacher_id, revision = cache_args.teacher_model_name_or_path, cache_args.teacher_model_revision
    teacher = load_teacher(
        task, teacher_id, revision=revision, trust_remote_code=cache_args.trust_remote_code
    )
    processor = None
    if task.needs_processor:
        source = cache_args.teacher_processor or teacher_id
        processor = task.load_processor(source, revision="main" if cache_args.teacher_processor else revision)
    metadata = capture_teacher_logits(
        teacher.to(state.device),
        processor,
        task,
        DatasetDict({name: raw[name] for name in names}),
        cache_args.output_dir,
        teacher_id=teacher_id,
        teacher_revision=revision,
        top_k=cache_args.top_k,
        dtype=cache_args.logits_dtype,
        batch_size=cache_args.batch_size,
        shard_size=cache_args.shard_size,
        dataset_name=data_args.dataset_name,
        dataset_config=data_args.dataset_config,
        overwrite=cache_args.overwrite,
        progress=state.is_local_main_process,
        compression=cache_args.codec(),
    )
    if cache_args.push_to_hub and state.is_main_process:
        push_cache_to_hub(cache_args.output_dir, cache_args.hub_dataset_id, private=cache_args.hub_private)
    state.wait_for_everyone()
    return metadata


# --------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------


def dataset_card(metadata: CacheMetadata) -> DatasetCard:
    """A dataset card: Hub metadata (tags, one config whose splits are the arrow files) and a body
    with the provenance table and the commands that use the cache."""
    card_data = DatasetCardData(
        tags=["hf_kd", "knowledge-distillation", "teacher-logits"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"{name}/*.arrow"} for name in metadata.splits],
            }
        ],
    )
    stored = (
        "full logits"
        if metadata.top_k is None
        else f"top-{metadata.top_k} log-probabilities, their indices and the tail mass"
    )
    if metadata.compression is not None:
        stored += f", packed by the `{metadata.compression['codec']}` codec"
    rows = [
        [f"`{key}`", format_value(value)] for key, value in metadata.provenance().items() if value is not None
    ]
    splits = [
        [name, f"{record['num_rows']:,}", f"`{record['fingerprint'][:16]}`"]
        for name, record in metadata.splits.items()
    ]
    body = f"""# Teacher cache of `{metadata.teacher_id}`

Outputs of the teacher `{metadata.teacher_id}` ({metadata.task}) over {", ".join(f"`{n}`" for n in metadata.splits)},
captured once with [hf_kd](https://github.com/) {metadata.hf_kd_version}: the original rows plus the
teacher's {stored} in `{metadata.dtype}` (columns {", ".join(f"`{c}`" for c in metadata.columns)}), raw at temperature 1.

Train a student from it without loading the teacher:

```yaml
teacher_source: cached
teacher_cache: <this dataset id or a local copy>
```

Before training, hf_kd verifies the cache itself (the metadata against its digests, every file against
its checksum) and checks the metadata below against the run (rows, label space or vocabulary, tokenizer).

## Splits

{markdown_table(["Split", "Rows", "Source fingerprint"], splits)}

## Metadata

{markdown_table(["Field", "Value"], rows)}
"""
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def push_cache_to_hub(
    cache_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload teacher cache made with hf_kd",
) -> CommitInfo:
    """Upload a verified cache directory (data, ``hf_kd_cache.json``, dataset card) as a Hub dataset."""
    cache = load_teacher_cache(cache_dir)
    return upload_folder_to_repo(
        cache.path,
        repo_id,
        repo_type="dataset",
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
    )
