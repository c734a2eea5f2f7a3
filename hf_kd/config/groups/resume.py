"""Resuming a run from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from hf_kd.config.checks import Group
from hf_kd.config.docs import documented


@documented()
@dataclass
class ResumeArgs(Group):
    r"""Resuming (a `transformers.TrainingArguments` field that hf_kd reads itself)

    Parameters:
        resume_from_checkpoint (`str`, `bool` or `None`, *optional*, defaults to `None`):
            Resume training: `true` from the latest complete `checkpoint-N` in `output_dir`, or a
            checkpoint path; `false` or `None`: start afresh.
    """

    resume_from_checkpoint: str | None = None

    def check(self) -> None:
        self.resume_from_checkpoint = resume_flag(self.resume_from_checkpoint)


def resume_flag(value: str | bool | None) -> str | bool | None:
    """``resume_from_checkpoint`` as ``Trainer.train`` takes it: "true" (command line) or true (recipe) →
    True (the latest checkpoint), "false"/false/"" → None, anything else a checkpoint path."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        value = value.strip().lower() == "true"
    return value or None
