"""Configuration: the distillation hyper-parameters (``DistillationConfig``, a ``TrainingArguments``
made of the field groups of ``groups/``, with the rules between groups in ``rules.py``), the model and
data arguments of ``scripts/distill.py`` (``arguments.py``), and recipe parsing (YAML + command line,
command line wins: ``parsing.py``). Each field is documented once, in its class's docstring
(``docs.py`` makes it the field's ``--help``).
"""

from hf_kd.config.arguments import NO_SPLIT, STUDENT_INITS, TASKS, DataArguments, ModelArguments
from hf_kd.config.checks import check_finite
from hf_kd.config.distillation import DistillationConfig
from hf_kd.config.groups import GROUPS, RESERVED_INIT_KWARGS
from hf_kd.config.groups.loss import temperature_value
from hf_kd.config.parsing import ARGUMENT_CLASSES, load_recipe, parse_args
from hf_kd.config.rules import RULES, Rule
from hf_kd.teachers.sources import TEACHER_SOURCES
from hf_kd.teachers.synthetic import SYNTHETIC_KINDS

__all__ = [
    "ARGUMENT_CLASSES",
    "GROUPS",
    "NO_SPLIT",
    "RESERVED_INIT_KWARGS",
    "RULES",
    "STUDENT_INITS",
    "SYNTHETIC_KINDS",
    "TASKS",
    "TEACHER_SOURCES",
    "DataArguments",
    "DistillationConfig",
    "ModelArguments",
    "Rule",
    "check_finite",
    "load_recipe",
    "parse_args",
    "temperature_value",
]
