"""Was a run still learning when it stopped? Measured against the learning rate spent, not the steps taken.

A decaying schedule (linear, cosine) shrinks each update towards the end, so any loss curve flattens on
the step axis in the last quarter of a run whether the student has converged or not: the flat end of a
short linear-decay run reads exactly like the flat end of a converged one. Measured against the
*learning-rate time* ``T(s) = Σ_{t ≤ s} η_t`` (the distance the optimizer was allowed to move), a curve
flattens only when the loss stops answering to the updates: converged. At a constant learning rate both
clocks agree.

:func:`late_fall_share`: the share of the loss's whole fall (first quarter's mean → last quarter's) made
over the last quarter of the clock: 1/3 on a straight line, near 0 once the curve has flattened.

Pure: logged training entries (``step``, ``learning_rate``, a loss) in, numbers out.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence


def lr_clock(entries: Sequence[Mapping[str, float]]) -> list[float] | None:
    """The learning-rate time at each logged entry, ``T_i = Σ_{j ≤ i} η_j · (step_j − step_{j−1})`` (the
    Trainer logs the rate at the end of each logging window; ``step_0 = 0``). None when an entry has no
    ``learning_rate`` or the rate is never positive."""
    clock, total, previous = [], 0.0, 0
    for entry in entries:
        rate = entry.get("learning_rate")
        if rate is None:
            return None
        total += max(float(rate), 0.0) * (entry["step"] - previous)
        previous = entry["step"]
        clock.append(total)
    return clock if total > 0 else None


def _quarter_means(values: Sequence[float], clock: Sequence[float]) -> tuple[float, float, float] | None:
    """Means of ``values`` whose clock lies in the first, second-to-last and last quarter of the clock's
    span (None when a quarter holds no value)."""
    start, end = clock[0], clock[-1]
    span = end - start
    if span <= 0:
        return None
    quarters: list[list[float]] = [[], [], [], []]
    for value, time in zip(values, clock, strict=True):
        quarters[min(3, int(4 * (time - start) / span))].append(value)
    if not (quarters[0] and quarters[2] and quarters[3]):
        return None
    return statistics.fmean(quarters[0]), statistics.fmean(quarters[2]), statistics.fmean(quarters[3])


def late_fall_share(values: Sequence[float], clock: Sequence[float] | None = None) -> float | None:
    """Share of the whole fall of ``values`` (mean over the clock's first quarter → mean over its last)
    made over the last quarter of ``clock`` (default: the entries' order, i.e. steps at a fixed logging
    interval). About 1/3 on a straight line, near 0 once a curve has flattened, whatever the size of the
    values. None with fewer than 4 values, an empty quarter or no fall."""
    if len(values) < 4:
        return None
    clock = list(range(len(values))) if clock is None else clock
    means = _quarter_means(values, clock)
    if means is None or means[0] <= means[2]:
        return None
    first, before, last = means
    return (before - last) / (first - last)


def late_rise(values: Sequence[float], clock: Sequence[float] | None = None) -> float | None:
    """How much the mean of ``values`` (a metric, higher is better) over the clock's last quarter exceeds
    its mean over the quarter before (None with fewer than 4 values or an empty quarter)."""
    if len(values) < 4:
        return None
    clock = list(range(len(values))) if clock is None else clock
    means = _quarter_means(values, clock)
    return None if means is None else means[2] - means[1]


def clock_at(
    steps: Sequence[float], entries: Sequence[Mapping[str, float]], clock: Sequence[float]
) -> list[float]:
    """The learning-rate time at each of ``steps`` (e.g. evaluation steps), interpolated linearly between
    the logged ``entries`` of ``clock`` (held at the ends)."""
    points = [(0.0, 0.0)] + [(float(e["step"]), t) for e, t in zip(entries, clock, strict=True)]
    out = []
    for step in steps:
        below = max((p for p in points if p[0] <= step), key=lambda p: p[0])
        above = min((p for p in points if p[0] >= step), key=lambda p: p[0], default=points[-1])
        width = above[0] - below[0]
        out.append(below[1] if width <= 0 else below[1] + (step - below[0]) / width * (above[1] - below[1]))
    return out
