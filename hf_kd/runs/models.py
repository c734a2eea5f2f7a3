"""A run's models phase: the student (from a checkpoint, from ``student_config``, or from the teacher's
layers) and the teacher, each config and processor checked before any weights load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PreTrainedModel

from hf_kd.config import DistillationConfig, ModelArguments
from hf_kd.modeling import check_model_fits, config_from_dict, load_pretrained, load_teacher, tokenizer_sizes
from hf_kd.student_init import choose_layers, describe_student_init, student_from_teacher
from hf_kd.tasks import Task, teacher_own_processor
from hf_kd.tasks.classification import label_names_of
from hf_kd.teachers.online import check_cross_tokenizer


@dataclass
class RunModels:
    """The models of a run.

    Args:
        student: the model trained.
        processor: the student's tokenizer or image processor.
        teacher: the teacher model, when the run loads one (else None: a cache, a served or synthetic
            teacher, or no teacher).
        teacher_processor: the teacher's own processor when it reads other inputs than the student's (another
            tokenizer), else None.
        student_init: the card's line for a student copied from the teacher's layers, else None.
    """

    student: PreTrainedModel
    processor: Any
    teacher: PreTrainedModel | None = None
    teacher_processor: Any = None
    student_init: str | None = None


def load_models(
    task: Task, model_args: ModelArguments, config: DistillationConfig, labels: list[str] | None
) -> RunModels:
    """The student and, when ``config.needs_teacher_model``, the teacher: the teacher's config and
    processor first, then the student, then the vocabularies compared (another one makes a
    cross-tokenizer run), the teacher's outputs mapped onto the student's and only then the teacher's
    weights (the student's teacher reused with ``student_init: teacher``)."""
    teacher_processor, teacher_config = None, None
    max_length = getattr(task, "max_length", None)  # text tasks: tokens per example
    if config.needs_teacher_model:  # its config, then its tokenizer, before any weights load
        teacher_config = AutoConfig.from_pretrained(
            config.teacher_model_name_or_path,
            revision=config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
        check_model_fits(task, teacher_config, "teacher", max_length=max_length)  # e.g. a text model, images
        teacher_processor = task.load_processor(
            model_args.teacher_processor or config.teacher_model_name_or_path,
            revision="main" if model_args.teacher_processor else config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
    init_teacher, student_init = None, None
    if model_args.student_init == "teacher":
        student, student_processor, init_teacher, student_init = teacher_initialised_student(
            task, model_args, config, labels, max_length
        )
    else:
        student, student_processor = load_student(task, model_args, labels, max_length)
    models = RunModels(student, student_processor, student_init=student_init)
    if not config.needs_teacher_model:
        return models  # a teacher loaded only to initialise the student is not kept
    if task.aligns_tokenizers:  # the vocabularies compared: another one makes a cross-tokenizer run
        task.use_processor(student_processor)
        task.use_teacher_tokenizer(teacher_processor)
        if task.vocabulary is not None:
            check_cross_tokenizer(config)
    task.teacher_output_map(teacher_config, student.config, config)  # labels / vocabularies
    models.teacher_processor = teacher_own_processor(task, teacher_processor, student_processor)
    if config.uses_features and models.teacher_processor is not None:
        raise ValueError(
            "hidden_loss / attention_weight compare the two models position by position: the teacher "
            "must read the student's inputs (same tokenizer or image processor)"
        )
    models.teacher = init_teacher or load_teacher(
        task,
        config.teacher_model_name_or_path,
        revision=config.teacher_model_revision,
        trust_remote_code=model_args.trust_remote_code,
        **(config.teacher_model_init_kwargs or {}),
    )
    return models


def load_student(task: Task, model_args: ModelArguments, labels: list[str] | None, max_length: int | None):
    """The student and its processor, from a checkpoint or freshly built from ``student_config`` (whose
    unset ``vocab_size`` and ``pad_token_id`` come from the tokenizer). Whether the architecture fits
    the task, the tokenizer and ``max_length`` is checked before any weights load."""
    head = (
        {}
        if labels is None
        else {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
        }
    )
    checkpoint = model_args.student_model_name_or_path
    processor_source = model_args.student_processor or checkpoint
    if processor_source is None and task.needs_processor:
        raise ValueError(
            "a student built from student_config needs student_processor (a tokenizer or image processor path)"
        )
    if checkpoint:  # its config before its processor: a text model for images is named as such
        model_config = AutoConfig.from_pretrained(
            checkpoint,
            revision=model_args.student_model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
        check_model_fits(task, model_config, "student", max_length=max_length)
    processor = task.load_processor(
        processor_source,
        revision=model_args.student_model_revision if processor_source == checkpoint else "main",
        trust_remote_code=model_args.trust_remote_code,
    )
    if not checkpoint:
        model_config = config_from_dict(model_args.student_config, tokenizer_sizes(processor), **head)
    check_model_fits(task, model_config, "student", processor=processor, max_length=max_length)
    if checkpoint:
        model = load_pretrained(
            task.model_class(),
            checkpoint,
            revision=model_args.student_model_revision,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=bool(head),
            **head,
        )
    else:
        model = task.model_class().from_config(model_config)
    return model, processor


def teacher_initialised_student(
    task: Task,
    model_args: ModelArguments,
    config: DistillationConfig,
    labels: list[str] | None,
    max_length: int | None,
):
    """``student_init: teacher``: the student is a copy of the teacher keeping the layers
    ``student_layers`` (or every ``every_k``-th), with its embeddings, head and norms, in float32. The
    teacher's config, labels (the dataset's, in order) and layer choice are checked before its weights
    load. Returns (student, processor, teacher, description for the card), the frozen teacher reused as
    the online teacher."""
    source, revision = config.teacher_model_name_or_path, config.teacher_model_revision
    trust = model_args.trust_remote_code
    teacher_config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust)
    check_model_fits(task, teacher_config, "teacher", max_length=max_length)
    if labels is not None and label_names_of(teacher_config) != labels:
        raise ValueError(
            f"student_init: teacher copies the teacher's head, whose labels {label_names_of(teacher_config)} "
            f"are not the dataset's {labels} in order"
        )
    depth = getattr(teacher_config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise ValueError(f"student_init: teacher: {source}'s config has no num_hidden_layers")
    layers = choose_layers(depth, model_args.student_layers, model_args.every_k)
    processor = task.load_processor(
        model_args.student_processor or source,
        revision="main" if model_args.student_processor else revision,
        trust_remote_code=trust,
    )
    teacher = load_teacher(
        task, source, revision=revision, trust_remote_code=trust, **(config.teacher_model_init_kwargs or {})
    )
    student = student_from_teacher(teacher, layers).float()
    return student, processor, teacher, describe_student_init(layers, depth, source)
