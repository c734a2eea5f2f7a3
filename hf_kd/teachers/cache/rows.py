"""From a batch of teacher outputs to cache rows: the stored tensors (full logits, or the top-k with its
tail mass), their arrow columns (or one packed row per example with a codec, and the sketch codes beside
them), and the probability mass kept at each position."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from datasets import Features

from hf_kd.losses import SparseLogits
from hf_kd.tasks.base import CACHE_PREFIX
from hf_kd.teachers.cache.format import SKETCH_COLUMN
from hf_kd.teachers.codec import TopkCodec
from hf_kd.teachers.sketch import LogitSketch


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


def kept_mass(columns: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Probability mass of the stored top-k at each (non-padding) position; empty for full logits."""
    if "tail_log_mass" not in columns:
        return torch.empty(0)
    tail = columns["tail_log_mass"] if mask is None else columns["tail_log_mass"][mask.bool()]
    return -torch.expm1(tail.float())


@dataclass
class BatchRows:
    """Turns one batch of teacher outputs into its cache rows.

    Args:
        features: the cache's columns (:func:`hf_kd.teachers.cache.format.cache_features`).
        top_k: the top-k stored, or None for full logits.
        compression: the codec packing each example's per-token top-k into one row, or None.
        sketch: the logit sketch whose codes are stored beside the top-k, or None.
    """

    features: Features
    top_k: int | None
    compression: TopkCodec | None = None
    sketch: LogitSketch | None = None
    sketch_features: Features = field(init=False)
    output_features: Features = field(init=False)

    def __post_init__(self):
        sketch_column = CACHE_PREFIX + SKETCH_COLUMN
        self.sketch_features = Features({k: v for k, v in self.features.items() if k == sketch_column})
        self.output_features = Features({k: v for k, v in self.features.items() if k != sketch_column})

    def __call__(self, logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[pa.Table, torch.Tensor]:
        """The cache rows of teacher outputs ``logits`` [B, (T,) K] (``mask`` [B, T] for per-token
        outputs, else None) and the probability mass kept per position."""
        if self.compression is not None:
            table, kept = packed_to_arrow(self.compression, logits, mask, self.output_features)
        else:
            columns = compress_logits(logits, self.top_k)
            table, kept = columns_to_arrow(columns, self.output_features, mask), kept_mass(columns, mask)
        if self.sketch is not None:
            codes = {SKETCH_COLUMN: self.sketch.encode(logits.flatten(0, -2)).reshape(*logits.shape[:-1], -1)}
            sketched = columns_to_arrow(codes, self.sketch_features, mask)
            table = pa.Table.from_arrays(table.columns + sketched.columns, schema=self.features.arrow_schema)
        return table, kept
