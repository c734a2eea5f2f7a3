"""How much of the teacher's probability mass a top-k capture kept: a summary per shard that adds up over
shards, and the report (mean, quantiles, and the advice for a flat teacher) a capture logs at its end."""

from __future__ import annotations

import logging

import numpy as np
import torch

from hf_kd.teachers.cache.advice import sparse_tail_advice
from hf_kd.teachers.codec import TopkCodec

logger = logging.getLogger(__name__)

LOW_KEPT_MASS = 0.8
"""A capture warns when its top-k keeps less than this probability mass on average."""
KEPT_BINS = 1000
"""Bins of the kept-mass histogram each shard records (the quantiles a capture reports)."""


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
