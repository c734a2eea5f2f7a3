"""``temperature: auto``: the trainer sets τ itself before its first step, by the pre-flight's τ rule
(:func:`hf_kd.knowledge.preflight.choose_temperature`) on the teacher's outputs over its first training rows
— the same measures (:func:`hf_kd.knowledge.profile.teacher_profile`) and the same rule as
``scripts/preflight.py``, so the two never disagree on the same rows."""

from __future__ import annotations

import logging

import torch

from hf_kd.knowledge.preflight import Choice, choose_temperature
from hf_kd.knowledge.profile import teacher_profile
from hf_kd.predictions import collect_predictions

logger = logging.getLogger(__name__)

AUTO_TEMPERATURE_ROWS = 512
"""Training rows the teacher is read over (the pre-flight's default slice)."""

AUTO_TEMPERATURE_TOKENS = 4096
"""Token positions read for a token-level task (the pre-flight's default)."""


def auto_temperature(trainer) -> Choice:
    """τ for ``temperature: auto``: :func:`choose_temperature` on the profile of ``trainer.teacher_signal``
    over the first :data:`AUTO_TEMPERATURE_ROWS` rows of ``trainer.train_dataset`` (in order, labelled
    items only; :data:`AUTO_TEMPERATURE_TOKENS` positions of a token-level task). Leaves the random state
    as it found it: the run that follows is the run at the chosen τ, step for step."""
    if trainer.teacher_signal is None:
        return Choice(1.0, "the run reads no teacher (α 0 or no teacher): τ is unused")
    task = trainer.task
    if {"aligned", "several"} & set(trainer.teacher_signal.returns):
        raise ValueError(
            "temperature: auto reads the teacher's probability of each true token over the student's "
            "vocabulary; a teacher of another tokenizer (alone or in a mixture) has no such row: set a number "
            "for temperature"
        )
    dataset = trainer.train_dataset
    rows = dataset.select(range(min(AUTO_TEMPERATURE_ROWS, len(dataset))))
    with torch.random.fork_rng():  # a data loader draws its base seed from the global generator
        predictions = collect_predictions(
            rows,
            task,
            teacher_signal=trainer.teacher_signal,
            batch_size=trainer.args.per_device_eval_batch_size,
            max_items=AUTO_TEMPERATURE_TOKENS if task.token_level else None,
            device=trainer.args.device,
        )
    if not (predictions.labels >= 0).any():
        raise ValueError(
            f"temperature: auto reads the teacher's probability of the true class on labelled training rows; "
            f"the first {len(rows)} training rows have no label: set a number for temperature"
        )
    choice = choose_temperature(teacher_profile(predictions.teacher_logits, predictions.labels))
    logger.info("temperature: auto chose τ %g: %s", choice.value, choice.because)
    return choice
