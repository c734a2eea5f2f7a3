"""Causal-LM rows without a token to learn (a next-token target): found from the Arrow buffers, dropped
out loud, or the split refused when none is left."""

from __future__ import annotations

import logging

import numpy as np

from hf_kd.tasks.base import NO_LABEL

logger = logging.getLogger(__name__)


class NoTargetError(ValueError):
    """A causal-LM split none of whose rows has a token to learn (a target) after truncation."""


def rows_with_targets(dataset) -> np.ndarray:
    """Indices of the prepared causal-LM rows (``labels``, else ``input_ids``: plain text is its own target)
    with at least one next-token target: a label other than NO_LABEL after the row's first token (what
    ``CausalLMTask.count_items`` counts). Read from the Arrow buffers, a batch of rows at a time."""
    column = "labels" if "labels" in dataset.column_names else "input_ids"
    kept, start = [], 0
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=10_000):
        lists = batch.column(column).combine_chunks()
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy(zero_copy_only=False)
        scored = values != NO_LABEL if column == "labels" else np.ones(len(values), dtype=bool)
        offsets = offsets - offsets[0]
        lengths = np.diff(offsets)
        scored[offsets[:-1][lengths > 0]] = False  # a row's first token has no target
        running = np.concatenate([[0], np.cumsum(scored)])
        kept.append(start + np.flatnonzero(running[offsets[1:]] - running[offsets[:-1]]))
        start += len(lengths)
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def drop_rows_without_target(dataset, where: str, max_length: int):
    """``dataset`` (prepared causal-LM rows of ``where``) without the rows that have no target after
    truncation to ``max_length`` (a conversation without an assistant turn, a prompt whose completion the
    truncation cut off), in one warning line: they add steps and learn nothing. None left raises
    :class:`NoTargetError`, naming why."""
    keep = rows_with_targets(dataset)
    if len(keep) == len(dataset):
        return dataset
    why = (
        "conversations without an assistant turn, prompts without a completion, or a max_length that cuts "
        f"every completion off (max_length={max_length})"
    )
    if len(keep) == 0:
        raise NoTargetError(
            f"none of the {len(dataset)} rows of {where} has a token to learn after truncation ({why}): "
            "training or evaluating on them would learn or score nothing; give rows with completions "
            "(assistant turns) or raise max_length"
        )
    logger.warning(
        "dropping %d of the %d rows of %s: they have no token to learn after truncation (%s); %d remain",
        len(dataset) - len(keep),
        len(dataset),
        where,
        why,
        len(keep),
    )
    return dataset.select(keep)
