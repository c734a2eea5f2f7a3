"""``KnowledgeCallback``: the knowledge-level measures at each evaluation, in ``log_history`` and every
reporting integration (TensorBoard, W&B, ...)."""

from __future__ import annotations

from transformers import TrainerCallback

from hf_kd.cards.run import KNOWLEDGE_PREFIX
from hf_kd.knowledge.measures import knowledge_measures, scalar_measures
from hf_kd.modeling import logit_layer_weight_or_none
from hf_kd.predictions import collect_predictions, teacher_agreements
from hf_kd.teachers.placement import full_teacher


class KnowledgeCallback(TrainerCallback):
    """After each evaluation, runs the student and the trainer's teacher signal over the evaluation set
    (at most ``max_items`` items) and logs the scalars of :func:`hf_kd.knowledge.measures.knowledge_measures`
    as ``eval_knowledge/<level>/<measure>`` through ``trainer.log``; with several teachers (the signal's
    ``teachers``), the student's agreement with each as ``eval_knowledge/teachers/<name>/<measure>``
    (:func:`hf_kd.predictions.teacher_agreements`). ``levels=False`` logs the per-teacher agreements only
    (a causal LM: the knowledge levels are classifier measures; its items are the scored token positions,
    at most ``max_items`` of them, read batch by batch).

        trainer = DistillationTrainer(...)
        trainer.add_callback(KnowledgeCallback(trainer))
    """

    def __init__(
        self, trainer, *, groups: list[int] | None = None, max_items: int = 1024, levels: bool = True
    ):
        if trainer.teacher_signal is None:
            raise ValueError(
                "KnowledgeCallback needs a trainer with a teacher signal (alpha > 0 and a teacher)"
            )
        self.trainer, self.groups, self.max_items, self.levels = trainer, groups, max_items, levels

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        if trainer.eval_dataset is None or isinstance(trainer.eval_dataset, dict):
            return  # one evaluation set only: with several, which one the measures describe is ambiguous
        measures = self._levels(args, model) if self.levels else {}
        agreements = self._read(teacher_agreements, args, model)  # several teachers: with each
        if agreements:
            measures["teachers"] = agreements
        if measures:
            trainer.log(scalar_measures(measures, prefix=KNOWLEDGE_PREFIX))

    def _read(self, reader, args, model):
        """``reader`` (``collect_predictions`` or ``teacher_agreements``) over the evaluation set, at most
        ``max_items`` items, with the student and the trainer's teacher signal."""
        trainer = self.trainer
        return reader(
            trainer.eval_dataset,
            trainer.task,
            student=model,
            teacher_signal=trainer.teacher_signal,
            batch_size=args.per_device_eval_batch_size,
            max_items=self.max_items,
            device=args.device,
        )

    def _levels(self, args, model) -> dict:
        """The knowledge measures of the student and the teacher signal over the evaluation set."""
        predictions = self._read(collect_predictions, args, model)
        signal = self.trainer.teacher_signal
        teacher_weight = None
        if signal.model is not None:
            with full_teacher(signal.model) as whole:  # sharded or offloaded weights made whole to be read
                teacher_weight = logit_layer_weight_or_none(whole, signal.output_map)
        measures = knowledge_measures(
            predictions.teacher_logits,
            predictions.labels,
            student_logits=predictions.student_logits,
            alpha=args.alpha,
            temperature=args.temperature,
            groups=self.groups,
            teacher_weight=teacher_weight,
            student_weight=logit_layer_weight_or_none(model),
        )
        measures.pop("settings")
        return measures
