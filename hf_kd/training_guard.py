"""A run that learns nothing, or learns from garbage, stops with a named error instead of ending in
success: a non-finite loss or gradient (checked before each optimizer step, so the weights and the last
checkpoint stay those of the last good step), and an optimizer step whose accumulation window holds
nothing to learn from."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_kd.checkpoints import latest_checkpoint


class TrainingStoppedError(RuntimeError):
    """Training stopped because continuing would only produce a broken or untrained student."""


class NonFiniteTrainingError(TrainingStoppedError):
    """The loss or a gradient is NaN or infinite."""


class NothingToLearnError(TrainingStoppedError):
    """An optimizer step whose window has no item for any term of the loss."""


def _kept(output_dir: str) -> str:
    checkpoint = latest_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if checkpoint is None:
        return "no checkpoint was written, nothing is saved"
    return f"the last good checkpoint, {checkpoint}, is kept; nothing later is saved"


def check_window(
    counts: list[float], *, hard_term: bool, soft_term: bool, step: int, output_dir: str
) -> None:
    """Refuse the accumulation window of optimizer step ``step`` whose item counts ``counts`` ([hard
    items, soft items]: tokens with a target for a causal LM, rows with a label / every row for a
    classifier) leave every asked-for term empty: no target with only the hard term (``hard_term``), no
    soft position when a soft term is asked for (``soft_term``)."""
    hard, soft = counts
    if soft_term and soft == 0:
        what = "no position for the soft term (no token with a target, no row)"
    elif not soft_term and hard == 0:
        what = "no item with a target (no labelled row, no token with a label)"
    else:
        return
    raise NothingToLearnError(
        f"optimizer step {step}: its batches hold {what}: the step would learn nothing. Rows without a "
        "target (a conversation without an assistant turn, a max_length that cuts every completion, "
        f"unlabelled rows with alpha 0) cannot be trained on; drop them or lengthen max_length. "
        f"{_kept(output_dir)}"
    )


class FiniteStepGuard(TrainerCallback):
    """Before each optimizer step: the loss terms recorded since the last log (``sums``, the trainer's
    running sums of the hard and soft terms and feature losses) and the gradient norm of ``modules``'
    parameters must be finite, else :class:`NonFiniteTrainingError` — the step is not taken, so the weights
    and the checkpoints already written stay those of the last good step. With several processes the
    verdict is agreed by all (``reduce``), so every process stops together."""

    TERMS = ("hard", "soft", "hidden", "attention")

    def __init__(self, sums: dict, modules: list[torch.nn.Module], reduce=None):
        self.sums = sums
        self.modules = modules
        self.reduce = reduce

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for module in self.modules for p in module.parameters() if p.grad is not None]
        values = [
            torch.as_tensor(self.sums[k], dtype=torch.float32).reshape(())
            for k in self.TERMS
            if k in self.sums
        ]
        device = grads[0].device if grads else args.device
        norm = torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros((), device=device)
        checked = torch.stack([norm.to(device), *(v.to(device) for v in values)])
        bad = ~torch.isfinite(checked)
        flag = bad.any().float().reshape(1)
        if self.reduce is not None and args.world_size > 1:
            flag = self.reduce(flag)  # every process stops, or none
        if not bool(flag.item()):
            return
        names = ["gradient norm", *(f"loss_{k}" for k in self.TERMS if k in self.sums)]
        found = ", ".join(
            f"{name} {value}"
            for name, value, flag in zip(names, checked.tolist(), bad.tolist(), strict=True)
            if flag
        )
        raise NonFiniteTrainingError(
            f"optimizer step {state.global_step + 1}: non-finite {found or 'values on another process'} "
            "(loss terms summed since the last log): the "
            "student would be corrupted by this step, so it is not taken. Look for a broken teacher or "
            "inputs, a learning rate too high, or half-precision overflow. "
            f"{_kept(args.output_dir)}"
        )
