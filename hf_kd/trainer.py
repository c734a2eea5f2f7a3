"""DistillationTrainer: a ``transformers.Trainer`` whose loss mixes hard labels with a teacher signal.

Plumbing only. Where the teacher's logits come from (online model, cache, uniform) is a *teacher
signal*; what is distilled from them (the real teacher or a synthetic one) is a *target function*;
how a batch becomes distillation instances is the *task*. The math is ``hf_kd.losses``.
"""

from __future__ import annotations

import inspect
import itertools
from collections import defaultdict
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from hf_kd.config import DistillationConfig
from hf_kd.hub import DistillationCardInfo, write_model_card
from hf_kd.losses import HiddenStates, TargetFn, distillation_loss
from hf_kd.modeling import check_model_source, freeze, load_pretrained, logit_layer_weight
from hf_kd.run_card import with_latest_evaluation
from hf_kd.tasks import CausalLMTask, ImageClassificationTask, Task, TextClassificationTask, split_batch
from hf_kd.teachers.online import OnlineTeacher, UniformTeacher
from hf_kd.teachers.placement import place_teacher
from hf_kd.teachers.synthetic import SyntheticTargetFn


def task_for_model(model: PreTrainedModel) -> Task:
    """The task a model's head implies, for users who pass no task."""
    name = type(model).__name__
    if name.endswith("ForImageClassification"):
        return ImageClassificationTask()
    if name.endswith("ForSequenceClassification"):
        return TextClassificationTask()
    raise ValueError(f"cannot infer the task of a {name}; pass task=... (see hf_kd.tasks)")


class DistillationTrainer(Trainer):
    """Trains ``model`` (the student) on ``(1 − α)·CE + α·s·D(teacher^τ, student^τ)``.

    Args:
        model: the student.
        teacher_model: a model, or a Hub id / local path loaded with ``from_pretrained`` (safetensors,
            ``args.teacher_model_init_kwargs``). Frozen, in eval mode, run without autograd, never saved.
        args: a :class:`hf_kd.DistillationConfig`.
        task: the task adapter (default: inferred from the student's head).
        teacher_signal: where teacher logits come from, ``signal(batch) -> logits``;
            default: the online ``teacher_model`` (or the uniform teacher for ``synthetic_teacher='ls'``).
        target_fn: maps the teacher's log p^τ to the distilled target (a synthetic teacher); default none.
        **kwargs: any other ``transformers.Trainer`` argument (datasets, ``compute_metrics``, callbacks, ...).
    """

    # compute_loss normalises by the item counts of the whole accumulation window (get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillationConfig | None = None,
        task: Task | None = None,
        teacher_signal=None,
        target_fn: TargetFn | None = None,
        **kwargs: Any,
    ):
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a hf_kd.DistillationConfig, got {type(args).__name__}")
        self.task = task or task_for_model(model)
        if isinstance(teacher_model, str):
            check_model_source("teacher_model_name_or_path", teacher_model)
            teacher_model = load_pretrained(
                self.task.model_class(),
                teacher_model,
                revision=args.teacher_model_revision,
                **(args.teacher_model_init_kwargs or {}),
            )
        kwargs.setdefault("data_collator", self.task.collate)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = None
        if teacher_model is not None:
            self.teacher_model = place_teacher(
                freeze(teacher_model), self.accelerator, cpu_offload=args.teacher_cpu_offload
            )
        if teacher_signal is None and args.alpha > 0:
            if args.synthetic_teacher == "none":  # the paper's α = 0 arm: labels only
                pass
            elif args.synthetic_teacher == "ls":
                teacher_signal = UniformTeacher(num_classes=logit_layer_weight(self.model).shape[0])
            elif self.teacher_model is not None:
                output_map = self.task.teacher_output_map(teacher_model.config, self.model.config, args)
                teacher_signal = OnlineTeacher(self.teacher_model, output_map)
            elif args.synthetic_teacher != "none":
                raise ValueError(
                    f"alpha={args.alpha} needs a teacher: pass teacher_model or teacher_signal (or set alpha: 0)"
                )
        self.teacher_signal = teacher_signal
        if target_fn is None and args.alpha > 0 and args.synthetic_teacher in ("kd_pt", "kd_topk"):
            target_fn = SyntheticTargetFn(args.synthetic_teacher, k=args.synthetic_topk)
        self.target_fn = target_fn
        if args.student_logits_from_hidden_states:
            self._check_student_logits_from_hidden_states()
        self._output_layer_checked = False
        self._kd_sums: dict[str, dict[str, torch.Tensor]] = {
            "train": defaultdict(float),
            "eval": defaultdict(float),
        }
        self.card_info: DistillationCardInfo | None = None
        """The distillation model card (``hf_kd.run_card``): when set, written as README.md wherever the
        student is saved (checkpoints, ``save_model``) and pushed with it by ``push_to_hub``."""

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``, after checking that a ``kd_sim`` run was given its target function (its
        class similarity needs the teacher or data: see ``hf_kd.pipeline.kd_sim_target_fn``)."""
        if self.args.alpha > 0 and self.args.synthetic_teacher == "kd_sim" and self.target_fn is None:
            raise ValueError(
                "synthetic_teacher='kd_sim' needs target_fn=SyntheticTargetFn('kd_sim', class_similarity=S); "
                "scripts/distill.py builds S from the teacher (hf_kd.pipeline.kd_sim_target_fn)"
            )
        return super().train(*args, **kwargs)

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

    def _set_signature_columns_if_needed(self) -> None:
        """Keep teacher inputs and cached teacher columns through ``remove_unused_columns``."""
        super()._set_signature_columns_if_needed()
        extra = set()
        for dataset in (self.train_dataset, self.eval_dataset):
            for name in getattr(dataset, "column_names", None) or []:
                if name.startswith(("teacher_", "kd_teacher_")):
                    extra.add(name)
        self._signature_columns = list(dict.fromkeys(self._signature_columns + sorted(extra)))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The window's micro-batches and its item counts [hard items, soft items], summed over ranks
        when ``average_tokens_across_devices`` is on."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches:
            return batches, None
        counts = torch.stack([self.task.count_items(batch).to(device) for batch in batches]).sum(0)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batches, counts

    # ---- loss ---------------------------------------------------------------------------------

    def _check_student_logits_from_hidden_states(self) -> None:
        """What ``student_logits_from_hidden_states`` needs, checked before training."""
        prefix = "student_logits_from_hidden_states: true"
        if not isinstance(self.task, CausalLMTask):
            raise ValueError(f"{prefix} needs the causal-lm task, got {self.task.name!r}")
        name = type(self.model).__name__
        if "logits_to_keep" not in inspect.signature(self.model.forward).parameters:
            raise ValueError(
                f"{prefix}: {name}.forward takes no logits_to_keep, so its logits cannot be skipped"
            )
        head = self.model.get_output_embeddings()
        if getattr(head, "weight", None) is None or getattr(head, "bias", None) is not None:
            raise ValueError(f"{prefix} needs an output layer with a weight and no bias; {name} has {head!r}")
        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            raise ValueError(
                f"{prefix} uses the output layer's weight outside the forward: not with FSDP or ZeRO-3"
            )
        if self.compute_metrics is not None:
            raise ValueError(f"{prefix} never makes the student's logits, which compute_metrics needs")

    def _student_hidden_states(self, model, student_inputs, length: int) -> HiddenStates:
        """The student's final hidden states [B, T, H] and output-layer weight, its logits not made: the
        forward runs through ``model`` (DDP's hooks included) with ``logits_to_keep`` selecting no position.
        The first batch keeps the last position to check that the logits are hidden · weightᵀ (a model that
        scales or soft-caps them after the output layer is refused)."""
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        check = not self._output_layer_checked
        keep = torch.arange(length - 1 if check else length, length, device=weight.device)
        outputs = model(**student_inputs, logits_to_keep=keep, output_hidden_states=True)
        hidden = outputs.hidden_states[-1]
        if check:
            with torch.no_grad():
                made = (hidden[:, -1:] @ weight.T).float()
            if not torch.allclose(outputs.logits.float(), made, rtol=1e-2, atol=1e-2):
                raise ValueError(
                    f"student_logits_from_hidden_states: {type(model).__name__}'s logits are not its last hidden "
                    f"state times its output layer (max difference {(outputs.logits - made).abs().max():.3g}); "
                    "set it to false for this model"
                )
            self._output_layer_checked = True
        return HiddenStates(hidden, weight)

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
        labels = inputs["labels"]
        student_inputs, _, _ = split_batch(inputs)
        # The teacher runs first: its activations are freed before the student's are made (~8 % faster steps).
        teacher_logits = self.teacher_signal(inputs) if self.teacher_signal is not None else None
        if self.args.student_logits_from_hidden_states:
            student = self._student_hidden_states(model, student_inputs, labels.shape[1])
        else:
            student = model(**student_inputs).logits
        items = self.task.kd_items(student, teacher_logits, labels)
        window = (
            num_items_in_batch is not None
            and torch.is_tensor(num_items_in_batch)
            and num_items_in_batch.numel() == 2
        )
        counts = num_items_in_batch if window else self.task.count_items(inputs).to(labels.device)
        args = self.args
        terms = distillation_loss(
            items.student_logits,
            items.teacher,
            items.labels,
            alpha=args.alpha if items.teacher is not None else 0.0,
            temperature=args.temperature,
            divergence_name=args.divergence,
            soft_mask=items.soft_mask,
            num_hard=counts[0],
            num_soft=counts[1],
            temperature_squared=args.temperature_squared,
            tail=args.sparse_tail,
            target_fn=self.target_fn,
            chunk_size=args.loss_chunk_size,
            beta=args.beta,
            skew=args.skew,
        )
        loss = terms.loss
        if window and args.average_tokens_across_devices and args.world_size > 1:
            loss = loss * args.world_size  # DDP averages gradients over ranks; the normaliser is global
        self._record(terms, items, "train" if model.training else "eval")
        if not return_outputs:
            return loss
        if isinstance(student, HiddenStates):
            return loss, {}  # the student's logits were never made (no compute_metrics: checked)
        predictions = {"logits": student}
        if torch.is_tensor(teacher_logits) and not isinstance(self.teacher_signal, UniformTeacher):
            predictions["teacher_logits"] = teacher_logits  # a real teacher: agreement is reported
        return loss, predictions

    # ---- logging ------------------------------------------------------------------------------

    def _record(self, terms, items, mode: str) -> None:
        sums = self._kd_sums[mode]
        sums["hard"] += terms.hard_sum.detach().float()
        sums["n_hard"] += (items.labels != -100).sum().float()
        sums["soft"] += terms.soft_sum.detach().float()
        sums["n_soft"] += items.soft_mask.sum().float()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``loss_hard`` (mean CE over labelled items) and ``loss_soft`` (mean divergence over soft
        items, before α and τ²), averaged over every process since the last log."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        sums = self._kd_sums[mode]
        if sums:
            keys = ("hard", "n_hard", "soft", "n_soft")
            totals = torch.stack([torch.as_tensor(sums[k], device=self.args.device).float() for k in keys])
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            hard, n_hard, soft, n_soft = totals.tolist()
            prefix = "eval_" if mode == "eval" else ""
            if n_hard:
                logs[prefix + "loss_hard"] = hard / n_hard
            if n_soft and self.teacher_signal is not None:
                logs[prefix + "loss_soft"] = soft / n_soft
            sums.clear()
        super().log(logs, start_time)
