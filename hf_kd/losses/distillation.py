"""The training loss: hard-label cross-entropy mixed with one divergence, normalised over the
accumulation window (docs/knowledge.md#the-distillation-loss), and the choice of how each chunk of it is
computed: in one pass with closed-form gradients (``hf_kd.losses.closed_form``), else through autograd;
whole or chunk by chunk (``hf_kd.losses.chunked``), from logits or from hidden states through the output
layer (``hf_kd.losses.output_layer``), against a teacher of another tokenizer
(``hf_kd.losses.cross_tokenizer``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hf_kd.losses.chunked import weighted_sums
from hf_kd.losses.closed_form import CLOSED_FORM_DIVERGENCES, DenseKDSums, SparseKDSums
from hf_kd.losses.cross_tokenizer import AlignedLogits
from hf_kd.losses.divergences import (
    closed_form_tail,
    divergence,
    divergence_from_log_probs,
    teacher_log_probs,
)
from hf_kd.losses.output_layer import HiddenStates, default_chunk_size
from hf_kd.losses.sparse import SparseLogits
from hf_kd.losses.standardization import standardize_logits

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Maps (teacher log p^τ [n, K], labels [n]) to the target log-probabilities actually distilled
(a synthetic teacher, see ``hf_kd.teachers.synthetic``)."""


@dataclass
class LossTerms:
    """The two parts of the KD loss, summed over items, and the weighted total that is differentiated.
    ``parts`` names the pieces of the soft sum that are logged on their own, each as (its sum over
    items, before its weight; its item count): ``soft_matched`` and ``soft_unmatched`` of a
    cross-tokenizer teacher (``hf_kd.losses.cross_tokenizer``)."""

    loss: torch.Tensor
    hard_sum: torch.Tensor
    soft_sum: torch.Tensor
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _fused(teacher, divergence_name: str, tail: str, target_fn: TargetFn | None) -> bool:
    """Whether :class:`SparseKDSums` computes this loss (a top-k teacher distilled as stored)."""
    if not isinstance(teacher, SparseLogits) or target_fn is not None:
        return False
    return closed_form_tail(divergence_name, tail) or (tail == "bucket" and divergence_name != "mse")


def _loss_sums(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseLogits,
    labels: torch.Tensor,
    soft_mask: torch.Tensor,
    *,
    temperature: float,
    divergence_name: str,
    tail: str,
    target_fn: TargetFn | None,
    params: dict,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ hard CE over labelled items, Σ D over soft-masked items) for one chunk of positions; with
    ``standardize`` the soft term reads both models' logits z-scored per item (the hard term never)."""
    if _fused(teacher, divergence_name, tail, target_fn):
        return SparseKDSums.apply(
            student_logits, labels, soft_mask, teacher, divergence_name, temperature, tail, params
        )
    closed_form = torch.is_tensor(teacher) and target_fn is None and not standardize  # z-scored: autograd
    if closed_form and divergence_name in CLOSED_FORM_DIVERGENCES:
        beta = params.get("beta", 0.5)
        return DenseKDSums.apply(
            student_logits, labels, soft_mask, teacher, divergence_name, temperature, beta
        )
    hard = F.cross_entropy(student_logits.float(), labels, ignore_index=-100, reduction="sum")
    if teacher is None:
        return hard, torch.zeros_like(hard)
    if standardize:
        student_logits, teacher = standardize_logits(student_logits), standardize_logits(teacher)
    if divergence_name == "mse" or target_fn is None:
        per_item = divergence(
            divergence_name, student_logits, teacher, temperature=temperature, tail=tail, **params
        )
    else:
        log_p = target_fn(teacher_log_probs(teacher, temperature, tail), labels)
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        per_item = divergence_from_log_probs(divergence_name, log_q, log_p, **params)
    soft = torch.where(soft_mask, per_item, torch.zeros_like(per_item)).sum()
    return hard, soft


def distillation_loss(
    student_logits: torch.Tensor | HiddenStates,
    teacher: torch.Tensor | SparseLogits | HiddenStates | None,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    divergence_name: str = "forward_kl",
    soft_mask: torch.Tensor | None = None,
    num_hard: torch.Tensor | float | None = None,
    num_soft: torch.Tensor | float | None = None,
    temperature_squared: bool = True,
    tail: str = "uniform",
    target_fn: TargetFn | None = None,
    chunk_size: int | None = None,
    standardize: bool = False,
    **params: float,
) -> LossTerms:
    """L = (1 − α) · Σ_hard H(y, q¹) / N_hard + α · s · Σ_soft D(p^τ, q^τ) / N_soft,  s = τ² or 1.

    Inputs are flattened positions: ``student_logits`` [N, K], ``teacher`` [N, K] dense or sparse
    (None: no soft term),
    ``labels`` [N] with −100 for items without a hard label (unlabelled transfer data, masked tokens),
    ``soft_mask`` [N] bool for the items that take the soft term (default: labelled items). ``num_hard``
    and ``num_soft`` are the normalisers (default: the local counts); pass window totals for exact
    gradient accumulation. With ``chunk_size`` the loss and its gradient are computed ``chunk_size``
    positions at a time (same values and gradients as one chunk). ``student_logits`` and a dense
    ``teacher`` may be :class:`HiddenStates`: their logits are then made chunk by chunk too, so neither
    [N, K] tensor exists in full (``chunk_size`` None: :func:`default_chunk_size` for the device). A teacher of another tokenizer
    (:class:`AlignedLogits`) replaces Σ_soft D by its matched and unmatched parts
    (``hf_kd.losses.cross_tokenizer``), logged apart in :attr:`LossTerms.parts`.

    ``standardize`` (``logit_standardization``): D reads p = softmax(Z(v)/τ), q = softmax(Z(z)/τ) with Z the
    per-item z-score of :func:`hf_kd.losses.standardization.standardize_logits` (chunks and hidden states
    compose: Z is per item); a top-k or cross-tokenizer teacher has no full row of logits to z-score and
    is refused.
    """
    if standardize and isinstance(teacher, SparseLogits | AlignedLogits):
        raise ValueError(
            f"logit_standardization z-scores each item's full row of teacher logits; a "
            f"{type(teacher).__name__} teacher (a top-k cache or another tokenizer) has none: set "
            "logit_standardization: false, or use an online teacher or a full-logit cache"
        )
    if soft_mask is None:
        soft_mask = labels != -100
    num_hard = (labels != -100).sum() if num_hard is None else num_hard
    num_soft = soft_mask.sum() if num_soft is None else num_soft
    hard_weight = (1.0 - alpha) / torch.as_tensor(num_hard, dtype=torch.float32).clamp(min=1)
    soft_weight = alpha * (temperature**2 if temperature_squared else 1.0)
    soft_weight = soft_weight / torch.as_tensor(num_soft, dtype=torch.float32).clamp(min=1)
    from_hidden = isinstance(student_logits, HiddenStates)
    device = student_logits.hidden.device if from_hidden else student_logits.device
    hard_weight, soft_weight = hard_weight.to(device), soft_weight.to(device)
    if isinstance(teacher, AlignedLogits):
        return _cross_tokenizer_loss(
            student_logits,
            teacher,
            labels,
            soft_mask,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            temperature=temperature,
            divergence_name=divergence_name,
            tail=tail,
            target_fn=target_fn,
            chunk_size=chunk_size,
            params=params,
        )

    teacher_head = isinstance(teacher, HiddenStates)
    if chunk_size is None and (from_hidden or teacher_head):
        head = student_logits if from_hidden else teacher
        chunk_size = default_chunk_size(head.weight.shape[0], device)
    if teacher_head:
        teacher = teacher.cast()  # one cast of its weight, not one per chunk

    def teacher_rows(rows: slice) -> torch.Tensor | SparseLogits | None:
        if not teacher_head:
            return None if teacher is None else teacher[rows]
        with torch.no_grad():
            return teacher.logits(rows)

    def sums_fn(logits_rows: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return _loss_sums(
            logits_rows,
            teacher_rows(rows),
            labels[rows],
            soft_mask[rows],
            temperature=temperature,
            divergence_name=divergence_name,
            tail=tail,
            target_fn=target_fn,
            params=params,
            standardize=standardize,
        )

    loss, hard, soft = weighted_sums(
        student_logits, sums_fn, hard_weight, soft_weight, chunk_size, len(labels)
    )
    return LossTerms(loss, hard, soft)


def _cross_tokenizer_loss(
    student_logits: torch.Tensor | HiddenStates,
    teacher: AlignedLogits,
    labels: torch.Tensor,
    soft_mask: torch.Tensor,
    *,
    hard_weight: torch.Tensor,
    soft_weight: torch.Tensor,
    temperature: float,
    divergence_name: str,
    tail: str,
    target_fn: TargetFn | None,
    chunk_size: int | None,
    params: dict,
) -> LossTerms:
    """:func:`distillation_loss` against a teacher of another tokenizer (``hf_kd.losses.cross_tokenizer``):

        L = hard_weight · Σ_hard CE + soft_weight · (w_m · Σ_matched D + w_u · Σ_unmatched U)

    The hard term and both parts run chunk by chunk like the usual loss, each part reading only its
    own span-start rows of the chunk."""
    if isinstance(student_logits, HiddenStates):
        raise ValueError(
            "a teacher with another tokenizer needs the student's logits: student_logits_from_hidden_states "
            "is not supported with it"
        )
    if target_fn is not None:
        raise ValueError(
            "a synthetic target (synthetic_teacher) is not supported with a teacher of another tokenizer"
        )
    part_sums: list[tuple[torch.Tensor, torch.Tensor]] = []
    # mse is a mean over the classes: over the shared tokens, not the student's whole vocabulary
    mse_scale = student_logits.shape[-1] / max(1, teacher.student_ids.numel())

    def divergence_fn(student: torch.Tensor, shared_teacher: torch.Tensor) -> torch.Tensor:
        per_row = divergence(
            divergence_name, student, shared_teacher, temperature=temperature, tail=tail, **params
        )
        return per_row * mse_scale if divergence_name == "mse" else per_row

    def sums_fn(logits_rows: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        hard = F.cross_entropy(logits_rows.float(), labels[rows], ignore_index=-100, reduction="sum")
        matched, unmatched = teacher.soft_sums(logits_rows, rows, soft_mask[rows], divergence_fn, temperature)
        part_sums.append((matched.detach(), unmatched.detach()))
        return hard, matched * teacher.matched_weight + unmatched * teacher.unmatched_weight

    loss, hard, soft = weighted_sums(
        student_logits, sums_fn, hard_weight, soft_weight, chunk_size, len(labels)
    )
    starts = (teacher.teacher_row >= 0) & soft_mask.to(teacher.teacher_row.device)
    matched_sum, unmatched_sum = (torch.stack(part).sum() for part in zip(*part_sums, strict=True))
    parts = {
        "soft_matched": (matched_sum, (starts & teacher.matched).sum()),
        "soft_unmatched": (unmatched_sum, (starts & ~teacher.matched).sum()),
    }
    return LossTerms(loss, hard, soft, parts)
