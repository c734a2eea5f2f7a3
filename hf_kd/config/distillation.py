"""``DistillationConfig``: ``transformers.TrainingArguments`` with the groups of :mod:`hf_kd.config.groups`
as one flat dataclass (YAML keys and flags are the field names), checked group by group, then by the
rules between groups (:mod:`hf_kd.config.rules`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import TrainingArguments

from hf_kd.config.checks import check_finite
from hf_kd.config.docs import joined_doc
from hf_kd.config.groups import GROUPS
from hf_kd.config.rules import RULES
from hf_kd.redact import redact, redact_value


# The groups reversed: a dataclass takes its bases' fields from the last base up, so they follow
# TrainingArguments' fields in the order of GROUPS.
@dataclass
class DistillationConfig(*reversed(GROUPS), TrainingArguments):
    def __post_init__(self) -> None:
        check_finite(self)
        TrainingArguments.__post_init__(self)
        for group in GROUPS:
            group.check(self)
        for rule in RULES:
            rule.check(self)

    def __getstate__(self) -> dict[str, Any]:
        """The pickled state (``training_args.bin``, written next to every saved student) without any
        secret (``hf_kd.redact.redact_value``): ``hub_token`` and every secret-named key at any depth
        (``teacher_model_init_kwargs: {token: …}``) become None, credential-shaped strings ``<redacted>``.
        A secret never reaches a file or the Hub (a ``copy.deepcopy`` has none either)."""
        return redact_value({**self.__dict__, "hub_token": None}, (self.hub_token,), replacement=None)

    def to_dict(self) -> dict[str, Any]:
        """``TrainingArguments.to_dict`` (what ``str(config)``, logs and integrations show) with every secret
        redacted (``hf_kd.redact.redact_value``)."""
        return redact_value(super().to_dict(), (self.hub_token,))

    def __repr__(self) -> str:
        """``TrainingArguments``' listing of every field, every secret redacted (``hf_kd.redact.redact``)."""
        return redact(TrainingArguments.__str__(self), (self.hub_token,))

    __str__ = __repr__

    @property
    def needs_teacher_model(self) -> bool:
        """Whether the run loads the teacher's weights (a source that does, like ``online``): for the soft
        term, or to write completions."""
        return self.source.loads_model and (self.uses_teacher or self.seq_kd)

    @property
    def uses_teacher(self) -> bool:
        """Whether the soft term is on (alpha > 0 and a teacher-based target)."""
        return self.alpha > 0 and self.synthetic_teacher not in ("none", "ls")


DistillationConfig.__doc__ = joined_doc(
    r"""Training arguments of :class:`hf_kd.DistillationTrainer`.

    The loss is ``(1 − alpha) · CE(labels, student) + alpha · s · D(teacher^τ, student^τ)`` with
    τ = ``temperature``, D = ``divergence`` and s = τ² when ``temperature_squared`` is on
    (docs/knowledge.md#the-distillation-loss). The fields below are the ones this class adds (each group
    a dataclass of ``hf_kd.config.groups``); every other field is a ``transformers.TrainingArguments``
    field.
    """,
    GROUPS,
)
# The name a pickle (training_args.bin) records: the one it had before the groups, kept wherever it lives.
DistillationConfig.__module__ = "hf_kd.config"
