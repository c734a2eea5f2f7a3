"""DistillationTrainer: a ``transformers.Trainer`` whose loss mixes hard labels with a teacher signal.

Plumbing only. Where the teacher's logits come from (online model, cache, uniform) is a *teacher
signal* (``hf_kd.teachers.signal``: one interface, built by one factory); what is distilled from them
(the real teacher or a synthetic one) is a *target function*; how a batch becomes distillation
instances is the *task*. The math is ``hf_kd.losses``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from hf_kd.cards.model import DistillationCardInfo, write_model_card
from hf_kd.cards.run import with_latest_evaluation
from hf_kd.checkpoints import CompleteCheckpointsMixin, resolve_resume
from hf_kd.completion_log import CompletionLog
from hf_kd.config import DistillationConfig
from hf_kd.data.labels import count_unlabeled
from hf_kd.features import FeatureDistiller
from hf_kd.generation import Generator
from hf_kd.hidden_states import check_student_for_hidden_states, student_hidden_states
from hf_kd.losses import HiddenStates, TargetFn, distillation_loss
from hf_kd.modeling import check_model_source, freeze, load_teacher, logit_layer_weight
from hf_kd.on_policy import GENERATED_KEY, check_prompt_rows, check_prompts_only, on_policy_batches
from hf_kd.on_policy_watch import OnPolicyWatch
from hf_kd.paths import refuse_overlap
from hf_kd.run_lock import output_dir_lock
from hf_kd.tasks import Task, split_batch, task_for_model
from hf_kd.tasks.base import (
    ALIGNMENT_PREFIX,
    CACHE_PREFIX,
    NO_LABEL,
    TEACHER_INPUT_PREFIX,
    TEXT_BYTES,
    row_columns,
)
from hf_kd.tasks.causal_lm import bits_per_byte, scored_bytes
from hf_kd.teachers.contract import TeacherSignal, check_teacher_signal
from hf_kd.teachers.placement import place_teacher
from hf_kd.teachers.signal import build_teacher_signal
from hf_kd.teachers.synthetic import SyntheticTargetFn
from hf_kd.training_guard import FiniteStepGuard, check_window

GRAD_KEYS = ("grad_hard", "grad_soft", "n_grad")
"""Sums of the logged terms' gradient norms (:meth:`DistillationTrainer._record_term_gradients`) and their count."""

logger = logging.getLogger(__name__)


class ZeroGradsAfterStep(TrainerCallback):
    """Clears ``module``'s gradients after each optimizer step, as Trainer does for the model's only:
    a module trained beside the model (the feature projection) would otherwise add up its gradients
    over every step."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def on_step_end(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


class DistillationTrainer(CompleteCheckpointsMixin, Trainer):
    """Trains ``model`` (the student) on ``(1 − α)·CE + α·s·D(teacher^τ, student^τ)``.

    Args:
        model: the student.
        teacher_model: a model, or a Hub id / local path loaded with ``from_pretrained`` (safetensors,
            ``args.teacher_model_init_kwargs``). Frozen, in eval mode, run without autograd, never saved.
        args: a :class:`hf_kd.DistillationConfig`.
        task: the task adapter (default: inferred from the student's head: sequence or image
            classification, causal LM).
        teacher_signal: where teacher logits come from (:class:`hf_kd.teachers.contract.TeacherSignal`,
            checked; its ``collator`` wraps the data collator);
            default: :func:`~hf_kd.teachers.signal.build_teacher_signal` from ``args`` and ``teacher_model``
            (the online teacher, or the uniform teacher for ``synthetic_teacher='ls'``).
        target_fn: maps the teacher's log p^τ to the distilled target (a synthetic teacher); default none.
        generator: samples the completions of on-policy batches (``args.lmbda`` > 0 or ``args.seq_kd``;
            :class:`hf_kd.generation.Generator`); default Transformers' ``generate``.
        **kwargs: any other ``transformers.Trainer`` argument (``compute_metrics``, callbacks, ...), as
            ``transformers.Trainer`` takes them:

            - ``train_dataset`` / ``eval_dataset``: processed rows (``input_ids`` or ``pixel_values``, with
              ``label``/``labels``; causal-LM rows without labels are their own targets), or raw rows
              (the task's text, messages or image column) that ``task.prepare`` processes with
              ``processing_class``;
            - ``processing_class``: the student's tokenizer or image processor (pads batches, prepares raw rows);
            - ``data_collator``: used as given; by default the task's collator (padding with the tokenizer,
              else with the student's pad id; stacking pixel values; teacher and cached columns kept).
    """

    # compute_loss normalises by the item counts of the whole accumulation window (get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillationConfig | None = None,
        task: Task | None = None,
        teacher_signal: TeacherSignal | None = None,
        target_fn: TargetFn | None = None,
        generator: Generator | None = None,
        **kwargs: Any,
    ):
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a hf_kd.DistillationConfig, got {type(args).__name__}")
        self.task = task or task_for_model(model)
        self._prepare_datasets(model, args, kwargs)
        if isinstance(teacher_model, str):
            refuse_overlap("output_dir", args.output_dir, {"teacher_model": teacher_model})
            check_model_source("teacher_model_name_or_path", teacher_model)
            teacher_model = load_teacher(
                self.task,
                teacher_model,
                revision=args.teacher_model_revision,
                **(args.teacher_model_init_kwargs or {}),
            )
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = self.task.collate
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = None
        if teacher_model is not None:
            self.teacher_model = place_teacher(
                freeze(teacher_model), self.accelerator, cpu_offload=args.teacher_cpu_offload
            )
        if teacher_signal is None:
            teacher_signal = build_teacher_signal(
                args, self.task, self.model, teacher_model=self.teacher_model
            )
        if teacher_signal is not None:  # the contract (hf_kd.teachers.contract), whatever the source
            check_teacher_signal(teacher_signal)
            if args.lmbda > 0 and not teacher_signal.scores_samples:
                raise ValueError(
                    f"lmbda={args.lmbda}: {type(teacher_signal).__name__} cannot score the student's sampled "
                    "completions (scores_samples is False); use a teacher that can, or lmbda: 0"
                )
            self.data_collator = teacher_signal.collator(self.data_collator)
        self.teacher_signal: TeacherSignal | None = teacher_signal
        if target_fn is None and args.alpha > 0 and args.synthetic_teacher in ("kd_pt", "kd_topk"):
            target_fn = SyntheticTargetFn(args.synthetic_teacher, k=args.synthetic_topk)
        self.target_fn = target_fn
        if args.student_logits_from_hidden_states:
            check_student_for_hidden_states(
                self.task,
                self.model,
                sharded=self.is_fsdp_enabled or is_deepspeed_zero3_enabled(),
                compute_metrics=self.compute_metrics,
            )
        self.features = (
            FeatureDistiller(args, self.task, self.model, getattr(self.teacher_signal, "model", None))
            if args.uses_features
            else None
        )
        """Feature losses (``hf_kd.features``): hidden states and attention relations, with the projection
        trained alongside the student (in its optimizer, never saved into it); None when off."""
        if self.features is not None:
            self.add_callback(ZeroGradsAfterStep(self.features))
        self._kd_sums: dict[str, dict[str, torch.Tensor]] = {
            "train": defaultdict(float),
            "eval": defaultdict(float),
        }
        modules = [self.model] + ([self.features] if self.features is not None else [])
        reduce = lambda flag: self.accelerator.reduce(flag, reduction="sum")  # noqa: E731
        self.add_callback(FiniteStepGuard(self._kd_sums["train"], modules, reduce))
        self._output_layer_checked = False
        self._part_names: set[str] = set()
        """The names of the loss parts logged on their own (``LossTerms.parts``), as they appear."""
        self.on_policy = on_policy_batches(
            args,
            self.task,
            self.model,
            self.processing_class,
            teacher=self.teacher_model,
            process_index=args.process_index,
            generator=generator,
        )
        if self.on_policy is not None and isinstance(self.train_dataset, Dataset):
            check_prompt_rows(self.train_dataset, self.task.max_length)
        if self.on_policy is not None and 0 < args.lmbda < 1 and not args.seq_kd:
            self.add_callback(OnPolicyWatch())  # warns when the student's samples are far from the data's
        self.completion_log = (
            CompletionLog(args.output_dir, args.num_completions_to_log, self.processing_class)
            if args.log_completions and self.is_world_process_zero()
            else None
        )
        """A few sampled completions per logging step with both models' per-token log-probs
        (``hf_kd.completion_log``; ``args.log_completions``, main process); None when off."""
        if self.completion_log is not None:
            self.add_callback(self.completion_log)
        self.card_info: DistillationCardInfo | None = None
        """The distillation model card (``hf_kd.cards.run``): when set, written as README.md wherever the
        student is saved (checkpoints, ``save_model``) and pushed with it by ``push_to_hub``."""

    def _prepare_datasets(
        self, model: PreTrainedModel | None, args: DistillationConfig, kwargs: dict[str, Any]
    ) -> None:
        """Set the task's collation up from ``processing_class`` and process raw rows of ``train_dataset``
        and ``eval_dataset`` (a dataset or a dict of them) in ``kwargs``, before anything loads; raw
        prompt-only training rows need every completion generated, and evaluation rows need completions
        (``check_prompts_only``)."""
        processor = kwargs.get("processing_class")
        evaluation = kwargs.get("eval_dataset")
        splits = [("train_dataset", kwargs.get("train_dataset"), False)]
        if isinstance(evaluation, dict):
            splits += [(f"eval_dataset[{name!r}]", split, True) for name, split in evaluation.items()]
        else:
            splits.append(("eval_dataset", evaluation, True))
        for where, split, is_evaluation in splits:
            columns = row_columns(split)
            if columns is not None and getattr(self.task, "prompt_column", None) in columns:
                check_prompts_only(args, columns, self.task, where, evaluation=is_evaluation)
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.task.use_processor(processor, pad_token_id=pad_token_id)
        for key in ("train_dataset", "eval_dataset"):
            dataset = kwargs.get(key)
            if isinstance(dataset, dict):
                kwargs[key] = {
                    name: self.task.prepare_if_raw(
                        split, student_processor=processor, name=f"{key}[{name!r}]"
                    )
                    for name, split in dataset.items()
                }
            elif dataset is not None:
                kwargs[key] = self.task.prepare_if_raw(dataset, student_processor=processor, name=key)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, after checking that a ``kd_sim`` run was given its target function (its
        class similarity needs the teacher or data: see ``hf_kd.runs.distill.kd_sim_target_fn``).
        ``resume_from_checkpoint=True`` resumes from the latest *complete* checkpoint in ``output_dir``
        (an error when there is none); a path must be a complete checkpoint."""
        if self.args.alpha > 0 and self.args.synthetic_teacher == "kd_sim" and self.target_fn is None:
            raise ValueError(
                "synthetic_teacher='kd_sim' needs target_fn=SyntheticTargetFn('kd_sim', class_similarity=S); "
                "scripts/distill.py builds S from the teacher (hf_kd.runs.distill.kd_sim_target_fn)"
            )
        self._warn_of_inert_rows()
        checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        with output_dir_lock(self.args.output_dir, main=self.args.process_index == 0):  # one run per folder
            return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def _warn_of_inert_rows(self) -> None:
        """Without a soft term, unlabelled rows only fill batches: say how many (scripts/distill.py drops them)."""
        if self.args.uses_teacher or not isinstance(self.train_dataset, Dataset):
            return
        for column in ("labels", "label"):
            unlabeled = count_unlabeled(self.train_dataset, column)
            if unlabeled:
                logger.warning(
                    "%d of the %d training rows have no label and alpha=%s with synthetic_teacher=%r has no "
                    "soft term: nothing is learnt from them, yet they fill batches and add optimizer steps; "
                    "drop them (hf_kd.data.loading.drop_unlabeled)",
                    unlabeled,
                    len(self.train_dataset),
                    self.args.alpha,
                    self.args.synthetic_teacher,
                )
                return

    # ---- saving: the distillation card goes wherever the student goes ---------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir)

    def create_model_card(self, output_dir: str | None = None, **kwargs: Any) -> None:
        """Write the distillation card with the latest evaluation scores (the Trainer's generic card
        when ``card_info`` is unset); main process only."""
        if self.card_info is None:
            return super().create_model_card(**kwargs)
        if self.is_world_process_zero():
            write_model_card(
                with_latest_evaluation(self.card_info, self.state.log_history),
                output_dir or self.args.output_dir,
            )

    # ---- the teacher's own scores, by the student's measures ---------------------------------

    def teacher_hard_totals(self, dataset) -> tuple[float, float, float]:
        """The teacher's (summed cross-entropy on the labels, labelled items, bytes those items cover) on
        ``dataset``, over the same evaluation batches as the student's ``eval_loss_hard``, summed over every
        process (every process must call it). A teacher of the student's tokenizer is scored on the
        student's items and classes (the vocabulary both share); one of another tokenizer on its own
        tokens of the same text (``teacher_input_ids``), those starting where the student's tokens have
        labels: only its bytes make it comparable (:meth:`hard_scores`). Bytes are 0 without the
        ``kd_text_bytes`` columns (rows not prepared by a causal-LM task)."""
        if self.teacher_signal is None:
            raise ValueError("teacher_hard_totals needs a teacher: this run has no teacher signal")
        classes = logit_layer_weight(self.model).shape[0]
        totals = torch.zeros(3, device=self.args.device)
        for batch in self.get_eval_dataloader(dataset):
            batch = self._prepare_inputs(batch)
            items = self.task.teacher_scored_items(self.teacher_signal(batch), batch, classes)
            if items is None:
                continue
            logits, labels, byte_counts, scored = items
            labels = labels.to(logits.device)
            totals[0] += F.cross_entropy(logits, labels, ignore_index=NO_LABEL, reduction="sum").to(
                totals.device
            )
            totals[1] += (labels != NO_LABEL).sum().to(totals.device)
            if byte_counts is not None:
                totals[2] += scored_bytes(byte_counts, scored).to(totals.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss, count, num_bytes = totals.tolist()
        return loss, count, num_bytes

    def hard_scores(self, loss_sum: float, count: float, num_bytes: float = 0.0) -> dict[str, float]:
        """``eval_loss_hard`` (mean cross-entropy on the labels: ``loss_sum`` over ``count`` items) and, for
        a causal LM, ``eval_perplexity`` = exp(mean token cross-entropy) and, when the bytes the tokens
        cover are known, ``eval_bits_per_byte`` (``hf_kd.tasks.causal_lm.bits_per_byte``)."""
        cross_entropy = loss_sum / count if count else math.nan
        scores = {"eval_loss_hard": cross_entropy}
        if self.task.scores_bytes:
            scores["eval_perplexity"] = math.exp(cross_entropy) if cross_entropy < 700 else math.inf
            if num_bytes:
                scores["eval_bits_per_byte"] = bits_per_byte(loss_sum, num_bytes)
        return scores

    # ---- batches ------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        """Keep teacher inputs and cached teacher columns through ``remove_unused_columns``, and every
        column of a dataset transformed on the fly (``with_transform``: its transform reads them)."""
        super()._set_signature_columns_if_needed()
        extra = set()
        evaluation = (
            self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        )
        for dataset in (self.train_dataset, *evaluation):
            transformed = isinstance(dataset, datasets.Dataset) and dataset.format["type"] == "custom"
            for name in getattr(dataset, "column_names", None) or []:
                if transformed or name.startswith(
                    (TEACHER_INPUT_PREFIX, CACHE_PREFIX, ALIGNMENT_PREFIX, TEXT_BYTES)
                ):
                    extra.add(name)
        self._signature_columns = list(dict.fromkeys(self._signature_columns + sorted(extra)))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The window's micro-batches and its item counts [hard items, soft items], summed over ranks
        when ``average_tokens_across_devices`` is on."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches:
            return batches, None
        if self.on_policy is not None:  # on-policy: sampled completions replace the data's, before counting
            batches = [self._generated(batch, index) for index, batch in enumerate(batches)]
        counts = torch.stack([self.task.count_items(batch).to(device) for batch in batches]).sum(0)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        if self.args.world_size == 1 or self.args.average_tokens_across_devices:  # the same on every process
            soft = self.teacher_signal is not None and self.args.alpha > 0
            check_window(
                counts.tolist(),
                hard_term=not soft or self.args.alpha < 1,
                soft_term=soft,
                step=self.state.global_step + 1,
                output_dir=self.args.output_dir,
            )
        return batches, counts

    def _generated(self, batch: dict[str, Any], index: int) -> dict[str, Any]:
        """Micro-batch ``index`` of this step, its completions sampled when the lmbda coin (or seq_kd)
        says so (``hf_kd.on_policy``); each process samples from its own prompts with the unwrapped model."""
        return self.on_policy(
            batch,
            student=self.accelerator.unwrap_model(self.model),
            teacher=None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model),
            step=self.state.global_step,
            index=index,
        )

    # ---- loss ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r"""The distillation loss of one micro-batch (docs/knowledge.md#the-distillation-loss):

            L = (1 − α) · Σ_hard H(y, q¹) / N_hard + α · s · Σ_soft D(p^τ, q^τ) / N_soft

        with q the student's distribution, p the teacher signal's (or the target function's ρ, a
        synthetic teacher), τ = ``args.temperature``, D = ``args.divergence``, s = τ² when
        ``args.temperature_squared`` else 1. The task flattens the batch into items (one per example, or
        one per token with a next-token target); Σ_hard runs over the items with a label, Σ_soft over
        the task's soft items. Without a teacher signal α is taken as 0 (labels only).

        N_hard and N_soft are the item counts of the whole gradient-accumulation window
        (``num_items_in_batch``, a [hard, soft] tensor from :meth:`get_batch_samples`, summed over
        processes with ``average_tokens_across_devices``; the loss is then multiplied by the number of
        processes, since DDP averages gradients). Without a window (evaluation) they are the batch's own
        counts. The hard and soft sums are recorded for the ``loss_hard`` / ``loss_soft`` logs.

        Returns:
            The scalar loss; with ``return_outputs``, ``(loss, outputs)`` where ``outputs`` holds the
            student's ``logits`` and, for a real teacher's dense logits, ``teacher_logits`` (empty when
            the student's logits were never made: ``student_logits_from_hidden_states``).
        """
        writer = inputs.pop(GENERATED_KEY, None)  # an on-policy batch: who wrote its completions
        labels = inputs["labels"]
        student_inputs, _, _ = split_batch(inputs)
        # The teacher runs first: its activations are freed before the student's are made (~8 % faster steps).
        feature_kwargs, teacher_outputs = {}, None
        if self.features is not None:  # the teacher's features come from the same forward as its logits
            feature_kwargs = self.features.forward_kwargs
            teacher_logits, teacher_outputs = self.teacher_signal.run(inputs, **feature_kwargs)
        else:
            teacher_logits = self.teacher_signal(inputs) if self.teacher_signal is not None else None
        if self.args.student_logits_from_hidden_states:
            weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
            check = not self._output_layer_checked
            student = student_hidden_states(model, weight, student_inputs, labels.shape[1], check=check)
            self._output_layer_checked = True
        else:
            student_outputs = model(**student_inputs, **feature_kwargs)
            student = student_outputs.logits
        items = self.task.kd_items(student, teacher_logits, labels)
        if writer is not None and self.completion_log is not None:
            dense = teacher_logits if torch.is_tensor(teacher_logits) else None
            self.completion_log.record(inputs, writer, self.state.global_step + 1, student, dense)
        window = (
            num_items_in_batch is not None
            and torch.is_tensor(num_items_in_batch)
            and num_items_in_batch.numel() == 2
        )
        counts = num_items_in_batch if window else self.task.count_items(inputs).to(labels.device)
        args = self.args
        alpha = args.alpha if items.teacher is not None else 0.0
        settings = {
            "alpha": alpha,
            "temperature": args.temperature,
            "divergence_name": args.divergence,
            "soft_mask": items.soft_mask,
            "num_hard": counts[0],
            "num_soft": counts[1],
            "temperature_squared": args.temperature_squared,
            "tail": args.sparse_tail,
            "target_fn": self.target_fn,
            "chunk_size": args.loss_chunk_size,
            "standardize": args.logit_standardization,
            "beta": args.beta,
            "skew": args.skew,
        }
        terms = distillation_loss(items.student_logits, items.teacher, items.labels, **settings)
        loss = terms.loss
        if self.features is not None:
            features = self.features.terms(student_outputs, teacher_outputs, inputs, counts[1])
            loss = loss + features.loss
            self._record_features(features.sums, "train" if model.training else "eval")
        if window and args.average_tokens_across_devices and args.world_size > 1:
            loss = loss * args.world_size  # DDP averages gradients over ranks; the normaliser is global
        mode = "train" if model.training else "eval"
        if (  # the outcome's hard/soft balance (classification); on an LM's [tokens, V] logits it would
            # cost two more full-vocabulary gradients per window for a report that does not cover LMs
            mode == "train"
            and not self._kd_sums[mode].get("n_grad")
            and 0 < alpha < 1
            and torch.is_tensor(items.student_logits)
            and not self.task.token_level
        ):
            self._record_term_gradients(items, settings)  # first micro-batch of each logging window
        byte_count = None
        if mode == "eval" and TEXT_BYTES in inputs:  # bits per byte: the bytes the targets cover
            byte_count = scored_bytes(inputs[TEXT_BYTES], labels != NO_LABEL)
        self._record(terms, items, mode, generated=writer is not None, byte_count=byte_count)
        if not return_outputs:
            return loss
        if isinstance(student, HiddenStates):
            return loss, {}  # the student's logits were never made (no compute_metrics: checked)
        predictions = {"logits": student}
        if torch.is_tensor(teacher_logits) and self.teacher_signal.real_teacher:
            predictions["teacher_logits"] = teacher_logits  # agreement with a real teacher is reported
        return loss, predictions

    # ---- logging ------------------------------------------------------------------------------

    def _record_term_gradients(self, items, settings: dict) -> None:
        """Record the norms of the two weighted terms' gradients with respect to the student's logits
        (logged as ``grad_norm_hard`` / ``grad_norm_soft``): the parameters' gradient is the same
        Jacobian applied to their sum, so their ratio says which term steers the update. Two extra loss
        evaluations on detached logits (no pass through the model), once per logging window."""
        logits = items.student_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            (total,) = torch.autograd.grad(
                distillation_loss(logits, items.teacher, items.labels, **settings).loss, logits
            )
            (hard,) = torch.autograd.grad(
                distillation_loss(logits, None, items.labels, **settings).loss, logits
            )
        sums = self._kd_sums["train"]
        sums["grad_hard"] += hard.float().norm()
        sums["grad_soft"] += (total - hard).float().norm()
        sums["n_grad"] += 1.0

    def _record(
        self, terms, items, mode: str, generated: bool = False, byte_count: torch.Tensor | None = None
    ) -> None:
        sums = self._kd_sums[mode]
        if byte_count is not None:
            sums["bytes"] += byte_count.float()
        sums["hard"] += terms.hard_sum.detach().float()
        sums["n_hard"] += (items.labels != -100).sum().float()
        sums["soft"] += terms.soft_sum.detach().float()
        sums["n_soft"] += items.soft_mask.sum().float()
        for name, (value, count) in terms.parts.items():  # e.g. a cross-tokenizer teacher's two parts
            self._part_names.add(name)
            sums[name] += value.detach().float()
            sums["n_" + name] += torch.as_tensor(count).float()
        if self.on_policy is not None:  # the soft term on sampled completions, apart from the data's
            source = "generated" if generated else "data"
            sums["soft_" + source] += terms.soft_sum.detach().float()
            sums["n_soft_" + source] += items.soft_mask.sum().float()

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process (every process must call it)."""
        return self.accelerator.reduce(values.to(self.args.device), reduction="sum").cpu()

    def _record_features(self, feature_sums: dict[str, torch.Tensor], mode: str) -> None:
        for key, value in feature_sums.items():
            self._kd_sums[mode][key] += value

    def checkpoint_extras(self) -> dict[str, torch.nn.Module]:
        """The feature projection, saved beside the student in each checkpoint (never inside it)."""
        return {} if self.features is None else {"feature_projection": self.features.projection}

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the feature projection's parameters (if any) as one more group."""
        optimizer = super().create_optimizer(model)
        projection = [] if self.features is None else list(self.features.parameters())
        if projection and not any(p is projection[0] for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": projection, "weight_decay": self.args.weight_decay})
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``loss_hard`` (mean CE over labelled items; ``eval_perplexity`` and ``eval_bits_per_byte`` too
        for a causal LM) and ``loss_soft`` (mean divergence over soft items, before α and τ²), averaged over
        every process since the last log; with feature losses ``loss_hidden`` / ``loss_attention`` (mean over
        items, before their weights); ``grad_norm_hard`` / ``grad_norm_soft`` (each weighted term's gradient on the student's
        logits, once per logging window); with on-policy batches ``loss_soft_generated`` /
        ``loss_soft_data`` (the soft term on sampled vs the data's completions), ``completion_length`` and
        ``generation_time_share`` (over every process); with ``log_completions`` the kept completions are
        appended to ``output_dir/completions.jsonl``; with a teacher of another tokenizer
        ``loss_soft_matched`` (mean divergence over matched spans) and ``loss_soft_unmatched`` (mean ULD
        distance over the other spans)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        sums = self._kd_sums[mode]
        if sums:
            keys = [
                "hard",
                "n_hard",
                "bytes",
                "soft",
                "n_soft",
                "hidden",
                "attention",
                "n_feature",
                *GRAD_KEYS,
            ]
            sources = ("generated", "data") if self.on_policy is not None else ()
            keys += [name + source for source in sources for name in ("soft_", "n_soft_")]
            keys += [key for part in sorted(self._part_names) for key in (part, "n_" + part)]
            totals = torch.stack([torch.as_tensor(sums[k], device=self.args.device).float() for k in keys])
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            total = dict(zip(keys, totals.tolist(), strict=True))
            prefix = "eval_" if mode == "eval" else ""
            if total["n_hard"] and mode == "eval":
                logs.update(self.hard_scores(total["hard"], total["n_hard"], total["bytes"]))
            elif total["n_hard"]:
                logs["loss_hard"] = total["hard"] / total["n_hard"]
            if self.teacher_signal is not None:
                for name in ("", *("_" + source for source in sources)):
                    if total["n_soft" + name]:
                        logs[prefix + "loss_soft" + name] = total["soft" + name] / total["n_soft" + name]
            for part in sorted(self._part_names):
                if total["n_" + part]:
                    logs[prefix + "loss_" + part] = total[part] / total["n_" + part]
            if total["n_feature"] and self.features is not None:
                if self.features.mapping:
                    logs[prefix + "loss_hidden"] = total["hidden"] / total["n_feature"]
                if self.args.attention_weight > 0:
                    logs[prefix + "loss_attention"] = total["attention"] / total["n_feature"]
            if total["n_grad"]:
                logs.update(
                    grad_norm_hard=total["grad_hard"] / total["n_grad"],
                    grad_norm_soft=total["grad_soft"] / total["n_grad"],
                )
            sums.clear()
        if self.completion_log is not None and mode == "train":
            self.completion_log.write()
        if self.on_policy is not None and mode == "train":
            logs.update(
                self.on_policy.pop_logs(self._sum_over_processes if self.args.world_size > 1 else None)
            )
        super().log(logs, start_time)
