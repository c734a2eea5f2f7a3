"""The configuration in groups: each field documented once (its ``--help`` is its docstring entry), the
rules between groups in one table (each names its fields and is enforced), recipes and pickles that load
as before."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields

import pytest
import yaml
from test_config import RECIPES
from transformers import HfArgumentParser, TrainingArguments

from hf_kd.config import (
    ARGUMENT_CLASSES,
    GROUPS,
    RULES,
    DataArguments,
    DistillationConfig,
    ModelArguments,
    parse_args,
)
from hf_kd.config.docs import documented, parameter_entries
from hf_kd.config.groups import FeatureArgs, LossArgs, OnPolicyArgs, TeacherArgs

GROUP_OF = {f.name: group for group in GROUPS for f in fields(group)}
"""Each field of a group → its group."""


def test_the_groups_hold_every_field_the_config_adds_and_nothing_twice():
    names = [f.name for group in GROUPS for f in fields(group)]
    assert len(names) == len(set(names))
    config_names = {f.name for f in fields(DistillationConfig)}
    assert set(names) <= config_names
    added = {f.name for f in fields(DistillationConfig) if f.name not in GROUP_OF}
    assert added == {f.name for f in fields(TrainingArguments)} - set(names)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_each_fields_help_is_its_one_docstring_entry(group):
    """The group's docstring, the assembled DistillationConfig docstring and ``--help`` say the same."""
    entries = parameter_entries(group.__doc__)
    config_entries = parameter_entries(DistillationConfig.__doc__)
    assert list(entries) == [f.name for f in fields(group)]
    for f in fields(DistillationConfig):
        if GROUP_OF.get(f.name) is group:
            assert f.metadata["help"] == entries[f.name] == config_entries[f.name]
            assert len(f.metadata["help"]) > 20


@pytest.mark.parametrize(
    ("group", "values", "message"),
    [
        (LossArgs, {"alpha": 1.5}, r"alpha=1.5 is out of range"),
        (OnPolicyArgs, {"log_completions": True}, r"log_completions: true with lmbda=0"),
        (FeatureArgs, {"hidden_weight": float("nan")}, r"hidden_weight=nan: expected a finite number"),
        (TeacherArgs, {"teacher_source": "cached"}, r"teacher_source='cached' needs teacher_cache"),
    ],
)
def test_a_group_built_alone_checks_its_own_fields(group, values, message):
    with pytest.raises(ValueError, match=message):
        group(**values)
    assert group() == group()


@pytest.mark.parametrize("arguments", [ModelArguments, DataArguments], ids=lambda c: c.__name__)
def test_model_and_data_arguments_are_documented_once_too(arguments):
    entries = parameter_entries(arguments.__doc__)
    assert {f.name: f.metadata["help"] for f in fields(arguments)} == entries


def test_the_help_printed_is_the_docstring_entry():
    """Compared without white space: argparse wraps the lines to the terminal's width."""
    text = "".join(HfArgumentParser(ARGUMENT_CLASSES).format_help().split())
    for name, entry in parameter_entries(DistillationConfig.__doc__).items():
        assert "".join(entry.split()) in text, name
    assert "'skew_rkl'" in parameter_entries(DistillationConfig.__doc__)["divergence"]


def test_a_field_without_a_docstring_entry_is_refused_where_it_is_defined():
    with pytest.raises(
        TypeError, match=r"Probe's docstring misses \['width'\] and documents no field \['depth'\]"
    ):

        @documented()
        @dataclass
        class Probe:
            """A probe.

            Parameters:
                depth (`int`, *optional*, defaults to `1`):
                    How deep.
            """

            width: int = 1


BREAKING = {
    ("hidden_loss", "attention_weight", "alpha", "synthetic_teacher"): {"hidden_loss": "mse", "alpha": 0.0},
    ("hidden_loss", "attention_weight", "teacher_source"): {
        "hidden_loss": "cosine",
        "teacher_source": "cached",
        "teacher_cache": "some/cache",
    },
    ("hidden_loss", "attention_weight", "student_logits_from_hidden_states"): {
        "hidden_loss": "mse",
        "student_logits_from_hidden_states": True,
        "loss_chunk_size": 8,
    },
    ("hidden_loss", "attention_weight", "teacher_logits_from_hidden_states"): {
        "attention_weight": 1.0,
        "teacher_logits_from_hidden_states": True,
    },
    ("teacher_logits_from_hidden_states", "teacher_source"): {
        "teacher_logits_from_hidden_states": True,
        "teacher_source": "cached",
        "teacher_cache": "some/cache",
    },
    ("lmbda", "seq_kd", "teacher_source"): {
        "lmbda": 0.5,
        "teacher_source": "cached",
        "teacher_cache": "some/cache",
    },
    ("lmbda", "alpha", "synthetic_teacher"): {"lmbda": 0.5, "alpha": 0.0},
    ("divergence", "synthetic_teacher"): {"divergence": "mse", "synthetic_teacher": "ls"},
}
"""For each rule (by its fields), values that break it and no other check."""


def test_every_rule_has_a_breaking_example_here():
    assert sorted(BREAKING) == sorted(rule.fields for rule in RULES)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "+".join(r.fields))
def test_each_rule_names_its_fields_of_two_groups_and_refuses_a_config_breaking_it(tmp_path, rule):
    assert len({GROUP_OF[name] for name in rule.fields}) >= 2, "a rule within one group is its check"
    values = BREAKING[rule.fields]
    valid = DistillationConfig(output_dir=str(tmp_path), report_to="none")
    assert not rule.broken(valid)
    for name, value in values.items():
        setattr(valid, name, value)
    assert rule.broken(valid)
    message = rule.message(valid)
    assert [name for name in rule.fields if name not in message] == []
    with pytest.raises(ValueError) as refused:
        DistillationConfig(output_dir=str(tmp_path), report_to="none", **values)
    assert str(refused.value) == message


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_recipe_round_trips_through_its_recorded_values(recipe):
    """A recipe's parsed values, given back as a run record gives them (``parse_dict``), parse the same."""
    data, model, config = parse_args(["--config", str(recipe)])
    written = yaml.safe_load(recipe.read_text())
    parsed = {**vars(data), **vars(model), **vars(config)}
    again = HfArgumentParser(ARGUMENT_CLASSES).parse_dict({key: parsed[key] for key in written})
    assert vars(again[0]) == vars(data) and vars(again[1]) == vars(model)
    own = [name for name in GROUP_OF]
    assert {n: getattr(again[2], n) for n in own} == {n: getattr(config, n) for n in own}


def test_a_pickled_config_names_the_class_where_it_always_was(tmp_path):
    """``training_args.bin`` records ``hf_kd.config.DistillationConfig``, the name it had before the groups, so
    one saved before loads now and one saved now loads if the class moves again."""
    config = DistillationConfig(
        output_dir=str(tmp_path), alpha=0.7, lmbda=0.5, hub_token="secret", report_to="none"
    )
    data = pickle.dumps(config)
    assert b"hf_kd.config" in data and b"hf_kd.config.distillation" not in data
    loaded = pickle.loads(data)
    assert type(loaded) is DistillationConfig
    assert (loaded.alpha, loaded.lmbda, loaded.hub_token) == (0.7, 0.5, None)
