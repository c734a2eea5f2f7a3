"""Cached teacher: reads the teacher's outputs from the ``kd_teacher_*`` columns of the batch."""

from __future__ import annotations

from typing import Any

import torch

from hf_kd.losses import SparseLogits
from hf_kd.tasks.base import Task, split_batch
from hf_kd.teachers.cache.load import TeacherCache, load_teacher_cache
from hf_kd.teachers.contract import SignalDefaults
from hf_kd.teachers.sketch import LogitSketch


class CachedTeacher(SignalDefaults):
    """Teacher signal of a cache written by :func:`hf_kd.teachers.cache.capture.capture_teacher_logits`.

    Full logits come back as a dense float32 tensor; top-k columns as :class:`hf_kd.losses.SparseLogits`
    over ``num_classes`` classes (the loss applies ``sparse_tail``). ``output_map`` reorders the
    teacher's classes into the student's (``teacher_logits[..., output_map]``); for top-k columns it
    must be a permutation, applied to the stored class ids. ``sketch``: the cache's low-rank sketch of
    the teacher's logits, attached to the top-k as a :class:`hf_kd.losses.TailSketch` (``sparse_tail: sketch``).
    """

    returns = ("dense", "sparse")

    def __init__(
        self, num_classes: int, output_map: list[int] | None = None, sketch: LogitSketch | None = None
    ):
        self.num_classes = num_classes
        self.output_map = output_map
        self.sketch = sketch
        self._columns = None if output_map is None else torch.as_tensor(output_map)
        self._inverse = None  # _inverse[teacher class] = student class
        if output_map is not None:
            if sorted(output_map) != list(range(num_classes)):
                raise ValueError(
                    f"a cached teacher reorders its {num_classes} classes by a permutation; got output_map={output_map}"
                )
            self._inverse = torch.argsort(self._columns)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor | SparseLogits:
        cached = split_batch(batch)[2]
        if "logits" in cached:
            logits = cached["logits"].float()
            return logits if self._columns is None else logits[..., self._columns.to(logits.device)]
        missing = [name for name in ("log_probs", "indices", "tail_log_mass") if name not in cached]
        if missing:
            raise KeyError(
                f"the batch has no cached teacher columns kd_teacher_{missing}; got kd_teacher_{sorted(cached)}"
            )
        indices = cached["indices"].long()
        if self._inverse is not None:
            indices = self._inverse.to(indices.device)[indices]
        tail = None
        if self.sketch is not None and "sketch" in cached:
            tail = self.sketch.tail_sketch(cached["sketch"])
            if self._columns is not None:
                tail = tail.over_classes(self._columns.to(indices.device))
        return SparseLogits(
            cached["log_probs"].float(), indices, cached["tail_log_mass"].float(), self.num_classes, tail
        )


def open_teacher_cache(config, task: Task, splits, split_names: list[str]):
    """The ``cached`` source's opening, before any model loads: the cache named by ``config.teacher_cache``
    (every recorded fact verified, its teacher checked against ``teacher_model_name_or_path`` when one is
    named), its top-k checked against ``sparse_tail``, its decoder given to a per-token ``task`` (for a
    compressed cache), and its columns joined to the ``split_names`` of ``splits`` (checked to be the
    captured rows). Returns (the cache, the joined splits)."""
    cache = load_teacher_cache(
        config.teacher_cache,
        teacher=config.teacher_model_name_or_path,
        teacher_revision=config.teacher_model_revision,
    )
    cache.check_sparse_tail(config.sparse_tail)
    if hasattr(task, "cache_decoder"):  # a per-token task
        task.cache_decoder = cache.decoder()  # None unless the cache is compressed
    return cache, cache.join(splits, task.name, split_names)


def build_cached_teacher(
    config, task: Task, student, *, resource: TeacherCache | None = None, student_processor=None, **_
) -> CachedTeacher:
    """The ``cached`` source's signal: the logits of ``resource`` (the cache :func:`open_teacher_cache`
    opened), checked against the task, the student's config and ``student_processor``."""
    if resource is None:
        raise ValueError(
            "teacher_source='cached' needs its cache opened first (hf_kd.teachers.signal.open_teacher_source), "
            "or pass teacher_signal=CachedTeacher(...)"
        )
    output_map = resource.check_run(task, student.config, student_processor, config)
    resource.check_sparse_tail(config.sparse_tail)
    return CachedTeacher(resource.metadata.num_classes, output_map, resource.sketch)
