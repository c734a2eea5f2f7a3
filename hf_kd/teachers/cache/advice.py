"""Which ``sparse_tail`` to train a top-k teacher cache with: the one place every message of the capture
and of training takes its advice from, so that none contradicts README.md ("Compressed caches", "How to
pick a setting"; measured in BENCHMARKS.md, "Compressed per-token teacher caches").

- A cache with a logit sketch (``sketch_rank`` > 0): ``sketch`` — the stored tail mass spread the way each
  position's teacher spread it; on a flat teacher it matched online KD where the best top-k-only cache
  stayed 0.17 nats behind.
- A top-k cache of a flat teacher (the top-k keeps little of the mass): ``bucket`` — the left-out mass
  matched as one outcome; ``uniform`` acts like heavy label smoothing there, ``renormalize`` is worse.
- A top-k cache of a peaked teacher (the top-k keeps most of the mass): ``uniform`` is fine.
"""

from __future__ import annotations


def recommended_sparse_tail(has_sketch: bool, flat: bool) -> tuple[str, str]:
    """``(sparse_tail, why)`` for a top-k cache with or without a logit sketch, of a flat or peaked teacher."""
    if has_sketch:
        return "sketch", "the cache's logit sketch spreads the left-out mass like each position's teacher"
    if flat:
        return "bucket", (
            "the left-out mass is matched as one outcome; uniform would spread it evenly over the other "
            "classes, which acts like label smoothing"
        )
    return "uniform", "the top-k keeps most of the teacher's mass"


def sparse_tail_advice(has_sketch: bool, flat: bool, sketch_rank: int | None = None) -> str:
    """The sentence a message gives: ``Train with sparse_tail: <mode> (<why>).``, and for a cache without
    a sketch of a flat teacher, how to capture the recommended one."""
    mode, why = recommended_sparse_tail(has_sketch, flat)
    rank = f"rank-{sketch_rank} " if has_sketch and sketch_rank else ""
    text = f"Train with sparse_tail: {mode} ({why.replace('logit sketch', rank + 'logit sketch')})."
    if flat and not has_sketch:
        text += (
            " To keep the tail's shape as well, capture with sketch_rank: 32 and train with sparse_tail: sketch "
            "(the recommended cache of README.md)."
        )
    return text
