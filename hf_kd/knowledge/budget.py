"""Is a KD run compared with its no-KD twin at an equal budget? Each run's optimizer steps, rows per step
and labelled rows seen, compared pair by pair: every difference is named, and the ones that decide the
result instead of the teacher make the outcome say it cannot judge.

Pure: :class:`~hf_kd.knowledge.outcome.RunFacts`-like objects in (``optimizer_steps``, ``batch_size``,
``labelled_rows``, ``unlabelled_rows``, ``labelled_rows_seen``, ``uses_soft_term``), sentences out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BUDGET_TOLERANCE = 0.02
"""Two budgets are equal when they differ by at most this share of the larger one: 2 % absorbs the last
partial batch of an epoch and an epoch count rounded in ``trainer_state.json`` (e.g. 504 vs 500 steps);
150 vs 200 steps, or 1.49× anything, is a different budget."""


@dataclass(frozen=True)
class BudgetComparison:
    """What :func:`compare_budgets` found for the runs compared."""

    differences: tuple[str, ...]
    """Every difference, in words (each pair's, where several seeds are compared)."""
    blocking: tuple[str, ...]
    """The short forms (``steps 200 vs 150``) of the differences that make the comparison measure the
    budget rather than the teacher: the outcome cannot judge while any is there."""
    same: bool
    """No blocking difference."""


def apart(a: float, b: float, tolerance: float = BUDGET_TOLERANCE) -> bool:
    """``a`` and ``b`` differ by more than ``tolerance`` of the larger one."""
    return abs(a - b) > tolerance * max(abs(a), abs(b))


def _ratio(a: float, b: float) -> str:
    return f"{max(a, b) / min(a, b):.2f}× apart" if min(a, b) > 0 else "one of them zero"


def _pair(kd, twin, tolerance: float) -> tuple[list[str], list[str]]:
    """Differences (words) and blocking ones (short forms) of one KD run and one twin."""
    words, blocking = [], []
    steps_apart = apart(kd.optimizer_steps, twin.optimizer_steps, tolerance)
    if steps_apart:
        words.append(
            f"optimizer steps {kd.optimizer_steps:,} (KD) vs {twin.optimizer_steps:,} (no KD), "
            f"{_ratio(kd.optimizer_steps, twin.optimizer_steps)}"
        )
        blocking.append(f"steps {kd.optimizer_steps:,} vs {twin.optimizer_steps:,}")
    batch_apart = apart(kd.batch_size, twin.batch_size, tolerance)
    if batch_apart:
        words.append(f"rows per optimizer step {kd.batch_size:,} (KD) vs {twin.batch_size:,} (no KD)")
        blocking.append(f"rows per step {kd.batch_size:,} vs {twin.batch_size:,}")
    if kd.labelled_rows != twin.labelled_rows:
        words.append(
            f"labelled rows {kd.labelled_rows:,} (KD) vs {twin.labelled_rows:,} (no KD): not the same labels"
        )
        blocking.append(f"labelled rows {kd.labelled_rows:,} vs {twin.labelled_rows:,}")
    a, b = kd.labelled_rows_seen, twin.labelled_rows_seen
    if apart(a, b, tolerance):
        seen = f"labelled rows seen {a:,.0f} (KD) vs {b:,.0f} (no KD), {_ratio(a, b)}"
        # At equal steps and rows per step, a KD run that also feeds unlabelled rows sees its labelled rows
        # fewer times than a twin training on labelled rows only: that is the trade being measured (the
        # same compute spent on the teacher's soft labels instead of more passes over the labels).
        traded = (
            not steps_apart
            and not batch_apart
            and kd.labelled_rows == twin.labelled_rows
            and kd.unlabelled_rows > 0
            and twin.unlabelled_rows == 0
            and a < b
        )
        if traded:
            share = kd.unlabelled_rows / (kd.unlabelled_rows + kd.labelled_rows)
            seen += (
                f": at equal steps the KD run spends {share:.0%} of its rows on {kd.unlabelled_rows:,} "
                "unlabelled rows, the twin all of its rows on labels (the trade KD with unlabelled data makes)"
            )
        else:
            blocking.append(f"labelled rows seen {a:,.0f} vs {b:,.0f}")
        words.append(seen)
    if not twin.uses_soft_term and twin.unlabelled_rows:
        words.append(
            f"the twin iterated over {twin.unlabelled_rows:,} unlabelled rows from which nothing learns at α = 0"
        )
    return words, blocking


def compare_budgets(kd: Sequence, twin: Sequence, tolerance: float = BUDGET_TOLERANCE) -> BudgetComparison:
    """Each KD run against the twin of its seed (every twin when no seed is shared): optimizer steps, rows
    per step, the labelled rows and the labelled rows seen must agree within ``tolerance``. Labelled rows
    seen may differ only by the KD run's unlabelled rows at equal steps (named, not blocking)."""
    by_seed = {r.seed: r for r in twin}
    pairs = [(k, by_seed[k.seed]) for k in kd if k.seed in by_seed] or [(k, t) for k in kd for t in twin]
    found = [(k, t, *_pair(k, t, tolerance)) for k, t in pairs]
    alike = all(words == found[0][2] for _, _, words, _ in found)  # the same for every pair: said once
    differences: list[str] = []
    blocking: list[str] = []
    for k, t, words, block in found:
        tag = "" if alike else f" (KD seed {k.seed}, twin seed {t.seed})"
        differences += [w + tag for w in words if w + tag not in differences]
        blocking += [b for b in block if b not in blocking]
    return BudgetComparison(tuple(differences), tuple(blocking), not blocking)


def budget_remedy(kd, twin) -> str:
    """What to run so that the two compare at an equal budget."""
    steps = max(kd.optimizer_steps, twin.optimizer_steps)
    return (
        f"Compare at the same budget: give both runs max_steps: {steps:,} (the longer of the two) and the same "
        "batch and labelled rows, and let the twin train on its labelled rows only (use_unlabeled: false, or "
        "hf_kd's default of dropping inert rows)."
    )
