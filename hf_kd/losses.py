"""Distillation losses: pure tensor math, no Trainer plumbing.

Notation (``docs/knowledge.md#notation``): p is the teacher distribution, q the student's, both at temperature
τ (the logits are divided by τ before the softmax). Every divergence returns one value per position,
shape ``logits.shape[:-1]``, in float32.

The training loss mixes the hard-label cross-entropy with one divergence:

    L = (1 − α) · H(y, q¹) + α · s · D(p^τ, q^τ),      s = τ² (Hinton) or 1

and :func:`distillation_loss` computes it over flattened positions, optionally in chunks of
positions so that no full-vocabulary float32 tensor for all positions is alive at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "mse")
TAIL_MODES = ("uniform", "renormalize")


# --------------------------------------------------------------------------------------------
# Sparse (top-k) teacher
# --------------------------------------------------------------------------------------------


@dataclass
class SparseLogits:
    """A teacher distribution kept as its top-k entries plus the mass they leave out.

    ``log_probs[..., j] = log p_{indices[..., j]}`` (at τ = 1) and ``tail_log_mass = log(1 − Σ_j p_j)``.
    ``num_classes`` is K, the size of the full output space.
    """

    log_probs: torch.Tensor
    indices: torch.Tensor
    tail_log_mass: torch.Tensor
    num_classes: int

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> SparseLogits:
        """Top-k compression of dense logits: keeps the k largest log-probabilities and the tail mass.

        The tail is summed directly, log Σ_{i ∉ top-k} p_i, not as log(1 − Σ_topk p): that difference
        rounds to log 0 = −inf in float32 once the tail is below ~1e-7, although its classes keep p > 0.
        """
        log_p = torch.log_softmax(logits.float(), dim=-1)
        K = logits.shape[-1]
        top, idx = log_p.topk(min(k, K), dim=-1)
        tail = torch.logsumexp(log_p.scatter(-1, idx, -math.inf), dim=-1)
        return cls(top, idx, tail, K)

    def __getitem__(self, rows) -> SparseLogits:
        return SparseLogits(
            self.log_probs[rows], self.indices[rows], self.tail_log_mass[rows], self.num_classes
        )

    def reshape(self, *shape: int) -> SparseLogits:
        k = self.log_probs.shape[-1]
        return SparseLogits(
            self.log_probs.reshape(*shape, k),
            self.indices.reshape(*shape, k),
            self.tail_log_mass.reshape(*shape),
            self.num_classes,
        )

    def to_dense_log_probs(self, tail: str = "uniform") -> torch.Tensor:
        """Rebuild a full log-distribution over K classes.

        ``uniform``:      p_i for the top-k, tail_mass / (K − k) for every other class
                          (exactly the paper's ``kd_topk`` target);
        ``renormalize``:  p_i / Σ_topk p for the top-k, 0 elsewhere.
        """
        if tail not in TAIL_MODES:
            raise ValueError(f"tail={tail!r} is not one of {TAIL_MODES}")
        lp = self.log_probs.float()
        k, K = lp.shape[-1], self.num_classes
        if tail == "uniform" and k < K:
            fill = self.tail_log_mass.float().unsqueeze(-1) - math.log(K - k)
        else:
            fill = torch.full_like(lp[..., :1], -math.inf)
            if tail == "renormalize":
                lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        dense = fill.expand(*lp.shape[:-1], K).clone()
        return dense.scatter_(-1, self.indices.long(), lp)


# --------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------


def teacher_log_probs(
    teacher: torch.Tensor | SparseLogits, temperature: float, tail: str = "uniform"
) -> torch.Tensor:
    """log p^τ = log_softmax(v / τ). A sparse teacher is first rebuilt with ``tail`` handling, then its
    log-probabilities play the part of v (softmax(log p / τ) = p^τ for the kept entries)."""
    logits = teacher.to_dense_log_probs(tail) if isinstance(teacher, SparseLogits) else teacher.float()
    return torch.log_softmax(logits / temperature, dim=-1)


LOG_ZERO = -1.0e4
"""Stands for log 0 in a teacher's log-probabilities: e^LOG_ZERO is exactly 0 in float32, and unlike −inf
it gives 0 · (LOG_ZERO − log q) = 0 rather than NaN, so the KL sums need no masking pass."""


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_i a_i (log a_i − log b_i) for finite log-probabilities (a_i = 0 terms give 0)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w · a + (1 − w) · b) computed in log space."""
    w = torch.tensor(weight_a, dtype=log_a.dtype, device=log_a.device)
    return torch.logaddexp(log_a + torch.log(w), log_b + torch.log1p(-w))


def divergence_from_log_probs(
    name: str, log_q: torch.Tensor, log_p: torch.Tensor, *, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """Per-position divergence between teacher p and student q given as log-probabilities.

    forward_kl  KL(p ‖ q) = Σ p (log p − log q)
    reverse_kl  KL(q ‖ p) = Σ q (log q − log p)
    jsd         β · KL(p ‖ m) + (1 − β) · KL(q ‖ m),  m = β p + (1 − β) q   (TRL's generalized JSD;
                β = 0 is defined as forward KL and β = 1 as reverse KL, as in TRL)
    tvd         ½ Σ |p − q|
    skew_kl     KL(p ‖ s p + (1 − s) q)              (DistiLLM, s = ``skew``)
    skew_rkl    KL(q ‖ (1 − s) p + s q)

    A zero teacher probability (log p = −inf: a renormalised top-k teacher, a synthetic target) is
    taken as e^LOG_ZERO: it adds nothing to the KL terms weighted by p, and a large finite penalty
    instead of +inf to those weighted by q (reverse_kl).
    """
    log_p = log_p.clamp(min=LOG_ZERO)
    if name == "forward_kl":
        return _kl(log_p, log_q)
    if name == "reverse_kl":
        return _kl(log_q, log_p)
    if name == "jsd":
        if beta == 0.0:
            return _kl(log_p, log_q)
        if beta == 1.0:
            return _kl(log_q, log_p)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if name == "skew_kl":
        return _kl(log_p, _log_mix(log_p, log_q, skew))
    if name == "skew_rkl":
        return _kl(log_q, _log_mix(log_p, log_q, 1.0 - skew))
    raise ValueError(f"divergence={name!r} is not one of {DIVERGENCES}")


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseLogits,
    *,
    temperature: float = 1.0,
    tail: str = "uniform",
    **params: float,
) -> torch.Tensor:
    """D(p^τ, q^τ) per position, float32, shape ``student_logits.shape[:-1]``.

    Temperature divides both logits (q^τ = softmax(z/τ), p^τ = softmax(v/τ)); the τ² factor is the
    caller's. ``mse`` is the mean over classes of (z/τ − v/τ)² and needs dense teacher logits. See
    :func:`divergence_from_log_probs` for the others; ``params`` are ``beta`` (jsd) and ``skew``.
    """
    if name == "mse":
        if isinstance(teacher_logits, SparseLogits):
            raise ValueError("divergence='mse' compares logits and needs a dense teacher, not top-k logits")
        return ((student_logits.float() - teacher_logits.float()) / temperature).pow(2).mean(-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return divergence_from_log_probs(
        name, log_q, teacher_log_probs(teacher_logits, temperature, tail), **params
    )


# --------------------------------------------------------------------------------------------
# The training loss
# --------------------------------------------------------------------------------------------

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Maps (teacher log p^τ [n, K], labels [n]) to the target log-probabilities actually distilled
(a synthetic teacher, see ``hf_kd.teachers.synthetic``)."""


@dataclass
class LossTerms:
    """The two parts of the KD loss, summed over items, and the weighted total that is differentiated."""

    loss: torch.Tensor
    hard_sum: torch.Tensor
    soft_sum: torch.Tensor


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ hard CE over labelled items, Σ D over soft-masked items) for one chunk of positions."""
    hard = F.cross_entropy(student_logits.float(), labels, ignore_index=-100, reduction="sum")
    if teacher is None:
        return hard, torch.zeros_like(hard)
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
    """A student given by its last hidden states [N, H] and output-layer weight [V, H] (no bias): its
    logits are ``hidden · weightᵀ``. :func:`distillation_loss` with a ``chunk_size`` makes them one chunk
    of positions at a time, so the student's [N, V] logits and their gradient never exist in full."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def logits(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.hidden[rows] @ self.weight.T


class _ChunkedHeadLoss(torch.autograd.Function):
    """:class:`_ChunkedLoss` through the output layer: per chunk, z = h Wᵀ, then ∂L/∂h = (∂L/∂z) W and
    ∂L/∂W += (∂L/∂z)ᵀ h (accumulated in float32); only those two gradients are kept for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, hard_weight, soft_weight, chunk_size, sums_fn):  # noqa: D102
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        hard_total = hidden.new_zeros((), dtype=torch.float32)
        soft_total = hard_total.clone()
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.enable_grad():
                logits = (hidden[rows] @ weight.T).detach().requires_grad_(True)
                hard, soft = sums_fn(logits, rows)
                (grad_logits,) = torch.autograd.grad(hard * hard_weight + soft * soft_weight, logits)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.T.float(), hidden[rows].float())
            hard_total += hard.detach()
            soft_total += soft.detach()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return hard_total * hard_weight + soft_total * soft_weight, hard_total, soft_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        return grad_hidden, grad_weight.mul_(grad_loss).to(ctx.weight_dtype), None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor | HiddenStates,
    teacher: torch.Tensor | SparseLogits | None,
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
    **params: float,
) -> LossTerms:
    """L = (1 − α) · Σ_hard H(y, q¹) / N_hard + α · s · Σ_soft D(p^τ, q^τ) / N_soft,  s = τ² or 1.

    Inputs are flattened positions: ``student_logits`` [N, K], ``teacher`` [N, K] dense or sparse
    (None: no soft term),
    ``labels`` [N] with −100 for items without a hard label (unlabelled transfer data, masked tokens),
    ``soft_mask`` [N] bool for the items that take the soft term (default: labelled items). ``num_hard``
    and ``num_soft`` are the normalisers (default: the local counts); pass window totals for exact
    gradient accumulation. With ``chunk_size`` the loss and its gradient are computed ``chunk_size``
    positions at a time (same values and gradients as one chunk). ``student_logits`` may be
    :class:`HiddenStates`: the logits are then made chunk by chunk too.
    """
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

    def sums_fn(logits_rows: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return _loss_sums(
            logits_rows,
            None if teacher is None else teacher[rows],
            labels[rows],
            soft_mask[rows],
            temperature=temperature,
            divergence_name=divergence_name,
            tail=tail,
            target_fn=target_fn,
            params=params,
        )

    logits_of = student_logits.logits if from_hidden else student_logits.__getitem__
    needs_grad = torch.is_grad_enabled() and (
        student_logits.hidden.requires_grad or student_logits.weight.requires_grad
        if from_hidden
        else student_logits.requires_grad
    )
    if chunk_size is None or not needs_grad:
        if chunk_size is None:
            hard, soft = sums_fn(logits_of(slice(None)), slice(None))
        else:
            chunks = [slice(s, s + chunk_size) for s in range(0, len(labels), chunk_size)]
            sums = [sums_fn(logits_of(rows), rows) for rows in chunks]
            hard, soft = (torch.stack(part).sum() for part in zip(*sums, strict=True))
        return LossTerms(hard * hard_weight + soft * soft_weight, hard.detach(), soft.detach())
    if from_hidden:
        loss, hard, soft = _ChunkedHeadLoss.apply(
            student_logits.hidden, student_logits.weight, hard_weight, soft_weight, chunk_size, sums_fn
        )
    else:
        loss, hard, soft = _ChunkedLoss.apply(student_logits, hard_weight, soft_weight, chunk_size, sums_fn)
    return LossTerms(loss, hard, soft)
