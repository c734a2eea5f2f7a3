"""What a teacher offers, measured before any training on a slice of the data (the pre-flight's
measures): its held-out accuracy, its confidence and calibration, the knowledge levels' own measures
(:func:`hf_kd.knowledge.measures.knowledge_measures`) at each candidate temperature, the student's distance
from it, and for a token-level teacher the probability mass a top-k cache would keep.

Pure: logits in, numbers out (``hf_kd.runs.preflight`` collects the logits; :mod:`hf_kd.knowledge.preflight`
turns the numbers into a recommended setting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hf_kd.knowledge.measures import knowledge_measures
from hf_kd.knowledge.universe import wrong_mass
from hf_kd.losses.standardization import standardize_logits

CANDIDATE_TEMPERATURES = (1.0, 2.0, 4.0)
"""The temperatures the pre-flight measures the teacher at (and chooses τ from)."""

STANDARDIZED_BASE_TEMPERATURE = 2.0
"""The base τ at which the pre-flight measures the teacher's z-scored logits (logit standardisation, Sun et
al.'s default): what ``logit_standardization: true`` at ``temperature: 2`` would distil."""

CANDIDATE_TOP_K = (8, 16, 32, 64, 128, 256)
"""The cache widths whose kept probability mass the pre-flight measures for a token-level teacher."""


def kept_mass_by_k(teacher_logits: torch.Tensor, ks: Sequence[int] = CANDIDATE_TOP_K) -> dict[int, dict]:
    """For each k ≤ K of ``ks``: the mean and 10 % quantile over items [N, K] of the probability mass a top-k
    cache keeps, Σ_{i ∈ top-k} p_i (p at τ = 1)."""
    probs = torch.softmax(teacher_logits.float(), dim=-1)
    K = probs.shape[-1]
    ks = [k for k in ks if k < K]
    if not ks:
        return {}
    top = probs.topk(max(ks), dim=-1).values.cumsum(-1)
    out = {}
    for k in ks:
        kept = top[:, k - 1].double()
        out[k] = {"mean": kept.mean().item(), "p10": torch.quantile(kept, 0.1).item()}
    return out


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits.float(), labels).item()


def _standardized(v: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Normalised entropy, KL to uniform and soft signal of softmax(Z(v) / base) (Z: per-item z-score), and
    the mean logit σ: what logit standardisation at base τ :data:`STANDARDIZED_BASE_TEMPERATURE` distils."""
    base = STANDARDIZED_BASE_TEMPERATURE
    z = standardize_logits(v)
    log_p = torch.log_softmax(z / base, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1).double().mean().item()
    log_k = math.log(v.shape[-1])
    return {
        "base_temperature": base,
        "logit_std": v.std(dim=-1).double().mean().item(),
        "teacher_entropy": entropy / log_k,
        "kl_to_uniform": log_k - entropy,
        "soft_signal": wrong_mass(z, y, temperature=base).double().mean().item(),
    }


def heldout_scores(teacher_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The teacher's accuracy and NLL on held-out labelled items (label ≥ 0): what it knows beyond the rows
    it may have memorised, the number its usefulness is judged by."""
    keep = labels >= 0
    v, y = teacher_logits[keep].float(), labels[keep]
    return {
        "num_items": int(y.numel()),
        "accuracy": (v.argmax(-1) == y).double().mean().item(),
        "nll": _nll(v, y),
    }


def teacher_profile(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_logits: torch.Tensor | None = None,
    temperatures: Sequence[float] = CANDIDATE_TEMPERATURES,
    token_level: bool = False,
) -> dict[str, Any]:
    """Every pre-flight measure of a teacher on labelled items (label ≥ 0), [N, K] logits, [N] labels.

    ``teacher``: accuracy, NLL and perplexity exp(NLL), ECE, saturation share, tail flatness (level 2),
    p_t mean and std (level 3's spread); ``by_temperature[τ]``: normalised entropy H(p^τ)/log K, KL(p^τ ‖ u)
    and the soft signal, mean 1 − p^τ_t (level 1: at α = 1 the smoothing ε̄ the teacher applies);
    ``standardized``: the same three at :data:`STANDARDIZED_BASE_TEMPERATURE` on z-scored logits, with the
    mean σ of the logits (σ with Bessel's correction: each item's effective τ is base · σ);
    ``majority_share``: the most frequent label's share; ``student`` (with ``student_logits``, e.g. an
    untrained or pretrained student): accuracy, NLL, perplexity and top-1 agreement with the teacher;
    ``kept_mass`` (``token_level``): :func:`kept_mass_by_k`."""
    keep = labels >= 0
    if not keep.any():
        raise ValueError("the pre-flight needs labelled items (label ≥ 0); every label is < 0")
    v, y = teacher_logits[keep].float(), labels[keep]
    by_temperature = {}
    for tau in temperatures:
        m = knowledge_measures(v, y, alpha=1.0, temperature=tau)
        by_temperature[float(tau)] = {
            "teacher_entropy": m["level1"]["teacher_entropy"],
            "kl_to_uniform": m["level1"]["kl_to_uniform"],
            "soft_signal": wrong_mass(v, y, temperature=tau).double().mean().item(),
        }
    health, level3 = m["health"], m["level3"]
    nll = _nll(v, y)
    profile: dict[str, Any] = {
        "num_items": int(y.numel()),
        "num_classes": int(v.shape[-1]),
        "majority_share": torch.bincount(y).max().item() / y.numel(),
        "teacher": {
            "accuracy": health["teacher_accuracy"],
            "nll": nll,
            "perplexity": math.exp(min(nll, 700.0)),
            "expected_calibration_error": health["expected_calibration_error"],
            "confidence_mean": torch.softmax(v, -1).max(-1).values.double().mean().item(),
            "saturation_share": health["saturation_share"],
            "tail_flatness": health["tail_flatness"],
            "true_prob_mean": level3["teacher_true_prob_mean"],
            "true_prob_std": level3["teacher_true_prob_std"],
        },
        "by_temperature": by_temperature,
        "standardized": _standardized(v, y),
    }
    if student_logits is not None:
        z = student_logits[keep].float()
        s_nll = _nll(z, y)
        profile["student"] = {
            "accuracy": (z.argmax(-1) == y).double().mean().item(),
            "nll": s_nll,
            "perplexity": math.exp(min(s_nll, 700.0)),
            "top1_agreement": (z.argmax(-1) == v.argmax(-1)).double().mean().item(),
        }
    if token_level:
        profile["kept_mass"] = kept_mass_by_k(v)
    return profile
