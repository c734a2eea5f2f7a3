"""One distillation run from parsed arguments: what ``scripts/distill.py`` does, callable from Python."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import EvalPrediction, IntervalStrategy, set_seed

from hf_kd.callbacks import KnowledgeCallback
from hf_kd.cards.model import DistillationCardInfo
from hf_kd.cards.run import run_card_info
from hf_kd.checkpoints import resolve_resume
from hf_kd.config import DataArguments, DistillationConfig, ModelArguments
from hf_kd.data.loading import dataset_inputs
from hf_kd.features import describe_feature_losses
from hf_kd.hub import HUB_FAILURES, PUSH_SCRIPT, HubPushError, hub_failure, prepare_repo, push_student
from hf_kd.modeling import check_model_source, count_parameters
from hf_kd.paths import refuse_overlap
from hf_kd.predictions import collect_predictions, teacher_class_similarity
from hf_kd.run_lock import output_dir_lock
from hf_kd.runs.models import RunModels, load_models
from hf_kd.runs.rows import RunRows, prepare_rows, select_rows
from hf_kd.runs.run_record import run_record, write_run_record
from hf_kd.tasks import CausalLMTask, Task, build_task
from hf_kd.tasks.classification import ClassificationMetrics
from hf_kd.teachers.contract import TeacherSignal
from hf_kd.teachers.placement import full_teacher
from hf_kd.teachers.signal import build_teacher_signal
from hf_kd.teachers.synthetic import SyntheticTargetFn
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
    """:func:`run_distillation`'s phases, under the lock: check → data → models → signal → train →
    evaluate → save. Everything that can be refused is refused before the first model loads."""
    checkpoint, repo_id = _check(data_args, model_args, config)
    set_seed(config.seed)
    task = build_task(data_args)
    metrics = (
        None if task.token_level else ClassificationMetrics(data_args.metrics, model_args.trust_remote_code)
    )
    rows = select_rows(data_args, config, task)
    models = load_models(task, model_args, config, rows.labels)
    teacher_signal = _signal(config, task, models, rows)
    card_info = _card_info(data_args, model_args, config, task, rows, models, command, recipe_yaml)
    trainer = _train(data_args, config, task, rows, models, teacher_signal, metrics, card_info, checkpoint)
    results = _evaluate(trainer, models, data_args, cross_tokenizer=_cross_tokenizer(task))
    _save(trainer, results, data_args, model_args, config, rows, models, repo_id)
    return RunResult(
        metrics=results,
        student_parameters=count_parameters(models.student),
        teacher_parameters=None if models.teacher is None else count_parameters(models.teacher),
        trainer=trainer,
    )


def _check(
    data_args: DataArguments, model_args: ModelArguments, config: DistillationConfig
) -> tuple[str | None, str | None]:
    """The check phase: the sources (:func:`_check_sources`), the checkpoint to resume from and the Hub
    repository to push to (:func:`_prepare_push`), before anything loads. Returns (checkpoint, repo id)."""
    _check_sources(data_args, model_args, config)
    checkpoint = resolve_resume(config.resume_from_checkpoint, config.output_dir)  # before any loading
    return checkpoint, _prepare_push(config)


def _signal(config: DistillationConfig, task: Task, models: RunModels, rows: RunRows) -> TeacherSignal | None:
    """The signal phase: the teacher signal of a run whose teacher is no loaded model (a cache, a served
    teacher, a synthetic target); None when the trainer builds it from the loaded teacher, once placed,
    or when the run has no teacher."""
    if not config.uses_teacher or config.source.loads_model:
        return None
    return build_teacher_signal(
        config, task, models.student, resource=rows.source, student_processor=models.processor
    )


def _cross_tokenizer(task: Task) -> bool:
    """Whether the teacher reads another tokenizer's tokens than the student."""
    return task.token_level and task.vocabulary is not None


def _card_info(
    data_args: DataArguments,
    model_args: ModelArguments,
    config: DistillationConfig,
    task: Task,
    rows: RunRows,
    models: RunModels,
    command: str | None,
    recipe_yaml: str | None,
) -> DistillationCardInfo:
    """What the model card says of the run (the teacher's scores are added by :func:`_evaluate`)."""
    tokenizers = None
    if _cross_tokenizer(task):
        tokenizers = describe_tokenizers(
            model_args.student_processor or model_args.student_model_name_or_path,
            model_args.teacher_processor or config.teacher_model_name_or_path,
            task,
        )
    return run_card_info(
        data_args,
        config,
        student_parameters=count_parameters(models.student),
        teacher_parameters=None if models.teacher is None else count_parameters(models.teacher),
        cache_provenance=rows.source.provenance() if hasattr(rows.source, "provenance") else None,
        command=command,
        recipe_yaml=recipe_yaml,
        student_source=model_args.student_model_name_or_path,
        student_init=models.student_init,
        feature_losses=describe_feature_losses(config),
        tokenizers=tokenizers,
    )


def _train(
    data_args: DataArguments,
    config: DistillationConfig,
    task: Task,
    rows: RunRows,
    models: RunModels,
    teacher_signal: TeacherSignal | None,
    metrics: ClassificationMetrics | None,
    card_info: DistillationCardInfo,
    checkpoint: str | None,
) -> DistillationTrainer:
    """The train phase: the rows prepared (:func:`hf_kd.runs.rows.prepare_rows`), the trainer built (with
    the ``kd_sim`` target and the knowledge callback where they apply) and trained, from ``checkpoint``
    when resuming; ``train_results.json`` written."""
    train, evaluation = prepare_rows(task, rows, models, data_args, config)
    if task.transforms_raw_rows:
        config.remove_unused_columns = False  # images are transformed on the fly from the raw columns
    trainer = DistillationTrainer(
        model=models.student,
        teacher_model=models.teacher,
        teacher_signal=teacher_signal,
        args=config,
        task=task,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=models.processor,
        compute_metrics=metrics,  # LM: none (loss, loss_hard, loss_soft)
    )
    if config.alpha > 0 and config.synthetic_teacher == "kd_sim":  # kd_pt and kd_topk: built by the trainer
        trainer.target_fn = kd_sim_target_fn(config, trainer, train)
    if evaluation is not None and config.uses_teacher:
        if not task.token_level or trainer.teacher_signal.teachers:  # an LM: each teacher's agreement only
            trainer.add_callback(KnowledgeCallback(trainer, levels=not task.token_level))
    if trainer.temperature_choice is not None:  # temperature: auto, set by the trainer: the card says why
        card_info.temperature = config.temperature = trainer.args.temperature
        card_info.temperature_auto = trainer.temperature_choice.because
    trainer.card_info = card_info
    trainer.save_metrics("train", trainer.train(resume_from_checkpoint=checkpoint).metrics)
    return trainer


def _evaluate(
    trainer: DistillationTrainer, models: RunModels, data_args: DataArguments, *, cross_tokenizer: bool
) -> dict[str, float]:
    """The evaluate phase: the student's final metrics, and the teacher's scores by the same measures
    (:func:`teacher_scores`, kept on the card); empty without an evaluation split."""
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    if models.teacher is not None:
        card_info = trainer.card_info
        card_info.teacher_metrics = teacher_scores(
            trainer, trainer.eval_dataset, cross_tokenizer=cross_tokenizer
        )
        scores = ", ".join(f"{key}={value:.6g}" for key, value in sorted(card_info.teacher_metrics.items()))
        logger.info("Teacher on the %r split: %s", data_args.eval_split, scores)
        if cross_tokenizer:
            logger.info(
                "The teacher's tokens are not the student's: only bits per byte (of the same text) compares "
                "them; its per-token cross-entropy and perplexity are left out"
            )
    return metrics


def _save(
    trainer: DistillationTrainer,
    metrics: dict[str, float],
    data_args: DataArguments,
    model_args: ModelArguments,
    config: DistillationConfig,
    rows: RunRows,
    models: RunModels,
    repo_id: str | None,
) -> None:
    """The save phase: ``eval_results.json`` (with the teacher's scores), ``trainer_state.json``, the
    student with its processor and card, the run record; then the push, when asked."""
    card_info = trainer.card_info
    if metrics:
        teacher_results = {f"teacher_{key}": value for key, value in card_info.teacher_metrics.items()}
        trainer.save_metrics("eval", metrics | teacher_results)
    trainer.save_state()  # trainer_state.json: the full log history, whatever the save_strategy
    models.student.config.use_cache = True
    trainer.save_model(config.output_dir)  # with the card
    if not trainer.is_world_process_zero():
        return
    record = run_record(
        data_args,
        model_args,
        config,
        trainer.state,
        card_info,
        labelled_rows=len(rows.train) - rows.unlabelled_rows,
        unlabelled_rows=rows.unlabelled_rows,
        inert_rows_dropped=rows.inert_rows_dropped,
    )
    write_run_record(config.output_dir, record)
    if repo_id is not None:
        push_student(
            config.output_dir,
            repo_id,
            token=config.hub_token,
            private=config.hub_private_repo,
            revision=config.hub_revision,
        )


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column text table of final metrics."""
    width = max((len(k) for k in metrics), default=0)
    return "\n".join(
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
        for k, v in sorted(metrics.items())
    )
