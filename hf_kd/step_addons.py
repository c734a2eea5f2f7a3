"""Step add-ons: what a training step does besides the distillation loss, behind one interface.

An add-on may ask both forwards for more (``forward_kwargs``), rewrite the micro-batches of an
accumulation window before they are counted (``before_window``), add named parts to the loss
(``loss_parts``), record sums in the logging window (``observe``; ``sum_keys`` names them, so the trainer
sums them over processes with its own) and turn the window's totals into logged values (``logs``). The
trainer calls every add-on the same way and knows none of them: today the feature losses
(``hf_kd.features``), on-policy sampling (``hf_kd.on_policy``, with its watch), the completion log
(``hf_kd.completion_log``) and the gradient norms of the two terms. :func:`build_addons` makes the run's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_kd.completion_log import CompletionLog
from hf_kd.features import FeatureDistiller
from hf_kd.losses import HiddenStates, LossTerms, distillation_loss
from hf_kd.on_policy import OnPolicyBatches, check_prompt_rows, on_policy_batches
from hf_kd.on_policy_watch import OnPolicyWatch, check_start
from hf_kd.tasks.base import KDItems, Task

GRAD_KEYS = ("grad_hard", "grad_soft", "n_grad")
"""Sums of the logged terms' gradient norms (:func:`record_term_gradients`) and their count."""

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepContext:
    """One micro-batch's step, as the add-ons see it."""

    inputs: dict[str, Any]  # the batch (without the on-policy writer key)
    mode: str  # "train" or "eval"
    step: int  # optimizer steps done (``state.global_step``)
    writer: str | None  # who wrote the batch's completions (on-policy), else None
    student: torch.Tensor | HiddenStates  # the student's logits (or final hidden states)
    student_outputs: Any  # the student's model output (None when its logits were never made)
    teacher_logits: Any  # what the teacher signal returned (None without one)
    teacher_outputs: Any  # the teacher's model output when an add-on asked for it, else None
    items: KDItems
    terms: LossTerms
    settings: dict[str, Any]  # the keyword arguments ``distillation_loss`` was called with
    counts: torch.Tensor  # [N_hard, N_soft] of the window (or of the batch, evaluating)
    sums: dict[str, Any]  # the logging window's sums of this mode (a defaultdict(float))


class StepAddOn:
    """The interface; every method does nothing by default, so an add-on writes only what it uses."""

    name = "addon"
    component: Any = None
    """The object the add-on wraps (the trainer exposes it as ``trainer.<name>``), or None."""

    def forward_kwargs(self) -> dict[str, Any] | None:
        """Extra keyword arguments for both forwards; a dict (even empty) also asks for the teacher's
        model output (``TeacherSignal.run``) and the student's; None: neither is needed."""
        return None

    def before_window(self, batches: list[dict], *, student, teacher, step: int) -> list[dict]:
        """The accumulation window's micro-batches, before their items are counted."""
        return batches

    def loss_parts(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named, weighted and normalised terms added to the micro-batch's loss."""
        return {}

    def observe(self, ctx: StepContext) -> None:
        """Record what the add-on logs into ``ctx.sums``, after the loss is made."""

    def sum_keys(self) -> tuple[str, ...]:
        """The keys this add-on records in the window's sums (summed over processes when logging)."""
        return ()

    def logs(self, mode: str, totals: Mapping[str, float] | None, reduce: Reduce | None) -> dict[str, float]:
        """Logged values at a logging step of ``mode``; ``totals`` the window's sums over every process
        (None when nothing was recorded); ``reduce`` sums a tensor over processes (None on one)."""
        return {}

    def callbacks(self) -> list[TrainerCallback]:
        return []

    def checkpoint_extras(self) -> dict[str, torch.nn.Module]:
        """Modules saved beside the student in each checkpoint and loaded on resume."""
        return {}

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters trained with the student (one more optimizer group)."""
        return []


def prefix(mode: str) -> str:
    return "eval_" if mode == "eval" else ""


class ZeroGradsAfterStep(TrainerCallback):
    """Clears ``module``'s gradients after each optimizer step, as Trainer does for the model's only:
    a module trained beside the model (the feature projection) would otherwise add up its gradients
    over every step."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def on_step_end(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


class FeatureLosses(StepAddOn):
    """Hidden-state and attention-relation losses (``loss_hidden`` / ``loss_attention``: means over items
    before their weights), with the projection trained alongside the student and saved beside it."""

    name = "features"

    def __init__(self, distiller: FeatureDistiller, attention: bool):
        self.component, self.attention = distiller, attention

    def forward_kwargs(self) -> dict[str, Any]:
        return self.component.forward_kwargs

    def loss_parts(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        terms = self.component.terms(ctx.student_outputs, ctx.teacher_outputs, ctx.inputs, ctx.counts[1])
        for key, value in terms.sums.items():
            ctx.sums[key] += value
        return {"features": terms.loss}

    def sum_keys(self) -> tuple[str, ...]:
        return ("hidden", "attention", "n_feature")

    def logs(self, mode, totals, reduce) -> dict[str, float]:
        logs = {}
        if totals and totals["n_feature"]:
            if self.component.mapping:
                logs[prefix(mode) + "loss_hidden"] = totals["hidden"] / totals["n_feature"]
            if self.attention:
                logs[prefix(mode) + "loss_attention"] = totals["attention"] / totals["n_feature"]
        return logs

    def callbacks(self) -> list[TrainerCallback]:
        return [ZeroGradsAfterStep(self.component)]

    def checkpoint_extras(self) -> dict[str, torch.nn.Module]:
        return {"feature_projection": self.component.projection}

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.component.parameters())


class OnPolicySampling(StepAddOn):
    """Sampled completions replace the data's before a window is counted; logs the soft term on each
    (``loss_soft_generated`` / ``loss_soft_data``, with a teacher signal), ``completion_length`` and
    ``generation_time_share``; warns when the samples are far from the data (``watch``: ``OnPolicyWatch``
    on the logs of a mixed run) or, with ``start_task`` (a fully on-policy run), when the student starts
    far from the teacher on the first window's data (``hf_kd.on_policy_watch.check_start``;
    ``start_nll`` keeps the two NLLs read)."""

    name = "on_policy"

    def __init__(
        self, batches: OnPolicyBatches, has_teacher: bool, watch: bool, start_task: Task | None = None
    ):
        self.component, self.has_teacher, self.watch = batches, has_teacher, watch
        self.start_task, self.start_nll = start_task, None

    def before_window(self, batches, *, student, teacher, step):
        if self.start_task is not None and teacher is not None:  # once, before the data's rows are replaced
            self.start_nll = check_start(batches[0], self.start_task, student, teacher, step)
            self.start_task = None
        return [
            self.component(batch, student=student, teacher=teacher, step=step, index=index)
            for index, batch in enumerate(batches)
        ]

    def observe(self, ctx: StepContext) -> None:
        source = "generated" if ctx.writer is not None else "data"
        ctx.sums["soft_" + source] += ctx.terms.soft_sum.detach().float()
        ctx.sums["n_soft_" + source] += ctx.items.soft_mask.sum().float()

    def sum_keys(self) -> tuple[str, ...]:
        return ("soft_generated", "n_soft_generated", "soft_data", "n_soft_data")

    def logs(self, mode, totals, reduce) -> dict[str, float]:
        logs = {}
        for source in ("generated", "data") if totals and self.has_teacher else ():
            if totals["n_soft_" + source]:
                logs[prefix(mode) + "loss_soft_" + source] = (
                    totals["soft_" + source] / totals["n_soft_" + source]
                )
        if mode == "train":
            logs.update(self.component.pop_logs(reduce))
        return logs

    def callbacks(self) -> list[TrainerCallback]:
        return [OnPolicyWatch()] if self.watch else []


class CompletionRecords(StepAddOn):
    """A few sampled completions per logging step with both models' per-token log-probs, appended to
    ``output_dir/completions.jsonl`` (``hf_kd.completion_log``)."""

    name = "completion_log"

    def __init__(self, log: CompletionLog):
        self.component = log

    def observe(self, ctx: StepContext) -> None:
        if ctx.writer is not None:
            dense = ctx.teacher_logits if torch.is_tensor(ctx.teacher_logits) else None
            self.component.record(ctx.inputs, ctx.writer, ctx.step + 1, ctx.student, dense)

    def logs(self, mode, totals, reduce) -> dict[str, float]:
        if mode == "train":
            self.component.write()
        return {}

    def callbacks(self) -> list[TrainerCallback]:
        return [self.component]


def record_term_gradients(sums: dict[str, Any], items: KDItems, settings: dict[str, Any]) -> None:
    """Add to ``sums`` the norms of the two weighted terms' gradients with respect to the student's logits
    (logged as ``grad_norm_hard`` / ``grad_norm_soft``): the parameters' gradient is the same Jacobian
    applied to their sum, so their ratio says which term steers the update. Two extra loss evaluations on
    detached logits (no pass through the model)."""
    logits = items.student_logits.detach().requires_grad_(True)
    with torch.enable_grad():
        (total,) = torch.autograd.grad(
            distillation_loss(logits, items.teacher, items.labels, **settings).loss, logits
        )
        (hard,) = torch.autograd.grad(distillation_loss(logits, None, items.labels, **settings).loss, logits)
    sums["grad_hard"] += hard.float().norm()
    sums["grad_soft"] += (total - hard).float().norm()
    sums["n_grad"] += 1.0


class TermGradientNorms(StepAddOn):
    """``grad_norm_hard`` / ``grad_norm_soft`` on the first training micro-batch of each logging window,
    for classification with both terms on (the outcome's hard/soft balance); on an LM's [tokens, V] logits
    it would cost two more full-vocabulary gradients per window for a report that does not cover LMs."""

    name = "gradient_norms"

    def observe(self, ctx: StepContext) -> None:
        if (
            ctx.mode == "train"
            and not ctx.sums.get("n_grad")
            and 0 < ctx.settings["alpha"] < 1
            and torch.is_tensor(ctx.items.student_logits)
        ):
            record_term_gradients(ctx.sums, ctx.items, ctx.settings)

    def sum_keys(self) -> tuple[str, ...]:
        return GRAD_KEYS

    def logs(self, mode, totals, reduce) -> dict[str, float]:
        if not totals or not totals["n_grad"]:
            return {}
        return {
            "grad_norm_hard": totals["grad_hard"] / totals["n_grad"],
            "grad_norm_soft": totals["grad_soft"] / totals["n_grad"],
        }


def build_addons(
    args,
    task,
    student: torch.nn.Module,
    processor: Any,
    *,
    teacher_signal=None,
    teacher: torch.nn.Module | None = None,
    generator=None,
    train_dataset=None,
    main_process: bool = True,
) -> list[StepAddOn]:
    """The run's add-ons from a ``DistillationConfig``, in the order the trainer calls them: features
    (``args.uses_features``), on-policy sampling (``args.lmbda`` > 0 or ``args.seq_kd``; its prompts checked
    against ``task.max_length``), the completion log (``args.log_completions``, main process) and, for an
    example-level task, the terms' gradient norms."""
    addons: list[StepAddOn] = []
    if args.uses_features:
        teacher_model = getattr(teacher_signal, "model", None)
        distiller = FeatureDistiller(args, task, student, teacher_model)
        addons.append(FeatureLosses(distiller, attention=args.attention_weight > 0))
    sampled = on_policy_batches(
        args, task, student, processor, teacher=teacher, process_index=args.process_index, generator=generator
    )
    if sampled is not None:
        if isinstance(train_dataset, Dataset):
            check_prompt_rows(train_dataset, task.max_length)
        watch = 0 < args.lmbda < 1 and not args.seq_kd  # data batches to compare the samples with
        fully = args.lmbda == 1 and not args.seq_kd and teacher_signal is not None  # none: check the start
        addons.append(
            OnPolicySampling(
                sampled,
                has_teacher=teacher_signal is not None,
                watch=watch,
                start_task=task if fully else None,
            )
        )
    if args.log_completions and main_process:
        addons.append(
            CompletionRecords(CompletionLog(args.output_dir, args.num_completions_to_log, processor))
        )
    if not task.token_level:
        addons.append(TermGradientNorms())
    return addons
