"""The teacher contract: what every teacher signal is and declares, whatever its source.

A teacher signal is called on a collated batch and returns the teacher's logits over the batch's items
as the task lays them out: dense logits (a tensor), top-k :class:`hf_kd.losses.SparseLogits`,
:class:`hf_kd.losses.AlignedLogits` (a teacher of another tokenizer), or
:class:`hf_kd.losses.WeightedTeachers` (several teachers of different tokenizers, each output with its
weight). It declares which of those it
returns (``returns``), whether its ``run`` gives the teacher's hidden states (``gives_features``) and
whether it can score sequences made at training time (``scores_samples``: on-policy). The trainer reads
these, never the signal's kind; :func:`check_teacher_signal` holds any signal to them.

:class:`SignalDefaults` gives a new source everything but ``__call__`` and ``returns``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch

from hf_kd.losses import AlignedLogits, SparseLogits, WeightedTeachers

TeacherOutput = torch.Tensor | SparseLogits | AlignedLogits | WeightedTeachers
"""What a teacher signal returns for a batch."""

OUTPUT_KINDS = {
    "dense": torch.Tensor,
    "sparse": SparseLogits,
    "aligned": AlignedLogits,
    "several": WeightedTeachers,
}
"""Each value of ``returns`` and the type it names."""


@runtime_checkable
class TeacherSignal(Protocol):
    """A source of teacher logits for distillation.

    Attributes:
        returns: what ``signal(batch)`` may return, among ``"dense"``, ``"sparse"``, ``"aligned"`` and
            ``"several"``.
        gives_features: whether ``run(batch, output_hidden_states=True, ...)`` returns the teacher's
            forward output with its hidden states (feature losses).
        scores_samples: whether it can score any token sequence, such as the student's sampled
            completions (on-policy), rather than only the rows it was prepared for.
        output_map: the index map that put the teacher's classes into the student's label order
            (``teacher_logits[..., output_map]``), already applied to what the signal returns; None when
            the orders agree. Callers reorder anything else of the teacher's (its logit layer) by it.
        model: the teacher model the signal runs, whose weights can be read (its logit layer), or None
            when no model runs in this process (cached or served logits, the uniform teacher).
        real_teacher: True when the logits are a trained teacher's, so that the student's agreement with
            them is worth reporting; False for a synthetic source (the uniform teacher).
        teachers: the teachers the signal combines, by name, each a callable ``batch -> output`` giving that
            teacher's part as the signal reads it (several teachers: the student's agreement with each is
            reported); empty for a signal of one teacher.
    """

    returns: tuple[str, ...]
    gives_features: bool
    scores_samples: bool
    output_map: list[int] | None
    model: torch.nn.Module | None
    real_teacher: bool
    teachers: Mapping[str, Callable[[dict[str, Any]], TeacherOutput]]

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """The teacher's logits for ``batch`` (a collated batch with ``labels``)."""

    def run(self, batch: dict[str, Any], **forward_kwargs: Any) -> tuple[TeacherOutput, Any]:
        """The teacher's logits and its forward output (None when no model runs here), the forward
        asked for ``forward_kwargs`` (only when ``gives_features``)."""

    def collator(self, collate: Callable[[list], dict]) -> Callable[[list], dict]:
        """The data collator to use with this signal, made from the task's ``collate``: ``collate``
        itself, or one that also starts work on each batch as soon as it is collated (a server's
        answer requested while the student trains on earlier batches)."""


class SignalDefaults:
    """The contract's defaults: no features, no scoring of new sequences, no model, the task's collator
    as it is, a real teacher, one teacher. A source sets ``returns`` and defines ``__call__``."""

    returns: tuple[str, ...] = ()
    gives_features = False
    scores_samples = False
    output_map: list[int] | None = None
    model: torch.nn.Module | None = None
    real_teacher = True
    teachers: Mapping[str, Callable[[dict[str, Any]], TeacherOutput]] = MappingProxyType({})

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        raise NotImplementedError

    def run(self, batch: dict[str, Any], **forward_kwargs: Any) -> tuple[TeacherOutput, Any]:
        if forward_kwargs:
            raise ValueError(
                f"{type(self).__name__} gives no teacher forward output (asked for {sorted(forward_kwargs)}): "
                "feature losses need a teacher that runs here (teacher_source: online)"
            )
        return self(batch), None

    def collator(self, collate: Callable[[list], dict]) -> Callable[[list], dict]:
        return collate


def check_teacher_signal(signal: Any) -> None:
    """Raise TypeError when ``signal`` does not satisfy :class:`TeacherSignal`: a missing attribute or
    method, or a ``returns`` outside ``OUTPUT_KINDS``."""
    missing = [
        name for name in (*TeacherSignal.__annotations__, "run", "collator") if not hasattr(signal, name)
    ]
    if missing or not callable(signal):
        raise TypeError(
            f"a teacher signal needs the attributes of hf_kd.teachers.contract.TeacherSignal; "
            f"{type(signal).__name__} lacks {missing or ['__call__']} (subclass SignalDefaults for the defaults)"
        )
    unknown = [kind for kind in signal.returns if kind not in OUTPUT_KINDS]
    if not signal.returns or unknown:
        raise TypeError(
            f"{type(signal).__name__}.returns={signal.returns!r}: expected some of {sorted(OUTPUT_KINDS)}"
        )
