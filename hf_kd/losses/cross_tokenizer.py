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

  With the same tokenizer on both sides S is the whole vocabulary and this is the usual soft term. It is
  computed on the student's vocabulary: the teacher's logits are mapped onto it once per chunk (student
  ids outside S get a logit of −10³⁰, probability exactly 0 on both sides), so the student's logits are
  only masked, never gathered, and only the matched rows are read.
- **unmatched** (any other span: a word split differently, or one token on each side with different
  strings): ULD (Boizard et al. 2024) between the two distributions at the span start, the L1 distance
  between the probability vectors sorted in decreasing order, the shorter one padded with zeros:

      U(r) = Σ_i |sort↓(softmax(z_r / τ))_i − sort↓(softmax(v_u / τ))_i|

  Both vectors sum to 1, as in ULD, where each aligned position compares two full distributions. An
  earlier version merged a multi-token side by the chain rule (the span start's distribution times the
  probability of each later token of the span): that vector sums to far less than 1, the single-token
  side to 1, so U measured mostly that mass difference and gave the student almost no gradient (the
  part was the same to four digits for a random student and a trained one).

The student rows and the teacher rows are the flattened token positions of the batch ([N] and [N_t]);
:class:`AlignedLogits` carries the teacher's logits with the alignment, as the teacher signal builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OUTSIDE_SHARED = -1.0e30
"""The logit given to a student id outside the shared tokens, on both sides of the matched part: its
probability is exactly 0 in float32 at any temperature the loss accepts, and, unlike −inf, it gives
0 · (log p − log q) = 0 rather than NaN in the divergences."""


@dataclass
class AlignedLogits:
    """The teacher's logits over its own tokens, with their alignment to the student's rows.

    Attributes:
        logits: [N_t, V_t] the teacher's logits, one row per teacher position (flattened batch).
        teacher_row: [N] long, for each student row r that starts a span, the teacher row u aligned with
            it; −1 for the other student rows.
        matched: [N] bool, student rows whose span is matched (one token each side, same string).
        student_ids: [M] long, the student ids of the shared tokens S.
        teacher_ids: [M] long, the teacher ids of the same tokens, in the same order.
        matched_weight: weight w_m of the matched (exact) part.
        unmatched_weight: weight w_u of the unmatched (ULD) part.
    """

    logits: torch.Tensor
    teacher_row: torch.Tensor
    matched: torch.Tensor
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    matched_weight: float = 1.0
    unmatched_weight: float = 1.0

    def soft_sums(
        self,
        student_logits: torch.Tensor,
        rows: slice,
        soft_mask: torch.Tensor,
        divergence_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ D_matched, Σ U) over the soft-masked span starts of ``rows`` (a chunk: ``student_logits``
        [n, V_s] are those rows' logits, ``soft_mask`` [n]). Only this chunk's teacher rows are read,
        so no [N × V] float32 tensor is made. ``divergence_fn(student [n, V_s], teacher [n, V_s])`` is
        the run's divergence per row."""
        device = student_logits.device
        teacher_row = self.teacher_row[rows].to(device)
        starts = soft_mask.to(device) & (teacher_row >= 0)
        matched = self.matched[rows].to(device)
        per_row = self._matched_divergence(student_logits, teacher_row.clamp(min=0), divergence_fn)
        unmatched = torch.nonzero(starts & ~matched).squeeze(-1)
        return (
            torch.where(starts & matched, per_row, torch.zeros_like(per_row)).sum(),
            self._unmatched_sum(student_logits, unmatched, teacher_row, temperature),
        )

    def matched_agreement(
        self, student_logits: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The student's agreement with the teacher at the matched span starts with a label (≥ 0), the only
        rows where both predict the same event over tokens they share; [N, V_s] logits of every student
        row, [N] labels (next-token targets). Per such row, [n] each, float64 (the terms of
        :func:`hf_kd.knowledge.measures.agreement_items`, on the shared tokens S):

            top1_agreement = [map(argmax z_r) = argmax v_u]   (map: student id → teacher id, none outside S)
            kl = KL(p ‖ q), p = softmax(v_u[S_t]), q = softmax(z_r[S_s])   (τ = 1)
            teacher_accuracy = [argmax v_u = map(y_r)]
        """
        rows = torch.nonzero(self.matched & (self.teacher_row >= 0) & (labels >= 0)).squeeze(-1)
        student = student_logits.index_select(0, rows.to(student_logits.device)).float()
        teacher_row = self.teacher_row[rows]
        column = self._teacher_ids_of(student.shape[-1], student.device)
        top = self._teacher_rows(teacher_row, student.device).argmax(-1)
        from hf_kd.losses.divergences import forward_kl  # that module imports this one

        kl = self._matched_divergence(
            student, teacher_row, lambda z, v: forward_kl(torch.log_softmax(z, -1), torch.log_softmax(v, -1))
        )
        return {
            "top1_agreement": (column[student.argmax(-1)] == top).double(),
            "kl": kl.double(),
            "teacher_accuracy": (column[labels[rows].to(student.device)] == top).double(),
        }

    def _teacher_ids_of(self, vocab: int, device) -> torch.Tensor:
        """[V_s] the teacher id of each student id of the shared tokens S, −1 outside S."""
        column = torch.full((vocab,), -1, dtype=torch.long, device=device)
        column[self.student_ids.to(device)] = self.teacher_ids.to(device)
        return column

    def _teacher_rows(self, teacher_row: torch.Tensor, device) -> torch.Tensor:
        """The teacher's logits at ``teacher_row``, in float32 on ``device``."""
        return self.logits.index_select(0, teacher_row.to(self.logits.device)).to(device).float()

    def _matched_divergence(self, student_logits, teacher_row, divergence_fn) -> torch.Tensor:
        """[n] D_matched of every row of the chunk against the teacher rows ``teacher_row``, on the
        student's vocabulary: the teacher's logits mapped onto it, ids outside S at −10³⁰ on both sides
        (added, so the student's backward is the divergence's own)."""
        vocab, device = student_logits.shape[-1], student_logits.device
        teacher = self._teacher_rows(teacher_row, device)
        if self.student_ids.numel() == vocab and torch.equal(self.student_ids, self.teacher_ids):
            return divergence_fn(student_logits, teacher)  # one vocabulary: the usual soft term
        column = self._teacher_ids_of(vocab, device)
        outside = torch.where(column < 0, OUTSIDE_SHARED, 0.0)
        teacher = teacher.index_select(1, column.clamp(min=0)).add_(outside)
        return divergence_fn(student_logits.float() + outside, teacher)

    def _unmatched_sum(self, student_logits, rows, teacher_row, temperature: float) -> torch.Tensor:
        """Σ U over the chunk's unmatched span starts ``rows`` (module docstring)."""
        teacher = self._teacher_rows(teacher_row[rows], student_logits.device)
        student = student_logits.index_select(0, rows).float()
        return uld_distance(
            torch.softmax(student / temperature, -1), torch.softmax(teacher / temperature, -1)
        ).sum()


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD per row: Σ_i |sort↓(q)_i − sort↓(p)_i|, ``student_probs`` [n, V_s] and ``teacher_probs``
    [n, V_t], the shorter padded with zeros. Float32, [n]."""
    size = max(student_probs.shape[-1], teacher_probs.shape[-1])

    def sorted_padded(probs: torch.Tensor) -> torch.Tensor:
        values = probs.float().sort(-1, descending=True).values
        return values if values.shape[-1] == size else F.pad(values, (0, size - values.shape[-1]))

    return (
        (sorted_padded(student_probs) - sorted_padded(teacher_probs).to(student_probs.device)).abs().sum(-1)
    )
