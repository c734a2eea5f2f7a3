"""Collecting what the knowledge measures read: student and teacher logits over a dataset, and the
teacher's class-similarity matrix (for ``kd_sim`` and level 2).

Plumbing around the pure measures: batches come from the task's collator, the teacher through any
teacher signal ``signal(batch) -> logits`` (online model, cached logits, uniform), and
the task flattens each batch into distillation items (one per example, or one per token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from hf_kd.knowledge.domain import class_similarity, soft_confusion
from hf_kd.knowledge.measures import Predictions, agreement_items, mean_agreement
from hf_kd.losses import AlignedLogits, SparseLogits
from hf_kd.modeling import logit_layer_weight_or_none
from hf_kd.tasks.base import NO_LABEL, KDItems, Task, split_batch


def _dense(teacher: torch.Tensor | SparseLogits) -> torch.Tensor:
    """A sparse (top-k) teacher rebuilt as dense log-probabilities (uniform tail), float32."""
    return teacher.to_dense_log_probs("uniform") if isinstance(teacher, SparseLogits) else teacher.float()


@torch.no_grad()
def _each_batch(
    dataset,
    task: Task,
    take: Callable[[KDItems], int],
    *,
    student: torch.nn.Module | None,
    teacher_signal,
    batch_size: int,
    max_items: int | None,
    device: torch.device | str,
) -> None:
    """Run ``student`` and/or ``teacher_signal`` over a prepared ``dataset`` in order (the student in eval
    mode), handing each batch's distillation items to ``take``, which returns how many it kept; stops once
    ``max_items`` are kept. Only one batch's logits are held at a time."""
    if student is None and teacher_signal is None:
        raise ValueError("collect_predictions needs a student, a teacher_signal or both")
    if student is not None:
        was_training = student.training
        student.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=task.collate)
    count = 0
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        student_logits = student(**split_batch(batch)[0]).logits if student is not None else None
        teacher_logits = teacher_signal(batch) if teacher_signal is not None else None
        count += take(
            task.kd_items(
                student_logits if student is not None else teacher_logits, teacher_logits, batch["labels"]
            )
        )
        if max_items is not None and count >= max_items:
            break
    if student is not None:
        student.train(was_training)


def collect_predictions(
    dataset,
    task: Task,
    *,
    student: torch.nn.Module | None = None,
    teacher_signal=None,
    batch_size: int = 256,
    max_items: int | None = None,
    device: torch.device | str = "cpu",
) -> Predictions:
    """Run ``student`` and/or ``teacher_signal`` over a prepared ``dataset`` in order, keep the items'
    logits on the CPU. Without a student the signal gets ``None`` for the student's logits (online and
    cached teachers do not read them). ``max_items`` stops after that many items (token-level tasks)."""
    student_parts, teacher_parts, label_parts = [], [], []

    def take(items: KDItems) -> int:
        if student is not None:
            student_parts.append(items.student_logits.float().cpu())
        if teacher_signal is not None:
            teacher_parts.append(_dense(items.teacher).cpu())
        label_parts.append(items.labels.cpu())
        return items.labels.numel()

    _each_batch(
        dataset,
        task,
        take,
        student=student,
        teacher_signal=teacher_signal,
        batch_size=batch_size,
        max_items=max_items,
        device=device,
    )
    n = sum(len(labels) for labels in label_parts) if max_items is None else max_items
    cat = lambda parts: torch.cat(parts)[:n] if parts else None  # noqa: E731
    return Predictions(cat(student_parts), cat(teacher_parts), torch.cat(label_parts)[:n])


def teacher_agreements(
    dataset,
    task: Task,
    *,
    student: torch.nn.Module,
    teacher_signal,
    batch_size: int = 256,
    max_items: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """The student's agreement with each teacher a signal combines (its ``teachers``: several teachers),
    by name, over the first ``max_items`` labelled items of a prepared ``dataset`` (a causal LM: its
    scored token positions), batch by batch: :func:`hf_kd.knowledge.measures.teacher_agreement` (top-1
    agreement, KL, the teacher's accuracy); for a teacher of another tokenizer, the same at the matched
    span starts only (:meth:`hf_kd.losses.AlignedLogits.matched_agreement`). ``{}`` for a signal of one
    teacher; a teacher with no such item (no labelled item, or no matched span) gets ``{}``."""
    return {
        name: _agreement(dataset, task, student, teacher, batch_size, max_items, device)
        for name, teacher in teacher_signal.teachers.items()
    }


def _agreement(dataset, task, student, teacher, batch_size, max_items, device) -> dict[str, float]:
    """The student's agreement with one teacher of a signal's ``teachers`` (:func:`teacher_agreements`)."""
    parts: list[dict[str, torch.Tensor]] = []

    def take(items: KDItems) -> int:
        if isinstance(items.teacher, AlignedLogits):
            part = items.teacher.matched_agreement(items.student_logits, items.labels)
        else:
            part = agreement_items(items.student_logits, _dense(items.teacher), items.labels)
        parts.append({key: values.cpu() for key, values in part.items()})
        return len(part["top1_agreement"])

    _each_batch(
        dataset,
        task,
        take,
        student=student,
        teacher_signal=teacher,
        batch_size=batch_size,
        max_items=max_items,
        device=device,
    )
    if not sum(len(part["top1_agreement"]) for part in parts):
        return {}
    return mean_agreement({key: torch.cat([part[key] for part in parts])[:max_items] for key in parts[0]})


def teacher_class_similarity(
    teacher: torch.nn.Module | None,
    teacher_predictions: Callable[[], Predictions] | None = None,
    output_map: list[int] | None = None,
) -> tuple[torch.Tensor, str]:
    """The teacher's class-similarity matrix [K, K] in the student's label order, and where it came from.

    From the logit-layer weights when the teacher has one (S_W = Ŵ Ŵᵀ, rows reordered by
    ``output_map``, the teacher signal's); otherwise the soft confusion C of the teacher's predictions, which
    ``teacher_predictions()`` collects (its logits on the training set, in the student's label order).
    """
    weight = None if teacher is None else logit_layer_weight_or_none(teacher, output_map)
    if weight is not None:
        return class_similarity(weight), "logit-layer weights"
    if teacher_predictions is None:
        raise ValueError(
            "the teacher has no readable logit layer: teacher predictions are needed for the soft-confusion fallback"
        )
    predictions = teacher_predictions()
    keep = predictions.labels != NO_LABEL
    probs = torch.softmax(predictions.teacher_logits[keep], dim=-1)
    return soft_confusion(
        probs, predictions.labels[keep], predictions.num_classes
    ), "soft confusion of predictions"
