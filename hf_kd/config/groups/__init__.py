"""The groups of :class:`~hf_kd.config.DistillationConfig`'s own fields, one module each: a dataclass
documented once (its docstring is each field's ``--help``) that checks its own fields. A rule between
fields of two groups is in :mod:`hf_kd.config.rules`.

A new field goes into its group's module: the field with its default, its entry in the group's docstring
(``documented`` refuses a field without one), and its check in the group's ``check``. Its YAML key and its
flag are its name. A new group is a module here and a place in :data:`GROUPS`.
"""

from hf_kd.config.groups.cross_tokenizer import CrossTokenizerArgs
from hf_kd.config.groups.features import FeatureArgs
from hf_kd.config.groups.loss import LossArgs
from hf_kd.config.groups.on_policy import OnPolicyArgs
from hf_kd.config.groups.resume import ResumeArgs
from hf_kd.config.groups.synthetic import SyntheticArgs
from hf_kd.config.groups.teacher import RESERVED_INIT_KWARGS, TeacherArgs

GROUPS = (
    TeacherArgs,
    LossArgs,
    CrossTokenizerArgs,
    SyntheticArgs,
    FeatureArgs,
    OnPolicyArgs,
    ResumeArgs,
)
"""The groups of a ``DistillationConfig``'s own fields, in the order of its docstring and ``--help``."""

__all__ = [
    "GROUPS",
    "RESERVED_INIT_KWARGS",
    "CrossTokenizerArgs",
    "FeatureArgs",
    "LossArgs",
    "OnPolicyArgs",
    "ResumeArgs",
    "SyntheticArgs",
    "TeacherArgs",
]
