"""``student_logits_from_hidden_states`` (and ``teacher_logits_from_hidden_states``): a model's final hidden
states and output-layer weight in place of its logits, so that the loss makes the logits chunk by chunk
(``hf_kd.losses.HiddenStates``) and a large vocabulary's [B, T, V] tensor is never whole."""

from __future__ import annotations

import inspect

import torch

from hf_kd.losses import HiddenStates
from hf_kd.tasks import Task

PREFIX = "student_logits_from_hidden_states: true"


def check_student_for_hidden_states(
    task: Task, model: torch.nn.Module, *, sharded: bool, compute_metrics
) -> None:
    """What the option needs, checked before training: the causal-lm task, a forward that takes
    ``logits_to_keep``, an output layer with a weight and no bias, no sharded weights (``sharded``: FSDP or
    ZeRO-3) and no ``compute_metrics`` (it would need the logits)."""
    check_output_layer(task, model, PREFIX)
    if sharded:
        raise ValueError(
            f"{PREFIX} uses the output layer's weight outside the forward: not with FSDP or ZeRO-3"
        )
    if compute_metrics is not None:
        raise ValueError(f"{PREFIX} never makes the student's logits, which compute_metrics needs")


def check_output_layer(task: Task, model: torch.nn.Module, option: str) -> None:
    """What making ``model``'s logits from its hidden states needs (``option`` names the setting in the
    error): the causal-lm task, a forward that takes ``logits_to_keep``, an output layer with a weight
    and no bias."""
    if not task.token_level:
        raise ValueError(f"{option} needs the causal-lm task, got {task.name!r}")
    name = type(model).__name__
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{option}: {name}.forward takes no logits_to_keep, so its logits cannot be skipped")
    head = model.get_output_embeddings()
    if getattr(head, "weight", None) is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{option} needs an output layer with a weight and no bias; {name} has {head!r}")


def student_hidden_states(
    model: torch.nn.Module,
    weight: torch.Tensor,
    student_inputs: dict,
    length: int,
    *,
    check: bool,
    option: str = "student_logits_from_hidden_states",
) -> HiddenStates:
    """The model's final hidden states [B, T, H] and output-layer ``weight``, its logits not made: the
    forward runs through ``model`` (DDP's hooks included) with ``logits_to_keep`` selecting no position.
    With ``check`` (the first batch) it keeps the last position to check that the logits are
    hidden · weightᵀ (a model that scales or soft-caps them after the output layer is refused; ``option``
    names the setting in the error). The teacher's go through it too (``teacher_logits_from_hidden_states``)."""
    keep = torch.arange(length - 1 if check else length, length, device=weight.device)
    outputs = model(**student_inputs, logits_to_keep=keep, output_hidden_states=True)
    hidden = outputs.hidden_states[-1]
    if check:
        with torch.no_grad():
            made = (hidden[:, -1:] @ weight.T).float()
        if not torch.allclose(outputs.logits.float(), made, rtol=1e-2, atol=1e-2):
            raise ValueError(
                f"{option}: {type(model).__name__}'s logits are not its last hidden "
                f"state times its output layer (max difference {(outputs.logits - made).abs().max():.3g}); "
                "set it to false for this model"
            )
    return HiddenStates(hidden, weight)
