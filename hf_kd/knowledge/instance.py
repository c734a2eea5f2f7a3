"""Level 3 — instance-specific knowledge: per-instance gradient rescaling (``docs/knowledge.md#instance-level``).

For L = (1 − α) H(y, q) + α τ² KL(p^τ ‖ q^τ) the gradient on the true-class logit is
∂L/∂z_t = (1 − α)(q_t − 1) + α τ (q^τ_t − p^τ_t); dividing by the hard-label gradient q_t − 1 gives
the weight w_t by which KD rescales each example.
"""

from __future__ import annotations

import math

import torch

from hf_kd.knowledge.domain import spearman
from hf_kd.knowledge.universe import wrong_mass


def rescaling_weight(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """w_t = (∂L/∂z_t) / (∂H(y, q)/∂z_t) = (1 − α) + α τ (p^τ_t − q^τ_t) / (1 − q_t).

    At τ = 1: w_t = 1 − α (1 − p_t) / (1 − q_t). Matches autograd on the loss with the τ² factor
    (checked in tests). Written with wrong-class masses m = 1 − p_t (see :func:`wrong_mass`) as
    (1 − α) + α τ (m_q^τ − m_p^τ) / m_q, stable when p_t or q_t → 1. NaN where the label is < 0.
    """
    m_p_tau = wrong_mass(teacher_logits, labels, temperature=temperature)
    m_q_tau = wrong_mass(student_logits, labels, temperature=temperature)
    m_q = wrong_mass(student_logits, labels)
    return (1.0 - alpha) + alpha * temperature * (m_q_tau - m_p_tau) / m_q


def rescaling_summary(
    weight: torch.Tensor,
    teacher_true_prob: torch.Tensor,
    difficulty: torch.Tensor | None = None,
    *,
    bins: int = 20,
) -> dict:
    """Summary of w_t over the instances where it is finite.

    ``histogram``/``bin_edges``: counts of w_t in ``bins`` equal bins over [min w, max w];
    ``share_below_zero`` = #{w_t < 0} / N; ``spearman_teacher_prob`` = ρ_s(w_t, p_t);
    ``spearman_difficulty`` = ρ_s(w_t, d) for a difficulty proxy d (student loss, teacher margin,
    ground truth), None without one.
    """
    keep = torch.isfinite(weight) & torch.isfinite(teacher_true_prob)
    if difficulty is not None:
        keep &= torch.isfinite(difficulty)
    w = weight[keep].double().cpu()
    counts, edges = torch.histogram(w, bins=bins)
    return {
        "count": w.numel(),
        "mean": w.mean().item() if w.numel() else math.nan,
        "share_below_zero": (w < 0).double().mean().item() if w.numel() else math.nan,
        "histogram": counts.long().tolist(),
        "bin_edges": edges.tolist(),
        "spearman_teacher_prob": spearman(w, teacher_true_prob[keep].cpu()),
        "spearman_difficulty": None if difficulty is None else spearman(w, difficulty[keep].cpu()),
    }
