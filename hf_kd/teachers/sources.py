"""The teacher sources, registered by name: what each one is, what its signal returns and can do, and
which function builds it. The one place a new source is added (``teacher_source: <name>``).

==========  ==========================  ========  =========  ==========  ================================
source      returns                     features  on-policy  loads the   built by
                                                             teacher
==========  ==========================  ========  =========  ==========  ================================
online      dense (aligned: another     yes       yes        yes         ``hf_kd.teachers.online``
            tokenizer)
cached      dense or sparse (top-k)     no        no         no          ``hf_kd.teachers.cached``
served      sparse (top-k)              no        yes        no          ``hf_kd.teachers.served``
mixture     dense (log-probabilities;   no        no         no          ``hf_kd.teachers.mixture``
            several: other tokenizers)
==========  ==========================  ========  =========  ==========  ================================

The configuration (``hf_kd.config``) reads the declared capabilities to refuse what a source cannot do
before anything loads; :func:`hf_kd.teachers.signal.build_teacher_signal` builds every source through its
``open`` and ``build`` functions (named by import path, so this module imports nothing heavy). The
signal each returns satisfies :class:`hf_kd.teachers.signal.TeacherSignal`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

RETURNS = ("dense", "sparse", "aligned", "several")
"""What a teacher signal can return: dense logits (a tensor), top-k :class:`hf_kd.losses.SparseLogits`,
:class:`hf_kd.losses.AlignedLogits` (a teacher of another tokenizer, aligned to the student's tokens), or
:class:`hf_kd.losses.WeightedTeachers` (several teachers of different tokenizers, not mixed)."""


@dataclass(frozen=True)
class TeacherSource:
    """One way to get a teacher's outputs.

    Attributes:
        name: the value of ``teacher_source`` that picks it.
        description: what it means for a run, as the model card says it.
        returns: what its signal may return (a subset of :data:`RETURNS`).
        loads_model: whether the run loads the teacher's weights into its own process (the teacher
            model path is then required, and on-policy ``seq_kd`` can use it to write completions).
        gives_features: whether its signal's ``run`` gives the teacher's hidden states (feature losses).
        scores_samples: whether it can score sequences that exist only at training time (the student's
            sampled completions: on-policy ``lmbda`` > 0).
        open: ``"module:function"`` called once per run before any model loads, as
            ``open(config, task, splits, split_names) -> (resource, splits)``: what the source needs
            (a loaded cache, a checked server connection) and the splits it may extend (a cache's
            columns joined); None when there is nothing to open.
        build: ``"module:function"`` that builds the signal, as
            ``build(config, task, student, resource=..., teacher_model=..., student_processor=...)``.
        requires: the config fields it needs set (``teacher_cache`` for a cache).
        options: the keys ``teacher_options`` may hold for this source (anything else is refused).
    """

    name: str
    description: str
    returns: tuple[str, ...]
    loads_model: bool
    gives_features: bool
    scores_samples: bool
    build: str
    open: str | None = None
    requires: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def function(self, which: str):
        """The ``open`` or ``build`` function, imported now."""
        module, name = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), name)

    def check_config(self, config: Any) -> None:
        """Refuse a config (a :class:`hf_kd.DistillationConfig`) that leaves a field this source
        ``requires`` unset, or sets ``teacher_options`` keys it does not read (naming those it does)."""
        for name in self.requires:
            if not getattr(config, name):
                raise ValueError(f"teacher_source={self.name!r} needs {name}")
        unknown = sorted(set(config.teacher_options or {}) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise ValueError(
                f"teacher_options {unknown} are not options of teacher_source={self.name!r} (accepted: {accepted})"
            )


TEACHER_SOURCES: dict[str, TeacherSource] = {}
"""Every registered source, by name (:func:`register_teacher_source`)."""


def register_teacher_source(source: TeacherSource) -> TeacherSource:
    """Add ``source`` to :data:`TEACHER_SOURCES` (a name taken twice is refused)."""
    if source.name in TEACHER_SOURCES:
        raise ValueError(f"teacher source {source.name!r} is already registered")
    unknown = sorted(set(source.returns) - set(RETURNS))
    if not source.returns or unknown:
        raise ValueError(
            f"teacher source {source.name!r} returns {source.returns}; expected some of {RETURNS}"
        )
    TEACHER_SOURCES[source.name] = source
    return source


def teacher_source(name: str) -> TeacherSource:
    """The registered source called ``name``; a clear error naming the registered ones otherwise."""
    if name not in TEACHER_SOURCES:
        raise ValueError(f"teacher_source={name!r}: expected one of {sorted(TEACHER_SOURCES)}")
    return TEACHER_SOURCES[name]


register_teacher_source(
    TeacherSource(
        name="online",
        description="the teacher ran alongside the student at every step",
        returns=("dense", "aligned"),
        loads_model=True,
        gives_features=True,
        scores_samples=True,
        build="hf_kd.teachers.online:build_online_teacher",
    )
)
register_teacher_source(
    TeacherSource(
        name="cached",
        description="the teacher's outputs were computed once and read back from a cache",
        returns=("dense", "sparse"),
        loads_model=False,
        gives_features=False,
        scores_samples=False,
        open="hf_kd.teachers.cached:open_teacher_cache",
        build="hf_kd.teachers.cached:build_cached_teacher",
        requires=("teacher_cache",),
    )
)
register_teacher_source(
    TeacherSource(
        name="served",
        description="the teacher's top-k log-probabilities were asked of a server (vLLM's OpenAI-compatible API)",
        returns=("sparse",),
        loads_model=False,
        gives_features=False,
        scores_samples=True,
        open="hf_kd.teachers.served:open_served_teacher",
        build="hf_kd.teachers.served:build_served_teacher",
        options=("url", "model", "top_k", "api_key_env", "timeout", "retries", "backoff", "concurrency"),
    )
)
register_teacher_source(
    TeacherSource(
        name="mixture",
        description=(
            "several teachers' distributions were mixed by weight (teachers of different tokenizers: their "
            "soft terms summed by weight), or each example routed to one of them"
        ),
        returns=("dense", "several"),
        loads_model=False,
        gives_features=False,
        scores_samples=False,
        open="hf_kd.teachers.mixture:open_mixture",
        build="hf_kd.teachers.mixture:build_mixture_teacher",
        requires=("teachers",),
    )
)
