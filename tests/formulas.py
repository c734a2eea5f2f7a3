"""The formulas of docs/knowledge.md written out by hand in probability space, independently of
``hf_kd.losses`` (no log-space mixtures, no clamping, no chunks): the tests compare the code with these."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_i a_i (log a_i − log b_i) over the last dimension (probabilities, all > 0)."""
    return (a * (a.log() - b.log())).sum(-1)


def divergence_of_probs(
    name: str, p: torch.Tensor, q: torch.Tensor, *, beta: float, skew: float
) -> torch.Tensor:
    """D(p, q) per row for the probability divergences (docs/knowledge.md#divergences); ``jsd`` by its
    mixture formula, so β must lie strictly inside (0, 1)."""
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        assert 0.0 < beta < 1.0, "the mixture formula is 0 at β ∈ {0, 1}; use the KLs there"
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    if name == "skew_rkl":
        return kl(q, (1 - skew) * p + skew * q)
    if name == "uld":
        return (p.sort(-1, descending=True).values - q.sort(-1, descending=True).values).abs().sum(-1)
    raise ValueError(name)


def divergence_by_hand(
    name: str, z: torch.Tensor, v: torch.Tensor, tau: float, *, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """D(p^τ, q^τ) per row from student logits z and teacher logits v; ``mse`` on the tempered logits."""
    if name == "mse":
        return ((z - v) / tau).pow(2).mean(-1)
    return divergence_of_probs(
        name, torch.softmax(v / tau, -1), torch.softmax(z / tau, -1), beta=beta, skew=skew
    )


def kd_loss(
    z: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    tau: float,
    soft_rows: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """L = (1 − α) · mean_{labelled} H(y, q¹) + α · τ² · mean_{soft rows} D(ρ, q^τ).

    ``target`` is the distilled distribution ρ [N, K] as probabilities (a teacher's p^τ or a synthetic
    target); ``soft_rows`` (bool [N]) the rows taking the soft term, default the labelled ones. Labels
    < 0 have no hard term; with no labelled row the hard term is 0."""
    labelled = labels >= 0
    soft_rows = labelled if soft_rows is None else soft_rows
    log_q1 = torch.log_softmax(z, -1)
    ce = -log_q1[labelled].gather(-1, labels[labelled, None]).mean() if labelled.any() else z.new_zeros(())
    d = divergence_of_probs(divergence, target, torch.softmax(z / tau, -1), beta=beta, skew=skew)
    return (1 - alpha) * ce + alpha * tau**2 * d[soft_rows].mean()


def kd_logit_gradient(
    z: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, *, alpha: float, tau: float
) -> torch.Tensor:
    """∂L/∂z_i = (1 − α)(q_i − y_i) + α τ (q^τ_i − p^τ_i) per row (forward KL, τ², normalisers 1)."""
    y = F.one_hot(labels, z.shape[-1]).to(z.dtype)
    q, q_tau, p_tau = torch.softmax(z, -1), torch.softmax(z / tau, -1), torch.softmax(v / tau, -1)
    return (1 - alpha) * (q - y) + alpha * tau * (q_tau - p_tau)
