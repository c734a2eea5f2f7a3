"""temperature: auto — the run sets τ by the pre-flight's τ rule on its teacher's first training rows: the
same τ and reason as scripts/preflight.py on those rows, written in the run record and the card, and the
run is the run at that τ, step for step."""

import json
from types import SimpleNamespace

import pytest
import torch
from distill_run import cache_tiny_teacher, write_tiny_run

from hf_kd.auto_temperature import auto_temperature
from hf_kd.knowledge.preflight import choose_temperature
from hf_kd.knowledge.profile import teacher_profile
from scripts import distill, preflight


def _losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["loss"]) for e in history if "loss" in e]


def test_auto_sets_the_preflight_temperature_and_trains_as_that_fixed_temperature(tmp_path):
    recipe = write_tiny_run(tmp_path, temperature="auto", alpha=0.9)
    report = preflight.main(
        ["--config", str(recipe), "--report_dir", str(tmp_path / "p"), "--max_samples", "64"]
    )
    expected = report["recommendation"]["fields"]["temperature"]
    distill.main(["--config", str(recipe), "--output_dir", str(tmp_path / "auto")])
    record = json.loads((tmp_path / "auto" / "run_record.json").read_text())
    assert record["recipe"]["temperature"] == expected["value"]
    assert record["card"]["temperature_auto"] == expected["because"]
    assert record["recipe"]["logit_standardization"] is False  # the record rebuilds the run at that τ
    card = (tmp_path / "auto" / "README.md").read_text()
    assert f"{expected['value']:g}, set by `temperature: auto`: the teacher is" in card
    fixed = ["--temperature", str(expected["value"]), "--output_dir", str(tmp_path / "fixed")]
    distill.main(["--config", str(recipe), *fixed])
    auto_losses, fixed_losses = _losses(tmp_path / "auto"), _losses(tmp_path / "fixed")
    assert len(auto_losses) == 2 and auto_losses == fixed_losses  # reading the teacher drew no random number
    fixed_card = (tmp_path / "fixed" / "README.md").read_text()
    assert f"- **Temperature τ:** {expected['value']:g} (τ² scaling on)" in fixed_card  # set by --temperature


def test_auto_with_alpha_0_reads_no_teacher(tmp_path):
    recipe = write_tiny_run(tmp_path, temperature="auto", alpha=0.0)
    distill.main(["--config", str(recipe)])
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert record["recipe"]["temperature"] == 1.0 and "τ is unused" in record["card"]["temperature_auto"]


@pytest.mark.parametrize(("scale", "tau"), [(1.0, 1.0), (4.0, 4.0)])
def test_the_rule_keeps_tau_1_unless_the_teacher_is_saturated(scale, tau):
    """A teacher right on every item by a margin of 3 (p_t ≈ 0.69: τ 1); the same logits × 4 (margin 12,
    p_t ≈ 0.99995: saturated): at τ 2 it leaves 9 / (e⁶ + 9) ≈ 0.022 of its mass off the true class, at τ 4
    9 / (e³ + 9) ≈ 0.31, so the rule goes to τ 4."""
    labels = torch.arange(200) % 10
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 0.1
    logits[torch.arange(200), labels] += 3.0
    profile = teacher_profile(logits * scale, labels)
    choice = choose_temperature(profile)
    assert choice.value == tau
    if tau > 1:
        assert (
            profile["by_temperature"][2.0]["soft_signal"]
            < 0.1
            <= profile["by_temperature"][4.0]["soft_signal"]
        )


def test_auto_reads_a_top_k_cache_as_the_pre_flight_does(tmp_path):
    """A top-k cache (k 2 of 3 classes, the tail spread uniformly): the run's τ and reason are the
    pre-flight's on the same cache, where logit standardisation would be refused (no full row)."""
    recipe = write_tiny_run(tmp_path, temperature="auto", alpha=0.9)
    cache_tiny_teacher(tmp_path, recipe, top_k=2)
    cached = ["--teacher_source", "cached", "--teacher_cache", str(tmp_path / "cache")]
    report = preflight.main(["--config", str(recipe), "--report_dir", str(tmp_path / "p"), *cached])
    distill.main(["--config", str(recipe), *cached])
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    expected = report["recommendation"]["fields"]["temperature"]
    assert record["recipe"]["temperature"] == expected["value"]
    assert record["card"]["temperature_auto"] == expected["because"]


def test_auto_refuses_a_teacher_of_another_tokenizer_before_reading_it():
    task = SimpleNamespace(token_level=True, vocabulary=object())  # a cross-tokenizer causal-LM task
    signal = SimpleNamespace(returns=("aligned",))  # what a teacher of another tokenizer declares
    trainer = SimpleNamespace(teacher_signal=signal, task=task, train_dataset=None)
    with pytest.raises(ValueError, match="another tokenizer .* set a number for temperature"):
        auto_temperature(trainer)
