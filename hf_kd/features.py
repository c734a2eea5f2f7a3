"""Feature distillation in a training step: which forward outputs the losses of ``hf_kd.feature_losses``
read, the positions that count, and the learned projection (trained with the student, never saved
into it).

The teacher's hidden states come from the same forward as its logits (``output_hidden_states``); the
last layer's queries, keys and values of both models are read by forward hooks on their projections
(so the attention implementation stays the fast one). Checked when the distiller is built, before any
training: an online teacher, blocks the code can find, the same positions on both sides, and for the
attention relations query/key/value projections of one width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hf_kd.feature_losses import (
    FeatureProjection,
    attention_relation_loss,
    check_layer_mapping,
    default_layer_mapping,
    hidden_state_loss,
)
from hf_kd.student_init import find_layer_list
from hf_kd.tasks import Task
from hf_kd.tasks.base import NO_LABEL
from hf_kd.tasks.causal_lm import next_token_targets

PROJECTIONS = {
    "q": ("query", "q_proj", "q_lin"),
    "k": ("key", "k_proj", "k_lin"),
    "v": ("value", "v_proj", "v_lin"),
}
"""Names of the query, key and value projections inside a block (BERT/RoBERTa/ViT, Llama family, DistilBERT)."""


@dataclass
class FeatureTerms:
    """One micro-batch's feature losses: ``loss`` (weighted and normalised, added to the total) and the
    raw sums and item count behind the ``loss_hidden`` / ``loss_attention`` logs."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]


def last_block_projections(model: nn.Module) -> dict[str, nn.Linear]:
    """The query, key and value ``nn.Linear`` of ``model``'s last block; ValueError naming what is missing."""
    _, blocks = find_layer_list(model)
    found: dict[str, nn.Linear] = {}
    for path, module in blocks[-1].named_modules():
        for role, names in PROJECTIONS.items():
            if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in names:
                found.setdefault(role, module)
    missing = [role for role in PROJECTIONS if role not in found]
    if missing:
        raise ValueError(
            f"attention_weight > 0: {type(model).__name__}'s last block has no separate {missing} projection "
            f"(looked for {[n for r in missing for n in PROJECTIONS[r]]}); attention relations need them"
        )
    if found["q"].out_features != found["k"].out_features:
        raise ValueError(
            f"attention_weight > 0: {type(model).__name__}'s queries ({found['q'].out_features}) and keys "
            f"({found['k'].out_features}) differ in width (grouped-query attention), not supported"
        )
    return found


class FeatureDistiller(nn.Module):
    """The feature terms of a run: ``hidden_weight · L_hidden + attention_weight · L_attention``, each a
    sum over the task's items divided by the window's soft-item count, as the logit terms are.

    Items: a classification example (its positions' losses averaged over its attention mask), or a causal
    LM token with a next-token target (completion tokens only when the labels mask the prompt).
    """

    def __init__(self, args, task: Task, student: nn.Module, teacher: nn.Module | None):
        super().__init__()
        if teacher is None:
            raise ValueError(
                "hidden_loss / attention_weight need an online teacher model (its hidden states are read "
                "in its forward); this run has none"
            )
        self.task, self.args = task, args
        self.causal = task.token_level
        student_depth = len(find_layer_list(student)[1])
        teacher_depth = len(find_layer_list(teacher)[1])
        self.hidden_kind = args.hidden_loss
        self.mapping = {}
        if args.hidden_loss != "none":
            mapping = args.layer_mapping or default_layer_mapping(student_depth, teacher_depth)
            self.mapping = check_layer_mapping(mapping, student_depth, teacher_depth)
        self.projection = FeatureProjection(student.config.hidden_size, teacher.config.hidden_size)
        self._captured: dict[tuple[str, str], torch.Tensor] = {}
        if args.attention_weight > 0:
            for side, model in (("student", student), ("teacher", teacher)):
                for role, module in last_block_projections(model).items():
                    module.register_forward_hook(self._capture_hook(side, role))
        self.to(args.device)
        if args.world_size > 1:
            for parameter in self.projection.parameters():
                parameter.register_post_accumulate_grad_hook(_average_over_processes)

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """What both forwards are asked for: hidden states when a hidden loss is on."""
        return {"output_hidden_states": True} if self.mapping else {}

    def _capture_hook(self, side: str, role: str):
        def hook(module, inputs, output):
            self._captured[(side, role)] = output

        return hook

    def position_weights(self, batch: dict[str, Any], length: int) -> torch.Tensor:
        """[B, T] weights of the positions that count, summing to 1 per example (classification) or 1 per
        token with a next-token target (causal LM)."""
        labels = batch["labels"]
        if self.causal:
            return (next_token_targets(labels) != NO_LABEL).float()
        mask = batch.get("attention_mask")
        if mask is None or mask.shape[1] != length:  # images: every patch (and the class token)
            mask = torch.ones(labels.shape[0], length, device=labels.device)
        mask = mask.float()
        return mask / mask.sum(1, keepdim=True).clamp(min=1)

    def key_mask(self, batch: dict[str, Any], length: int, device: torch.device) -> torch.Tensor:
        """[B, T, T]: the keys each query may attend to (not padding; not the future for a causal LM;
        always itself, so that a padded query still has a distribution)."""
        mask = batch.get("attention_mask")
        size = batch["labels"].shape[0]
        keys = (
            torch.ones(size, length, dtype=torch.bool, device=device)
            if mask is None or mask.shape[1] != length
            else mask.bool()
        )
        allowed = keys[:, None, :].expand(size, length, length)
        if self.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
        return allowed | torch.eye(length, dtype=torch.bool, device=device)

    def terms(
        self, student_outputs, teacher_outputs, batch: dict[str, Any], num_items: torch.Tensor
    ) -> FeatureTerms:
        """The feature terms of one micro-batch, ``num_items`` the window's soft-item count."""
        args = self.args
        loss = torch.zeros((), device=num_items.device)
        sums: dict[str, torch.Tensor] = {}
        weights = None
        if self.mapping:
            student_hidden, teacher_hidden = student_outputs.hidden_states, teacher_outputs.hidden_states
            weights = self.position_weights(batch, student_hidden[0].shape[1])
            sums["hidden"] = hidden_state_loss(
                [student_hidden[s] for s in self.mapping],
                [teacher_hidden[t] for t in self.mapping.values()],
                weights,
                self.hidden_kind,
                self.projection,
            )
            loss = loss + args.hidden_weight * sums["hidden"] / num_items
        if args.attention_weight > 0:
            captured = self._captured
            student = tuple(captured[("student", role)] for role in PROJECTIONS)
            teacher = tuple(captured[("teacher", role)] for role in PROJECTIONS)
            length = student[0].shape[1]
            weights = self.position_weights(batch, length) if weights is None else weights
            sums["attention"] = attention_relation_loss(
                student,
                teacher,
                weights,
                self.key_mask(batch, length, student[0].device),
                args.attention_relation_heads,
            )
            loss = loss + args.attention_weight * sums["attention"] / num_items
        self._captured = {}  # the hooked activations are not kept past the step
        sums["n_feature"] = weights.sum().detach()
        return FeatureTerms(loss, {k: v.detach().float() for k, v in sums.items()})


def _average_over_processes(parameter: torch.Tensor) -> None:
    """The projection lives outside the DDP-wrapped student: average its gradient over processes, as
    DDP does for the student's (its accumulated gradient is the same on every process afterwards)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(parameter.grad)
        parameter.grad /= dist.get_world_size()


def describe_feature_losses(args) -> str | None:
    """One line for the card and the run record: the feature losses used, or None."""
    parts = []
    if args.hidden_loss != "none":
        mapping = args.layer_mapping or "spread evenly over depth"
        parts.append(f"hidden-state {args.hidden_loss} (weight {args.hidden_weight}, layers {mapping})")
    if args.attention_weight > 0:
        parts.append(
            f"MiniLM attention and value relations of the last layer (weight {args.attention_weight}, "
            f"{args.attention_relation_heads} relation heads)"
        )
    return "; ".join(parts) or None
