"""The ablation runner (hf_kd.runs.ablation, scripts/ablate.py): runs kept per arm and seed,
progress, mean ± std table, the paper's ordering, written files."""

import json
import math
import statistics
from pathlib import Path

import pytest

from hf_kd.runs.ablation import (
    paper_ordering,
    parse_arms,
    run_ablation,
    run_argv,
    summarize,
    write_summary,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes/paper/student_kd.yaml")
ACCURACY = {"none": 0.70, "ls": 0.72, "kd_pt": 0.80, "kd_sim": 0.75, "kd": 0.78, "kd_topk": 0.79}


class FakeTrain:
    """Stands in for a training run: accuracy of the arm plus 0.01 · seed, read back from the argv."""

    def __init__(self):
        self.calls = []

    def __call__(self, argv):
        self.calls.append(argv)
        arm, seed = argv[argv.index("--synthetic_teacher") + 1], int(argv[argv.index("--seed") + 1])
        return {"eval_accuracy": ACCURACY[arm] + 0.01 * seed, "eval_loss": 1.0}


def test_runs_are_kept_and_skipped(tmp_path):
    train, lines = FakeTrain(), []
    results = run_ablation(RECIPE, ["none", "kd"], [0, 1], tmp_path, train=train, progress=lines.append)
    assert len(train.calls) == 4 and [(r["arm"], r["seed"]) for r in results] == [
        ("none", 0),
        ("none", 1),
        ("kd", 0),
        ("kd", 1),
    ]
    assert lines[0] == "[1/4] arm=none seed=0: training" and "eval_accuracy=0.7100" in lines[3]
    assert json.loads((tmp_path / "kd" / "seed1" / "result.json").read_text())["metrics"][
        "eval_accuracy"
    ] == pytest.approx(0.79)
    (tmp_path / "none" / "seed1" / "result.json").unlink()  # one run lost: only it is trained again
    again, lines = FakeTrain(), []
    results = run_ablation(RECIPE, ["none", "kd"], [0, 1], tmp_path, train=again, progress=lines.append)
    assert len(again.calls) == 1 and again.calls[0][again.calls[0].index("--seed") + 1] == "1"
    assert sum("finished earlier, kept" in line for line in lines) == 3 and len(results) == 4


def test_run_argv_none_sets_alpha_zero_and_overrides_pass_through(tmp_path):
    argv = run_argv(RECIPE, "none", 2, tmp_path / "r", ["--num_train_epochs", "3"])
    assert argv[:4] == ["--config", RECIPE, "--num_train_epochs", "3"]
    assert argv[argv.index("--alpha") + 1] == "0.0" and argv[argv.index("--seed") + 1] == "2"
    assert "--alpha" not in run_argv(RECIPE, "kd", 0, tmp_path, [])


def test_bad_override_fails_before_training(tmp_path):
    train = FakeTrain()
    with pytest.raises(ValueError, match="temperature"):
        run_ablation(
            RECIPE,
            ["kd"],
            [0],
            tmp_path,
            overrides=["--temperature", "-1.0"],
            train=train,
            progress=lambda s: None,
        )
    assert train.calls == []


def test_parse_arms():
    assert parse_arms("none, kd_pt,kd") == ["none", "kd_pt", "kd"]
    for bad in ("kd,bogus", "kd,kd", ""):
        with pytest.raises(ValueError):
            parse_arms(bad)


def test_summary_table_ordering_and_files(tmp_path):
    results = run_ablation(
        RECIPE, list(ACCURACY), [0, 1, 2], tmp_path, train=FakeTrain(), progress=lambda s: None
    )
    summary = summarize(results, "eval_accuracy")
    values = [ACCURACY["kd_pt"] + 0.01 * s for s in range(3)]
    assert summary["kd_pt"]["mean"] == pytest.approx(statistics.fmean(values))
    assert summary["kd_pt"]["std"] == pytest.approx(statistics.stdev(values)) and summary["kd_pt"]["n"] == 3
    assert paper_ordering(summary) == ["kd_pt > kd_sim: holds", "kd_sim > ls: holds", "kd_topk ≥ kd: holds"]
    content = write_summary(results, "eval_accuracy", tmp_path, "fake")
    text = (tmp_path / "ablation.md").read_text()
    assert summary["kd_pt"]["delta_mean"] == pytest.approx(ACCURACY["kd_pt"] - ACCURACY["none"])
    assert summary["kd_pt"]["delta_std"] == pytest.approx(0.0, abs=1e-12)  # the seed shifts every arm alike
    row = f"| kd_pt | {summary['kd_pt']['mean']:.4f} ± {summary['kd_pt']['std']:.4f} | +0.1000 ± 0.0000 | 3 |"
    assert row in text
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "ablation.json").read_text())["summary"] == content["summary"]
    one_seed = summarize(results[:1], "eval_accuracy")
    assert math.isnan(one_seed["none"]["std"])
    with pytest.raises(KeyError, match="eval_f1"):
        summarize(results, "eval_f1")


def test_ablate_script_real_runs(tmp_path, capsys):
    """Two real arms on a small hierarchy task through scripts/ablate.py, then the same command again."""
    from hf_kd import parse_args, run_distillation
    from hf_kd.data.hierarchy import write_hierarchy_dataset

    data = write_hierarchy_dataset(tmp_path / "data", n_per_class=20)
    teacher = [
        "--config",
        str(ROOT / "recipes/paper/teacher.yaml"),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(tmp_path / "t"),
    ]
    run_distillation(*parse_args(teacher + ["--num_train_epochs", "3", "--disable_tqdm", "true"]))
    from scripts import ablate

    argv = [
        "--config",
        RECIPE,
        "--arms",
        "none,kd_pt",
        "--seeds",
        "1",
        "--output_dir",
        str(tmp_path / "abl"),
        "--dataset_name",
        str(data),
    ]
    argv += [
        "--teacher_model_name_or_path",
        str(tmp_path / "t"),
        "--num_labeled_examples",
        "100",
        "--num_train_epochs",
        "1",
    ]
    content = ablate.main(argv)
    accuracy = {
        arm: json.loads((tmp_path / "abl" / arm / "seed0" / "result.json").read_text())["metrics"][
            "eval_accuracy"
        ]
        for arm in ("none", "kd_pt")
    }
    assert set(content["summary"]) == {"none", "kd_pt"}
    assert content["summary"]["kd_pt"]["mean"] == accuracy["kd_pt"] and content["summary"]["kd_pt"]["n"] == 1
    assert content["summary"]["kd_pt"]["delta_mean"] == pytest.approx(accuracy["kd_pt"] - accuracy["none"])
    out = capsys.readouterr().out
    assert "[2/2] arm=kd_pt seed=0: training" in out and "ablation table:" in out
    assert ablate.main(argv)["summary"] == content["summary"]
    assert "[2/2] arm=kd_pt seed=0: finished earlier, kept" in capsys.readouterr().out
