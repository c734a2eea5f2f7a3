"""A sparse (top-k) teacher: its kept log-probabilities, their class ids and the mass it left out, and
how that mass is read back (``tail``: uniform, renormalize, bucket, or sketch: spread like a low-rank
sketch of the teacher's logits; docs/knowledge.md#top-k-teachers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

TAIL_MODES = ("uniform", "renormalize", "bucket", "sketch")


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row of x [..., K], largest first, and their class ids: as
    ``x.topk(k)`` (equal values may come in another order). On CPU through numpy's introselect, about
    twice as fast as ``torch.topk`` for k ≪ K; torch's elsewhere."""
    num_classes = x.shape[-1]
    if (
        x.requires_grad
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or k >= num_classes
    ):
        return x.topk(min(k, num_classes), dim=-1)
    rows = x.reshape(-1, num_classes).numpy()
    ids = np.argpartition(rows, num_classes - k, axis=-1)[:, num_classes - k :]
    values = np.take_along_axis(rows, ids, -1)
    order = np.argsort(-values, axis=-1, kind="stable")
    values, ids = np.take_along_axis(values, order, -1), np.take_along_axis(ids, order, -1)
    shape = (*x.shape[:-1], k)
    return torch.from_numpy(values).reshape(shape), torch.from_numpy(ids).reshape(shape)


@dataclass
class TailSketch:
    """Approximate teacher logits over all K classes, z̃ = coefficients · basisᵀ + mean, from a few
    numbers per position (``hf_kd.teachers.sketch``): what ``sparse_tail: sketch`` spreads the tail by."""

    coefficients: torch.Tensor
    """[..., r] per position."""
    basis: torch.Tensor
    """[K, r], shared by all positions."""
    mean: torch.Tensor
    """[K], shared by all positions."""

    def logits(self) -> torch.Tensor:
        """z̃ [..., K] in float32."""
        return torch.matmul(self.coefficients.float(), self.basis.float().T) + self.mean.float()

    def over_classes(self, columns: slice | torch.Tensor) -> TailSketch:
        """The sketch of the classes ``columns`` (a prefix, or a reordering of the classes)."""
        return replace(self, basis=self.basis[columns], mean=self.mean[columns])


@dataclass
class SparseLogits:
    """A teacher distribution kept as its top-k entries plus the mass they leave out.

    ``log_probs[..., j] = log p_{indices[..., j]}`` (at τ = 1) and ``tail_log_mass = log(1 − Σ_j p_j)``.
    ``num_classes`` is K, the size of the full output space. ``sketch`` (optional) approximates the
    teacher's logits over all classes; ``sparse_tail: sketch`` spreads the tail mass like it.
    """

    log_probs: torch.Tensor
    indices: torch.Tensor
    tail_log_mass: torch.Tensor
    num_classes: int
    sketch: TailSketch | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> SparseLogits:
        """Top-k compression of dense logits: keeps the k largest log-probabilities and the tail mass.

        The tail is summed directly, log Σ_{i ∉ top-k} p_i, not as log(1 − Σ_topk p): that difference
        rounds to log 0 = −inf in float32 once the tail is below ~1e-7, although its classes keep p > 0.
        """
        log_p = torch.log_softmax(logits.float(), dim=-1)
        K = logits.shape[-1]
        top, idx = top_k(log_p, k)
        tail = torch.logsumexp(log_p.scatter(-1, idx, -math.inf), dim=-1)
        return cls(top, idx, tail, K)

    def __getitem__(self, rows) -> SparseLogits:
        sketch = self.sketch and replace(self.sketch, coefficients=self.sketch.coefficients[rows])
        return SparseLogits(
            self.log_probs[rows], self.indices[rows], self.tail_log_mass[rows], self.num_classes, sketch
        )

    def reshape(self, *shape: int) -> SparseLogits:
        k = self.log_probs.shape[-1]
        sketch = self.sketch and replace(
            self.sketch,
            coefficients=self.sketch.coefficients.reshape(*shape, self.sketch.coefficients.shape[-1]),
        )
        return SparseLogits(
            self.log_probs.reshape(*shape, k),
            self.indices.reshape(*shape, k),
            self.tail_log_mass.reshape(*shape),
            self.num_classes,
            sketch,
        )

    def first_classes(self, num_classes: int) -> SparseLogits:
        """This teacher over its first ``num_classes`` classes (the kept ids must all be below it)."""
        sketch = self.sketch and self.sketch.over_classes(slice(num_classes))
        return replace(self, num_classes=num_classes, sketch=sketch)

    def bucket(self) -> torch.Tensor:
        """The teacher over k + 1 outcomes [..., k + 1]: each kept class, then the tail as one outcome
        (``sparse_tail: bucket``); padding slots hold −inf."""
        return torch.cat([self.log_probs.float(), self.tail_log_mass.float().unsqueeze(-1)], dim=-1)

    def gather_index(self) -> torch.Tensor:
        """``indices`` as gather positions [..., k]; padding slots read class 0 (callers mask them)."""
        return torch.where(self.log_probs > -math.inf, self.indices.long(), 0)

    def bucket_from_kept(self, kept: torch.Tensor) -> torch.Tensor:
        """Another distribution on this teacher's k + 1 outcomes, from its log q at the kept slots
        [..., k] (``log_q.gather(-1, self.gather_index())``): q of each kept class and
        log Σ_tail q = log(1 − Σ_kept q); padding slots hold −inf."""
        kept = kept.masked_fill(self.log_probs <= -math.inf, -math.inf)
        total = torch.logsumexp(kept, -1)
        # log Σ_tail q; −inf once Σ_kept q rounds to 1 (every class kept, or a confident student), without
        # the infinite derivative of log(−expm1(x)) at x = 0, which made the gradient NaN
        some = total < 0.0
        rest = torch.where(some, torch.log(-torch.expm1(torch.where(some, total, -1.0))), -math.inf)
        return torch.cat([kept, rest.unsqueeze(-1)], dim=-1)

    def to_dense_log_probs(self, tail: str = "uniform") -> torch.Tensor:
        """Rebuild a full log-distribution over K classes.

        ``uniform``:      p_i for the top-k, tail_mass / (K − k) for every other class
                          (exactly the paper's ``kd_topk`` target);
        ``renormalize``:  p_i / Σ_topk p for the top-k, 0 elsewhere;
        ``sketch``:       p_i for the top-k, the tail mass spread over the other classes ∝ exp(z̃), z̃ the
                          :class:`TailSketch` logits.
        (``bucket`` has no dense form: the loss compares the k + 1 outcomes of :meth:`bucket`.)

        Entries whose log-prob is −inf are padding (a support smaller than k at this position, as a
        compressed cache decodes): their classes are tail classes, whatever their index.
        """
        if tail not in TAIL_MODES:
            raise ValueError(f"tail={tail!r} is not one of {TAIL_MODES}")
        if tail == "bucket":
            raise ValueError(
                "sparse_tail='bucket' compares the kept tokens and the tail as one outcome (see "
                "bucket_divergence); it rebuilds no dense distribution: use 'uniform' or 'renormalize' here"
            )
        lp = self.log_probs.float()
        K = self.num_classes
        stored = lp > -math.inf
        if tail == "sketch":
            return self._sketch_dense_log_probs(lp, stored)
        if tail == "uniform":
            k = stored.sum(-1, keepdim=True)
            fill = self.tail_log_mass.float().unsqueeze(-1) - torch.log((K - k).clamp(min=1).float())
            fill = fill.masked_fill(k >= K, -math.inf)
        else:
            fill = torch.full_like(lp[..., :1], -math.inf)
            lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        dense = fill.expand(*lp.shape[:-1], K + 1).clone()  # column K takes the padding entries
        index = torch.where(stored, self.indices.long(), K)
        return dense.scatter_(-1, index, lp)[..., :K]

    def _sketch_dense_log_probs(self, lp: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """``to_dense_log_probs("sketch")`` from the kept log-probs ``lp`` and their stored mask."""
        if self.sketch is None:
            raise ValueError(
                "sparse_tail='sketch' needs a teacher cache captured with a logit sketch (sketch_rank > 0); "
                "this top-k teacher has none: use 'uniform', 'renormalize' or 'bucket'"
            )
        K = self.num_classes
        index = torch.where(stored, self.indices.long(), K)  # column K takes the padding entries
        approx = F.pad(self.sketch.logits(), (0, 1)).scatter_(-1, index, -math.inf)[..., :K]
        dense = torch.log_softmax(approx, -1).add_(self.tail_log_mass.float()[..., None])
        dense.masked_fill_(dense.isnan(), -math.inf)  # NaN: no tail class at all
        return F.pad(dense, (0, 1)).scatter_(-1, index, lp)[..., :K]
