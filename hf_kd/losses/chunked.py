"""The loss over N positions computed ``chunk_size`` positions at a time, its forward and backward both
inside the forward pass, so that only the gradient w.r.t. the student's logits z [N, K] (through the
output layer: w.r.t. h and W, ``hf_kd.losses.output_layer``) is kept for backward. With ``sums_fn``
giving (Σ hard, Σ soft) of the rows r:

    L = w_h · Σ_r hard_r + w_s · Σ_r soft_r,   ∂L/∂z_r = ∂(w_h · hard_r + w_s · soft_r)/∂z_r

the same values and gradients as one chunk."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_kd.losses.output_layer import ChunkedHeadLoss, HiddenStates


class ChunkedLoss(torch.autograd.Function):
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


def weighted_sums(
    student_logits: torch.Tensor | HiddenStates,
    sums_fn: Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]],
    hard_weight: torch.Tensor,
    soft_weight: torch.Tensor,
    chunk_size: int | None,
    num_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hard_weight · Σ hard + soft_weight · Σ soft, Σ hard, Σ soft) of ``sums_fn(logits of rows, rows)``
    over all rows: in one piece, or ``chunk_size`` rows at a time (through :class:`ChunkedLoss` /
    :class:`ChunkedHeadLoss` when a gradient is needed: same values and gradients)."""
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
        return ChunkedHeadLoss.apply(
            student_logits.hidden, student_logits.weight, hard_weight, soft_weight, chunk_size, sums_fn
        )
    return ChunkedLoss.apply(student_logits, hard_weight, soft_weight, chunk_size, sums_fn)
