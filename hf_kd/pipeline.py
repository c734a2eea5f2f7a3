"""One distillation run from parsed arguments: what ``scripts/distill.py`` does, callable from Python."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, set_seed

from hf_kd.callbacks import KnowledgeCallback
from hf_kd.config import DataArguments, DistillationConfig, ModelArguments
from hf_kd.data.loading import drop_unlabeled, hide_labels, label_names, load_splits
from hf_kd.modeling import build_from_config, check_model_source, count_parameters, load_pretrained
from hf_kd.predictions import collect_predictions, teacher_class_similarity
from hf_kd.run_card import run_card_info, teacher_scores
from hf_kd.tasks import CausalLMTask, Task, build_task, teacher_own_processor
from hf_kd.tasks.causal_lm import vocab_size_of
from hf_kd.tasks.classification import ClassificationMetrics
from hf_kd.teachers.cache import load_teacher_cache
from hf_kd.teachers.cached import CachedTeacher
from hf_kd.teachers.placement import full_teacher
from hf_kd.teachers.synthetic import SyntheticTargetFn, topk_count
from hf_kd.trainer import DistillationTrainer
from hf_kd.vocab import check_same_vocabulary, shared_vocab_size

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced: final evaluation metrics, sizes, and the trainer (for further use)."""

    metrics: dict[str, float]
    student_parameters: int
    teacher_parameters: int | None
    trainer: DistillationTrainer


def _check_sources(model_args: ModelArguments, config: DistillationConfig) -> None:
    """Everything that can be checked before loading anything."""
    if model_args.student_model_name_or_path:
        check_model_source("student_model_name_or_path", model_args.student_model_name_or_path)
    if config.teacher_source == "online" and config.uses_teacher:
        if not config.teacher_model_name_or_path:
            raise ValueError(
                f"alpha={config.alpha} with an online teacher needs teacher_model_name_or_path (or set alpha: 0)"
            )
        check_model_source("teacher_model_name_or_path", config.teacher_model_name_or_path)


def load_student(task: Task, model_args: ModelArguments, labels: list[str] | None):
    """The student and its processor, from a checkpoint or freshly built from ``student_config``."""
    head = (
        {}
        if labels is None
        else {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
        }
    )
    if model_args.student_model_name_or_path:
        model = load_pretrained(
            task.model_class(),
            model_args.student_model_name_or_path,
            revision=model_args.student_model_revision,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=bool(head),
            **head,
        )
    else:
        model = build_from_config(task.model_class(), model_args.student_config, **head)
    processor_source = model_args.student_processor or model_args.student_model_name_or_path
    if processor_source is None and task.needs_processor:
        raise ValueError(
            "a student built from student_config needs student_processor (a tokenizer or image processor path)"
        )
    processor = task.load_processor(
        processor_source,
        revision=model_args.student_model_revision
        if processor_source == model_args.student_model_name_or_path
        else "main",
        trust_remote_code=model_args.trust_remote_code,
    )
    return model, processor


def kd_sim_target_fn(
    config: DistillationConfig, trainer: DistillationTrainer, train_dataset
) -> SyntheticTargetFn:
    """The ``kd_sim`` target function: its class similarity comes from the teacher's logit layer, else
    from the soft confusion of the trainer's teacher signal (online or cached) on the training set."""
    predictions = lambda: collect_predictions(  # noqa: E731
        train_dataset,
        trainer.task,
        student=trainer.model,
        teacher_signal=trainer.teacher_signal,
        batch_size=config.per_device_eval_batch_size,
        device=config.device,
    )
    permutation = getattr(trainer.teacher_signal, "label_permutation", None)
    if trainer.teacher_model is None:  # cached teacher: the soft-confusion fallback
        similarity, source = teacher_class_similarity(None, predictions, permutation)
    else:
        with full_teacher(trainer.teacher_model) as whole:  # sharded or offloaded weights made whole
            similarity, source = teacher_class_similarity(whole, predictions, permutation)
    logger.info("kd_sim: class similarity from the teacher's %s", source)
    return SyntheticTargetFn(
        "kd_sim", class_similarity=similarity, sim_temperature=config.synthetic_sim_temperature
    )


def run_distillation(
    data_args: DataArguments,
    model_args: ModelArguments,
    config: DistillationConfig,
    *,
    command: str | None = None,
    recipe_yaml: str | None = None,
) -> RunResult:
    """Load data, student and teacher; train; evaluate; save the student with its processor and model card
    (``command`` and ``recipe_yaml``: how to reproduce the run, quoted in the card); push it when
    ``config.push_to_hub``."""
    _check_sources(model_args, config)
    set_seed(config.seed)
    task = build_task(data_args)
    token_level = task.name == CausalLMTask.name  # a causal LM: vocabulary instead of label names
    metrics = None if token_level else ClassificationMetrics(data_args.metrics, model_args.trust_remote_code)
    splits = load_splits(data_args)
    cache = (
        load_teacher_cache(config.teacher_cache)
        if config.teacher_source == "cached" and config.uses_teacher
        else None
    )
    if cache is not None:  # checked to be the captured rows, joined before any row selection
        splits = cache.join(
            splits, task.name, [name for name in (data_args.train_split, data_args.eval_split) if name]
        )
    train = splits[data_args.train_split]
    labels = None if token_level else label_names(train, data_args.label_column)  # before labels are hidden
    if labels is not None and config.alpha > 0 and config.synthetic_teacher == "kd_topk":
        topk_count(config.synthetic_topk, len(labels))  # k must fit the label space
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.num_labeled_examples is not None:
        train = hide_labels(train, data_args.label_column, data_args.num_labeled_examples, config.seed)
    if not data_args.use_unlabeled:
        train = drop_unlabeled(train, data_args.label_column)
    evaluation = splits[data_args.eval_split] if data_args.eval_split else None
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))

    student, student_processor = load_student(task, model_args, labels)

    teacher, teacher_processor = None, None
    if config.teacher_source == "online" and config.uses_teacher:
        teacher_config = AutoConfig.from_pretrained(
            config.teacher_model_name_or_path,
            revision=config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
        task.teacher_output_map(
            teacher_config, student.config, config
        )  # label/vocabulary check before loading weights
        teacher_processor = task.load_processor(
            model_args.teacher_processor or config.teacher_model_name_or_path,
            revision="main" if model_args.teacher_processor else config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
        if token_level:
            check_same_vocabulary(teacher_processor, student_processor)  # before loading weights
            shared_vocab_size(
                vocab_size_of(teacher_config), vocab_size_of(student.config), len(student_processor)
            )
        teacher_processor = teacher_own_processor(task, teacher_processor, student_processor)
        teacher = load_pretrained(
            task.model_class(),
            config.teacher_model_name_or_path,
            revision=config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
            **(config.teacher_model_init_kwargs or {}),
        )
    teacher_signal = None
    if cache is not None:
        teacher_signal = CachedTeacher(
            cache.metadata.num_classes, cache.check_run(task, student.config, student_processor, config)
        )

    train_prepared = task.prepare(
        train, student_processor=student_processor, teacher_processor=teacher_processor
    )
    eval_prepared = (
        None
        if evaluation is None
        else task.prepare(
            evaluation, student_processor=student_processor, teacher_processor=teacher_processor
        )
    )
    if task.name == "image-classification":
        config.remove_unused_columns = False  # images are transformed on the fly from the raw columns

    card_info = run_card_info(
        data_args,
        config,
        student_parameters=count_parameters(student),
        teacher_parameters=None if teacher is None else count_parameters(teacher),
        cache_provenance=cache.metadata.provenance() if cache is not None else None,
        command=command,
        recipe_yaml=recipe_yaml,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        teacher_signal=teacher_signal,
        args=config,
        task=task,
        train_dataset=train_prepared,
        eval_dataset=eval_prepared,
        processing_class=student_processor,
        compute_metrics=metrics,  # LM: none (loss, loss_hard, loss_soft)
    )
    if config.alpha > 0 and config.synthetic_teacher == "kd_sim":  # kd_pt and kd_topk: built by the trainer
        trainer.target_fn = kd_sim_target_fn(config, trainer, train_prepared)
    if eval_prepared is not None and config.uses_teacher and not token_level:
        trainer.add_callback(KnowledgeCallback(trainer))
    trainer.card_info = card_info
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_prepared is not None else {}
    if metrics:
        trainer.save_metrics("eval", metrics)
    if teacher is not None:
        card_info.teacher_metrics = teacher_scores(trainer, eval_prepared)
    student.config.use_cache = True
    trainer.save_model(config.output_dir)  # writes the card; pushes student + card when config.push_to_hub
    return RunResult(
        metrics=metrics,
        student_parameters=count_parameters(student),
        teacher_parameters=None if teacher is None else count_parameters(teacher),
        trainer=trainer,
    )


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column text table of final metrics."""
    width = max((len(k) for k in metrics), default=0)
    return "\n".join(
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
        for k, v in sorted(metrics.items())
    )
