"""Cross-tokenizer distillation: a teacher whose vocabulary differs from the student's
(docs/knowledge.md#different-tokenizers).

Both models read the same text, each through its own tokenizer. ``hf_kd.tasks.alignment`` groups their
tokens into *spans* whose character boundaries coincide on both sides; at the start of a span both
models predict the span's first token from exactly the same text, so their two next-token
distributions there describe the same event. Each span gives one aligned pair of prediction rows
(student row r, teacher row u) and is one of two kinds:

- **matched**: one student token and one teacher token with the same string (the vocabulary map pairs
  them). Both distributions are mapped onto the shared tokens S (pairs ``(student id, teacher id)`` with
  equal strings) and compared with the run's divergence D at temperature τ:

      D_matched(r) = D(softmax(v_u[S_t] / τ), softmax(z_r[S_s] / τ))

  With the same tokenizer on both sides S is the whole vocabulary and this is the usual soft term.
- **unmatched** (any other span: a word split differently, or one token on each side with different
  strings): ULD (Boizard et al. 2024), the L1 distance between the two probability vectors sorted in
  decreasing order, the shorter one padded with zeros. Where a side has several tokens in the span, its
  vector is merged by the chain rule: the distribution at the span's first row times the probability
  of each later token of the span given the ones before it (TRL GOLD's "observed" merge),

      q̃_r = softmax(z_r / τ) · Π_{k later in span} softmax(z_k / τ)[y_k]     (the same for the teacher)
      U(r) = Σ_i |sort↓(q̃_r)_i − sort↓(p̃_u)_i|

The student rows and the teacher rows are the flattened token positions of the batch ([N] and [N_t]);
:class:`AlignedLogits` carries the teacher's logits with the alignment, as the teacher signal builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AlignedLogits:
    """The teacher's logits over its own tokens, with their alignment to the student's rows.

    Attributes:
        logits: [N_t, V_t] the teacher's logits, one row per teacher position (flattened batch).
        teacher_row: [N] long, for each student row r that starts a span, the teacher row u aligned with
            it; −1 for the other student rows.
        matched: [N] bool, student rows whose span is matched (one token each side, same string).
        student_span: [N] long, for a student row that predicts a later token of an unmatched span, the
            row of the span's start (its probability multiplies that row's vector); −1 otherwise.
        teacher_span: [N_t] long, the same for teacher rows: the *student* row of the span's start.
        teacher_targets: [N_t] long, the teacher token each teacher row predicts (its next input id).
        student_ids: [M] long, the student ids of the shared tokens S.
        teacher_ids: [M] long, the teacher ids of the same tokens, in the same order.
        matched_weight: weight w_m of the matched (exact) part.
        unmatched_weight: weight w_u of the unmatched (ULD) part.
    """

    logits: torch.Tensor
    teacher_row: torch.Tensor
    matched: torch.Tensor
    student_span: torch.Tensor
    teacher_span: torch.Tensor
    teacher_targets: torch.Tensor
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    matched_weight: float = 1.0
    unmatched_weight: float = 1.0

    def matched_sum(
        self,
        student_logits: torch.Tensor,
        rows: slice,
        soft_mask: torch.Tensor,
        divergence_fn,
    ) -> torch.Tensor:
        """Σ D_matched over the matched, soft-masked student rows of ``rows`` (a chunk: ``student_logits``
        [n, V_s] are those rows' logits, ``soft_mask`` [n]). Only this chunk's teacher rows are gathered,
        so no [N × V_t] float32 tensor is made. ``divergence_fn(student [n, M], teacher [n, M])`` is the
        run's divergence per row."""
        teacher_row = self.teacher_row[rows]
        use = self.matched[rows] & soft_mask & (teacher_row >= 0)
        student_ids = self.student_ids.to(student_logits.device)
        teacher_ids = self.teacher_ids.to(self.logits.device)
        teacher = self.logits[teacher_row.clamp(min=0).to(self.logits.device)][:, teacher_ids]
        per_row = divergence_fn(student_logits[:, student_ids], teacher.to(student_logits.device))
        return torch.where(use.to(per_row.device), per_row, torch.zeros_like(per_row)).sum()

    def unmatched_rows(self, soft_mask: torch.Tensor) -> torch.Tensor:
        """[n_u] the student rows that start an unmatched span and take the soft term."""
        return torch.nonzero((self.teacher_row >= 0) & ~self.matched & soft_mask).squeeze(-1)


def _chunks(rows: torch.Tensor, chunk_size: int | None) -> list[torch.Tensor]:
    """``rows`` in pieces of at most ``chunk_size`` (one piece when None)."""
    return list(rows.split(chunk_size or max(1, rows.numel())))


def _chain_log_factor(
    logits: torch.Tensor,
    span: torch.Tensor,
    targets: torch.Tensor,
    size: int,
    temperature: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """[size] per span-start row, Σ log softmax(logits_k / τ)[targets_k] over the rows k with
    ``span[k]`` = that row (0 for every other row): the log of the chain-rule factor. No gradient."""
    factor = torch.zeros(size, dtype=torch.float32, device=logits.device)
    for later in _chunks(torch.nonzero(span >= 0).squeeze(-1), chunk_size):
        log_probs = torch.log_softmax(logits[later].detach().float() / temperature, dim=-1)
        picked = log_probs.gather(-1, targets[later].clamp(min=0)[:, None].to(logits.device)).squeeze(-1)
        factor.index_add_(0, span[later].to(logits.device), picked)
    return factor


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD per row: Σ_i |sort↓(q)_i − sort↓(p)_i|, ``student_probs`` [n, V_s] and ``teacher_probs``
    [n, V_t] (possibly unnormalised: chain-rule merged), the shorter padded with zeros. Float32, [n]."""
    size = max(student_probs.shape[-1], teacher_probs.shape[-1])
    sorted_q = F.pad(
        student_probs.float().sort(-1, descending=True).values, (0, size - student_probs.shape[-1])
    )
    sorted_p = F.pad(
        teacher_probs.float().sort(-1, descending=True).values, (0, size - teacher_probs.shape[-1])
    )
    return (sorted_q - sorted_p.to(sorted_q.device)).abs().sum(-1)


class _UnmatchedSum(torch.autograd.Function):
    """Σ U over the unmatched span starts ``rows``, ``chunk_size`` rows at a time, and its gradient with
    respect to the student's logits z [N, V_s] (module docstring for U).

    U(r) reads z_r and, through the chain-rule factor, log q_k[y_k] = log softmax(z_k / τ)[y_k] of the
    span's later rows k. Forward computes, per chunk and with autograd inside, ∂U/∂z_r and ∂U/∂f_r (f_r
    = Σ_k log q_k[y_k], the log factor); backward adds the later rows' share in closed form,
    ∂ log q_k[y_k] / ∂z_k = (onehot(y_k) − softmax(z_k / τ)) / τ, chunk by chunk. Only [chunk × V]
    float32 tensors are made; the gradients of the span starts are kept in z's dtype."""

    @staticmethod
    def forward(ctx, z, teacher, labels, rows, temperature, chunk_size, need_grad):  # noqa: D102
        size = z.shape[0]
        student_factor = _chain_log_factor(z, teacher.student_span, labels, size, temperature, chunk_size)
        teacher_factor = _chain_log_factor(
            teacher.logits, teacher.teacher_span, teacher.teacher_targets, size, temperature, chunk_size
        )
        total = torch.zeros((), dtype=torch.float32, device=z.device)
        grad_rows = (
            torch.empty((rows.numel(), z.shape[1]), dtype=z.dtype, device=z.device) if need_grad else None
        )
        grad_factor = torch.zeros(size, dtype=torch.float32, device=z.device)
        done = 0
        for chunk in _chunks(rows, chunk_size):
            teacher_rows = teacher.teacher_row[chunk].to(teacher.logits.device)
            log_p = torch.log_softmax(teacher.logits[teacher_rows].float() / temperature, -1)
            p = (log_p + teacher_factor[chunk.to(teacher_factor.device), None]).exp()
            with torch.enable_grad():
                logits = z[chunk].detach().float().requires_grad_(need_grad)
                factor = student_factor[chunk].requires_grad_(need_grad)
                q = (torch.log_softmax(logits / temperature, -1) + factor[:, None]).exp()
                distance = uld_distance(q, p).sum()
                if need_grad:
                    grad_logits, grad_chunk_factor = torch.autograd.grad(distance, (logits, factor))
                    grad_rows[done : done + chunk.numel()] = grad_logits.to(z.dtype)
                    grad_factor[chunk] = grad_chunk_factor
            total += distance.detach()
            done += chunk.numel()
        ctx.setup = (temperature, chunk_size)
        if need_grad:
            ctx.save_for_backward(z, rows, grad_rows, grad_factor, teacher.student_span, labels)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        temperature, chunk_size = ctx.setup
        z, rows, grad_rows, grad_factor, span, labels = ctx.saved_tensors
        grad = torch.zeros_like(z)
        grad[rows] = grad_rows * grad_total.to(z.dtype)
        for later in _chunks(torch.nonzero(span >= 0).squeeze(-1), chunk_size):
            weight = grad_factor[span[later]] * grad_total / temperature  # ∂L/∂ log q_k[y_k], over τ
            chunk_grad = -torch.softmax(z[later].float() / temperature, -1) * weight[:, None]
            chunk_grad.scatter_add_(-1, labels[later].clamp(min=0)[:, None], weight[:, None])
            grad[later] += chunk_grad.to(z.dtype)
        return grad, None, None, None, None, None, None


def unmatched_sum(
    student_logits: torch.Tensor,
    teacher: AlignedLogits,
    labels: torch.Tensor,
    soft_mask: torch.Tensor,
    temperature: float,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ U over the unmatched span starts, their count): the ULD part, with both sides' vectors merged
    by the chain rule over their span (module docstring), ``chunk_size`` span starts at a time (and
    later rows at a time for the factors): no [n_unmatched × V] float32 tensor for all of them at once.
    ``student_logits`` [N, V_s], ``labels`` [N] the student's next-token targets."""
    rows = teacher.unmatched_rows(soft_mask)
    if rows.numel() == 0:
        return student_logits.new_zeros((), dtype=torch.float32), rows.new_zeros(())
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    total = _UnmatchedSum.apply(student_logits, teacher, labels, rows, temperature, chunk_size, need_grad)
    return total, torch.tensor(rows.numel(), device=rows.device)
