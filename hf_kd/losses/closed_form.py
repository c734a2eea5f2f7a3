"""The KD sums of one chunk of student logits z [n, K] with their gradients written in closed form: one
dense pass each way over z instead of autograd through two log-softmaxes and their backward
(docs/knowledge.md#the-distillation-loss):

    (Σ_labelled H(y, q¹), Σ_soft D(p^τ, q^τ)),   q¹ = softmax(z), q^τ = softmax(z / τ)

against a top-k teacher (:class:`SparseKDSums`) or a dense one [n, K] (:class:`DenseKDSums`, for the
:data:`CLOSED_FORM_DIVERGENCES`). ``hf_kd.losses.distillation`` decides when they apply."""

from __future__ import annotations

import math

import torch

from hf_kd.losses.divergences import LOG_ZERO, bucket_divergence, sparse_divergence_from_stats


class SparseKDSums(torch.autograd.Function):
    """(Σ hard CE, Σ soft D) of student logits z [n, K] against a top-k teacher, as
    :func:`hf_kd.losses.distillation._loss_sums` computes them, with one dense pass each way instead of
    two log-softmaxes and their backward.

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
"""Divergences whose gradient :class:`DenseKDSums` writes in closed form against a dense teacher."""


class DenseKDSums(torch.autograd.Function):
    """(Σ hard CE, Σ soft D) of student logits z [n, K] against dense teacher logits v [n, K], as
    :func:`hf_kd.losses.distillation._loss_sums` computes them through autograd, with the gradients
    written in closed form in the forward pass (one float32 [n, K] tensor per term kept for backward, no
    autograd graph). With
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
