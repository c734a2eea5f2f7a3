"""The model and data arguments of ``scripts/distill.py`` (each field documented once, in its class's
docstring, which is also its ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from hf_kd.config.checks import check_choice, check_finite
from hf_kd.config.docs import documented

NO_SPLIT = ("none", "null", "")
"""Values of eval_split that turn evaluation off (compared lower-case)."""
STUDENT_INITS = ("config", "teacher")
"""The values of ``student_init``: fresh weights from ``student_config``, or the teacher's own layers."""
TASKS = ("text-classification", "image-classification", "causal-lm", "feature-classification")


@documented()
@dataclass
class ModelArguments:
    """The student model and the processors (``scripts/distill.py``).

    Parameters:
        student_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            The student: a Hub model id or a local directory. One of it and `student_config` is required.
        student_model_revision (`str`, *optional*, defaults to `"main"`):
            Revision (branch, tag or commit) of `student_model_name_or_path`.
        student_config (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Build the student from this model config instead, untrained (e.g.
            `{"model_type": "vit", "hidden_size": 32, ...}`); a string is read as YAML.
        student_processor (`str` or `None`, *optional*, defaults to `None`):
            The student's tokenizer or image processor (Hub id or directory); `None`: the student model's own.
        teacher_processor (`str` or `None`, *optional*, defaults to `None`):
            The teacher's tokenizer or image processor; `None`: the teacher model's own. For a causal LM,
            a tokenizer with another vocabulary than the student's makes the run a cross-tokenizer one
            (docs/knowledge.md#different-tokenizers): the teacher reads the same text through it.
        teacher_tokenizer (`str` or `None`, *optional*, defaults to `None`):
            Another name for `teacher_processor`, for causal LMs (the teacher's tokenizer); set one of them.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow model (and metric) code from the Hub. Leave it off unless you trust the repository.
        student_init (`str`, *optional*, defaults to `"config"`):
            How the student starts when it is not a checkpoint: `"config"` (fresh weights from
            `student_config`) or `"teacher"` (a copy of the teacher keeping only the layers
            `student_layers` / every `every_k`-th one, with its embeddings, head and norms: DistilBERT's
            initialisation; `hf_kd.student_init`). The teacher's labels must be the dataset's, in order.
        student_layers (`list[int]` or `None`, *optional*, defaults to `None`):
            With `student_init="teacher"`: the teacher layers kept (0-based, increasing), e.g. `[0, 2, 4]`.
        every_k (`int` or `None`, *optional*, defaults to `None`):
            With `student_init="teacher"`: keep teacher layers 0, k, 2k, ... instead of `student_layers`.
    """

    student_model_name_or_path: str | None = None
    student_model_revision: str = "main"
    student_config: dict | str | None = None
    student_processor: str | None = None
    teacher_processor: str | None = None
    teacher_tokenizer: str | None = None
    trust_remote_code: bool = False
    student_init: str = "config"
    student_layers: list[int] | None = None
    every_k: int | None = None

    def __post_init__(self) -> None:
        check_finite(self)
        if self.teacher_tokenizer is not None:
            if self.teacher_processor not in (None, self.teacher_tokenizer):
                raise ValueError(
                    f"teacher_tokenizer={self.teacher_tokenizer!r} and teacher_processor={self.teacher_processor!r} "
                    "name the same thing (the teacher's tokenizer) differently; set one of them"
                )
            self.teacher_processor = self.teacher_tokenizer
        if isinstance(self.student_config, str):
            self.student_config = yaml.safe_load(self.student_config)
        check_choice("student_init", self.student_init, STUDENT_INITS)
        if self.student_init == "teacher":
            if self.student_model_name_or_path or self.student_config:
                raise ValueError(
                    "student_init: teacher builds the student from the teacher's layers; remove "
                    "student_model_name_or_path / student_config"
                )
            if (self.student_layers is None) == (self.every_k is None):
                raise ValueError("student_init: teacher needs exactly one of student_layers and every_k")
            return
        if self.student_layers is not None or self.every_k is not None:
            raise ValueError("student_layers / every_k need student_init: teacher")
        if self.student_model_name_or_path is None and self.student_config is None:
            raise ValueError(
                "Give a student: student_model_name_or_path (Hub id or path) or student_config (train from scratch)"
            )


@documented()
@dataclass
class DataArguments:
    """The dataset and the task (``scripts/distill.py``).

    Parameters:
        task (`str`, *optional*, defaults to `"text-classification"`):
            One of `"text-classification"`, `"image-classification"`, `"causal-lm"`,
            `"feature-classification"`.
        dataset_name (`str` or `None`, *optional*, defaults to `None`):
            A Hub dataset id, a directory written by `save_to_disk`, or a data-file builder name (`csv`,
            `json`, `parquet`, ...).
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            The dataset's configuration name.
        data_files (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Data files of a builder dataset; a string starting with `{` is read as YAML.
        train_split (`str`, *optional*, defaults to `"train"`):
            The training split.
        eval_split (`str` or `None`, *optional*, defaults to `"test"`):
            The evaluation split; `None`, `"none"` or empty: no evaluation.
        text_column (`str`, *optional*, defaults to `"text"`):
            The text column (text tasks).
        text_pair_column (`str` or `None`, *optional*, defaults to `None`):
            The second text column of sentence-pair tasks.
        messages_column (`str`, *optional*, defaults to `"messages"`):
            causal-lm: the column of conversations (`[{role, content}, ...]`, rendered with the chat
            template).
        prompt_column (`str` or `None`, *optional*, defaults to `None`):
            causal-lm: read plain-text prompts from this column instead of conversations or text (with a
            chat template, when the tokenizer has one, a prompt is one user turn and its completion the
            assistant's reply; without one, prompt tokens then completion tokens). Rows without a
            completion are prompts only: their completions must all be generated (`lmbda: 1` or `seq_kd`).
        completion_column (`str`, *optional*, defaults to `"completion"`):
            causal-lm with `prompt_column`: the column of plain-text completions, when the dataset has it.
        completion_only_loss (`bool`, *optional*, defaults to `True`):
            causal-lm chat data: train (hard and soft term) on the assistant's tokens only; `False`: on
            every token.
        packing (`bool`, *optional*, defaults to `False`):
            causal-lm: pack whole examples into rows of `max_length` tokens (position ids restart per
            example).
        image_column (`str`, *optional*, defaults to `"image"`):
            The image column (image tasks).
        feature_column (`str`, *optional*, defaults to `"features"`):
            The feature-vector column (feature-classification).
        label_column (`str`, *optional*, defaults to `"label"`):
            The label column; a label of -1 or -100, or a missing one, marks an unlabelled row (soft term
            only).
        max_length (`int`, *optional*, defaults to `128`):
            Maximum tokens per example (≥ 1).
        max_train_samples (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first N training rows.
        max_eval_samples (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first N evaluation rows.
        num_labeled_examples (`int` or `None`, *optional*, defaults to `None`):
            Keep the labels of only N training rows (picked with the seed); the others become unlabelled
            transfer data.
        use_unlabeled (`bool`, *optional*, defaults to `True`):
            Train on rows without a label too (soft term only: the teacher labels them); `False` drops
            them.
        metrics (`list[str]`, *optional*, defaults to `["accuracy"]`):
            `evaluate` metrics: a built-in of hf_kd (`accuracy`, `f1`), a local module path, or a Hub
            metric name (runs its code: needs `trust_remote_code`).
    """

    task: str = "text-classification"
    dataset_name: str | None = None
    dataset_config: str | None = None
    data_files: dict | str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    text_column: str = "text"
    text_pair_column: str | None = None
    messages_column: str = "messages"
    prompt_column: str | None = None
    completion_column: str = "completion"
    completion_only_loss: bool = True
    packing: bool = False
    image_column: str = "image"
    feature_column: str = "features"
    label_column: str = "label"
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    num_labeled_examples: int | None = None
    use_unlabeled: bool = True
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])

    def __post_init__(self) -> None:
        check_finite(self)
        check_choice("task", self.task, TASKS)
        if self.eval_split is not None and self.eval_split.strip().lower() in NO_SPLIT:
            self.eval_split = None
        if isinstance(self.data_files, str) and self.data_files.lstrip().startswith("{"):
            self.data_files = yaml.safe_load(self.data_files)
        if self.num_labeled_examples is not None and self.num_labeled_examples < 0:
            raise ValueError(f"num_labeled_examples={self.num_labeled_examples!r} must be ≥ 0")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length!r} must be a positive number of tokens")
