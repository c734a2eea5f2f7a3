r"""Losses on intermediate representations (docs/knowledge.md#feature-distillation): hidden states
(DistilBERT's cosine, TinyBERT's MSE, through a learned projection when widths differ) and MiniLM's
self-attention relations. Pure tensor math: which positions count and how the batch is normalised is
the caller's (``hf_kd.features``).

Every loss is a *sum over items* of per-position losses weighted by ``weights`` [B, T] (the positions
that count; an example's weights summing to 1 makes each example one item, all-ones weights make each
position one item), so that the caller divides by the same item count as the logit terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_LOSSES = ("none", "mse", "cosine")


def default_layer_mapping(student_depth: int, teacher_depth: int) -> dict[int, int]:
    """Student layer s ↦ teacher layer round(s · L_t / L_s) for s = 1 … L_s (layer numbers count the
    blocks' outputs from 1; 0 is the embeddings): spread evenly over depth, the last onto the last."""
    return {s: round(s * teacher_depth / student_depth) for s in range(1, student_depth + 1)}


def check_layer_mapping(mapping: dict[int, int], student_depth: int, teacher_depth: int) -> dict[int, int]:
    """``mapping`` with int keys and values, each in [0, depth] of its model (0 = the embeddings)."""
    checked = {int(s): int(t) for s, t in mapping.items()}
    bad = {s: t for s, t in checked.items() if not (0 <= s <= student_depth and 0 <= t <= teacher_depth)}
    if not checked or bad:
        raise ValueError(
            f"layer_mapping={mapping!r}: expected student_layer: teacher_layer pairs with student layers in "
            f"[0, {student_depth}] and teacher layers in [0, {teacher_depth}] (0 = embeddings); bad: {bad}"
        )
    return checked


class FeatureProjection(nn.Module):
    """W ∈ R^{H_t × H_s}: maps student hidden states onto the teacher's width (TinyBERT's W_h, one shared
    by every mapped layer); the identity (no parameters) when the widths agree. Trained with the student,
    never saved into it."""

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        self.linear = (
            None if student_width == teacher_width else nn.Linear(student_width, teacher_width, bias=False)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.linear is None else self.linear(hidden)


def hidden_state_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    weights: torch.Tensor,
    kind: str,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    r"""Σ_{b,t} w_{bt} · (1/M) Σ_m ℓ(P s^m_{bt}, t^m_{bt}) over the M mapped layer pairs, where
    ``student[m]`` [B, T, H_s] and ``teacher[m]`` [B, T, H_t] are the pair's hidden states, P the
    ``projection`` (identity when None) and

        mse:     ℓ(x, y) = (1/H_t) · ‖x − y‖²
        cosine:  ℓ(x, y) = 1 − x·y / (‖x‖ ‖y‖)

    computed in float32; the teacher's states carry no gradient."""
    if kind not in HIDDEN_LOSSES[1:]:
        raise ValueError(f"hidden_loss={kind!r} is not one of {HIDDEN_LOSSES[1:]}")
    total = weights.new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        x = (s if projection is None else projection(s)).float()
        y = t.detach().float()
        if kind == "mse":
            per_position = (x - y).pow(2).mean(-1)
        else:
            per_position = 1 - F.cosine_similarity(x, y, dim=-1, eps=1e-8)
        total = total + (weights.float() * per_position).sum()
    return total / len(student)


def relation_log_probs(
    a: torch.Tensor, b: torch.Tensor, relation_heads: int, key_mask: torch.Tensor
) -> torch.Tensor:
    r"""MiniLM(v2) relations: a [B, T, D] and b [B, T, D] split into R = ``relation_heads`` heads of
    d = D / R, then log softmax_j(a_{r,i} · b_{r,j} / √d) over the keys j that ``key_mask`` [B, T, T]
    allows. Returns [B, R, T, T] log-probabilities (−inf where masked)."""
    batch, length, width = a.shape
    if width % relation_heads:
        raise ValueError(f"attention_relation_heads={relation_heads} does not divide the width {width}")
    d = width // relation_heads
    a = a.float().view(batch, length, relation_heads, d).transpose(1, 2)
    b = b.float().view(batch, length, relation_heads, d).transpose(1, 2)
    scores = a @ b.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~key_mask[:, None], float("-inf"))
    return scores.log_softmax(-1)


def relation_kl(student_log: torch.Tensor, teacher_log: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""Σ_{b,i} w_{bi} · (1/R) Σ_r KL(T_{b,r,i,·} ‖ S_{b,r,i,·}) for [B, R, T, T] relation log-probabilities
    (masked keys, −inf in both, contribute 0)."""
    teacher_p = teacher_log.detach().exp()
    terms = teacher_p * (teacher_log.detach() - student_log)
    kl = torch.where(teacher_p > 0, terms, torch.zeros_like(terms)).sum(-1).mean(1)  # [B, T]
    return (weights.float() * kl).sum()


def attention_relation_loss(
    student: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    key_mask: torch.Tensor,
    relation_heads: int,
) -> torch.Tensor:
    r"""MiniLM's last-layer loss from the (queries, keys, values) [B, T, D] of each model:

        KL(A_T ‖ A_S) + KL(VR_T ‖ VR_S),   A = relations(Q, K),  VR = relations(V, V)

    with R = ``relation_heads`` relation heads on both sides (so the two models' head counts and widths
    may differ), each KL as in :func:`relation_kl`."""
    (sq, sk, sv), (tq, tk, tv) = student, teacher
    attention = relation_kl(
        relation_log_probs(sq, sk, relation_heads, key_mask),
        relation_log_probs(tq, tk, relation_heads, key_mask),
        weights,
    )
    value = relation_kl(
        relation_log_probs(sv, sv, relation_heads, key_mask),
        relation_log_probs(tv, tv, relation_heads, key_mask),
        weights,
    )
    return attention + value
