"""One distillation run from parsed arguments: what ``scripts/distill.py`` does, callable from Python."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, EvalPrediction, IntervalStrategy, set_seed

from hf_kd.callbacks import KnowledgeCallback
from hf_kd.cards.run import run_card_info
from hf_kd.checkpoints import resolve_resume
from hf_kd.config import DataArguments, DistillationConfig, ModelArguments
from hf_kd.data.labels import count_unlabeled, drop_unlabeled, hide_labels, label_names
from hf_kd.data.loading import dataset_inputs, load_splits
from hf_kd.features import describe_feature_losses
from hf_kd.hub import HUB_FAILURES, PUSH_SCRIPT, HubPushError, hub_failure, prepare_repo, push_student
from hf_kd.modeling import (
    check_model_fits,
    check_model_source,
    config_from_dict,
    count_parameters,
    load_pretrained,
    load_teacher,
    tokenizer_sizes,
)
from hf_kd.on_policy import check_prompts_only
from hf_kd.paths import refuse_overlap
from hf_kd.predictions import collect_predictions, teacher_class_similarity
from hf_kd.run_lock import output_dir_lock
from hf_kd.runs.run_record import run_record, write_run_record
from hf_kd.student_init import choose_layers, describe_student_init, student_from_teacher
from hf_kd.tasks import CausalLMTask, Task, build_task, teacher_own_processor
from hf_kd.tasks.classification import ClassificationMetrics, label_names_of
from hf_kd.tasks.lm_targets import drop_rows_without_target
from hf_kd.teachers.online import check_cross_tokenizer
from hf_kd.teachers.placement import full_teacher
from hf_kd.teachers.signal import build_teacher_signal, open_teacher_source
from hf_kd.teachers.synthetic import SyntheticTargetFn, topk_count
from hf_kd.trainer import DistillationTrainer

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced: final evaluation metrics, sizes, and the trainer (for further use)."""

    metrics: dict[str, float]
    student_parameters: int
    teacher_parameters: int | None
    trainer: DistillationTrainer


def _check_sources(data_args: DataArguments, model_args: ModelArguments, config: DistillationConfig) -> None:
    """Everything that can be checked before loading anything."""
    refuse_overlap(
        "output_dir",
        config.output_dir,
        {
            "student_model_name_or_path": model_args.student_model_name_or_path,
            "student_processor": model_args.student_processor,
            "teacher_model_name_or_path": config.teacher_model_name_or_path,
            "teacher_processor": model_args.teacher_processor,
            "teacher_cache": config.teacher_cache,
            **dataset_inputs(data_args),
        },
    )
    if model_args.student_model_name_or_path:
        check_model_source("student_model_name_or_path", model_args.student_model_name_or_path)
    if model_args.student_init == "teacher":
        if not config.teacher_model_name_or_path:
            raise ValueError(
                "student_init: teacher needs teacher_model_name_or_path (the model whose layers it copies)"
            )
        check_model_source("teacher_model_name_or_path", config.teacher_model_name_or_path)
    if config.needs_teacher_model:
        if not config.teacher_model_name_or_path:
            raise ValueError(
                f"alpha={config.alpha} with an online teacher needs teacher_model_name_or_path (or set "
                "alpha: 0); seq_kd: true needs it too, to write completions"
            )
        check_model_source("teacher_model_name_or_path", config.teacher_model_name_or_path)
    if data_args.eval_split is None and config.eval_strategy != IntervalStrategy.NO:
        if config.load_best_model_at_end:
            raise ValueError("load_best_model_at_end needs an evaluation split, and eval_split is none")
        config.eval_strategy, config.do_eval = IntervalStrategy.NO, False  # nothing to evaluate on


def _prepare_push(config: DistillationConfig) -> str | None:
    """With ``push_to_hub``: the student's repo id, its repository created now (main process) so that a bad
    token or an unreachable Hub stops the run before any work; the Trainer's own pushes are turned off
    (``config.push_to_hub`` becomes False): the run pushes the saved student once, at the end. None
    without ``push_to_hub``."""
    if not config.push_to_hub:
        return None
    repo_id = config.hub_model_id or Path(config.output_dir).absolute().name
    if config.should_save:
        try:
            repo_id = prepare_repo(
                repo_id, token=config.hub_token, private=config.hub_private_repo, revision=config.hub_revision
            )
        except HUB_FAILURES as err:
            raise HubPushError(
                f"{hub_failure(err)} while creating {repo_id}; nothing was trained. Fix the connection or "
                f"token, or train with push_to_hub: false and push later with {PUSH_SCRIPT}"
            ) from err
    config.push_to_hub = False
    return repo_id


def describe_tokenizers(student_name: str | None, teacher_name: str, task: CausalLMTask) -> str:
    """The card's line for a cross-tokenizer run: both tokenizers and how many tokens they share."""
    shared = len(task.vocabulary.student_ids)
    return (
        f"student `{student_name}` ({len(task.tokenizer)} tokens), teacher `{teacher_name}` "
        f"({len(task.teacher_tokenizer)} tokens); different vocabularies, {shared} tokens shared: "
        f"cross-tokenizer distillation (exact part on shared single-token spans, ULD on the rest)"
    )


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
    signal = trainer.teacher_signal
    if signal.model is None:  # cached teacher: the soft-confusion fallback
        similarity, source = teacher_class_similarity(None, predictions, signal.output_map)
    else:
        with full_teacher(signal.model) as whole:  # sharded or offloaded weights made whole
            similarity, source = teacher_class_similarity(whole, predictions, signal.output_map)
    logger.info("kd_sim: class similarity from the teacher's %s", source)
    return SyntheticTargetFn(
        "kd_sim", class_similarity=similarity, sim_temperature=config.synthetic_sim_temperature
    )


def drop_inert_rows(train, label_column: str, config: DistillationConfig):
    """Without a soft term (alpha = 0, or a label-only target) an unlabelled row has nothing to learn
    from: drop such rows, in one log line, so they cannot change the run's budget unannounced."""
    unlabeled = count_unlabeled(train, label_column)
    if unlabeled == 0:
        return train
    logger.warning(
        "dropping the %d unlabelled training rows: alpha=%s with synthetic_teacher=%r has no soft term, "
        "so nothing is learnt from them (they would only fill batches and add steps); %d labelled rows remain",
        unlabeled,
        config.alpha,
        config.synthetic_teacher,
        len(train) - unlabeled,
    )
    return drop_unlabeled(train, label_column)


def teacher_scores(trainer, dataset, *, cross_tokenizer: bool = False) -> dict[str, float]:
    """The teacher's scores on ``dataset`` by the student's own evaluation measures: its mean
    cross-entropy on the labels (``eval_loss_hard``; with ``eval_perplexity`` and ``eval_bits_per_byte``
    for a causal LM, see ``DistillationTrainer.teacher_hard_totals``) and, for a run with
    ``compute_metrics``, the task metrics of one prediction pass over its logits (gathered over every
    process). A teacher of another tokenizer (``cross_tokenizer``) is scored on its own tokens of the
    same text, so only ``eval_bits_per_byte`` compares with the student's. Every process must call it."""
    if dataset is None:
        return {}
    scores = trainer.hard_scores(*trainer.teacher_hard_totals(dataset))
    if cross_tokenizer:
        return {key: value for key, value in scores.items() if key == "eval_bits_per_byte"}
    if trainer.compute_metrics is None:
        return scores
    output = trainer.predict(dataset, metric_key_prefix="eval")
    if isinstance(output.predictions, tuple) and len(output.predictions) == 2:
        metrics = trainer.compute_metrics(
            EvalPrediction(predictions=output.predictions[1], label_ids=output.label_ids)
        )
        scores |= {f"eval_{name}": value for name, value in metrics.items()}
    return scores


def run_distillation(
    data_args: DataArguments,
    model_args: ModelArguments,
    config: DistillationConfig,
    *,
    command: str | None = None,
    recipe_yaml: str | None = None,
) -> RunResult:
    """Load data, student and teacher; train; evaluate student and teacher; save the student with its
    processor and model card (``command`` and ``recipe_yaml``: how to reproduce the run, quoted in the card,
    secrets redacted), the results (``train_results.json``, ``eval_results.json``) and the log history
    (``trainer_state.json``) into ``output_dir``; push the student when ``config.push_to_hub`` (a failed
    push raises :class:`hf_kd.hub.HubPushError` after everything is saved). The run holds ``output_dir``'s
    lock throughout (:func:`hf_kd.run_lock.output_dir_lock`): a second run into it is refused by name."""
    with output_dir_lock(config.output_dir, main=config.process_index == 0):
        return _distill(data_args, model_args, config, command=command, recipe_yaml=recipe_yaml)


def _distill(
    data_args: DataArguments,
    model_args: ModelArguments,
    config: DistillationConfig,
    *,
    command: str | None,
    recipe_yaml: str | None,
) -> RunResult:
    """:func:`run_distillation`'s work, under the lock."""
    _check_sources(data_args, model_args, config)
    checkpoint = resolve_resume(config.resume_from_checkpoint, config.output_dir)  # before any loading
    repo_id = _prepare_push(config)
    set_seed(config.seed)
    task = build_task(data_args)
    token_level = task.token_level  # a causal LM: vocabulary instead of label names
    metrics = None if token_level else ClassificationMetrics(data_args.metrics, model_args.trust_remote_code)
    splits = load_splits(data_args)
    check_prompts_only(
        config, splits[data_args.train_split].column_names, task, f"split {data_args.train_split!r}"
    )
    # the source opened before any model loads and any row is selected (a cache: loaded, checked, joined)
    source_resource, splits = open_teacher_source(
        config, task, splits, [name for name in (data_args.train_split, data_args.eval_split) if name]
    )
    train = splits[data_args.train_split]
    labels = None if token_level else label_names(train, data_args.label_column)  # before labels are hidden
    if labels is not None and config.alpha > 0 and config.synthetic_teacher == "kd_topk":
        topk_count(config.synthetic_topk, len(labels))  # k must fit the label space
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.num_labeled_examples is not None:
        train = hide_labels(train, data_args.label_column, data_args.num_labeled_examples, config.seed)
    rows_before_drop = len(train)
    if not data_args.use_unlabeled:
        train = drop_unlabeled(train, data_args.label_column)
        rows_before_drop = len(train)  # dropped by choice, not inert
    elif labels is not None and not config.uses_teacher:
        train = drop_inert_rows(train, data_args.label_column, config)
    if len(train) == 0:  # before any model loads
        raise ValueError(
            f"no training row is left to learn from in split {data_args.train_split!r} "
            f"(num_labeled_examples={data_args.num_labeled_examples}, use_unlabeled={data_args.use_unlabeled}, "
            f"alpha={config.alpha}, max_train_samples={data_args.max_train_samples}): unlabelled rows teach only "
            "through a soft term (alpha > 0 with a teacher), and use_unlabeled: false drops them"
        )
    unlabelled_rows = count_unlabeled(train, data_args.label_column)
    evaluation = splits[data_args.eval_split] if data_args.eval_split else None
    if evaluation is not None:
        check_prompts_only(
            config, evaluation.column_names, task, f"split {data_args.eval_split!r}", evaluation=True
        )
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))

    teacher, teacher_processor, teacher_config = None, None, None
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

    if config.needs_teacher_model:
        if task.aligns_tokenizers:  # the vocabularies compared: another one makes a cross-tokenizer run
            task.use_processor(student_processor)
            task.use_teacher_tokenizer(teacher_processor)
            if task.vocabulary is not None:
                check_cross_tokenizer(config)
        task.teacher_output_map(teacher_config, student.config, config)  # labels / vocabularies
        teacher_processor = teacher_own_processor(task, teacher_processor, student_processor)
        if config.uses_features and teacher_processor is not None:
            raise ValueError(
                "hidden_loss / attention_weight compare the two models position by position: the teacher "
                "must read the student's inputs (same tokenizer or image processor)"
            )
        teacher = init_teacher or load_teacher(
            task,
            config.teacher_model_name_or_path,
            revision=config.teacher_model_revision,
            trust_remote_code=model_args.trust_remote_code,
            **(config.teacher_model_init_kwargs or {}),
        )
    del init_teacher  # a teacher loaded only to initialise the student is not kept
    teacher_signal = None  # a loaded teacher's is built by the trainer, once the teacher is placed
    if config.uses_teacher and not config.source.loads_model:
        teacher_signal = build_teacher_signal(
            config, task, student, resource=source_resource, student_processor=student_processor
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
    if token_level:  # rows with no token to learn only add steps; a split of only such rows is refused
        if not (config.lmbda == 1 or config.seq_kd):  # else every completion is generated from the prompts
            where = f"split {data_args.train_split!r}"
            train_prepared = drop_rows_without_target(train_prepared, where, task.max_length)
        if eval_prepared is not None:
            where = f"split {data_args.eval_split!r}"
            eval_prepared = drop_rows_without_target(eval_prepared, where, task.max_length)
    if task.name == "image-classification":
        config.remove_unused_columns = False  # images are transformed on the fly from the raw columns
    cross_tokenizer = token_level and task.vocabulary is not None
    tokenizers = None
    if cross_tokenizer:
        tokenizers = describe_tokenizers(
            model_args.student_processor or model_args.student_model_name_or_path,
            model_args.teacher_processor or config.teacher_model_name_or_path,
            task,
        )

    card_info = run_card_info(
        data_args,
        config,
        student_parameters=count_parameters(student),
        teacher_parameters=None if teacher is None else count_parameters(teacher),
        cache_provenance=source_resource.provenance() if hasattr(source_resource, "provenance") else None,
        command=command,
        recipe_yaml=recipe_yaml,
        student_source=model_args.student_model_name_or_path,
        student_init=student_init,
        feature_losses=describe_feature_losses(config),
        tokenizers=tokenizers,
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
    trainer.save_metrics("train", trainer.train(resume_from_checkpoint=checkpoint).metrics)
    metrics = trainer.evaluate() if eval_prepared is not None else {}
    if teacher is not None and eval_prepared is not None:
        card_info.teacher_metrics = teacher_scores(trainer, eval_prepared, cross_tokenizer=cross_tokenizer)
        scores = ", ".join(f"{key}={value:.6g}" for key, value in sorted(card_info.teacher_metrics.items()))
        logger.info("Teacher on the %r split: %s", data_args.eval_split, scores)
        if cross_tokenizer:
            logger.info(
                "The teacher's tokens are not the student's: only bits per byte (of the same text) compares "
                "them; its per-token cross-entropy and perplexity are left out"
            )
    if metrics:
        teacher_results = {f"teacher_{key}": value for key, value in card_info.teacher_metrics.items()}
        trainer.save_metrics("eval", metrics | teacher_results)
    trainer.save_state()  # trainer_state.json: the full log history, whatever the save_strategy
    student.config.use_cache = True
    trainer.save_model(config.output_dir)  # with the card
    if trainer.is_world_process_zero():
        record = run_record(
            data_args,
            model_args,
            config,
            trainer.state,
            card_info,
            labelled_rows=len(train) - unlabelled_rows,
            unlabelled_rows=unlabelled_rows,
            inert_rows_dropped=rows_before_drop - len(train),
        )
        write_run_record(config.output_dir, record)
    if repo_id is not None and trainer.is_world_process_zero():
        push_student(
            config.output_dir,
            repo_id,
            token=config.hub_token,
            private=config.hub_private_repo,
            revision=config.hub_revision,
        )
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
