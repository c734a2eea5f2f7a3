"""Online teacher: a frozen model run inside the training step."""

from __future__ import annotations

from typing import Any

import torch

from hf_kd.tasks.base import split_batch


class OnlineTeacher:
    """Runs a frozen teacher on each batch, on its own inputs (``teacher_*`` columns) when its
    preprocessing differs from the student's, else on the student's inputs.

    ``label_permutation`` reorders the teacher's classes into the student's label order.
    """

    def __init__(self, model: torch.nn.Module, label_permutation: list[int] | None = None):
        self.model = model
        self.label_permutation = label_permutation

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        student_inputs, teacher_inputs, _ = split_batch(batch)
        with torch.no_grad():
            logits = self.model(**(teacher_inputs or student_inputs)).logits
        if self.label_permutation is not None:
            logits = logits[..., self.label_permutation]
        return logits


class UniformTeacher:
    """The teacher of label smoothing (the paper's ``ls`` arm): constant logits over ``num_classes``
    classes for every item of the batch (shape ``labels.shape + (K,)``), p = u = 1/K."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        return torch.zeros(*labels.shape, self.num_classes, dtype=torch.float32, device=labels.device)
