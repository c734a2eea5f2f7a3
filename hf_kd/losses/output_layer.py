"""A model given by its last hidden states and its output-layer weight (:class:`HiddenStates`), and the loss
through that layer chunk by chunk (:class:`ChunkedHeadLoss`), so that the [N, V] logits and their
gradient never exist in full. With h [N, H], W [V, H] and a chunk of rows r:

    z_r = h_r Wᵀ [r, V],   ∂L/∂h_r = (∂L/∂z_r) W,   ∂L/∂W = Σ_r (∂L/∂z_r)ᵀ h_r

The products run in :func:`compute_dtype`; :func:`default_chunk_size` picks r for the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HiddenStates:
    """A model given by its last hidden states [N, H] and output-layer weight [V, H] (no bias): its
    logits are ``hidden · weightᵀ``. :func:`hf_kd.losses.distillation.distillation_loss` with a student
    or a teacher given this way makes its logits one chunk of positions at a time, so the [N, V] logits
    (and, for the student, their gradient) never exist in full. The product runs in
    :func:`compute_dtype` (bf16 under autocast)."""

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


class ChunkedHeadLoss(torch.autograd.Function):
    """:class:`hf_kd.losses.chunked.ChunkedLoss` through the output layer: per chunk, z = h Wᵀ, then
    ∂L/∂h = (∂L/∂z) W and ∂L/∂W += (∂L/∂z)ᵀ h, all in the forward pass; only those two gradients are kept
    for backward.

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
