"""Task adapters: preprocessing, collation and how a batch becomes distillation instances."""

from hf_kd.tasks.base import (
    CACHE_PREFIX,
    NO_LABEL,
    TEACHER_INPUT_PREFIX,
    KDItems,
    Task,
    processor_fingerprint,
    split_batch,
    teacher_own_processor,
)
from hf_kd.tasks.causal_lm import CausalLMTask
from hf_kd.tasks.classification import ImageClassificationTask, TextClassificationTask
from hf_kd.tasks.features import FeatureClassificationTask


def build_task(data_args) -> Task:
    """The task adapter named by ``data_args.task`` (a ``hf_kd.config.DataArguments``)."""
    if data_args.task == "text-classification":
        return TextClassificationTask(
            data_args.text_column, data_args.text_pair_column, data_args.label_column, data_args.max_length
        )
    if data_args.task == "image-classification":
        return ImageClassificationTask(data_args.image_column, data_args.label_column)
    if data_args.task == "feature-classification":
        return FeatureClassificationTask(data_args.feature_column, data_args.label_column)
    if data_args.task == "causal-lm":
        return CausalLMTask(
            data_args.text_column,
            data_args.messages_column,
            data_args.max_length,
            data_args.completion_only_loss,
            data_args.packing,
            prompt_column=data_args.prompt_column,
            completion_column=data_args.completion_column,
        )
    raise ValueError(f"task={data_args.task!r} has no adapter yet")


def task_for_model(model) -> Task:
    """The task a model's head implies (a ``PreTrainedModel``), for users who pass no task."""
    name = type(model).__name__
    if name.endswith("ForImageClassification"):
        return ImageClassificationTask()
    if name.endswith("ForSequenceClassification"):
        return TextClassificationTask()
    if name.endswith("ForCausalLM"):
        return CausalLMTask()
    raise ValueError(f"cannot infer the task of a {name}; pass task=... (see hf_kd.tasks)")


__all__ = [
    "CACHE_PREFIX",
    "CausalLMTask",
    "FeatureClassificationTask",
    "NO_LABEL",
    "TEACHER_INPUT_PREFIX",
    "ImageClassificationTask",
    "KDItems",
    "Task",
    "TextClassificationTask",
    "build_task",
    "processor_fingerprint",
    "teacher_own_processor",
    "split_batch",
    "task_for_model",
]
