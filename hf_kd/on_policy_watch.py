"""A warning during on-policy training when the student's own completions are far from what the teacher
would write: the soft term on its samples (``loss_soft_generated``) far above the same term on the
data's completions (``loss_soft_data``), as the trainer logs them (``lmbda`` strictly between 0 and 1).

A student that does not yet write plausible text teaches itself little from the teacher's scores of its
garbage: warm-start it (labels or off-policy KD first) or lower ``lmbda``. ``scripts/preflight.py`` checks
the same before training (the student's per-token NLL on the data against the teacher's), and is the only
check for fully on-policy runs (``lmbda: 1``: no data batches to compare with).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

GENERATED_OVER_DATA = 3.0
"""Warn when ``loss_soft_generated`` ≥ this × ``loss_soft_data`` in one logging window. Not calibrated on
runs that diverged: on the reversal task from scratch (BENCHMARKS.md, "Why `mixed` is near 0 %"), the
student's samples and the data scored alike (0.18 vs 0.20) while the run failed for another reason (a weak
JSD signal) — this line catches a different failure, samples the teacher finds far worse than the data."""


def generated_far_from_data(logs: Mapping[str, float], ratio: float = GENERATED_OVER_DATA) -> str | None:
    """The warning's sentence when ``logs`` hold both soft losses and generated ≥ ``ratio`` × data; else None."""
    generated, data = logs.get("loss_soft_generated"), logs.get("loss_soft_data")
    if generated is None or data is None or not data > 0 or generated < ratio * data:
        return None
    return (
        f"on-policy: the soft loss on the student's own completions ({generated:.4g}) is {generated / data:.1f}× "
        f"the one on the data's ({data:.4g}, warning at {ratio:g}×): the student does not yet write text the "
        "teacher finds plausible, and learns little from its scores of it. Warm-start it first (labels or "
        "off-policy KD, lmbda: 0) or lower lmbda; scripts/preflight.py measures this before a run."
    )


class OnPolicyWatch(TrainerCallback):
    """Logs :func:`generated_far_from_data`'s warning once per run, at the first logging window that shows it."""

    def __init__(self, ratio: float = GENERATED_OVER_DATA):
        self.ratio, self.warned = ratio, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        message = None if self.warned or not logs else generated_far_from_data(logs, self.ratio)
        if message is not None:
            self.warned = True
            logger.warning("step %d: %s", state.global_step, message)
