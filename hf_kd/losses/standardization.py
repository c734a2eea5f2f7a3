"""Logit standardisation (Sun et al., *Logit Standardization in Knowledge Distillation*, CVPR 2024): each
item's logits z-scored before the soft term's softmax, so the student matches the teacher's logit
*relations* rather than their range, and one base temperature suits teachers of any logit scale
(``logit_standardization: true``; docs/knowledge.md#logit-standardisation)."""

from __future__ import annotations

import torch

STANDARDIZATION_EPS = 1e-7
"""Added to the standard deviation (a constant row has σ = 0), as in the authors' code."""


def standardize_logits(logits: torch.Tensor, eps: float = STANDARDIZATION_EPS) -> torch.Tensor:
    """Z(z) = (z − mean(z)) / (σ(z) + eps) over the last dimension, [..., K] → [..., K] (float32).

    mean(z) = Σ_k z_k / K and σ(z)² = Σ_k (z_k − mean(z))² / (K − 1) (Bessel's correction, as in the
    authors' code). The soft term then reads softmax(Z(z) / τ_base) for student and teacher alike, so
    each item's effective temperature is τ_base · σ(z). Differentiable
    (the student's gradient flows through the mean and σ); invariant to adding a constant to a row or
    scaling it by a positive factor."""
    z = logits.float()
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + eps)
