"""The teacher signal: where a batch's teacher logits come from, one interface for every source.

==========  =====================================================  ==========================
source      what ``signal(batch)`` returns                          built from
==========  =====================================================  ==========================
online      the frozen teacher's logits, dense [..., K]             a teacher model
            (another tokenizer: AlignedLogits, its own tokens)
cached      dense logits, or top-k :class:`SparseLogits`            a teacher cache's columns
uniform     zeros [..., K] (p = 1/K: the ``ls`` target)             the student's class count
==========  =====================================================  ==========================

:func:`build_teacher_signal` picks the source from the run's config; the trainer calls the signal and
reads its attributes, never its kind. A new source is any object with the attributes of
:class:`TeacherSignal`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from accelerate.utils import extract_model_from_parallel

from hf_kd.hidden_states import check_output_layer
from hf_kd.losses import SparseLogits
from hf_kd.modeling import logit_layer_weight
from hf_kd.tasks.base import Task
from hf_kd.teachers.cached import CachedTeacher
from hf_kd.teachers.online import TEACHER_OPTION, CrossTokenizerTeacher, OnlineTeacher
from hf_kd.teachers.synthetic import UniformTeacher


class TeacherSignal(Protocol):
    """A source of teacher logits for distillation.

    Attributes:
        output_map: the index map that put the teacher's classes into the student's label order
            (``teacher_logits[..., output_map]``), already applied to what the signal returns; None when
            the orders agree. Callers reorder anything else of the teacher's (its logit layer) by it.
        model: the teacher model the signal runs, whose weights can be read (its logit layer), or None
            when no model runs (cached logits, the uniform teacher).
        real_teacher: True when the logits are a trained teacher's, so that the student's agreement with
            them is worth reporting; False for a synthetic source (the uniform teacher).
    """

    output_map: list[int] | None
    model: torch.nn.Module | None
    real_teacher: bool

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor | SparseLogits:
        """The teacher's logits for ``batch`` (a collated batch with ``labels``): dense [..., K] or top-k
        :class:`SparseLogits`, over the items of the batch as the task lays them out."""


def check_cross_tokenizer(config: Any) -> None:
    """Refuse what a teacher with another tokenizer does not support (its tokens are aligned with the
    student's on the data's text; packing is the task's refusal), from ``config`` (a
    :class:`hf_kd.DistillationConfig`): before the teacher's weights load in a recipe run, when the
    teacher signal is built from Python."""
    sampling = f"lmbda={config.lmbda}" if config.lmbda > 0 else "seq_kd: true"
    unsupported = {
        f"{sampling} (sampled tokens have no teacher alignment)": config.generates,
        "student_logits_from_hidden_states: true": config.student_logits_from_hidden_states,
        "teacher_logits_from_hidden_states: true": config.teacher_logits_from_hidden_states,
        f"synthetic_teacher={config.synthetic_teacher!r}": config.synthetic_teacher != "kd",
    }
    refused = [name for name, on in unsupported.items() if on]
    if refused:
        raise ValueError(
            f"the teacher's tokenizer differs from the student's (cross-tokenizer distillation), which does not "
            f"support {', '.join(refused)}; turn {'them' if len(refused) > 1 else 'it'} off, or use a teacher "
            "that shares the student's tokenizer"
        )


def build_teacher_signal(
    config,
    task: Task,
    student: torch.nn.Module,
    *,
    teacher_model: torch.nn.Module | None = None,
    cache=None,
    student_processor: Any = None,
) -> TeacherSignal | None:
    """The run's teacher signal, from ``config`` (a :class:`hf_kd.DistillationConfig`):

    - None without a soft term (``alpha = 0``, or ``synthetic_teacher='none'``);
    - the uniform teacher over the student's classes for ``synthetic_teacher='ls'``;
    - the logits of ``cache`` (a loaded teacher cache, checked against the task, the student's config and
      ``student_processor``) when one is given;
    - else the online ``teacher_model`` (as placed for the run), its classes checked against the
      student's and mapped into their order; when ``task`` was prepared with a teacher tokenizer of
      another vocabulary (``task.vocabulary``), the cross-tokenizer teacher (what it does not support
      refused: :func:`check_cross_tokenizer`).

    Raises ValueError when the config needs a teacher and neither a cache nor a teacher model is given.
    """
    if not config.alpha > 0 or config.synthetic_teacher == "none":
        return None
    if config.synthetic_teacher == "ls":
        return UniformTeacher(num_classes=logit_layer_weight(student).shape[0])
    if cache is not None:
        output_map = cache.check_run(task, student.config, student_processor, config)
        cache.check_sparse_tail(config.sparse_tail)
        return CachedTeacher(cache.metadata.num_classes, output_map, cache.sketch)
    if teacher_model is not None:
        teacher_config = extract_model_from_parallel(teacher_model).config
        output_map = task.teacher_output_map(teacher_config, student.config, config)
        vocabulary = getattr(task, "vocabulary", None)
        if vocabulary is not None:
            check_cross_tokenizer(config)
            return CrossTokenizerTeacher(
                teacher_model,
                vocabulary,
                matched_weight=config.cross_tokenizer_matched_weight,
                unmatched_weight=config.cross_tokenizer_unmatched_weight,
            )
        if config.teacher_logits_from_hidden_states:
            unwrapped = extract_model_from_parallel(teacher_model)
            check_output_layer(task, unwrapped, TEACHER_OPTION)
            if unwrapped.get_output_embeddings().weight.numel() == 0:
                raise ValueError(f"{TEACHER_OPTION} needs the teacher's whole output layer: not with ZeRO-3")
        return OnlineTeacher(
            teacher_model, output_map, from_hidden_states=config.teacher_logits_from_hidden_states
        )
    raise ValueError(
        f"alpha={config.alpha} needs a teacher: pass teacher_model or teacher_signal (or set alpha: 0)"
    )
