"""The training loss: hard-label cross-entropy mixed with one divergence, normalised over the
accumulation window, dense, chunked, from a sparse teacher in one pass, or from the student's hidden
states (docs/knowledge.md#the-distillation-loss)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hf_kd.losses.cross_tokenizer import AlignedLogits
from hf_kd.losses.divergences import (
    LOG_ZERO,
    bucket_divergence,
    closed_form_tail,
    divergence,
    divergence_from_log_probs,
    sparse_divergence_from_stats,
    teacher_log_probs,
)
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
    """Whether :class:`_SparseKDSums` computes this loss (a top-k teacher distilled as stored)."""
    if not isinstance(teacher, SparseLogits) or target_fn is not None:
        return False
    return closed_form_tail(divergence_name, tail) or (tail == "bucket" and divergence_name != "mse")


class _SparseKDSums(torch.autograd.Function):
    """(Σ hard CE, Σ soft D) of student logits z [n, K] against a top-k teacher, as :func:`_loss_sums`
    computes them, with one dense pass each way instead of two log-softmaxes and their backward.

    The soft term reads the student only through a few statistics: log q at the k kept slots and, for
    forward/reverse KL with a uniform or renormalised tail, one row total (Σ log q^τ or Σ q^τ log q^τ).
    Forward differentiates the divergence w.r.t. those small statistics (g); backward maps g to z in
    closed form. With s the scale of the statistics' softmax (τ, or 1 for ``bucket``, which tempers the
    k + 1 outcomes instead) and q = softmax(z / s):

        ∂ log q_i / ∂z_j = (δ_ij − q_j) / s,   ∂ Σ log q / ∂z_j = (1 − K q_j) / s,
        ∂ Σ q log q / ∂z_j = q_j (log q_j − Σ q log q) / s,   ∂ CE / ∂z_j = q¹_j − δ_jy,

    so ∂L/∂z = (a q + b q log q + c) + (hard: w_h q¹, the same q when s = 1) plus a scatter onto the
    kept and label slots: a, b, c are per row.
    """

    @staticmethod
    def forward(ctx, z, labels, soft_mask, teacher, name, temperature, tail, params):  # noqa: D102
        zf = z.detach().float()
        log_q1 = torch.log_softmax(zf, -1)
        labelled = labels != -100
        label = labels.clamp(min=0)[:, None]
        hard = -torch.where(labelled, log_q1.gather(-1, label).squeeze(-1), 0.0).sum()
        scale = 1.0 if tail == "bucket" else temperature
        log_q = log_q1 if scale == 1.0 else torch.log_softmax(zf / scale, -1)
        index = teacher.gather_index()
        with torch.enable_grad():
            kept = log_q.gather(-1, index).requires_grad_(True)
            if tail == "bucket":
                leaves, per_item = (kept,), bucket_divergence(name, kept, teacher, temperature, params)
            else:
                stat = log_q.sum(-1) if name == "forward_kl" else (log_q.exp() * log_q).sum(-1)
                leaves = (kept, stat.requires_grad_(True))
                per_item = sparse_divergence_from_stats(name, kept, stat, teacher, temperature, tail)
            soft = torch.where(soft_mask, per_item, torch.zeros_like(per_item)).sum()
            grads = torch.autograd.grad(soft, leaves) if ctx.needs_input_grad[0] else ()
        ctx.setup = (name, scale, z.dtype)
        ctx.save_for_backward(
            log_q1, log_q, index, labelled, label, *grads, *(x.detach() for x in leaves[1:])
        )
        return hard, soft.detach()

    @staticmethod
    def backward(ctx, grad_hard, grad_soft):  # noqa: D102
        name, scale, dtype = ctx.setup
        log_q1, log_q, index, labelled, label, kept_grad, *stat = ctx.saved_tensors
        kept_grad = kept_grad * (grad_soft / scale)
        hard_rows = grad_hard * labelled
        a, b, c = -kept_grad.sum(-1), None, None  # per row: ∂L/∂z = a q + b q log q + c (+ scatters)
        if stat:
            stat_grad, total = stat[0] * (grad_soft / scale), stat[1]
            if name == "forward_kl":
                a, c = a - log_q.shape[-1] * stat_grad, stat_grad
            else:
                a, b = a - stat_grad * total, stat_grad
        row = a + hard_rows if scale == 1.0 else a  # s = 1: the hard term's q¹ is the same q
        coef = row[:, None] if b is None else (log_q * b[:, None]).add_(row[:, None])
        # In place on the saved [n, K] tensors, spent once read (a second backward fails loudly): no
        # new full-size tensor, one pass per term.
        grad = log_q.exp_().mul_(coef)
        if scale != 1.0:
            grad.addcmul_(log_q1.exp_(), hard_rows[:, None])
        if c is not None:
            grad.add_(c[:, None])
        grad.scatter_add_(-1, index, kept_grad)
        grad.scatter_add_(-1, label, -hard_rows[:, None])
        return grad.to(dtype), None, None, None, None, None, None, None


CLOSED_FORM_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
"""Divergences whose gradient :class:`_DenseKDSums` writes in closed form against a dense teacher."""


class _DenseKDSums(torch.autograd.Function):
    """(Σ hard CE, Σ soft D) of student logits z [n, K] against dense teacher logits v [n, K], as
    :func:`_loss_sums` computes them through autograd, with the gradients written in closed form in the
    forward pass (one float32 [n, K] tensor per term kept for backward, no autograd graph). With
    q = softmax(z / τ), p = softmax(v / τ), q¹ = softmax(z), m = β p + (1 − β) q:

        ∂ CE / ∂z = q¹ − onehot(y)
        ∂ KL(p ‖ q) / ∂z = (q − p) / τ
        ∂ KL(q ‖ p) / ∂z = q ⊙ (log q − log p − KL(q ‖ p)) / τ
        ∂ JSD_β / ∂z = (1 − β) · q ⊙ (log q − log m − KL(q ‖ m)) / τ

    (JSD's derivative in q is (1 − β) log(q / m): its p / m terms cancel.) β = 0 and β = 1 are the KLs,
    as in :func:`hf_kd.losses.divergences.divergence_from_log_probs`."""

    @staticmethod
    def forward(ctx, z, labels, soft_mask, teacher, name, temperature, beta):  # noqa: D102
        zf = z.detach().float()
        labelled = labels != -100
        log_q1 = torch.log_softmax(zf, -1)
        hard = -torch.where(labelled, log_q1.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1), 0.0).sum()
        log_q = log_q1 if temperature == 1.0 else torch.log_softmax(zf / temperature, -1)
        log_p = torch.log_softmax(teacher.float() / temperature, -1).clamp_(min=LOG_ZERO)
        if name == "jsd" and beta in (0.0, 1.0):
            name = "forward_kl" if beta == 0.0 else "reverse_kl"
        q = log_q.exp()
        if name == "forward_kl":
            p = log_p.exp()
            per_item = (p * (log_p - log_q)).sum(-1)
            grad_soft = q.sub_(p).div_(temperature)
        else:
            if name == "reverse_kl":
                log_ratio, scale = log_q - log_p, 1.0
                per_item = (q * log_ratio).sum(-1)
                kl_q = per_item
            else:  # jsd
                log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
                log_ratio, scale = log_q - log_m, 1.0 - beta
                kl_q = (q * log_ratio).sum(-1)
                per_item = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + scale * kl_q
            grad_soft = log_ratio.sub_(kl_q[:, None]).mul_(q).mul_(scale / temperature)
        soft_rows = soft_mask.to(grad_soft.dtype)[:, None]
        soft = torch.where(soft_mask, per_item, torch.zeros_like(per_item)).sum()
        grad_hard = log_q1.exp_() if log_q1 is not log_q else log_q1.exp()
        grad_hard.scatter_add_(-1, labels.clamp(min=0)[:, None], -torch.ones_like(zf[:, :1]))
        ctx.dtype = z.dtype
        ctx.save_for_backward(grad_hard.mul_(labelled[:, None]), grad_soft.mul_(soft_rows))
        return hard, soft

    @staticmethod
    def backward(ctx, grad_hard, grad_soft):  # noqa: D102
        hard, soft = ctx.saved_tensors
        # In place on the saved tensors, spent once read (a second backward fails loudly).
        grad = hard.mul_(grad_hard).add_(soft.mul_(grad_soft))
        return grad.to(ctx.dtype), None, None, None, None, None, None


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
        return _SparseKDSums.apply(
            student_logits, labels, soft_mask, teacher, divergence_name, temperature, tail, params
        )
    closed_form = divergence_name in CLOSED_FORM_DIVERGENCES and target_fn is None
    if torch.is_tensor(teacher) and closed_form and not standardize:  # its kernel reads raw logits
        beta = params.get("beta", 0.5)
        return _DenseKDSums.apply(
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


class _ChunkedLoss(torch.autograd.Function):
    """Runs forward and backward of the loss chunk by chunk inside the forward pass, keeping only the
    gradient w.r.t. the student logits (same dtype and size as the logits) for the backward pass."""

    @staticmethod
    def forward(ctx, student_logits, hard_weight, soft_weight, chunk_size, sums_fn):  # noqa: D102
        grad = torch.empty_like(student_logits)  # every row is written below
        hard_total = student_logits.new_zeros((), dtype=torch.float32)
        soft_total = hard_total.clone()
        for start in range(0, student_logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.enable_grad():
                chunk = student_logits[rows].detach().requires_grad_(True)
                hard, soft = sums_fn(chunk, rows)
                (chunk_grad,) = torch.autograd.grad(hard * hard_weight + soft * soft_weight, chunk)
            grad[rows] = chunk_grad
            hard_total += hard.detach()
            soft_total += soft.detach()
        ctx.save_for_backward(grad)
        return hard_total * hard_weight + soft_total * soft_weight, hard_total, soft_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft):  # noqa: D102
        (grad,) = ctx.saved_tensors
        # In place: a second full-size tensor would double the peak (a second backward then fails loudly).
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None


@dataclass
class HiddenStates:
    """A model given by its last hidden states [N, H] and output-layer weight [V, H] (no bias): its
    logits are ``hidden · weightᵀ``. :func:`distillation_loss` with a student or a teacher given this way
    makes its logits one chunk of positions at a time, so the [N, V] logits (and, for the student, their
    gradient) never exist in full. The product runs in :func:`compute_dtype` (bf16 under autocast)."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def logits(self, rows: slice = slice(None)) -> torch.Tensor:
        dtype = compute_dtype(self.hidden)
        return self.hidden[rows].to(dtype) @ self.weight.to(dtype).T

    def cast(self) -> HiddenStates:
        """Both tensors in :func:`compute_dtype` (themselves when already in it), so that :meth:`logits`
        casts nothing per chunk; detached from autograd's view of any cast."""
        dtype = compute_dtype(self.hidden)
        return HiddenStates(self.hidden.to(dtype), self.weight.to(dtype))


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the output layer's products: autocast's when it is on for ``hidden``'s device, else
    ``hidden``'s own (a float32 weight is then cast once per loss, as autocast would per product)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


CUDA_CHUNK_ELEMENTS = 1 << 26
"""Logit elements per chunk on a CUDA device when no ``chunk_size`` is given: 256 MiB of float32 logits,
so a chunk's handful of float32 [rows, V] temporaries stays near 2 GiB while the output layer's gradient,
updated once per chunk, is rewritten only N · V / 2²⁶ times."""
CPU_CHUNK_ELEMENTS = 1 << 22
"""The same on the CPU: 16 MiB of float32 logits per chunk (``scripts/bench_lm_loss.py --hidden``)."""


def default_chunk_size(num_classes: int, device: torch.device) -> int:
    """Positions per chunk for logits made from hidden states when none is given: the largest power of two
    with at most :data:`CUDA_CHUNK_ELEMENTS` (CPU: :data:`CPU_CHUNK_ELEMENTS`) logit elements, at least 16.
    At V = 128,256: 512 rows on a GPU, 32 on the CPU."""
    elements = CUDA_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CPU_CHUNK_ELEMENTS
    rows = max(1, elements // max(1, num_classes))
    return max(16, 1 << (rows.bit_length() - 1))


_MIXED_ADDMM = [True]  # whether torch.addmm takes out_dtype on CUDA (torch ≥ 2.8); cleared on first refusal


def _accumulate_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a · b in place, the product computed in ``a``'s dtype with float32 accumulation inside the
    matrix product: bf16 operands into a float32 ``total`` go through ``addmm(out_dtype=float32)`` on
    CUDA (no float32 copy of an operand), else through one product in ``a``'s dtype added to ``total``."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
        return
    if a.is_cuda and _MIXED_ADDMM[0]:
        try:
            torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MIXED_ADDMM[0] = False
    total.add_(a @ b)


class _ChunkedHeadLoss(torch.autograd.Function):
    """:class:`_ChunkedLoss` through the output layer: per chunk, z = h Wᵀ, then ∂L/∂h = (∂L/∂z) W and
    ∂L/∂W += (∂L/∂z)ᵀ h, all in the forward pass; only those two gradients are kept for backward.

    The three products run in :func:`compute_dtype` (bf16 under autocast: tensor cores) with float32
    accumulation inside each product; ∂L/∂W accumulates over chunks in the weight's dtype (float32
    master weights: float32; bf16 weights: rounded once per chunk, as Liger does). No float32 copy of
    h or W is made; a float32 W is cast once to the compute dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, hard_weight, soft_weight, chunk_size, sums_fn):  # noqa: D102
        dtype = compute_dtype(hidden)
        h_all, w = hidden.to(dtype), weight.to(dtype)  # no copy when already in the compute dtype
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        hard_total = hidden.new_zeros((), dtype=torch.float32)
        soft_total = hard_total.clone()
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = h_all[rows]
            with torch.enable_grad():
                logits = (h @ w.T).requires_grad_(True)
                hard, soft = sums_fn(logits, rows)
                (grad_logits,) = torch.autograd.grad(hard * hard_weight + soft * soft_weight, logits)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ w
            if grad_weight is not None:
                _accumulate_product(grad_weight, grad_logits.T, h)
            hard_total += hard.detach()
            soft_total += soft.detach()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return hard_total * hard_weight + soft_total * soft_weight, hard_total, soft_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: a second full-size tensor would double the peak (a second backward then fails loudly).
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


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

    ``standardize`` (``temperature: auto``): D reads p = softmax(Z(v)/τ), q = softmax(Z(z)/τ) with Z the
    per-item z-score of :func:`hf_kd.losses.standardization.standardize_logits` (chunks and hidden states
    compose: Z is per item); a top-k or cross-tokenizer teacher has no full row of logits to z-score and
    is refused.
    """
    if standardize and isinstance(teacher, SparseLogits | AlignedLogits):
        raise ValueError(
            f"temperature: auto (logit standardisation) z-scores each item's full row of teacher logits; a "
            f"{type(teacher).__name__} teacher (a top-k cache or another tokenizer) has none: set a number "
            "for temperature, or use an online teacher or a full-logit cache"
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

    loss, hard, soft = _weighted_sums(
        student_logits, sums_fn, hard_weight, soft_weight, chunk_size, len(labels)
    )
    return LossTerms(loss, hard, soft)


def _weighted_sums(
    student_logits: torch.Tensor | HiddenStates,
    sums_fn: Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]],
    hard_weight: torch.Tensor,
    soft_weight: torch.Tensor,
    chunk_size: int | None,
    num_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hard_weight · Σ hard + soft_weight · Σ soft, Σ hard, Σ soft) of ``sums_fn(logits of rows, rows)``
    over all rows: in one piece, or ``chunk_size`` rows at a time (through :class:`_ChunkedLoss` /
    :class:`_ChunkedHeadLoss` when a gradient is needed: same values and gradients)."""
    from_hidden = isinstance(student_logits, HiddenStates)
    logits_of = student_logits.cast().logits if from_hidden else student_logits.__getitem__
    needs_grad = torch.is_grad_enabled() and (
        student_logits.hidden.requires_grad or student_logits.weight.requires_grad
        if from_hidden
        else student_logits.requires_grad
    )
    if chunk_size is None or not needs_grad:
        if chunk_size is None:  # the logits themselves: a [:] view's backward would copy the gradient
            hard, soft = sums_fn(student_logits.logits() if from_hidden else student_logits, slice(None))
        else:
            chunks = [slice(s, s + chunk_size) for s in range(0, num_rows, chunk_size)]
            sums = [sums_fn(logits_of(rows), rows) for rows in chunks]
            hard, soft = (torch.stack(part).sum() for part in zip(*sums, strict=True))
        return hard * hard_weight + soft * soft_weight, hard.detach(), soft.detach()
    if from_hidden:
        return _ChunkedHeadLoss.apply(
            student_logits.hidden, student_logits.weight, hard_weight, soft_weight, chunk_size, sums_fn
        )
    return _ChunkedLoss.apply(student_logits, hard_weight, soft_weight, chunk_size, sums_fn)


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

    loss, hard, soft = _weighted_sums(
        student_logits, sums_fn, hard_weight, soft_weight, chunk_size, len(labels)
    )
    starts = (teacher.teacher_row >= 0) & soft_mask.to(teacher.teacher_row.device)
    matched_sum, unmatched_sum = (torch.stack(part).sum() for part in zip(*part_sums, strict=True))
    parts = {
        "soft_matched": (matched_sum, (starts & teacher.matched).sum()),
        "soft_unmatched": (unmatched_sum, (starts & ~teacher.matched).sum()),
    }
    return LossTerms(loss, hard, soft, parts)
