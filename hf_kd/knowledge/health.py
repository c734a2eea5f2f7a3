"""Teacher health: the failure signals of ``docs/knowledge.md#teacher-health``.

A saturated (over-large / over-fit) teacher has p_t → 1 and erases level 3; a label-smoothed teacher
has a flat wrong-class tail and erases level 2. Rows whose label is < 0 are left out (or NaN).
"""

from __future__ import annotations

import math

import torch

from hf_kd.knowledge.universe import entropy, wrong_mass
from hf_kd.teachers.synthetic import wrong_class_distribution


def saturation_share(teacher_logits: torch.Tensor, labels: torch.Tensor, *, threshold: float = 0.99) -> float:
    """#{n : p_t(n) > threshold} / N over labelled rows (p at τ = 1), i.e. 1 − p_t < 1 − threshold."""
    m = wrong_mass(teacher_logits, labels)
    m = m[~torch.isnan(m)]
    return (m < 1.0 - threshold).double().mean().item()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, *, num_bins: int = 15) -> float:
    """ECE = Σ_b (n_b / N) · |acc_b − conf_b|, with conf = max_i p_i, bins b = ((b−1)/B, b/B], B = ``num_bins``.

    acc_b is the share of rows in bin b whose argmax is the label, conf_b their mean confidence."""
    keep = labels >= 0
    probs = torch.softmax(logits[keep].float(), dim=-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels[keep]).float()
    inner = torch.linspace(0.0, 1.0, num_bins + 1, device=conf.device)[1:-1]
    b = torch.bucketize(conf, inner)
    gap = torch.zeros(num_bins, device=conf.device).index_add_(0, b, correct - conf)
    return (gap.abs().sum() / conf.numel()).item()


def tail_flatness(
    teacher_logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """H(p̄) / log(K − 1) ∈ [0, 1] per row, p̄ the renormalised wrong-class distribution of p^τ.

    Near 1: the tail is flat (a label-smoothed teacher), class relations are gone. NaN where label < 0."""
    K = teacher_logits.shape[-1]
    p_bar = wrong_class_distribution(teacher_logits.float() / temperature, labels.clamp_min(0))
    flat = entropy(p_bar) / math.log(K - 1)
    return flat.masked_fill(labels < 0, math.nan)
