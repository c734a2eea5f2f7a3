"""The sweep (scripts/tune.py): equal optimizer steps for every arm (a budget in epochs too), step counts
in the table, one-seed and inside-the-spread warnings, the winner chosen with its seed spread, "try
longer" at the largest budget, results merged across calls, a recipe without contradicting budgets."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from distill_run import write_tiny_run

from hf_kd import parse_args
from hf_kd.runs.tune import choose, recommended_recipe, summarize_grid, table, tune


def result(arm: str, seed: int, accuracy: float) -> dict:
    return {"arm": arm, "seed": seed, "metrics": {"eval_accuracy": accuracy}}


GRID = {
    "none_max_steps=100": {"alpha": 0.0, "max_steps": 100},
    "a0.5_t2_max_steps=100": {"alpha": 0.5, "temperature": 2.0, "max_steps": 100},
    "a0.9_t1_max_steps=100": {"alpha": 0.9, "temperature": 1.0, "max_steps": 100},
    "none_max_steps=300": {"alpha": 0.0, "max_steps": 300},
    "a0.5_t2_max_steps=300": {"alpha": 0.5, "temperature": 2.0, "max_steps": 300},
}


def test_the_winner_weighs_the_seed_spread_and_warns_at_the_edge():
    results = [result("none_max_steps=100", s, 0.60) for s in range(3)]
    results += [result("a0.5_t2_max_steps=100", s, a) for s, a in enumerate((0.90, 0.62, 0.64))]  # lucky seed
    results += [result("a0.9_t1_max_steps=100", s, a) for s, a in enumerate((0.70, 0.71, 0.72))]  # steady
    summary = summarize_grid(results, GRID, "eval_accuracy")
    noisy, steady = summary["a0.5_t2_max_steps=100"], summary["a0.9_t1_max_steps=100"]
    assert noisy["mean"] > steady["mean"] and noisy["score"] < steady["score"]
    assert steady["score"] == pytest.approx(0.71 - 0.01 / math.sqrt(3))
    best, warnings = choose(summary)
    assert best == "a0.9_t1_max_steps=100"
    assert steady["gain_interval"][0] > 0  # paired t interval of +0.10 ± 0.01 over 3 seeds
    assert warnings == [
        "the chosen setting is at the largest budget tried (100 optimizer steps): try longer "
        "(e.g. --budget_field max_steps --budgets 200)"
    ]
    md = table(summary, "accuracy")
    assert "| optimizer steps |" in md and "| a0.9_t1_max_steps=100 | 100 | 0.7100 ± 0.0100 |" in md
    assert md.index("a0.9_t1") < md.index("a0.5_t2")  # best score first


def test_one_seed_is_warned_and_shown_without_a_bare_dash():
    results = [result("none_max_steps=300", 0, 0.6), result("a0.5_t2_max_steps=300", 0, 0.7)]
    results += [result("none_max_steps=100", 0, 0.5)]
    summary = summarize_grid(results, GRID, "eval_accuracy")
    best, warnings = choose(summary)
    assert best == "a0.5_t2_max_steps=300"
    assert warnings[0].startswith("one seed for some settings: no spread")
    assert "try longer" in warnings[-1]
    md = table(summary, "accuracy")
    assert "± —" not in md and "0.7000 (1 seed: no spread)" in md


def test_a_gain_inside_the_spread_is_warned():
    results = [result("none_max_steps=300", s, a) for s, a in enumerate((0.60, 0.70, 0.65))]
    results += [result("a0.5_t2_max_steps=300", s, a) for s, a in enumerate((0.70, 0.66, 0.68))]
    best, warnings = choose(summarize_grid(results, GRID, "eval_accuracy"))
    assert best == "a0.5_t2_max_steps=300"
    assert any("inside the seed spread" in w for w in warnings)


def test_the_recommended_recipe_has_one_budget(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_train_epochs: 2\nalpha: 0.5\noutput_dir: out\n")
    text = recommended_recipe(str(recipe), {"alpha": 0.9, "temperature": 1.0, "max_steps": 1500}, "chosen")
    content = yaml.safe_load(text)
    assert content == {"alpha": 0.9, "output_dir": "out_tuned", "temperature": 1.0, "max_steps": 1500}


def steps_of(folder) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["global_step"]


def test_every_arm_runs_the_same_steps_and_calls_merge(tmp_path):
    # 16 of the 51 carved training rows labelled: a KD arm iterates all 51, the twin drops the 35 inert
    # ones; "1 epoch" is 4 steps of 16 for every arm, not 4 for KD and 1 for the twin.
    recipe = write_tiny_run(tmp_path, num_labeled_examples=16, use_unlabeled=True, max_steps=-1)
    messages = []
    kwargs = dict(alphas=[0.5], taus=[2.0], seeds=[0], progress=messages.append)
    content = tune(str(recipe), tmp_path / "tune", budgets=[1], budget_field="num_train_epochs", **kwargs)
    assert (
        "budgets in epochs of the KD arms' 51 training rows, as optimizer steps of batch 16 for every arm: 1 → 4"
        in messages
    )
    for arm in ("none_max_steps=4", "a0.5_t2_max_steps=4"):
        assert steps_of(tmp_path / "tune" / arm / "seed0") == 4
    twin = json.loads((tmp_path / "tune" / "none_max_steps=4" / "seed0" / "run_record.json").read_text())
    assert twin["budget"]["inert_rows_dropped"] == 35 and twin["budget"]["labelled_rows"] == 16
    assert any(m.startswith("warning: one seed") for m in messages)
    assert content["summary"]["a0.5_t2_max_steps=4"]["steps"] == 4

    # A second call with another grid adds to the first: tune.json, tune.md and the choice cover both.
    content = tune(
        str(recipe),
        tmp_path / "tune",
        budgets=[6],
        alphas=[0.9],
        taus=[1.0],
        seeds=[0],
        progress=messages.append,
    )
    assert set(content["summary"]) == {
        "none_max_steps=4", "a0.5_t2_max_steps=4", "none_max_steps=6", "a0.9_t1_max_steps=6",
    }  # fmt: skip
    md = (tmp_path / "tune" / "tune.md").read_text()
    assert "| a0.5_t2_max_steps=4 | 4 |" in md and "| a0.9_t1_max_steps=6 | 6 |" in md
    recommended = yaml.safe_load((tmp_path / "tune" / "recommended.yaml").read_text())
    assert "num_train_epochs" not in recommended and recommended["max_steps"] in (4, 6)
    _, _, config = parse_args(["--config", str(tmp_path / "tune" / "recommended.yaml")])
    assert config.max_steps == recommended["max_steps"]
    with pytest.raises(ValueError, match="holds a sweep of .* use another --output_dir"):
        tune(
            str(recipe),
            tmp_path / "tune",
            budgets=[4],
            alphas=[0.5],
            taus=[2.0],
            seeds=[0],
            metric="eval_loss",
        )
