"""A teacher whose outputs are no distribution (a NaN or infinite logit, or damaged weights) refused
by name, wherever a teacher runs: the cache capture and the online teacher of a training step."""

from __future__ import annotations

import math

import torch


class NonFiniteTeacherError(ValueError):
    """The teacher's weights or outputs hold a NaN or an infinity: nothing can be distilled from it."""


def check_teacher_logits(
    logits: torch.Tensor, mask: torch.Tensor | None, where: str, first_row: int, refusal: str
) -> None:
    """Refuse a batch of teacher logits [B, (T,) K] (rows ``first_row``… of ``where``; per token, the
    positions of ``mask``) of which one output is no distribution: a NaN or +inf logit, or every logit
    −inf. One reduction over the classes; names the first such row and position, then ``refusal`` (what
    is not done with it)."""
    top = logits.detach().amax(-1)  # NaN if any logit is NaN, +inf if one is, −inf if all are
    bad = ~torch.isfinite(top) if mask is None else ~torch.isfinite(top) & mask.bool()
    if not bool(bad.any()):
        return
    index = bad.nonzero()[0].tolist()
    value = top[tuple(index)].item()
    held = "a NaN logit" if math.isnan(value) else ("a +inf logit" if value > 0 else "only −inf logits")
    position = f", position {index[1]}" if len(index) > 1 else ""
    raise NonFiniteTeacherError(
        f"the teacher's output for {where}, row {first_row + index[0]}{position} holds {held}: "
        f"not a distribution (a broken teacher: overflow in half precision, or damaged weights?); {refusal}"
    )


def check_teacher_weights(model: torch.nn.Module, name: str) -> None:
    """Refuse a teacher (``name``: where it was loaded from) one of whose parameters or buffers holds a
    NaN or an infinity, naming the first such tensor; weights not materialised here (meta) are skipped."""
    tensors = (*model.named_parameters(), *model.named_buffers())
    for tensor_name, tensor in tensors:
        if tensor.is_meta or not tensor.is_floating_point():
            continue
        if not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteTeacherError(
                f"the teacher {name!r} has {count} non-finite value(s) (NaN or infinity) in its weight "
                f"{tensor_name!r} of shape {list(tensor.shape)}: its outputs would be no distribution; "
                "refusing to distil from it (a damaged checkpoint, or one saved after a diverged run?)"
            )
