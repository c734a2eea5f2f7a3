"""Level 2 — domain knowledge: class relationships and the logit-layer geometry (``docs/knowledge.md#domain-level``).

Class-similarity matrices (from logit-layer weights, or the soft confusion of predictions), their
agreement teacher vs student, and a hierarchy score where a class grouping is known. Correlations
are computed in torch (Spearman = Pearson of average ranks), with no scipy dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_kd.teachers.synthetic import class_similarity_from_predictions as soft_confusion

__all__ = [
    "Agreement",
    "class_similarity",
    "hierarchy_score",
    "most_frequent_classes",
    "pearson",
    "rank",
    "similarity_agreement",
    "soft_confusion",
    "spearman",
]


def class_similarity(weight: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """S_W = Ŵ Ŵᵀ, Ŵ the logit-layer rows w_k / ‖w_k‖ (cosine similarity of class templates), [K, K].

    ``classes`` (indices) keeps only those rows first, e.g. the M most frequent tokens of a large vocabulary."""
    w = weight.float() if classes is None else weight[classes].float()
    w = F.normalize(w, dim=-1)
    return w @ w.T


def rank(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor; tied values share their average rank (start + end) / 2."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts - 1) / 2.0)[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """r = Σ (a − ā)(b − b̄) / √(Σ (a − ā)² · Σ (b − b̄)²), over flattened inputs; NaN if one is constant."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """ρ_s = pearson(rank(a), rank(b)), average ranks for ties."""
    return pearson(rank(a.flatten()), rank(b.flatten()))


@dataclass
class Agreement:
    """Correlation of the off-diagonal entries of two class-similarity matrices over ``num_classes`` classes."""

    pearson: float
    spearman: float
    num_classes: int


def most_frequent_classes(labels: torch.Tensor, num_classes: int, m: int) -> torch.Tensor:
    """Indices of the m most frequent classes among the labels ≥ 0 (for a large vocabulary)."""
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes)
    return counts.topk(min(m, num_classes)).indices.sort().values


def similarity_agreement(a: torch.Tensor, b: torch.Tensor, classes: torch.Tensor | None = None) -> Agreement:
    """Pearson and Spearman of {a_ij} vs {b_ij}, i ≠ j (all ordered pairs: C need not be symmetric).

    ``classes`` restricts both matrices to those classes (see :func:`most_frequent_classes`)."""
    if classes is not None:
        a, b = a[classes][:, classes], b[classes][:, classes]
    off = ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    return Agreement(pearson(a[off], b[off]), spearman(a[off], b[off]), a.shape[0])


def hierarchy_score(similarity: torch.Tensor, groups: Sequence[int] | torch.Tensor) -> float:
    """mean_{i≠j, g_i = g_j} a_ij / mean_{g_i ≠ g_j} a_ij, on the affinity a = (1 + s) / 2.

    A plain ratio of similarities is meaningless once they can be negative (cosines are): a negative
    between-group mean flips its sign. The affine map s ↦ (1 + s)/2 sends [−1, 1] to [0, 1] and keeps
    the order of the two means, so the score is > 1 exactly when classes of one group are more similar
    to each other than to other groups, 1 when the grouping is invisible, and always ≥ 0 for entries in
    [−1, 1] (cosine or soft-confusion matrices). ``groups[k]`` is the group of class k; needs at least
    one group with two classes and two groups.
    """
    g = torch.as_tensor(groups, device=similarity.device)
    same = g.unsqueeze(0) == g.unsqueeze(1)
    off = ~torch.eye(len(g), dtype=torch.bool, device=similarity.device)
    affinity = (1.0 + similarity.double()) / 2.0
    return (affinity[same & off].mean() / affinity[~same].mean()).item()
