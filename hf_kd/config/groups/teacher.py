"""The teacher: which model, and where its outputs come from (a registered source)."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from hf_kd.config.checks import Group, check_choice
from hf_kd.config.docs import documented
from hf_kd.teachers.sources import TEACHER_SOURCES, TeacherSource, teacher_source

RESERVED_INIT_KWARGS = {"revision", "trust_remote_code", "use_safetensors"}
"""``from_pretrained`` arguments hf_kd sets itself (from its own fields), not through teacher_model_init_kwargs."""


@documented()
@dataclass
class TeacherArgs(Group):
    r"""Teacher

    Parameters:
        teacher_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            The teacher: a Hub model id or a local directory. Not needed when `alpha` is 0, when
            `synthetic_teacher` is `"none"` or `"ls"`, or when the teacher is cached.
        teacher_model_revision (`str`, *optional*, defaults to `"main"`):
            Revision (branch, tag or commit) of `teacher_model_name_or_path`.
        teacher_model_init_kwargs (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Extra keyword arguments of the teacher's `from_pretrained`, e.g. `{"dtype": "bfloat16"}`; a
            string is read as YAML. `revision`, `trust_remote_code` and `use_safetensors` are refused here
            (set by `teacher_model_revision`, `trust_remote_code`, and always safetensors).
        teacher_cpu_offload (`bool`, *optional*, defaults to `False`):
            Keep the online teacher's weights in CPU memory and move them to the device layer by layer
            (`hf_kd.teachers.placement`).
        teacher_source (`str`, *optional*, defaults to `"online"`):
            Where the teacher's logits come from, a source registered in `hf_kd.teachers.sources`:
            `"online"` (the teacher runs at every step), `"cached"` (read from `teacher_cache`), `"served"`
            (asked of a server speaking vLLM's API: `teacher_options`) or `"mixture"` (several `teachers`).
        teacher_options (`dict`, `str` or `None`, *optional*, defaults to `None`):
            The options of `teacher_source`, as its registry entry names them; a string is read as YAML.
        teachers (`list`, `str` or `None`, *optional*, defaults to `None`):
            With `teacher_source="mixture"`: the teachers, each `{name, source, weight, model, revision, cache,
            options}` (`hf_kd.teachers.mixture`); a string is read as YAML.
        teacher_routing_column (`str` or `None`, *optional*, defaults to `None`):
            With `teacher_source="mixture"`: a dataset column naming each example's teacher; each example is
            then taught by that teacher alone instead of the weighted mixture.
        teacher_cache (`str` or `None`, *optional*, defaults to `None`):
            With `teacher_source="cached"`: a local cache directory or a Hub dataset id written by
            `scripts/cache_teacher.py`.
        teacher_label_mapping (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Teacher label name → student label name, when the two label lists differ in order or naming;
            a string is read as YAML.
    """

    teacher_model_name_or_path: str | None = None
    teacher_model_revision: str = "main"
    teacher_model_init_kwargs: dict | str | None = None
    teacher_cpu_offload: bool = False
    teacher_source: str = "online"
    teacher_options: dict | str | None = None
    teachers: list | str | None = None
    teacher_routing_column: str | None = None
    teacher_cache: str | None = None
    teacher_label_mapping: dict | str | None = None

    def check(self) -> None:
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = yaml.safe_load(self.teacher_model_init_kwargs)
        reserved = sorted(set(self.teacher_model_init_kwargs or {}) & RESERVED_INIT_KWARGS)
        if reserved:
            raise ValueError(
                f"teacher_model_init_kwargs sets {reserved}: use the fields teacher_model_revision and "
                "trust_remote_code instead (weights always load as safetensors)"
            )
        if isinstance(self.teacher_label_mapping, str):
            self.teacher_label_mapping = yaml.safe_load(self.teacher_label_mapping)
        if isinstance(self.teacher_options, str):
            self.teacher_options = yaml.safe_load(self.teacher_options)
        if self.teacher_options is not None and not isinstance(self.teacher_options, dict):
            raise ValueError(
                f"teacher_options={self.teacher_options!r}: expected a mapping of option → value"
            )
        if isinstance(self.teachers, str):
            self.teachers = yaml.safe_load(self.teachers)
        check_choice("teacher_source", self.teacher_source, tuple(TEACHER_SOURCES))
        if (self.teachers or self.teacher_routing_column) and self.teacher_source != "mixture":
            raise ValueError(
                f"teachers / teacher_routing_column are read with teacher_source: mixture, not {self.teacher_source!r}"
            )
        self.source.check_config(self)

    @property
    def source(self) -> TeacherSource:
        """The registered teacher source ``teacher_source`` names (``hf_kd.teachers.sources``)."""
        return teacher_source(self.teacher_source)
