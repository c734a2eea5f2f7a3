"""The format of a teacher cache: its files, its teacher columns and its metadata, with the hashes
and digests that let every recorded fact be verified when it is read (:mod:`hf_kd.teachers.cache.load`).

On disk a cache is a ``DatasetDict.save_to_disk`` directory (``load_from_disk`` reads it) plus two files:

    <cache>/dataset_dict.json, <split>/...   the original rows + the teacher columns below
    <cache>/hf_kd_cache.json                 :class:`CacheMetadata` (written last; sizes and SHA-256 of every file)
    <cache>/README.md                        the dataset card (:mod:`hf_kd.cards.dataset`)

Teacher columns (prefix ``kd_teacher_``, raw outputs at τ = 1; the temperature is applied when training):

    full logits   ``kd_teacher_logits``         K values (float32 or float16)
    top-k         ``kd_teacher_log_probs``      k values, log p of the k most likely classes (float32 or float16)
                  ``kd_teacher_indices``        k class ids (uint16 when K ≤ 65,536, else int32)
                  ``kd_teacher_tail_log_mass``  log(1 − Σ_topk p), float32 (−inf when k = K)
    compressed    ``kd_teacher_packed``         per-token top-k packed by a codec (``compression`` in the
                                                metadata, see :mod:`hf_kd.teachers.codec`), one value per row
    sketch        ``kd_teacher_sketch``         beside a per-token top-k (packed or not): per position the
                                                bytes of a low-rank sketch of the logits (``sketch`` in the
                                                metadata, its matrices in ``sketch.safetensors``, see
                                                :mod:`hf_kd.teachers.sketch`)

For one output per row (classification) each column holds that row's values. For one output per token
(causal LM) each column holds a list over the row's non-padding positions t (``attention_mask`` = 1),
position t being the teacher's distribution of token t + 1 given tokens ≤ t; such a cache lines up
with a student only when both use the same tokenizer (``processor_hash``, checked when training).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, List, Value

from hf_kd.tasks.base import CACHE_PREFIX
from hf_kd.teachers.sketch import code_bytes

FORMAT_VERSION = 2
METADATA_FILE = "hf_kd_cache.json"
UNLISTED_FILES = (METADATA_FILE, "README.md", ".gitattributes")
"""The files of a cache directory that its ``files`` list leaves out, none of them read when training:
the metadata itself, the dataset card and the attributes file of a Hub repository."""
DERIVED_FILE = re.compile(r"(^|/)cache-[0-9a-f]+\.arrow$")
"""Files ``datasets.Dataset.map`` writes beside the arrow shards it reads (a user's ``prepare`` of the
cache's splits): ``load_from_disk`` reads only the shards its ``state.json`` lists, never these."""
LOGIT_DTYPES = ("float32", "float16")
DENSE_COLUMNS = ("logits",)
SPARSE_COLUMNS = ("log_probs", "indices", "tail_log_mass")
PACKED_COLUMN = "packed"
SKETCH_COLUMN = "sketch"
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
    sketch: dict[str, Any] | None = None
    """Per-token top-k with a low-rank sketch of the logits for the tail: its
    :meth:`hf_kd.teachers.sketch.LogitSketch.spec` (rank, bits, file); None without one."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per file of the cache directory (relative path): ``size`` in bytes and ``sha256``."""
    hf_kd_version: str = field(default_factory=lambda: version("hf_kd"))
    format_version: int = FORMAT_VERSION
    digests: dict[str, str] = field(default_factory=dict)
    """:func:`metadata_digests` of every other field, written last and verified by
    :func:`hf_kd.teachers.cache.load.read_metadata`."""

    @property
    def columns(self) -> list[str]:
        """The teacher columns, with their ``kd_teacher_`` prefix."""
        return list(
            cache_features(
                self.num_classes, self.top_k, self.dtype, self.per_token, self.compression, self.sketch
            )
        )

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
    num_classes: int,
    top_k: int | None,
    dtype: str,
    per_token: bool,
    compression: dict | None = None,
    sketch: dict | None = None,
) -> Features:
    """The ``datasets`` features of the teacher columns (see the module docstring)."""
    features = _output_features(num_classes, top_k, dtype, per_token, compression)
    if sketch is not None:
        width = code_bytes(sketch["rank"], sketch["bits"])
        features[CACHE_PREFIX + SKETCH_COLUMN] = List(List(Value("uint8"), length=width))
    return features


def _output_features(
    num_classes: int, top_k: int | None, dtype: str, per_token: bool, compression: dict | None
) -> Features:
    """The features of the teacher's outputs (all columns but the sketch)."""
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


def file_record(path: Path) -> dict[str, Any]:
    """A file's ``size`` in bytes and ``sha256``, as :attr:`CacheMetadata.files` records it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}
