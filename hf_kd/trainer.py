"""DistillationTrainer: a ``transformers.Trainer`` whose loss mixes hard labels with a teacher signal.

Plumbing only. Where the teacher's logits come from (online model, cache, uniform) is a *teacher
signal*; what is distilled from them (the real teacher or a synthetic one) is a *target function*;
how a batch becomes distillation instances is the *task*. The math is ``hf_kd.losses``.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, is_sagemaker_mp_enabled

from hf_kd.cards.model import DistillationCardInfo, write_model_card
from hf_kd.cards.run import with_latest_evaluation
from hf_kd.checkpoints import (
    STAGING_FOLDER,
    TRAINER_STATE,
    disk_full_error,
    is_disk_full,
    load_checkpoint_weights,
    resolve_resume,
)
from hf_kd.config import DistillationConfig
from hf_kd.data.labels import count_unlabeled
from hf_kd.losses import HiddenStates, TargetFn, distillation_loss
from hf_kd.modeling import check_model_source, freeze, load_pretrained, logit_layer_weight
from hf_kd.paths import refuse_overlap
from hf_kd.tasks import CausalLMTask, ImageClassificationTask, Task, TextClassificationTask, split_batch
from hf_kd.teachers.online import OnlineTeacher, UniformTeacher
from hf_kd.teachers.placement import place_teacher
from hf_kd.teachers.synthetic import SyntheticTargetFn

logger = logging.getLogger(__name__)


def task_for_model(model: PreTrainedModel) -> Task:
    """The task a model's head implies, for users who pass no task."""
    name = type(model).__name__
    if name.endswith("ForImageClassification"):
        return ImageClassificationTask()
    if name.endswith("ForSequenceClassification"):
        return TextClassificationTask()
    if name.endswith("ForCausalLM"):
        return CausalLMTask()
    raise ValueError(f"cannot infer the task of a {name}; pass task=... (see hf_kd.tasks)")


class DistillationTrainer(Trainer):
    """Trains ``model`` (the student) on ``(1 − α)·CE + α·s·D(teacher^τ, student^τ)``.

    Args:
        model: the student.
        teacher_model: a model, or a Hub id / local path loaded with ``from_pretrained`` (safetensors,
            ``args.teacher_model_init_kwargs``). Frozen, in eval mode, run without autograd, never saved.
        args: a :class:`hf_kd.DistillationConfig`.
        task: the task adapter (default: inferred from the student's head: sequence or image
            classification, causal LM).
        teacher_signal: where teacher logits come from, ``signal(batch) -> logits``;
            default: the online ``teacher_model`` (or the uniform teacher for ``synthetic_teacher='ls'``).
        target_fn: maps the teacher's log p^τ to the distilled target (a synthetic teacher); default none.
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
    _saving_checkpoint = False  # True while _save_checkpoint writes into the staging folder

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
        self._prepare_datasets(model, kwargs)
        if isinstance(teacher_model, str):
            refuse_overlap("output_dir", args.output_dir, {"teacher_model": teacher_model})
            check_model_source("teacher_model_name_or_path", teacher_model)
            teacher_model = load_pretrained(
                self.task.model_class(),
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
        """The distillation model card (``hf_kd.cards.run``): when set, written as README.md wherever the
        student is saved (checkpoints, ``save_model``) and pushed with it by ``push_to_hub``."""

    def _prepare_datasets(self, model: PreTrainedModel | None, kwargs: dict[str, Any]) -> None:
        """Set the task's collation up from ``processing_class`` and process raw rows of ``train_dataset``
        and ``eval_dataset`` (a dataset or a dict of them) in ``kwargs``, before anything loads."""
        processor = kwargs.get("processing_class")
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
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    # ---- checkpoints: read back the way from_pretrained reads them ----------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume with the checkpoint's weights, every one of them (see :func:`load_checkpoint_weights`)."""
        target = self.model if model is None else model
        if not self._loads_plain_weights(target, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading the student's weights from %s", resume_from_checkpoint)
        load_checkpoint_weights(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's weights, every one of them."""
        best = self.state.best_model_checkpoint
        if not self._loads_plain_weights(self.model, best):
            return super()._load_best_model()
        logger.info(
            "Loading the best student (%s: %s) from %s",
            self.args.metric_for_best_model,
            self.state.best_metric,
            best,
        )
        load_checkpoint_weights(self.model, best)

    def _loads_plain_weights(self, model, folder: str) -> bool:
        """Whether ``folder`` holds a whole ``save_pretrained`` model that hf_kd reads itself (not a
        DeepSpeed/FSDP/SageMaker state or a PEFT adapter: those stay with Transformers)."""
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled or is_sagemaker_mp_enabled()
        return (
            not sharded
            and isinstance(model, PreTrainedModel)
            and any((Path(folder) / name).is_file() for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
        )

    # ---- checkpoints: visible only when complete ------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        """While a checkpoint is being saved, the folder it is written into (see :meth:`_save_checkpoint`)."""
        run_dir = super()._get_output_dir(trial)
        return str(Path(run_dir) / STAGING_FOLDER) if self._saving_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer._save_checkpoint`` written into ``<output_dir>/_partial_checkpoint/checkpoint-N`` and
        renamed to ``<output_dir>/checkpoint-N`` once whole, so no run ever sees a partial checkpoint.
        A failed save removes what it wrote; one that filled the disk says so (:func:`disk_full_error`)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING_FOLDER
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a process killed mid-save
        self.accelerator.wait_for_everyone()
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are written
            if self.args.should_save:
                self._put_checkpoint_in_place(staging / name, run_dir / name)
        except Exception as error:
            full = is_disk_full(error, run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise disk_full_error(error, run_dir, name) from error
            raise
        finally:
            self._saving_checkpoint = False
        self.accelerator.wait_for_everyone()

    def _put_checkpoint_in_place(self, written: Path, final: Path) -> None:
        """Rename a complete checkpoint into place, the best-checkpoint path pointing at its final name,
        then delete the checkpoints ``save_total_limit`` drops (Trainer did so in the staging folder)."""
        if self.state.best_model_checkpoint == str(written):
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(written / TRAINER_STATE))
        if final.exists():  # a checkpoint of the same step from an earlier run, replaced only now
            shutil.rmtree(final)
        written.rename(final)
        written.parent.rmdir()
        rotate_checkpoints(
            output_dir=str(final.parent),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

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

    def teacher_cross_entropy(self, dataset) -> float:
        """The teacher's mean cross-entropy on the labels of ``dataset``: over the items and classes of the
        student's ``eval_loss_hard`` (tokens with a target, the vocabulary both share), the same evaluation
        batches, summed over every process. Every process must call it."""
        if self.teacher_signal is None:
            raise ValueError("teacher_cross_entropy needs a teacher: this run has no teacher signal")
        classes = logit_layer_weight(self.model).shape[0]
        totals = torch.zeros(2, device=self.args.device)
        for batch in self.get_eval_dataloader(dataset):
            batch = self._prepare_inputs(batch)
            items = self.task.kd_items(self.teacher_signal(batch)[..., :classes], None, batch["labels"])
            logits, labels = items.student_logits.float(), items.labels.to(items.student_logits.device)
            totals[0] += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").to(totals.device)
            totals[1] += (labels != -100).sum().to(totals.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss, count = totals.tolist()
        return loss / count if count else math.nan

    def hard_scores(self, cross_entropy: float) -> dict[str, float]:
        """``eval_loss_hard`` (mean cross-entropy on the labels) and, for a causal LM, ``eval_perplexity``
        = exp(mean token cross-entropy)."""
        scores = {"eval_loss_hard": cross_entropy}
        if isinstance(self.task, CausalLMTask):
            scores["eval_perplexity"] = math.exp(cross_entropy) if cross_entropy < 700 else math.inf
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
                if transformed or name.startswith(("teacher_", "kd_teacher_")):
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
        """Adds ``loss_hard`` (mean CE over labelled items; ``eval_perplexity`` too for a causal LM) and
        ``loss_soft`` (mean divergence over soft items, before α and τ²), averaged over every process since
        the last log."""
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
                logs.update(
                    self.hard_scores(hard / n_hard) if mode == "eval" else {"loss_hard": hard / n_hard}
                )
            if n_soft and self.teacher_signal is not None:
                logs[prefix + "loss_soft"] = soft / n_soft
            sums.clear()
        super().log(logs, start_time)
