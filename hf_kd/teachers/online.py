"""Online teacher: a frozen model run inside the training step."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from hf_kd.hidden_states import check_output_layer, student_hidden_states
from hf_kd.losses import AlignedLogits, HiddenStates
from hf_kd.tasks.alignment import VocabularyMap, aligned_logits
from hf_kd.tasks.base import Task, split_batch
from hf_kd.teachers.contract import SignalDefaults
from hf_kd.teachers.finite import check_teacher_logits

TEACHER_OPTION = "teacher_logits_from_hidden_states: true"


class OnlineTeacher(SignalDefaults):
    """Runs a frozen teacher on each batch, on its own inputs (``teacher_*`` columns) when its
    preprocessing differs from the student's, else on the student's inputs.

    ``model`` is the module to call (as placed for the run's strategy); ``output_map`` reorders the
    teacher's classes into the student's label order (``logits[..., output_map]``). With
    ``from_hidden_states`` (``teacher_logits_from_hidden_states``) it returns the teacher's final hidden
    states and output layer (:class:`HiddenStates`) instead of its logits, which the loss then makes chunk by
    chunk.
    """

    returns = ("dense",)
    gives_features = True
    scores_samples = True

    def __init__(
        self, model: torch.nn.Module, output_map: list[int] | None = None, *, from_hidden_states: bool = False
    ):
        if from_hidden_states and output_map is not None:
            raise ValueError(
                f"{TEACHER_OPTION} needs the teacher's classes in the student's order (no output map)"
            )
        self.model = model
        self.output_map = output_map
        self.from_hidden_states = from_hidden_states
        self._output_layer_checked = False

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.run(batch)[0]

    def run(self, batch: dict[str, Any], **forward_kwargs: Any) -> tuple[torch.Tensor | HiddenStates, Any]:
        """The teacher's logits and its whole forward output, asked for ``forward_kwargs`` (e.g.
        ``output_hidden_states=True``: feature losses read them from this same forward); with
        ``from_hidden_states``, its :class:`HiddenStates` and None. A logit that is NaN or +inf (or a
        position whose logits are all −inf) where the inputs are not padding raises
        :class:`hf_kd.teachers.finite.NonFiniteTeacherError`: nothing is distilled from such a teacher."""
        student_inputs, teacher_inputs, _ = split_batch(batch)
        inputs = teacher_inputs or student_inputs
        if self.from_hidden_states:  # no forward_kwargs: feature losses are refused with it
            weight = extract_model_from_parallel(self.model).get_output_embeddings().weight
            length, check = inputs["input_ids"].shape[1], not self._output_layer_checked
            with torch.no_grad():
                hidden = student_hidden_states(
                    self.model, weight, inputs, length, check=check, option=TEACHER_OPTION
                )
            self._output_layer_checked = True
            return hidden, None
        with torch.no_grad():
            outputs = self.model(**inputs, **forward_kwargs)
        logits = outputs.logits
        mask = inputs.get("attention_mask") if logits.dim() == 3 else None
        check_teacher_logits(logits, mask, "a batch", 0, "refusing to distil from it")
        if self.output_map is not None:
            logits = logits[..., self.output_map]
        return logits, outputs


class CrossTokenizerTeacher(OnlineTeacher):
    """An online teacher whose tokenizer differs from the student's: it runs on its own
    ``teacher_input_ids`` and its logits come with their alignment to the student's tokens
    (:class:`hf_kd.losses.AlignedLogits`, built from the batch's alignment columns), which the loss
    reads (``hf_kd.losses.cross_tokenizer``). Its features and on-policy samples are refused
    (:func:`check_cross_tokenizer`): the two models' positions differ."""

    returns = ("aligned",)
    gives_features = False
    scores_samples = False

    def __init__(
        self,
        model: torch.nn.Module,
        vocabulary: VocabularyMap,
        *,
        matched_weight: float = 1.0,
        unmatched_weight: float = 1.0,
    ):
        super().__init__(model)
        self.vocabulary = vocabulary
        self.matched_weight, self.unmatched_weight = matched_weight, unmatched_weight

    def __call__(self, batch: dict[str, Any]) -> AlignedLogits:
        return aligned_logits(
            self.run(batch)[0],
            batch,
            self.vocabulary,
            matched_weight=self.matched_weight,
            unmatched_weight=self.unmatched_weight,
        )


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


def cross_tokenizer_teacher(
    config, teacher_model: torch.nn.Module, vocabulary: VocabularyMap
) -> CrossTokenizerTeacher:
    """The teacher of another tokenizer (``vocabulary``: the tokens it shares with the student) with the
    part weights of ``config``, what it does not support refused first (:func:`check_cross_tokenizer`)."""
    check_cross_tokenizer(config)
    return CrossTokenizerTeacher(
        teacher_model,
        vocabulary,
        matched_weight=config.cross_tokenizer_matched_weight,
        unmatched_weight=config.cross_tokenizer_unmatched_weight,
    )


def build_online_teacher(
    config, task: Task, student: torch.nn.Module, *, teacher_model=None, **_: Any
) -> OnlineTeacher:
    """The ``online`` source: ``teacher_model`` (as placed for the run), its classes checked against the
    student's and mapped into their order; when ``task`` was prepared with a teacher tokenizer of another
    vocabulary (``task.vocabulary``), the cross-tokenizer teacher (what it does not support refused by
    :func:`check_cross_tokenizer`). Raises ValueError without a teacher model."""
    if teacher_model is None:
        raise ValueError(
            f"alpha={config.alpha} needs a teacher: pass teacher_model or teacher_signal (or set alpha: 0)"
        )
    teacher_config = extract_model_from_parallel(teacher_model).config
    output_map = task.teacher_output_map(teacher_config, student.config, config)
    vocabulary = getattr(task, "vocabulary", None)
    if vocabulary is not None:
        return cross_tokenizer_teacher(config, teacher_model, vocabulary)
    if config.teacher_logits_from_hidden_states:
        unwrapped = extract_model_from_parallel(teacher_model)
        check_output_layer(task, unwrapped, TEACHER_OPTION)
        if unwrapped.get_output_embeddings().weight.numel() == 0:
            raise ValueError(f"{TEACHER_OPTION} needs the teacher's whole output layer: not with ZeRO-3")
    return OnlineTeacher(
        teacher_model, output_map, from_hidden_states=config.teacher_logits_from_hidden_states
    )
