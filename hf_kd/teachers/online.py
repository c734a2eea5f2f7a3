"""Online teacher: a frozen model run inside the training step."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from hf_kd.hidden_states import student_hidden_states
from hf_kd.losses import AlignedLogits, HiddenStates
from hf_kd.tasks.alignment import VocabularyMap, aligned_logits
from hf_kd.tasks.base import split_batch
from hf_kd.teachers.finite import check_teacher_logits

TEACHER_OPTION = "teacher_logits_from_hidden_states: true"


class OnlineTeacher:
    """Runs a frozen teacher on each batch, on its own inputs (``teacher_*`` columns) when its
    preprocessing differs from the student's, else on the student's inputs.

    ``model`` is the module to call (as placed for the run's strategy); ``output_map`` reorders the
    teacher's classes into the student's label order (``logits[..., output_map]``). With
    ``from_hidden_states`` (``teacher_logits_from_hidden_states``) it returns the teacher's final hidden
    states and output layer (:class:`HiddenStates`) instead of its logits, which the loss then makes chunk by
    chunk.
    """

    real_teacher = True

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
    reads (``hf_kd.losses.cross_tokenizer``)."""

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
