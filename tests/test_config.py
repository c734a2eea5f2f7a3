"""Recipes and command line: precedence, unknown keys, range checks, early errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_kd import DistillationConfig, parse_args, run_distillation


def write_recipe(tmp_path, **values):
    values.setdefault("output_dir", str(tmp_path / "out"))
    values.setdefault("student_config", {"model_type": "bert", "vocab_size": 30})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_command_line_beats_recipe_beats_defaults(tmp_path):
    recipe = write_recipe(tmp_path, alpha=0.7, temperature=3.0, learning_rate=1.0e-4)
    data, model, config = parse_args(["--config", recipe, "--temperature", "5.0"])
    assert config.alpha == 0.7  # recipe over default 0.5
    assert config.temperature == 5.0  # command line over recipe
    assert config.learning_rate == 1.0e-4
    assert config.divergence == "forward_kl"  # default
    assert model.student_config == {"model_type": "bert", "vocab_size": 30}
    assert data.task == "text-classification"


def test_unknown_recipe_key_names_it_and_the_closest_field(tmp_path):
    recipe = write_recipe(tmp_path, temprature=2.0)
    with pytest.raises(ValueError, match=r"unknown field 'temprature'.*did you mean 'temperature'"):
        parse_args(["--config", recipe])


def test_unknown_flag_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--not_a_field"):
        parse_args(["--config", write_recipe(tmp_path), "--not_a_field", "1"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", 1.5, r"alpha=1.5 is out of range: expected a number in \[0.0, 1.0\]"),
        ("alpha", -0.1, r"alpha=-0.1 is out of range"),
        ("temperature", 0.0, r"temperature=0.0 must be > 0"),
        ("divergence", "kl", r"divergence='kl' is not one of"),
        ("beta", 2.0, r"beta=2.0 is out of range"),
        ("synthetic_teacher", "magic", r"synthetic_teacher='magic' is not one of"),
        ("teacher_model_init_kwargs", {"trust_remote_code": True}, r"sets \['trust_remote_code'\]"),
    ],
)
def test_bad_values_are_rejected_with_field_and_value(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), **{field: value})


def test_missing_teacher_directory_fails_before_any_work(tmp_path):
    recipe = write_recipe(
        tmp_path,
        teacher_model_name_or_path=str(tmp_path / "no-such-teacher"),
        dataset_name=str(tmp_path / "never-read"),
    )
    with pytest.raises(
        FileNotFoundError, match="teacher_model_name_or_path=.*no-such-teacher.*no such directory"
    ):
        run_distillation(*parse_args(["--config", recipe]))
    assert not (tmp_path / "out").exists()


def test_online_kd_without_a_teacher_is_an_error(tmp_path):
    with pytest.raises(
        ValueError, match=r"alpha=0.5 with an online teacher needs teacher_model_name_or_path"
    ):
        run_distillation(*parse_args(["--config", write_recipe(tmp_path, dataset_name="unused")]))


RECIPES = sorted(
    p
    for p in (Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml")
    if "accelerate_configs" not in p.parts
    and not p.name.startswith("cache_")  # cache_*: scripts/cache_teacher.py
)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_shipped_recipe_parses(recipe):
    """Each scripts/distill.py recipe's keys are known fields with valid values (no model or data is loaded),
    and each value reaches its field unchanged."""
    data, model, config = parse_args(["--config", str(recipe)])
    parsed = {**vars(data), **vars(model), **vars(config)}
    written = yaml.safe_load(recipe.read_text())
    assert "output_dir" in written
    assert {key: parsed[key] for key in written} == written


def test_hub_metric_needs_trust_remote_code():
    """A metric that is neither built in nor local would run Hub code: refused unless trusted."""
    from hf_kd.tasks.classification import ClassificationMetrics

    with pytest.raises(
        ValueError, match=r"metric 'glue' is neither built into hf_kd.*trust_remote_code: true"
    ):
        ClassificationMetrics(["accuracy", "glue"])


def test_checks_on_the_label_space_run_before_any_model_is_loaded(tmp_path):
    """synthetic_topk larger than K fails right after reading the labels, before the teacher is loaded."""
    from distill_run import write_tiny_run  # 3 classes

    recipe = write_tiny_run(tmp_path, synthetic_teacher="kd_topk", synthetic_topk=5.0)
    (tmp_path / "teacher" / "model.safetensors").unlink()  # would fail if the teacher were loaded
    with pytest.raises(ValueError, match=r"k=5: expected a count in \[1, 3\]"):
        run_distillation(*parse_args(["--config", str(recipe)]))


def test_max_length_must_be_positive():
    from hf_kd import DataArguments

    with pytest.raises(ValueError, match="max_length=0 must be a positive number of tokens"):
        DataArguments(max_length=0)
