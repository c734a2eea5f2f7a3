"""A low-rank sketch of a teacher's logits, stored beside a per-token top-k cache so that the tail (the
classes the top-k leaves out) keeps each position's shape (``sparse_tail: sketch``).

Fit once per cache on the teacher's logits at the first ``FIT_POSITIONS`` captured positions: each
position's logits centred over the classes (softmax ignores a constant), minus their mean m over the
positions; the top-``rank`` principal directions U [K, r] (by subspace iteration) and their standard
deviations σ [r]. Per position, the whitened coefficients c = Uᵀ(z − z̄ − m) / σ are stored as a float16
scale s = max |c_j| then ``rank`` codes round(c_j / s · L) + L of ``bits`` bits (L = 2^(bits−1) − 1): 2 + rank · bits / 8 bytes.
The rebuilt logits z̃ = (ĉ σ) Uᵀ + m (:class:`hf_kd.losses.TailSketch`) stand for the teacher's logits
up to a constant. The sketch needs only the logits, so it holds for any teacher (final soft-capping
included); the fit is a fixed matrix of the cache, written as safetensors (``SKETCH_FILE``) and checked by
its SHA-256 like every file of the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_kd.losses import TailSketch

SKETCH_FILE = "sketch.safetensors"
SKETCH_BITS = (4, 8)
FIT_POSITIONS = 4096
"""Positions (the first ones captured) that the sketch's directions are fitted on."""
FIT_ITERATIONS, FIT_OVERSAMPLING = 4, 16


@dataclass(frozen=True)
class LogitSketch:
    """The fitted sketch of one cache: directions U [K, r], their scales σ [r], the mean m [K]."""

    directions: torch.Tensor
    scales: torch.Tensor
    mean: torch.Tensor
    bits: int

    def __post_init__(self) -> None:
        check_setting(self.rank, self.bits, self.directions.shape[0])
        if self.scales.shape != (self.rank,) or self.mean.shape != self.directions.shape[:1]:
            raise ValueError(
                f"a logit sketch of directions {tuple(self.directions.shape)} needs scales ({self.rank},) and a "
                f"mean ({self.directions.shape[0]},); got {tuple(self.scales.shape)} and {tuple(self.mean.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.directions.shape[1]

    @property
    def code_bytes(self) -> int:
        return code_bytes(self.rank, self.bits)

    @classmethod
    def fit(cls, logits: torch.Tensor, rank: int, bits: int) -> LogitSketch:
        """The sketch of ``rank`` directions fitted on logits [N, K], on the CPU, by subspace iteration
        (``FIT_ITERATIONS`` steps from a seeded random start, ``FIT_OVERSAMPLING`` extra directions): a few
        [N, K] products, so any vocabulary fits in seconds. Directions with (numerically) no spread are
        left out (zero), so they never take a code's range."""
        check_setting(rank, bits, logits.shape[-1])
        if logits.shape[0] < rank:
            raise ValueError(
                f"sketch_rank={rank} needs at least {rank} positions to fit; got {logits.shape[0]}"
            )
        z = _centred(logits.detach().float().cpu())
        mean = z.mean(0)
        z -= mean
        width = min(rank + FIT_OVERSAMPLING, *z.shape)
        start = torch.randn(z.shape[1], width, generator=torch.Generator().manual_seed(0))
        subspace = torch.linalg.qr(start).Q
        for _ in range(FIT_ITERATIONS):
            subspace = torch.linalg.qr(z.T @ (z @ subspace)).Q
        _, singular, vh = torch.linalg.svd(z @ subspace, full_matrices=False)
        singular, directions = singular[:rank], subspace @ vh[:rank].T
        spread = singular > singular[0] * 1e-3  # below: float32 round-off
        scales = torch.where(spread, singular / math.sqrt(len(z)), 1.0)
        return cls(directions * spread.float(), scales, mean, bits)

    def encode(self, logits: torch.Tensor) -> torch.Tensor:
        """The stored bytes [N, code_bytes] (uint8, on the CPU) of logits [N, K]."""
        z = _centred(logits.detach().float())
        device = z.device
        coefficients = ((z - self.mean.to(device)) @ self.directions.to(device)) / self.scales.to(device)
        coefficients = coefficients.cpu()
        scale = coefficients.abs().amax(-1, keepdim=True).clamp(min=1e-4).half()
        levels = 2 ** (self.bits - 1) - 1
        codes = (coefficients / scale.float() * levels).round().clamp(-levels, levels) + levels
        codes = codes.to(torch.uint8)
        if self.bits == 4:
            codes = codes[:, 0::2] << 4 | codes[:, 1::2]
        return torch.cat([scale.view(torch.uint8), codes], dim=-1)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Coefficients ĉ σ [..., r] (float32) of stored bytes [..., code_bytes]."""
        stored = stored.to(torch.uint8)
        if stored.shape[-1] != self.code_bytes:
            raise ValueError(
                f"a sketch of rank {self.rank} at {self.bits} bits stores {self.code_bytes} bytes a position; got {stored.shape[-1]}"
            )
        scale = stored[..., :2].contiguous().view(torch.float16).float()
        codes = stored[..., 2:]
        if self.bits == 4:
            codes = torch.stack([codes >> 4, codes & 15], dim=-1).flatten(-2)
        levels = 2 ** (self.bits - 1) - 1
        return (codes.float() - levels) * (scale / levels) * self.scales.to(stored.device)

    def tail_sketch(self, stored: torch.Tensor) -> TailSketch:
        """The :class:`TailSketch` of stored bytes [..., code_bytes] (the basis on their device)."""
        device = stored.device
        return TailSketch(self.decode(stored), self.directions.to(device), self.mean.to(device))

    def spec(self) -> dict:
        """What a cache's metadata records about its sketch."""
        return {"rank": self.rank, "bits": self.bits, "file": SKETCH_FILE}

    def save(self, path: Path) -> None:
        """Write the fitted matrices to ``path`` (safetensors)."""
        tensors = {"directions": self.directions, "scales": self.scales, "mean": self.mean}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: Path, spec: dict, num_classes: int) -> LogitSketch:
        """The sketch a cache's metadata ``spec`` describes, read from ``path``; a clear error when the
        file does not hold it."""
        try:
            tensors = load_file(str(path))
            sketch = cls(tensors["directions"], tensors["scales"], tensors["mean"], spec["bits"])
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"logit sketch {str(path)!r} cannot be read as {spec}: {err}") from err
        if sketch.rank != spec["rank"] or sketch.directions.shape[0] != num_classes:
            raise ValueError(
                f"logit sketch {str(path)!r} holds rank {sketch.rank} over {sketch.directions.shape[0]} classes; "
                f"the cache records rank {spec['rank']} over {num_classes}"
            )
        return sketch


def code_bytes(rank: int, bits: int) -> int:
    """Bytes stored per position: the float16 scale and the codes."""
    return 2 + rank * bits // 8


def check_setting(rank: int, bits: int, num_classes: float = math.inf) -> None:
    """A clear error for a sketch setting that cannot be stored."""
    if not (isinstance(rank, int) and 1 <= rank <= num_classes):
        raise ValueError(f"sketch_rank={rank!r} must be an integer ≥ 1, at most the classes ({num_classes})")
    if bits not in SKETCH_BITS:
        raise ValueError(f"sketch_bits={bits!r} must be one of {SKETCH_BITS}")
    if rank * bits % 8:
        raise ValueError(f"sketch_rank={rank} at sketch_bits={bits} must fill whole bytes (an even rank)")


def _centred(logits: torch.Tensor) -> torch.Tensor:
    """Each position's logits minus their mean over the classes."""
    return logits - logits.mean(-1, keepdim=True)
