"""Compressed per-token top-k teacher outputs: one packed ``bytes`` value per cached row.

- ``packed.py``: the ``topk-packed`` codec (:class:`TopkCodec`): which tokens a position keeps, how their
  log-probabilities and the tail mass are quantised, the row layout, its checks and its error bound;
- ``golomb.py``: the ``topk-golomb`` codec (:class:`GolombTopkCodec`, the one to write): the same
  support and codes, each id gap in an exp-Golomb code;
- ``bits.py``: bit fields written to and read from a byte stream, vectorised.

A new codec is a subclass of :class:`TopkCodec` with its own ``name``, imported here: it joins
:data:`CODECS`, so a cache's metadata may name it. Encoding and decoding are vectorised over all
positions of a batch (no Python loop over positions).
"""

from hf_kd.teachers.codec.golomb import ORDER_BITS, GolombTopkCodec
from hf_kd.teachers.codec.packed import (
    CODECS,
    ROW_PREFIX,
    TAIL_BITS,
    TAIL_HIGH,
    TAIL_LOW,
    TAIL_STEP,
    CodecError,
    TopkCodec,
)

COMPRESSIONS = ("none", *CODECS)
"""The values of a capture's ``compression``: none, or a codec's name."""

__all__ = [
    "CODECS",
    "COMPRESSIONS",
    "ORDER_BITS",
    "ROW_PREFIX",
    "TAIL_BITS",
    "TAIL_HIGH",
    "TAIL_LOW",
    "TAIL_STEP",
    "CodecError",
    "GolombTopkCodec",
    "TopkCodec",
]
