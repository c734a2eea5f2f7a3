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
TAIL_MODES = ("uniform", "renormalize", "bucket")


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

    def bucket(self) -> torch.Tensor:
        """The teacher over k + 1 outcomes [..., k + 1]: each kept class, then the tail as one outcome
        (``sparse_tail: bucket``); padding slots hold −inf."""
        return torch.cat([self.log_probs.float(), self.tail_log_mass.float().unsqueeze(-1)], dim=-1)

    def gather_index(self) -> torch.Tensor:
        """``indices`` as gather positions [..., k]; padding slots read class 0 (callers mask them)."""
        return torch.where(self.log_probs > -math.inf, self.indices.long(), 0)

    def bucket_from_kept(self, kept: torch.Tensor) -> torch.Tensor:
        """Another distribution on this teacher's k + 1 outcomes, from its log q at the kept slots
        [..., k] (``log_q.gather(-1, self.gather_index())``): q of each kept class and
        log Σ_tail q = log(1 − Σ_kept q); padding slots hold −inf."""
        kept = kept.masked_fill(self.log_probs <= -math.inf, -math.inf)
        rest = torch.log(-torch.expm1(torch.logsumexp(kept, -1).clamp(max=0.0)))  # log Σ_tail q
        return torch.cat([kept, rest.unsqueeze(-1)], dim=-1)

    def to_dense_log_probs(self, tail: str = "uniform") -> torch.Tensor:
        """Rebuild a full log-distribution over K classes.

        ``uniform``:      p_i for the top-k, tail_mass / (K − k) for every other class
                          (exactly the paper's ``kd_topk`` target);
        ``renormalize``:  p_i / Σ_topk p for the top-k, 0 elsewhere.
        (``bucket`` has no dense form: the loss compares the k + 1 outcomes of :meth:`bucket`.)

        Entries whose log-prob is −inf are padding (a support smaller than k at this position, as a
        compressed cache decodes): their classes are tail classes, whatever their index.
        """
        if tail not in TAIL_MODES:
            raise ValueError(f"tail={tail!r} is not one of {TAIL_MODES}")
        if tail == "bucket":
            raise ValueError(
                "sparse_tail='bucket' compares the kept tokens and the tail as one outcome (see "
                "bucket_divergence); it rebuilds no dense distribution: use 'uniform' or 'renormalize' here"
            )
        lp = self.log_probs.float()
        K = self.num_classes
        stored = lp > -math.inf
        if tail == "uniform":
            k = stored.sum(-1, keepdim=True)
            fill = self.tail_log_mass.float().unsqueeze(-1) - torch.log((K - k).clamp(min=1).float())
            fill = fill.masked_fill(k >= K, -math.inf)
        else:
            fill = torch.full_like(lp[..., :1], -math.inf)
            lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        dense = fill.expand(*lp.shape[:-1], K + 1).clone()  # column K takes the padding entries
        index = torch.where(stored, self.indices.long(), K)
        return dense.scatter_(-1, index, lp)[..., :K]


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
    if isinstance(teacher_logits, SparseLogits) and tail == "bucket":
        log_q = torch.log_softmax(student_logits.float(), dim=-1)
        return bucket_divergence(
            name, log_q.gather(-1, teacher_logits.gather_index()), teacher_logits, temperature, params
        )
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher_logits, SparseLogits) and name in SPARSE_DIVERGENCES:
        return sparse_divergence(name, log_q, teacher_logits, temperature, tail)
    return divergence_from_log_probs(
        name, log_q, teacher_log_probs(teacher_logits, temperature, tail), **params
    )


def bucket_divergence(
    name: str, log_q_kept: torch.Tensor, teacher: SparseLogits, temperature: float, params: dict
) -> torch.Tensor:
    """D over the k + 1 outcomes of ``sparse_tail: bucket`` from the student's log q¹ at the teacher's kept
    slots [..., k] (padding slots are ignored): both sides tempered alike on those outcomes."""
    student = teacher.bucket_from_kept(log_q_kept)
    log_q, log_p = (torch.log_softmax(x / temperature, -1) for x in (student, teacher.bucket()))
    return divergence_from_log_probs(name, log_q.clamp(min=LOG_ZERO), log_p, **params)


SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl")
"""Divergences that :func:`sparse_divergence` computes from a sparse teacher without rebuilding it."""


def sparse_divergence(
    name: str, log_q: torch.Tensor, teacher: SparseLogits, temperature: float, tail: str
) -> torch.Tensor:
    """forward_kl or reverse_kl of the student's log q^τ [..., K] from a sparse teacher, equal to
    :func:`divergence_from_log_probs` on ``teacher_log_probs(teacher, temperature, tail)`` but without the
    dense [..., K] teacher: p^τ takes one value t on every tail class (``uniform``: the tail mass spread
    evenly, ``renormalize``: 0, taken as e^LOG_ZERO), so the tail's share of each sum is closed-form.

        KL(p ‖ q) = Σ_kept p_i (log p_i − log q_i) + e^t · (n_tail · t − Σ_tail log q)
        KL(q ‖ p) = Σ q log q − Σ_kept q_i log p_i − t · Σ_tail q,    Σ_tail x = Σ_all x − Σ_kept x
    """
    log_q_kept = log_q.gather(-1, teacher.gather_index())
    total = log_q.sum(-1) if name == "forward_kl" else (log_q.exp() * log_q).sum(-1)
    return sparse_divergence_from_stats(name, log_q_kept, total, teacher, temperature, tail)


def sparse_divergence_from_stats(
    name: str,
    log_q_kept: torch.Tensor,
    total: torch.Tensor,
    teacher: SparseLogits,
    temperature: float,
    tail: str,
) -> torch.Tensor:
    """:func:`sparse_divergence` from the only dense statistics it reads: the student's log q^τ at the
    teacher's kept slots [..., k] and ``total`` [...] — Σ_all log q^τ (forward_kl) or Σ_all q^τ log q^τ
    (reverse_kl)."""
    if tail not in TAIL_MODES:
        raise ValueError(f"tail={tail!r} is not one of {TAIL_MODES}")
    K = teacher.num_classes
    kept = teacher.log_probs.float()
    stored = kept > -math.inf
    n_tail = (K - stored.sum(-1)).float()
    scaled = torch.where(stored, kept / temperature, -math.inf)
    tail_each = teacher.tail_log_mass.float() - torch.log(n_tail.clamp(min=1))  # τ = 1, uniform
    if tail == "renormalize":
        tail_each = torch.full_like(tail_each, -math.inf)
    tail_each = torch.where(n_tail > 0, tail_each / temperature, -math.inf)
    log_z = torch.logaddexp(
        torch.logsumexp(scaled, -1), tail_each + torch.log(n_tail.clamp(min=1))
    )  # tail_each = −inf when there is no tail
    log_p = (scaled - log_z[..., None]).clamp(min=LOG_ZERO)  # padding slots: LOG_ZERO, weight 0
    t = (tail_each - log_z).clamp(min=LOG_ZERO)
    if name == "forward_kl":
        tail_log_q = total - (log_q_kept * stored).sum(-1)
        return (log_p.exp() * (log_p - log_q_kept)).sum(-1) + t.exp() * (n_tail * t - tail_log_q)
    q_kept = log_q_kept.exp() * stored
    tail_q = torch.where(n_tail > 0, (1.0 - q_kept.sum(-1)).clamp(min=0.0), 0.0)  # exact 0: no tail
    return total - (q_kept * log_p).sum(-1) - t * tail_q


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


def _fused(teacher, divergence_name: str, tail: str, target_fn: TargetFn | None) -> bool:
    """Whether :class:`_SparseKDSums` computes this loss (a top-k teacher distilled as stored)."""
    if not isinstance(teacher, SparseLogits) or target_fn is not None:
        return False
    return divergence_name in SPARSE_DIVERGENCES or (tail == "bucket" and divergence_name != "mse")


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
        coef = row[:, None] if b is None else torch.addcmul(row[:, None], log_q, b[:, None])
        grad = log_q.exp().mul_(coef)
        if scale != 1.0:
            grad.add_(log_q1.exp().mul_(hard_rows[:, None]))
        if c is not None:
            grad.add_(c[:, None])
        grad.scatter_add_(-1, index, kept_grad)
        grad.scatter_add_(-1, label, -hard_rows[:, None])
        return grad.to(dtype), None, None, None, None, None, None, None


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
    if _fused(teacher, divergence_name, tail, target_fn):
        return _SparseKDSums.apply(
            student_logits, labels, soft_mask, teacher, divergence_name, temperature, tail, params
        )
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
