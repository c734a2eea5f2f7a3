"""Level 1 — knowledge of the universe: the teacher as a label smoother (``docs/knowledge.md#universe-level``).

A uniform teacher turns KD into label smoothing with ε = α; the closer p^τ is to u = 1/K, the more KD
acts as plain regularisation. Per-instance measures of that, on [..., K] logits; rows whose label is
the ignore index (< 0) give NaN where a true class is needed.
"""

from __future__ import annotations

import math

import torch


def wrong_mass(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """1 − p^τ_t = Σ_{i≠t} p^τ_i = exp(logsumexp_{i≠t}(v_i/τ) − logsumexp_i(v_i/τ)).

    Stable when p^τ_t → 1 (no 1 − x cancellation). NaN where the label is < 0."""
    v = logits.float() / temperature
    t = labels.clamp_min(0).unsqueeze(-1)
    log_mass = torch.logsumexp(v.scatter(-1, t, -math.inf), dim=-1) - torch.logsumexp(v, dim=-1)
    return log_mass.exp().masked_fill(labels < 0, math.nan)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_i p_i log p_i over the last dimension (nats, 0 · log 0 = 0)."""
    return torch.special.entr(probs).sum(-1)


def _teacher_entropy_nats(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(p^τ), p^τ = softmax(v / τ)."""
    return entropy(torch.softmax(teacher_logits.float() / temperature, dim=-1))


def teacher_entropy(teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Normalised teacher entropy H(p^τ) / log K ∈ [0, 1]: 1 for a uniform teacher (pure LS), 0 for one-hot."""
    return _teacher_entropy_nats(teacher_logits, temperature) / math.log(teacher_logits.shape[-1])


def kl_to_uniform(teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """KL(p^τ ‖ u) = Σ_i p^τ_i log(K p^τ_i) = log K − H(p^τ): 0 for a uniform teacher."""
    return math.log(teacher_logits.shape[-1]) - _teacher_entropy_nats(teacher_logits, temperature)


def effective_smoothing(
    teacher_logits: torch.Tensor, labels: torch.Tensor, *, alpha: float, temperature: float = 1.0
) -> torch.Tensor:
    """ε_eff = α (1 − p^τ_t): the mass the mixed target ỹ = (1 − α) y + α p^τ moves off the true class."""
    return alpha * wrong_mass(teacher_logits, labels, temperature=temperature)
