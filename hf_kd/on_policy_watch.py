"""Warnings during on-policy training when the student's own completions are far from what the teacher
would write. A student that does not yet write plausible text teaches itself little from the teacher's
scores of its garbage: warm-start it (labels or off-policy KD first) or lower ``lmbda``.

- Mixed runs (``lmbda`` strictly between 0 and 1): the soft term on its samples (``loss_soft_generated``)
  far above the same term on the data's completions (``loss_soft_data``), as the trainer logs them
  (:class:`OnPolicyWatch`).
- Fully on-policy runs (``lmbda: 1``: no data batch is ever trained on, so nothing to compare with in the
  logs): at the first window, before its completions are replaced, the student's per-token NLL on the
  data's completions against the teacher's (:func:`data_nll`, :func:`start_far_from_teacher`) — the line
  ``scripts/preflight.py`` draws before training (``PREFLIGHT_RULES["on_policy_gap_nats"]``), now drawn by
  the run itself on its own first rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from hf_kd.knowledge.preflight import PREFLIGHT_RULES
from hf_kd.tasks.base import NO_LABEL, Task, split_batch

logger = logging.getLogger(__name__)

GENERATED_OVER_DATA = 3.0
"""Warn when ``loss_soft_generated`` ≥ this × ``loss_soft_data`` in one logging window. Not calibrated on
runs that diverged: on the reversal task from scratch (BENCHMARKS.md, "Why `mixed` is near 0 %"), the
student's samples and the data scored alike (0.18 vs 0.20) while the run failed for another reason (a weak
JSD signal) — this line catches a different failure, samples the teacher finds far worse than the data."""


def generated_far_from_data(logs: Mapping[str, float], ratio: float = GENERATED_OVER_DATA) -> str | None:
    """The warning's sentence when ``logs`` hold both soft losses and generated ≥ ``ratio`` × data; else None."""
    generated, data = logs.get("loss_soft_generated"), logs.get("loss_soft_data")
    if generated is None or data is None or not data > 0 or generated < ratio * data:
        return None
    return (
        f"on-policy: the soft loss on the student's own completions ({generated:.4g}) is {generated / data:.1f}× "
        f"the one on the data's ({data:.4g}, warning at {ratio:g}×): the student does not yet write text the "
        "teacher finds plausible, and learns little from its scores of it. Warm-start it first (labels or "
        "off-policy KD, lmbda: 0) or lower lmbda; scripts/preflight.py measures this before a run."
    )


class OnPolicyWatch(TrainerCallback):
    """Logs :func:`generated_far_from_data`'s warning once per run, at the first logging window that shows it."""

    def __init__(self, ratio: float = GENERATED_OVER_DATA):
        self.ratio, self.warned = ratio, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        message = None if self.warned or not logs else generated_far_from_data(logs, self.ratio)
        if message is not None:
            self.warned = True
            logger.warning("step %d: %s", state.global_step, message)


START_GAP_NATS = PREFLIGHT_RULES["on_policy_gap_nats"]
"""Warn at a fully on-policy run's first window when the student's per-token NLL on the data is more than
this many nats above the teacher's (the pre-flight's line and its evidence)."""


def data_nll(
    batch: dict[str, Any], task: Task, student: torch.nn.Module, teacher: torch.nn.Module
) -> tuple[float, float] | None:
    """(student, teacher) mean per-token NLL in nats on the labelled tokens of a collated data ``batch``, the
    items laid out by ``task.kd_items`` as the loss reads them (an output layer padded past the shared
    vocabulary sliced to it); None when the batch has no labelled token (prompt-only rows). Both models
    run without gradients, in evaluation mode."""
    labels = batch["labels"]
    if not bool((labels != NO_LABEL).any()):
        return None
    inputs = split_batch(batch)[0]
    logits = []
    for model in (student, teacher):
        device, training = next(model.parameters()).device, model.training
        model.eval()
        with torch.no_grad():
            logits.append(model(**{k: v.to(device) for k, v in inputs.items()}).logits)
        model.train(training)
    items = task.kd_items(logits[0], logits[1].to(logits[0].device), labels.to(logits[0].device))
    return tuple(
        F.cross_entropy(z.float(), items.labels, ignore_index=NO_LABEL).item()
        for z in (items.student_logits, items.teacher)
    )


def start_far_from_teacher(
    student_nll: float, teacher_nll: float, line: float = START_GAP_NATS
) -> str | None:
    """The warning's sentence when the student's NLL on the data is more than ``line`` nats above the
    teacher's; else None."""
    gap = student_nll - teacher_nll
    if not gap > line:
        return None
    return (
        f"on-policy (lmbda: 1): at the first step the student's per-token NLL on the data's completions is "
        f"{student_nll:.2f} nats, {gap:.2f} above the teacher's ({teacher_nll:.2f}; warning above {line:g}): "
        "the student does not yet write text the teacher finds plausible, and learns little from its scores "
        "of it (from scratch, fully on-policy KD ended worse than no KD). Warm-start it first (labels or "
        "off-policy KD, lmbda: 0) or mix (lmbda < 1); scripts/preflight.py measures this before a run."
    )


def check_start(
    batch: dict[str, Any], task: Task, student: torch.nn.Module, teacher: torch.nn.Module, step: int
) -> tuple[float, float] | None:
    """:func:`data_nll` on a fully on-policy run's first data ``batch``, warning by
    :func:`start_far_from_teacher`; returns the two NLLs (None: nothing labelled to read)."""
    nll = data_nll(batch, task, student, teacher)
    message = None if nll is None else start_far_from_teacher(*nll)
    if message is not None:
        logger.warning("step %d: %s", step, message)
    return nll
