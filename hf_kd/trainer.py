"""DistillationTrainer: a ``transformers.Trainer`` whose loss mixes hard labels with a teacher signal.

Plumbing only. Where the teacher's logits come from (online model, cache, uniform) is a *teacher
signal* (``hf_kd.teachers.signal``: one interface, built by one factory); what is distilled from them
(the real teacher or a synthetic one) is a *target function*; how a batch becomes distillation
instances is the *task*. The math is ``hf_kd.losses``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from hf_kd.auto_temperature import auto_temperature
from hf_kd.cards.model import DistillationCardInfo, write_model_card
from hf_kd.cards.run import with_latest_evaluation
from hf_kd.checkpoints import CompleteCheckpointsMixin, resolve_resume
from hf_kd.config import DistillationConfig
from hf_kd.generation import Generator
from hf_kd.hidden_states import check_student_for_hidden_states, student_hidden_states
from hf_kd.losses import HiddenStates, TargetFn, distillation_loss
from hf_kd.modeling import check_model_source, freeze, load_teacher
from hf_kd.on_policy import GENERATED_KEY
from hf_kd.paths import refuse_overlap
from hf_kd.run_lock import output_dir_lock
from hf_kd.step_addons import StepContext, build_addons, record_term_gradients
from hf_kd.tasks import Task, split_batch, task_for_model
from hf_kd.tasks.base import NO_LABEL, TEXT_BYTES
from hf_kd.tasks.causal_lm import scored_bytes
from hf_kd.teacher_scores import TeacherScoresMixin
from hf_kd.teachers.contract import TeacherSignal, check_teacher_signal
from hf_kd.teachers.placement import place_teacher
from hf_kd.teachers.signal import build_teacher_signal
from hf_kd.teachers.synthetic import SyntheticTargetFn
from hf_kd.trainer_data import TrainerDataMixin
from hf_kd.training_guard import FiniteStepGuard, check_window


class DistillationTrainer(TeacherScoresMixin, TrainerDataMixin, CompleteCheckpointsMixin, Trainer):
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
        self.temperature_choice = auto_temperature(self) if args.temperature == "auto" else None
        """Why ``temperature: auto`` set ``args.temperature`` (``hf_kd.auto_temperature``), or None."""
        if self.temperature_choice is not None:
            args.temperature = self.temperature_choice.value
        if args.student_logits_from_hidden_states:
            check_student_for_hidden_states(
                self.task,
                self.model,
                sharded=self.is_fsdp_enabled or is_deepspeed_zero3_enabled(),
                compute_metrics=self.compute_metrics,
            )
        self._output_layer_checked = False
        self._part_names: set[str] = set()
        """The names of the loss parts logged on their own (``LossTerms.parts``), as they appear."""
        self.addons = build_addons(
            args,
            self.task,
            self.model,
            self.processing_class,
            teacher_signal=self.teacher_signal,
            teacher=self.teacher_model,
            generator=generator,
            train_dataset=self.train_dataset,
            main_process=self.is_world_process_zero(),
        )
        """The step add-ons (``hf_kd.step_addons``): loss parts and logged measures besides the two terms."""
        for addon in self.addons:
            for callback in addon.callbacks():
                self.add_callback(callback)
        named = {addon.name: addon.component for addon in self.addons}
        self.features = named.get("features")
        """The feature losses (``hf_kd.features.FeatureDistiller``), None when off."""
        self.on_policy = named.get("on_policy")
        """The on-policy sampler (``hf_kd.on_policy.OnPolicyBatches``), None when nothing is generated."""
        self._kd_sums: dict[str, dict[str, torch.Tensor]] = {
            "train": defaultdict(float),
            "eval": defaultdict(float),
        }
        modules = [self.model] + ([self.features] if self.features is not None else [])
        reduce = lambda flag: self.accelerator.reduce(flag, reduction="sum")  # noqa: E731
        self.add_callback(FiniteStepGuard(self._kd_sums["train"], modules, reduce))
        self.card_info: DistillationCardInfo | None = None
        """The distillation model card (``hf_kd.cards.run``): when set, written as README.md wherever the
        student is saved (checkpoints, ``save_model``) and pushed with it by ``push_to_hub``."""

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

    # ---- batches ------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The window's micro-batches (each add-on's ``before_window`` applied: on-policy sampling) and its
        item counts [hard items, soft items], summed over ranks when ``average_tokens_across_devices`` is on."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches:
            return batches, None
        unwrap = self.accelerator.unwrap_model
        teacher = None if self.teacher_model is None else unwrap(self.teacher_model)
        for addon in self.addons:
            batches = addon.before_window(
                batches, student=unwrap(self.model), teacher=teacher, step=self.state.global_step
            )
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
        asked = [kwargs for addon in self.addons if (kwargs := addon.forward_kwargs()) is not None]
        forward_kwargs, teacher_outputs = {key: v for kwargs in asked for key, v in kwargs.items()}, None
        if asked:  # an add-on reads the models' outputs (features): from the same forwards as the logits
            teacher_logits, teacher_outputs = self.teacher_signal.run(inputs, **forward_kwargs)
        else:
            teacher_logits = self.teacher_signal(inputs) if self.teacher_signal is not None else None
        student_outputs = None
        if self.args.student_logits_from_hidden_states:
            weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
            check = not self._output_layer_checked
            student = student_hidden_states(model, weight, student_inputs, labels.shape[1], check=check)
            self._output_layer_checked = True
        else:
            student_outputs = model(**student_inputs, **forward_kwargs)
            student = student_outputs.logits
        items = self.task.kd_items(student, teacher_logits, labels)
        window = (
            num_items_in_batch is not None
            and torch.is_tensor(num_items_in_batch)
            and num_items_in_batch.numel() == 2
        )
        counts = num_items_in_batch if window else self.task.count_items(inputs).to(labels.device)
        settings = self._loss_settings(items, counts)
        terms = distillation_loss(items.student_logits, items.teacher, items.labels, **settings)
        mode = "train" if model.training else "eval"
        step = StepContext(
            inputs=inputs, mode=mode, step=self.state.global_step, writer=writer, student=student,
            student_outputs=student_outputs, teacher_logits=teacher_logits, teacher_outputs=teacher_outputs,
            items=items, terms=terms, settings=settings, counts=counts, sums=self._kd_sums[mode],
        )  # fmt: skip
        loss = terms.loss
        for addon in self.addons:
            for part in addon.loss_parts(step).values():
                loss = loss + part
        if window and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients over ranks; the normaliser is global
        for addon in self.addons:
            addon.observe(step)
        byte_count = None
        if mode == "eval" and TEXT_BYTES in inputs:  # bits per byte: the bytes the targets cover
            byte_count = scored_bytes(inputs[TEXT_BYTES], labels != NO_LABEL)
        self._record(terms, items, mode, byte_count=byte_count)
        if not return_outputs:
            return loss
        if isinstance(student, HiddenStates):
            return loss, {}  # the student's logits were never made (no compute_metrics: checked)
        predictions = {"logits": student}
        if torch.is_tensor(teacher_logits) and self.teacher_signal.real_teacher:
            predictions["teacher_logits"] = teacher_logits  # agreement with a real teacher is reported
        return loss, predictions

    def _loss_settings(self, items, counts: torch.Tensor) -> dict[str, Any]:
        """``distillation_loss``'s keyword arguments from the config, the items and the [N_hard, N_soft] counts."""
        args = self.args
        return {
            "alpha": args.alpha if items.teacher is not None else 0.0,
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

    # ---- logging ------------------------------------------------------------------------------

    def _record_term_gradients(self, items, settings: dict) -> None:
        """:func:`hf_kd.step_addons.record_term_gradients` into the training window's sums."""
        record_term_gradients(self._kd_sums["train"], items, settings)

    def _record(self, terms, items, mode: str, byte_count: torch.Tensor | None = None) -> None:
        """The two terms' sums and item counts, the named parts of the soft sum (``LossTerms.parts``) and,
        evaluating a causal LM, the bytes the targets cover."""
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

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process (every process must call it)."""
        return self.accelerator.reduce(values.to(self.args.device), reduction="sum").cpu()

    def checkpoint_extras(self) -> dict[str, torch.nn.Module]:
        """The add-ons' modules (the feature projection), saved beside the student in each checkpoint."""
        return {name: module for addon in self.addons for name, module in addon.checkpoint_extras().items()}

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the add-ons' trained parameters (the feature projection) as one more group."""
        optimizer = super().create_optimizer(model)
        extra = [parameter for addon in self.addons for parameter in addon.trained_parameters()]
        if extra and not any(p is extra[0] for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": extra, "weight_decay": self.args.weight_decay})
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``loss_hard`` (mean CE over labelled items; ``eval_perplexity`` and ``eval_bits_per_byte`` too
        for a causal LM), ``loss_soft`` (mean divergence over soft items, before α and τ²) and each named part
        of it (``loss_soft_matched`` / ``loss_soft_unmatched`` with a teacher of another tokenizer), averaged
        over every process since the last log, then what each step add-on logs (``hf_kd.step_addons``)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        sums, total = self._kd_sums[mode], None
        if sums:
            keys = ["hard", "n_hard", "bytes", "soft", "n_soft"]
            keys += [key for part in sorted(self._part_names) for key in (part, "n_" + part)]
            keys += [key for addon in self.addons for key in addon.sum_keys()]
            totals = torch.stack([torch.as_tensor(sums[k], device=self.args.device).float() for k in keys])
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            total = dict(zip(keys, totals.tolist(), strict=True))
            prefix = "eval_" if mode == "eval" else ""
            if total["n_hard"] and mode == "eval":
                logs.update(self.hard_scores(total["hard"], total["n_hard"], total["bytes"]))
            elif total["n_hard"]:
                logs["loss_hard"] = total["hard"] / total["n_hard"]
            if self.teacher_signal is not None and total["n_soft"]:
                logs[prefix + "loss_soft"] = total["soft"] / total["n_soft"]
            for part in sorted(self._part_names):
                if total["n_" + part]:
                    logs[prefix + "loss_" + part] = total[part] / total["n_" + part]
            sums.clear()
        reduce = self._sum_over_processes if self.args.world_size > 1 else None
        for addon in self.addons:
            logs.update(addon.logs(mode, total, reduce))
        super().log(logs, start_time)
