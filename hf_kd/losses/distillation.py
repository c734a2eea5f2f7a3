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
from hf_kd.losses.several_teachers import WeightedTeachers
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
    cross-tokenizer teacher (``hf_kd.losses.cross_tokenizer``); with several teachers not mixed into one
    distribution (:class:`WeightedTeachers`), ``soft_teacher_<name>`` for each (its own soft sum, as if it
    were alone) and a cross-tokenizer one's ``soft_teacher_<name>_matched`` / ``_unmatched``."""

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
    (``hf_kd.losses.cross_tokenizer``), logged apart in :attr:`LossTerms.parts`. Several teachers of
    different tokenizers (:class:`WeightedTeachers`) replace it by Σ_i w_i · (teacher i's soft sum), each
    teacher's logged apart (``hf_kd.losses.several_teachers``).

    ``standardize`` (``logit_standardization``): D reads p = softmax(Z(v)/τ), q = softmax(Z(z)/τ) with Z the
    per-item z-score of :func:`hf_kd.losses.standardization.standardize_logits` (chunks and hidden states
    compose: Z is per item); a top-k or cross-tokenizer teacher has no full row of logits to z-score and
    is refused.
    """
    if standardize and isinstance(teacher, SparseLogits | AlignedLogits | WeightedTeachers):
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
    if isinstance(teacher, AlignedLogits | WeightedTeachers):
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
    teacher: AlignedLogits | WeightedTeachers,
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

    or against several teachers not mixed into one distribution (``hf_kd.losses.several_teachers``):

        L = hard_weight · Σ_hard CE + soft_weight · Σ_i w_i · S_i

    with S_i teacher i's soft sum as for that teacher alone (routing: over its own rows only). The hard
    term and every part run chunk by chunk like the usual loss, from the same student logits, each
    cross-tokenizer part reading only its own span-start rows of the chunk."""
    if isinstance(student_logits, HiddenStates):
        raise ValueError(
            "a teacher with another tokenizer needs the student's logits: student_logits_from_hidden_states "
            "is not supported with it"
        )
    if target_fn is not None:
        raise ValueError(
            "a synthetic target (synthetic_teacher) is not supported with a teacher of another tokenizer"
        )
    several = isinstance(teacher, WeightedTeachers)
    outputs, weights, names = (
        (teacher.outputs, teacher.weights, teacher.names) if several else ([teacher], [1.0], [None])
    )
    routed = several and teacher.rows is not None
    masks = (
        [soft_mask & rows.to(soft_mask.device) for rows in teacher.rows]
        if routed
        else [soft_mask] * len(outputs)
    )
    settings = dict(temperature=temperature, divergence_name=divergence_name, tail=tail, params=params)
    parts = [
        _soft_part(output, student_logits.shape[-1], labels, mask, **settings)
        for output, mask in zip(outputs, masks, strict=True)
    ]
    part_sums: list[list[torch.Tensor]] = []

    def sums_fn(logits_rows: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        hard = F.cross_entropy(logits_rows.float(), labels[rows], ignore_index=-100, reduction="sum")
        chunk = [part(logits_rows, rows) for part in parts]  # per part: (its soft sum, its named pieces)
        part_sums.append([piece.detach() for soft, pieces in chunk for piece in (soft, *pieces)])
        return hard, sum(weight * soft for weight, (soft, _) in zip(weights, chunk, strict=True))

    loss, hard, soft = weighted_sums(
        student_logits, sums_fn, hard_weight, soft_weight, chunk_size, len(labels)
    )
    totals = iter(torch.stack(column).sum() for column in zip(*part_sums, strict=True))
    named = {}
    for output, name, mask in zip(outputs, names, masks, strict=True):
        total = next(totals)
        aligned = isinstance(output, AlignedLogits)
        if name is not None:
            named[f"soft_teacher_{name}"] = (total, mask.sum())
        if aligned:
            starts = (output.teacher_row >= 0) & mask.to(output.teacher_row.device)
            prefix = "soft" if name is None else f"soft_teacher_{name}"
            named[prefix + "_matched"] = (next(totals), (starts & output.matched).sum())
            named[prefix + "_unmatched"] = (next(totals), (starts & ~output.matched).sum())
    return LossTerms(loss, hard, soft, named)


def _soft_part(
    output: torch.Tensor | SparseLogits | AlignedLogits,
    vocab: int,
    labels: torch.Tensor,
    soft_mask: torch.Tensor,
    *,
    temperature: float,
    divergence_name: str,
    tail: str,
    params: dict,
) -> Callable[[torch.Tensor, slice], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """One teacher's soft sum over a chunk, as ``part(student logits of rows, rows) -> (S, pieces)``: a
    teacher of another tokenizer's w_m · Σ D_matched + w_u · Σ U, with pieces (Σ D_matched, Σ U); any
    other teacher's Σ D over the soft items (:func:`_loss_sums`), without pieces."""
    if not isinstance(output, AlignedLogits):
        settings = dict(temperature=temperature, divergence_name=divergence_name, tail=tail, params=params)

        def dense(logits_rows: torch.Tensor, rows: slice):
            soft = _loss_sums(
                logits_rows, output[rows], labels[rows], soft_mask[rows], target_fn=None, **settings
            )[1]
            return soft, ()

        return dense
    # mse is a mean over the classes: over the shared tokens, not the student's whole vocabulary
    mse_scale = vocab / max(1, output.student_ids.numel())

    def divergence_fn(student: torch.Tensor, shared_teacher: torch.Tensor) -> torch.Tensor:
        per_row = divergence(
            divergence_name, student, shared_teacher, temperature=temperature, tail=tail, **params
        )
        return per_row * mse_scale if divergence_name == "mse" else per_row

    def aligned(logits_rows: torch.Tensor, rows: slice):
        matched, unmatched = output.soft_sums(logits_rows, rows, soft_mask[rows], divergence_fn, temperature)
        return matched * output.matched_weight + unmatched * output.unmatched_weight, (matched, unmatched)

    return aligned
