"""The rules between fields of different groups, in one table: each names its fields, when they clash,
and the message (which names every one of them) a config breaking it raises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hf_kd.losses import DIVERGENCE_REGISTRY
from hf_kd.teachers.sources import TEACHER_SOURCES


@dataclass(frozen=True)
class Rule:
    """Values of ``fields`` (from at least two groups) that a config may not take together."""

    fields: tuple[str, ...]
    broken: Callable[[Any], bool]
    """Whether a config (a ``DistillationConfig`` whose groups passed their own checks) breaks the rule."""
    message: Callable[[Any], str]
    """The error for a config breaking the rule: it names every one of ``fields``."""

    def check(self, config: Any) -> None:
        """Raise ``ValueError(message(config))`` when ``config`` breaks the rule."""
        if self.broken(config):
            raise ValueError(self.message(config))


FEATURES = ("hidden_loss", "attention_weight")


def sources_that(capability: str) -> str:
    """The registered teacher sources with ``capability`` (a flag of ``TeacherSource``), as a recipe names them."""
    return " or ".join(name for name, source in TEACHER_SOURCES.items() if getattr(source, capability))


RULES = (
    Rule(
        (*FEATURES, "alpha", "synthetic_teacher"),
        lambda c: c.uses_features and not c.uses_teacher,
        lambda c: (
            f"hidden_loss / attention_weight need the teacher: alpha={c.alpha} with "
            f"synthetic_teacher={c.synthetic_teacher!r} runs none (use alpha > 0 and a teacher-based target)"
        ),
    ),
    Rule(
        (*FEATURES, "teacher_source"),
        lambda c: c.uses_features and not c.source.gives_features,
        lambda c: (
            f"hidden_loss / attention_weight read the teacher's hidden states, which a {c.teacher_source} "
            f"teacher does not have: use teacher_source: {sources_that('gives_features')}"
        ),
    ),
    *(
        Rule(
            (*FEATURES, name),
            lambda c, name=name: c.uses_features and getattr(c, name),
            lambda c, name=name: f"hidden_loss / attention_weight are not supported with {name}",
        )
        for name in ("student_logits_from_hidden_states", "teacher_logits_from_hidden_states")
    ),
    Rule(
        ("teacher_logits_from_hidden_states", "teacher_source"),
        lambda c: c.teacher_logits_from_hidden_states and c.teacher_source == "cached",
        lambda c: (
            "teacher_logits_from_hidden_states: true needs an online teacher; teacher_source='cached' "
            "stores top-k logits, not hidden states"
        ),
    ),
    Rule(
        ("lmbda", "seq_kd", "teacher_source"),
        lambda c: (c.lmbda > 0 and not c.source.scores_samples) or (c.seq_kd and not c.source.loads_model),
        lambda c: (
            f"lmbda={c.lmbda} / seq_kd={c.seq_kd} with teacher_source={c.teacher_source!r}: a "
            f"{c.teacher_source} teacher cannot score (or write) newly sampled tokens; use teacher_source: "
            f"{sources_that('scores_samples' if c.lmbda > 0 else 'loads_model')}, or lmbda: 0 and seq_kd: false"
        ),
    ),
    Rule(
        ("lmbda", "alpha", "synthetic_teacher"),
        lambda c: c.lmbda > 0 and not c.uses_teacher,
        lambda c: (
            f"lmbda={c.lmbda} with alpha={c.alpha} and synthetic_teacher={c.synthetic_teacher!r}: on the "
            "student's own samples only the teacher's soft term teaches anything; set alpha > 0 with "
            "synthetic_teacher: kd"
        ),
    ),
    Rule(
        ("divergence", "synthetic_teacher"),
        lambda c: DIVERGENCE_REGISTRY[c.divergence].on_logits and c.synthetic_teacher not in ("kd", "none"),
        lambda c: (
            f"divergence={c.divergence!r} compares logits; synthetic_teacher={c.synthetic_teacher!r} "
            "gives probabilities"
        ),
    ),
)
"""Every rule between groups, checked in this order after each group's own checks."""
