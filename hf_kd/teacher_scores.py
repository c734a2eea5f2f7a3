"""The teacher's own scores by the student's measures (cross-entropy on the labels, perplexity, bits
per byte), on the same evaluation batches as the student's, for the distillation trainer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hf_kd.modeling import logit_layer_weight
from hf_kd.tasks.base import NO_LABEL
from hf_kd.tasks.causal_lm import bits_per_byte, scored_bytes


class TeacherScoresMixin:
    """``teacher_hard_totals`` and ``hard_scores`` of :class:`hf_kd.trainer.DistillationTrainer`."""

    def teacher_hard_totals(self, dataset) -> tuple[float, float, float]:
        """The teacher's (summed cross-entropy on the labels, labelled items, bytes those items cover) on
        ``dataset``, over the same evaluation batches as the student's ``eval_loss_hard``, summed over every
        process (every process must call it). A teacher of the student's tokenizer is scored on the
        student's items and classes (the vocabulary both share); one of another tokenizer on its own
        tokens of the same text (``teacher_input_ids``), those starting where the student's tokens have
        labels: only its bytes make it comparable (:meth:`hard_scores`). Bytes are 0 without the
        ``kd_text_bytes`` columns (rows not prepared by a causal-LM task)."""
        if self.teacher_signal is None:
            raise ValueError("teacher_hard_totals needs a teacher: this run has no teacher signal")
        classes = logit_layer_weight(self.model).shape[0]
        totals = torch.zeros(3, device=self.args.device)
        for batch in self.get_eval_dataloader(dataset):
            batch = self._prepare_inputs(batch)
            items = self.task.teacher_scored_items(self.teacher_signal(batch), batch, classes)
            if items is None:
                continue
            logits, labels, byte_counts, scored = items
            labels = labels.to(logits.device)
            totals[0] += F.cross_entropy(logits, labels, ignore_index=NO_LABEL, reduction="sum").to(
                totals.device
            )
            totals[1] += (labels != NO_LABEL).sum().to(totals.device)
            if byte_counts is not None:
                totals[2] += scored_bytes(byte_counts, scored).to(totals.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss, count, num_bytes = totals.tolist()
        return loss, count, num_bytes

    def hard_scores(self, loss_sum: float, count: float, num_bytes: float = 0.0) -> dict[str, float]:
        """``eval_loss_hard`` (mean cross-entropy on the labels: ``loss_sum`` over ``count`` items) and, for
        a causal LM, ``eval_perplexity`` = exp(mean token cross-entropy) and, when the bytes the tokens
        cover are known, ``eval_bits_per_byte`` (``hf_kd.tasks.causal_lm.bits_per_byte``)."""
        cross_entropy = loss_sum / count if count else math.nan
        scores = {"eval_loss_hard": cross_entropy}
        if self.task.scores_bytes:
            scores["eval_perplexity"] = math.exp(cross_entropy) if cross_entropy < 700 else math.inf
            if num_bytes:
                scores["eval_bits_per_byte"] = bits_per_byte(loss_sum, num_bytes)
        return scores
