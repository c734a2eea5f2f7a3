"""The teacher signal: where a batch's teacher logits come from, one factory for every source.

The sources are registered by name in :mod:`hf_kd.teachers.sources` (``teacher_source``); each builds a
signal satisfying :class:`hf_kd.teachers.contract.TeacherSignal`. The synthetic uniform teacher
(``synthetic_teacher: ls``) needs no source. The trainer calls the signal and reads what it declares,
never its kind.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_kd.modeling import logit_layer_weight
from hf_kd.tasks.base import Task
from hf_kd.teachers.contract import TeacherSignal, check_teacher_signal
from hf_kd.teachers.sources import teacher_source
from hf_kd.teachers.synthetic import UniformTeacher

__all__ = ["TeacherSignal", "build_teacher_signal", "open_teacher_source"]


def open_teacher_source(config, task: Task, splits, split_names: list[str]) -> tuple[Any, Any]:
    """Open the run's teacher source (``config.teacher_source``) before any model loads: what it needs for
    the run (a loaded cache, a checked connection to a server) and the splits, extended by it where it
    adds columns to them. (None, splits) when the source opens nothing or the run has no soft term."""
    source = teacher_source(config.teacher_source)
    if source.open is None or not config.uses_teacher:
        return None, splits
    return source.function("open")(config, task, splits, split_names)


def build_teacher_signal(
    config,
    task: Task,
    student: torch.nn.Module,
    *,
    teacher_model: torch.nn.Module | None = None,
    resource: Any = None,
    student_processor: Any = None,
) -> TeacherSignal | None:
    """The run's teacher signal, from ``config`` (a :class:`hf_kd.DistillationConfig`):

    - None without a soft term (``alpha = 0``, or ``synthetic_teacher='none'``);
    - the uniform teacher over the student's classes for ``synthetic_teacher='ls'``;
    - else the signal of the registered source ``config.teacher_source``, built by its ``build``
      function from ``teacher_model`` (a source that loads the teacher: as placed for the run),
      ``resource`` (what :func:`open_teacher_source` opened) and ``student_processor``, and checked
      against the contract (:func:`hf_kd.teachers.contract.check_teacher_signal`).

    Raises ValueError when the source lacks what it needs (an online teacher without a model).
    """
    if not config.alpha > 0 or config.synthetic_teacher == "none":
        return None
    if config.synthetic_teacher == "ls":
        return UniformTeacher(num_classes=logit_layer_weight(student).shape[0])
    source = teacher_source(config.teacher_source)
    signal = source.function("build")(
        config,
        task,
        student,
        teacher_model=teacher_model,
        resource=resource,
        student_processor=student_processor,
    )
    check_teacher_signal(signal)
    return signal
