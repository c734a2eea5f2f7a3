"""The paper's synthetic teachers (``docs/knowledge.md#synthetic-teachers``).

Each kind replaces the teacher distribution p^τ in the same KD loss

    L = (1 − α) · H(y, q) + α · τ² · KL(ρ ‖ q^τ)

by a target ρ that keeps only some of the three knowledge levels:

    none     α = 0 (no target: the caller drops the KD term)            keeps nothing
    ls       ρ = u = 1/K                                                universe
    kd_pt    ρ_t = p^τ_t,  ρ_i = (1 − p^τ_t)/(K − 1) for i ≠ t            universe + instance
    kd_sim   ρ = softmax(S[t] / β), S a class-similarity matrix          universe + domain
    kd       ρ = p^τ                                                     all three
    kd_topk  top-k of p^τ kept, the rest spread uniformly over K − k     all three, less tail noise

The ``ls`` target needs no teacher at all: :class:`UniformTeacher` is its teacher signal. The others
transform a real teacher's distribution: :class:`SyntheticTargetFn` is the trainer's ``target_fn``.

Rows whose label is the ignore index (−100, or any negative value) have no true class: for them
``kd_pt`` and ``kd_sim`` use the teacher's argmax as t (the class the teacher believes in).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hf_kd.losses import SparseLogits
from hf_kd.teachers.contract import SignalDefaults

SYNTHETIC_KINDS = ("none", "ls", "kd_pt", "kd_sim", "kd", "kd_topk")


def true_class(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """t = y where y ≥ 0, else argmax_i v_i (the teacher's own guess for rows without a hard label)."""
    return torch.where(labels >= 0, labels, teacher_logits.argmax(-1))


def wrong_class_distribution(logits: torch.Tensor, true_class: torch.Tensor) -> torch.Tensor:
    """p̄_i = p_i / (1 − p_t) for i ≠ t and p̄_t = 0, with p = softmax(v).

    Computed as softmax(v) with v_t set to −∞, which stays exact when p_t → 1."""
    masked = logits.float().scatter(-1, true_class.unsqueeze(-1), -math.inf)
    return torch.softmax(masked, dim=-1)


def topk_count(k: int | float, num_classes: int) -> int:
    """k as a class count: a fraction f ∈ (0, 1) of K as max(1, round(f · K)); a whole number (int, or a
    float such as 3.0 from a config field) as a count in [1, K]."""
    if isinstance(k, float):
        if 0.0 < k < 1.0:
            return max(1, round(k * num_classes))
        if not k.is_integer():
            raise ValueError(f"k={k!r}: a fraction must lie in (0, 1), a count must be a whole number")
        k = int(k)
    if isinstance(k, bool) or not 1 <= k <= num_classes:
        raise ValueError(f"k={k!r}: expected a count in [1, {num_classes}] or a fraction in (0, 1)")
    return k


def synthetic_target(
    kind: str,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    k: int | float | None = None,
    class_similarity: torch.Tensor | None = None,
    sim_temperature: float = 1.0,
) -> torch.Tensor:
    """Target distribution ρ of shape [..., K] (float32, rows sum to 1) for the synthetic teacher ``kind``.

    With p^τ = softmax(v / τ), t the true class (the teacher's argmax where the label is < 0):

        ls       ρ_i = 1/K
        kd_pt    ρ_t = p^τ_t,  ρ_i = (1 − p^τ_t) / (K − 1)   (i ≠ t)
        kd_sim   ρ = softmax(S[t] / β),  S = ``class_similarity`` [K, K], β = ``sim_temperature``
        kd       ρ = p^τ
        kd_topk  ρ_i = p^τ_i for the k largest p^τ_i,  ρ_i = (1 − Σ_topk p^τ) / (K − k) otherwise

    ``temperature`` is not used by ``ls`` and ``kd_sim`` (β plays its part there). ``k`` is an int
    count or a float fraction of K (see :func:`topk_count`). ``none`` (α = 0) has no target and raises.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {SYNTHETIC_KINDS}")
    if kind == "none":
        raise ValueError("kind='none' means α = 0: there is no target, the caller drops the KD term")
    K = teacher_logits.shape[-1]
    if kind == "ls":
        return torch.full(teacher_logits.shape, 1.0 / K, dtype=torch.float32, device=teacher_logits.device)
    t = true_class(teacher_logits, labels)
    if kind == "kd_sim":
        if class_similarity is None:
            raise ValueError("kind='kd_sim' needs class_similarity (a [K, K] matrix)")
        S = class_similarity.to(device=teacher_logits.device, dtype=torch.float32)
        return torch.softmax(S[t] / sim_temperature, dim=-1)
    v = teacher_logits.float() / temperature
    if kind == "kd_topk":
        if k is None:
            raise ValueError("kind='kd_topk' needs k (an int count or a float fraction of K)")
        return SparseLogits.from_logits(v, topk_count(k, K)).to_dense_log_probs("uniform").exp()
    p = torch.softmax(v, dim=-1)
    if kind == "kd":
        return p
    p_t = p.gather(-1, t.unsqueeze(-1))
    return ((1.0 - p_t) / (K - 1)).expand_as(p).scatter(-1, t.unsqueeze(-1), p_t)


def class_similarity_from_predictions(
    teacher_probs: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Soft-confusion matrix C [K, K] from teacher predictions, usable as ``class_similarity`` for kd_sim.

        C[c, i] = mean over instances n with y_n = c of p̄_n,i   (i ≠ c),    C[c, c] = 1

    p̄ is the teacher's renormalised wrong-class distribution (:func:`wrong_class_distribution`).
    The diagonal is set to 1, the value a cosine class-similarity takes on its diagonal: it is ≥ every
    off-diagonal entry (those are probabilities), so softmax(C[t] / β) puts the most mass on t, like the
    weight-based S, and a flat p̄ gives a uniform tail. Rows with label < 0 are skipped; a class with
    no instance gets an all-zero off-diagonal row (a uniform tail under kd_sim). Exactly-zero
    probabilities are clamped to the smallest normal float before renormalising.
    """
    if teacher_probs.shape[-1] != num_classes:
        raise ValueError(f"teacher_probs has {teacher_probs.shape[-1]} classes, expected {num_classes}")
    keep = labels >= 0
    probs, y = teacher_probs[keep].float(), labels[keep]
    p_bar = wrong_class_distribution(probs.clamp_min(torch.finfo(torch.float32).tiny).log(), y)
    sums = torch.zeros(num_classes, num_classes, device=probs.device).index_add_(0, y, p_bar)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1)
    return (sums / counts.unsqueeze(-1)).fill_diagonal_(1.0)


class SyntheticTargetFn:
    """The trainer's ``target_fn`` for a synthetic teacher: (log p^τ [n, K], labels [n]) → log ρ [n, K].

    The loss hands over the teacher's tempered log-probabilities; softmax(log p^τ) = p^τ, so
    ``synthetic_target(kind, log p^τ, labels, temperature=1)`` is the target of ``docs/knowledge.md#synthetic-teachers``
    built from the teacher at temperature τ. It reads nothing but teacher logits and labels, so an
    online and a cached teacher give the same target. For ``kd_sim`` the class-similarity matrix is
    fixed before training (see ``hf_kd.predictions.teacher_class_similarity``).
    """

    def __init__(
        self,
        kind: str,
        *,
        k: int | float | None = None,
        class_similarity: torch.Tensor | None = None,
        sim_temperature: float = 1.0,
    ):
        if kind not in ("kd_pt", "kd_sim", "kd_topk"):
            raise ValueError(
                f"kind={kind!r}: a target function exists for 'kd_pt', 'kd_sim' and 'kd_topk' only"
            )
        if kind == "kd_sim" and class_similarity is None:
            raise ValueError("kind='kd_sim' needs class_similarity (a [K, K] matrix)")
        if kind == "kd_topk" and k is None:
            raise ValueError("kind='kd_topk' needs k (an int count or a float fraction of K)")
        if k is not None:
            topk_count(k, num_classes=max(1, int(k)))  # its form now; against K when the loss sees K
        self.kind, self.k, self.class_similarity, self.sim_temperature = (
            kind,
            k,
            class_similarity,
            sim_temperature,
        )

    def __call__(self, teacher_log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rho = synthetic_target(
            self.kind,
            teacher_log_probs,
            labels,
            k=self.k,
            class_similarity=self.class_similarity,
            sim_temperature=self.sim_temperature,
        )
        return rho.log()


class UniformTeacher(SignalDefaults):
    """The teacher signal of label smoothing (the ``ls`` target): constant logits over ``num_classes``
    classes for every item of the batch (shape ``labels.shape + (K,)``), p = u = 1/K. No model runs,
    so agreement with the student means nothing (``real_teacher`` is False)."""

    returns = ("dense",)
    scores_samples = True  # the same zeros for any sequence
    real_teacher = False

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        return torch.zeros(*labels.shape, self.num_classes, dtype=torch.float32, device=labels.device)
