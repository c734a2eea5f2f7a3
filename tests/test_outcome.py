"""Did KD pay? The outcome against the no-KD twin and each diagnosis, on constructed runs whose cause is
known, and one tiny end-to-end run reported by scripts/analyze.py from its output_dir alone."""

import json
import sys
from pathlib import Path

import pytest
import torch
from distill_run import write_tiny_run

from hf_kd import parse_args, run_distillation
from hf_kd.cards.model import DistillationCardInfo, render_model_card
from hf_kd.knowledge.outcome import (
    RunFacts,
    compare,
    diagnose_outcome,
    knowledge_causes,
    outcome,
    outcome_markdown,
    per_class_scores,
)

ROOT = Path(__file__).resolve().parents[1]


def losses(start: float, end: float, n: int = 12, soft: tuple[float, float] | None = None, hard=(1.0, 0.5)):
    """A logged training curve falling linearly from ``start`` to ``end`` (and the two terms likewise)."""
    out = []
    for i in range(n):
        f = i / (n - 1)
        entry = {
            "step": i + 1,
            "loss": start + f * (end - start),
            "loss_hard": hard[0] + f * (hard[1] - hard[0]),
        }
        if soft is not None:
            entry["loss_soft"] = soft[0] + f * (soft[1] - soft[0])
        out.append(entry)
    return tuple(out)


def settled(alpha: float, soft=(1.0, 0.2)) -> tuple[dict[str, float], ...]:
    """A curve that fell over its first half and is flat over its second: trained to convergence."""
    head = losses(1.0, 0.5, n=6, soft=soft if alpha > 0 else None)
    return head + tuple(dict(head[-1], step=7 + i) for i in range(6))


def run(seed=0, metric=0.8, alpha=0.5, **fields) -> RunFacts:
    """A run with the same budget as its twin by default (240 steps, 48 epochs over 150 labelled rows),
    a settled loss, high agreement and a teacher twice its size."""
    base = {
        "name": f"run{seed}",
        "seed": seed,
        "alpha": alpha,
        "temperature": 2.0,
        "metric": metric,
        "teacher_metric": 0.9,
        "optimizer_steps": 240,
        "epochs": 48.0,
        "labelled_rows": 150,
        "batch_size": 32,
        "student_parameters": 10_000,
        "teacher_parameters": 20_000,
        "agreement": 0.9,
        "losses": settled(alpha),
    }
    return RunFacts(**(base | fields))


def names(found):
    return [d["name"] for d in found]


def test_gain_spread_and_gap_closed_are_paired_by_seed():
    kd = [run(0, 0.80), run(1, 0.70), run(2, 0.75)]
    twin = [run(2, 0.65, alpha=0.0), run(0, 0.70, alpha=0.0), run(1, 0.60, alpha=0.0)]  # any order
    result = compare(kd, twin)
    assert result["gains"] == pytest.approx({0: 0.10, 1: 0.10, 2: 0.10})
    assert result["gain"] == pytest.approx(0.10) and result["gain_std"] == pytest.approx(0.0, abs=1e-12)
    assert result["gap_closed"] == pytest.approx(0.10 / (0.9 - 0.65))
    assert result["verdict"] == "helped" and result["sentence"].startswith("KD helped")
    assert "closed 40% of the no-KD → teacher gap" in result["sentence"]


def test_kd_worse_or_inside_the_spread_is_said_plainly():
    hurt = compare([run(0, 0.28), run(1, 0.30)], [run(0, 0.48, alpha=0.0), run(1, 0.47, alpha=0.0)])
    assert hurt["verdict"] == "hurt"
    assert hurt["sentence"].startswith("KD did not help: the student is worse than without KD")
    assert "widened the no-KD → teacher gap" in hurt["sentence"]
    noisy = compare([run(0, 0.75), run(1, 0.60)], [run(0, 0.70, alpha=0.0), run(1, 0.62, alpha=0.0)])
    assert noisy["verdict"] == "inside the spread"  # gains +0.05, −0.02
    assert noisy["sentence"].startswith("KD did not help measurably: the gain's interval includes 0")
    with pytest.raises(ValueError, match="without a final accuracy"):
        compare([run(0, None)], [run(0, 0.5, alpha=0.0)])


def test_verdict_is_a_paired_t_interval_of_the_mean_gain():
    twin = [run(s, 0.5, alpha=0.0) for s in range(5)]
    three = compare([run(s, 0.5 + g) for s, g in enumerate((0.1, 0.0, 0.2))], twin)
    assert three["interval"] == pytest.approx((0.1 - 0.16861, 0.1 + 0.16861), abs=1e-4)  # t(0.95, 2) = 2.920
    assert three["verdict"] == "inside the spread" and "90% interval -0.069 … +0.269" in three["sentence"]
    # five seeds, mean gain 0.030 below its std 0.031: the std rule said "inside", the interval says helped
    five = compare([run(s, 0.5 + g) for s, g in enumerate((-0.002, 0.0, 0.03, 0.06, 0.062))], twin)
    assert five["gain"] < five["gain_std"] and five["verdict"] == "helped"
    assert five["interval"][0] == pytest.approx(0.03 - 2.1318 * five["gain_std"] / 5**0.5, abs=1e-4)
    one = compare([run(0, 0.9)], [run(0, 0.5, alpha=0.0)])  # +0.4 on one seed decides nothing
    assert one["verdict"] == "inside the spread" and "one seed: no spread, no verdict" in one["sentence"]
    unpaired = compare(
        [run(s, v) for s, v in ((0, 0.8), (1, 0.82))], [run(s, 0.5, alpha=0.0) for s in (5, 6, 7)]
    )
    assert not unpaired["paired"] and unpaired["verdict"] == "helped"  # Welch: the twin's std is 0


def test_unequal_budgets_found_and_both_budgets_stated():
    kd = run(0, 0.28, optimizer_steps=80, epochs=2.0, unlabelled_rows=1108)
    twin = run(0, 0.48, alpha=0.0, inert_rows_dropped=1108)
    result = outcome([kd], [twin])
    assert result["verdict"] == "cannot judge"
    assert result["sentence"].startswith(
        "Cannot judge: budgets differ (steps 80 vs 240, labelled rows seen 300 vs 7,200)"
    )
    budget = next(d for d in result["diagnoses"] if d["name"] == "unequal budgets")
    assert "optimizer steps 80 (KD) vs 240 (no KD), 3.00× apart" in budget["finding"]
    assert "labelled rows seen 300 (KD) vs 7,200 (no KD)" in budget["finding"]
    assert "max_steps: 240" in budget["remedy"]
    assert result["budgets"][0].startswith("KD: 80 optimizer steps")
    assert "1,108 inert unlabelled rows dropped" in result["budgets"][1]
    assert "unequal budgets" not in names(diagnose_outcome([run(0)], [run(0, alpha=0.0)]))
    inert_twin = run(0, alpha=0.0, unlabelled_rows=500)  # an older twin that iterated over unlabelled rows
    assert "nothing learns at α = 0" in diagnose_outcome([run(0)], [inert_twin])[0]["finding"]


def test_under_training_needs_a_still_falling_soft_loss():
    falling = losses(2.0, 1.0, soft=(1.0, 0.9))
    kd = run(0, 0.3, optimizer_steps=80, epochs=2.0, losses=falling, agreement=0.3)
    found = diagnose_outcome([kd], [run(0, 0.5, alpha=0.0)])
    under = next(d for d in found if d["name"] == "under-training")
    assert (
        "soft loss (1 → 0.9) made 33% of its whole fall in the last quarter of its training"
        in under["finding"]
    )
    assert "2 times, the twin 48 times" in under["finding"]
    assert "soft loss is still 90% of its start" in under["finding"]
    assert "max_steps: 240 for both" in under["remedy"]  # at least the twin's steps, the twin as many
    assert "capacity gap" not in names(found)  # a student still learning is not at its limit
    assert "under-training" not in names(diagnose_outcome([run(0)], [run(0, alpha=0.0)]))  # flat at the end


def test_a_memorised_hard_loss_or_flat_evaluations_are_not_under_training():
    # the demo's false alarm: a labels-only twin's CE halves and halves again (−50 % per quarter) while
    # its share of the whole fall is 1 %; and a soft loss still falling while held-out accuracy is flat
    memorising = tuple({"step": i + 1, "loss": 2.0 * 0.5**i, "loss_hard": 2.0 * 0.5**i} for i in range(12))
    kd = run(0, 0.5, alpha=0.0, losses=memorising)
    assert "under-training" not in names(diagnose_outcome([kd], [run(0, 0.5, alpha=0.0)]))
    plateau = tuple(
        {"step": 10 * i, "metric": m} for i, m in enumerate((0.5, 0.7, 0.8, 0.81, 0.80, 0.81, 0.81, 0.81))
    )
    still_soft = run(0, 0.5, losses=losses(2.0, 1.0, soft=(1.0, 0.5)), evals=plateau)
    assert "under-training" not in names(diagnose_outcome([still_soft], [run(0, 0.5, alpha=0.0)]))
    rising = tuple(
        {"step": 10 * i, "metric": m} for i, m in enumerate((0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6))
    )
    flat_loss = run(0, 0.5, evals=rising)  # its loss has settled, the held-out metric has not
    under = next(
        d for d in diagnose_outcome([flat_loss], [run(0, 0.5, alpha=0.0)]) if d["name"] == "under-training"
    )
    assert (
        "evaluation metric still rose +0.100 over the last quarter of its evaluations (8 evaluations"
        in under["finding"]
    )


def test_a_short_run_far_from_the_teacher_is_under_trained_not_at_capacity():
    # measured on digits (seed 0, 80 steps, cosine): held-out accuracy flat at the end, soft loss 92 % of start
    flat = tuple(
        {"step": 8 * (i + 1), "metric": m}
        for i, m in enumerate((0.15, 0.2, 0.25, 0.27, 0.28, 0.28, 0.29, 0.28))
    )
    kd = run(
        0,
        0.28,
        optimizer_steps=80,
        epochs=2.0,
        losses=settled(0.5, soft=(0.68, 0.62)),
        evals=flat,
        agreement=0.29,
        teacher_parameters=140_000,
    )
    found = diagnose_outcome([kd], [run(0, 0.74, alpha=0.0, optimizer_steps=720)])
    under = next(d for d in found if d["name"] == "under-training")
    assert (
        "soft loss is still 91% of its start (0.68 → 0.62) after 80 optimizer steps (the twin made 720)"
        in under["finding"]
    )
    assert "capacity gap" not in names(found)
    same_steps = run(
        0,
        0.28,
        losses=settled(0.5, soft=(0.68, 0.62)),
        evals=flat,
        agreement=0.29,
        teacher_parameters=140_000,
    )
    assert names(diagnose_outcome([same_steps], [run(0, 0.74, alpha=0.0)])) == ["capacity gap"]


def test_capacity_gap_needs_low_agreement_a_stuck_soft_loss_and_a_larger_teacher():
    stuck = settled(0.5, soft=(1.0, 0.9))  # the soft loss stopped at 90 % of its start
    kd = run(0, 0.4, losses=stuck, agreement=0.4, teacher_parameters=140_000)
    gap = next(d for d in diagnose_outcome([kd], [run(0, 0.5, alpha=0.0)]) if d["name"] == "capacity gap")
    assert "agrees with the teacher on 40.0%" in gap["finding"] and "14.0× larger" in gap["finding"]
    assert "teacher assistant" in gap["remedy"] and "lower τ" in gap["remedy"]
    same_size = run(0, 0.4, losses=stuck, agreement=0.4, teacher_parameters=20_000)
    assert "capacity gap" not in names(diagnose_outcome([same_size], [run(0, alpha=0.0)]))
    agrees = run(0, 0.4, losses=stuck, agreement=0.95, teacher_parameters=140_000)
    assert "capacity gap" not in names(diagnose_outcome([agrees], [run(0, alpha=0.0)]))


def gradients(hard: float, soft: float, n: int = 8):
    """A settled curve whose logged weighted terms' gradient norms are ``hard`` and ``soft`` throughout."""
    return tuple(dict(e, grad_norm_hard=hard, grad_norm_soft=soft) for e in settled(0.5))[:n]


def test_one_term_dominating_is_found_by_the_gradient_norms():
    soft_heavy = run(0, alpha=0.9, temperature=4.0, losses=gradients(0.02, 0.5))
    found = next(
        d for d in diagnose_outcome([soft_heavy], [run(0, alpha=0.0)]) if d["name"] == "hard/soft balance"
    )
    assert "The soft term dominates" in found["finding"] and "25× the other's" in found["finding"]
    assert "lower α" in found["remedy"]
    hard_heavy = run(0, alpha=0.1, temperature=1.0, losses=gradients(0.4, 0.01))
    found = next(
        d for d in diagnose_outcome([hard_heavy], [run(0, alpha=0.0)]) if d["name"] == "hard/soft balance"
    )
    assert "The hard term dominates" in found["finding"] and "raise α" in found["remedy"]
    # loss sizes 11× apart (0.1·2.3 vs 0.9·4·0.7, the demo's first step) but gradients 3× apart: no alarm
    sized = tuple(dict(e, loss_hard=2.3, loss_soft=0.7) for e in gradients(0.1, 0.3))
    assert "hard/soft balance" not in names(
        diagnose_outcome([run(0, alpha=0.9, losses=sized)], [run(0, alpha=0.0)])
    )
    assert "hard/soft balance" not in names(diagnose_outcome([run(0)], [run(0, alpha=0.0)]))  # not logged


def test_the_trainer_logs_each_terms_gradient_on_the_logits():
    from collections import defaultdict
    from types import SimpleNamespace

    from hf_kd.trainer import DistillationTrainer

    torch.manual_seed(0)
    z, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, -100])
    soft_mask = torch.ones(6, dtype=torch.bool)
    settings = dict(
        alpha=0.7,
        temperature=2.0,
        divergence_name="forward_kl",
        soft_mask=soft_mask,
        num_hard=5,
        num_soft=6,
        temperature_squared=True,
        tail="uniform",
        target_fn=None,
        chunk_size=None,
        beta=0.5,
        skew=0.1,
    )
    fake = SimpleNamespace(_kd_sums={"train": defaultdict(float)})
    DistillationTrainer._record_term_gradients(
        fake, SimpleNamespace(student_logits=z, teacher=t, labels=y), settings
    )
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), 4).float() * (y >= 0).float()[:, None]
    hard = 0.3 * (z.softmax(-1) - onehot) * (y >= 0).float()[:, None] / 5  # ∂(1 − α)·CE/∂z
    soft = 0.7 * 2.0 * ((z / 2).softmax(-1) - (t / 2).softmax(-1)) / 6  # ∂α·τ²·KL(p^τ‖q^τ)/∂z
    sums = fake._kd_sums["train"]
    assert sums["grad_hard"].item() == pytest.approx(hard.norm().item(), rel=1e-5)
    assert sums["grad_soft"].item() == pytest.approx(soft.norm().item(), rel=1e-5)
    assert sums["n_grad"] == 1.0


def test_classes_the_teacher_gets_wrong_are_named():
    labels = torch.tensor([0] * 10 + [1] * 10)
    teacher = torch.nn.functional.one_hot(torch.tensor([0] * 10 + [0] * 6 + [1] * 4), 2).float()
    student = torch.nn.functional.one_hot(torch.tensor([0] * 10 + [1] * 10), 2).float()
    per_class = per_class_scores(teacher, student, labels, ["cat", "dog"])
    assert per_class["dog"] == {
        "items": 10,
        "teacher_precision": 1.0,
        "teacher_recall": pytest.approx(0.4),
        "teacher_f1": pytest.approx(2 * 0.4 / 1.4),
        "teacher_predicted": 4,
        "student_precision": 1.0,
        "student_recall": 1.0,
        "student_f1": 1.0,
        "student_predicted": 10,
    }
    assert per_class["cat"]["teacher_precision"] == pytest.approx(10 / 16)  # 6 dogs called cats
    found = diagnose_outcome([run(0)], [run(0, alpha=0.0)], per_class=per_class)
    assert found[0]["name"] == "teacher worse on some classes"
    assert (
        "dog (F1 0.57 vs 1.00: precision 1.00 vs 1.00, recall 0.40 vs 1.00, 10 items)" in found[0]["finding"]
    )


def test_knowledge_failure_patterns_come_with_a_remedy():
    causes = knowledge_causes(
        ["Over-confident teacher pattern: 74.0% of instances have p_t > 0.99 ...", "No failure pattern: ..."]
    )
    assert names(causes) == ["over-confident teacher"] and "earlier" in causes[0]["remedy"]


def test_a_gain_raises_no_alarm_but_unequal_budgets():
    stuck = settled(0.5, soft=(1.0, 0.9))
    kd = [run(s, 0.85 + 0.01 * s, losses=stuck, agreement=0.4, teacher_parameters=140_000) for s in range(3)]
    twin = [run(s, 0.74 + 0.01 * s, alpha=0.0) for s in range(3)]
    assert "capacity gap" in names(diagnose_outcome(kd, twin))
    result = outcome(kd, twin, knowledge_failures=["Over-confident teacher pattern: ..."])
    assert result["verdict"] == "helped" and result["diagnoses"] == []
    # same steps of the same rows, 1,050 of each epoch's 1,200 unlabelled: the trade KD makes, named only
    fewer_passes = [run(s, 0.85 + 0.01 * s, epochs=6.0, unlabelled_rows=1050) for s in range(3)]
    named = outcome(fewer_passes, twin)
    assert named["verdict"] == "helped" and names(named["diagnoses"]) == ["budget difference"]
    assert (
        "labelled rows seen 900 (KD) vs 7,200 (no KD), 8.00× apart: at equal steps the KD run spends 88% of its "
        "rows on 1,050 unlabelled rows" in named["diagnoses"][0]["finding"]
    )
    more_steps = [run(s, 0.85 + 0.01 * s, optimizer_steps=720) for s in range(3)]
    unequal = outcome(more_steps, twin)
    assert unequal["verdict"] == "cannot judge" and names(unequal["diagnoses"]) == ["unequal budgets"]
    assert "Why, and what to try" not in outcome_markdown(result)


def test_card_leads_with_the_outcome():
    info = DistillationCardInfo(
        "s", "t", "image-classification", "forward_kl", 2.0, 0.5, outcome="**KD helped.**"
    )
    body = str(render_model_card(info)).split("---\n", 2)[2]
    assert body.index("## Did distillation pay?\n\n**KD helped.**") < body.index("## How it was made")
    assert "Did distillation pay" not in str(
        render_model_card(DistillationCardInfo("s", "t", "x", "kl", 2.0, 0.5))
    )


def test_analyze_reports_the_outcome_from_output_dirs_alone(tmp_path, capsys):
    recipe = write_tiny_run(tmp_path, eval_split="test", logging_steps=1)
    base = ["--config", str(recipe), "--report_to", "none"]
    run_distillation(*parse_args(base + ["--output_dir", str(tmp_path / "kd")]))
    run_distillation(
        *parse_args(base + ["--alpha", "0.0", "--max_steps", "8", "--output_dir", str(tmp_path / "twin")])
    )
    record = json.loads((tmp_path / "kd" / "run_record.json").read_text())
    assert record["budget"]["optimizer_steps"] == 4 and record["budget"]["labelled_rows"] == 64
    recipe.unlink()  # the run's folder is all analyze needs
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import analyze
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    argv = ["--run", str(tmp_path / "kd"), "--twin", str(tmp_path / "twin"), "--card"]
    report_dir = analyze.main(argv)
    assert report_dir == tmp_path / "kd" / "report"
    content = json.loads((report_dir / "report.json").read_text())
    assert list(content)[0] == "outcome"
    kd_acc = json.loads((tmp_path / "kd" / "eval_results.json").read_text())["eval_accuracy"]
    twin_acc = json.loads((tmp_path / "twin" / "eval_results.json").read_text())["eval_accuracy"]
    assert content["outcome"]["gain"] == pytest.approx(kd_acc - twin_acc)
    md = (report_dir / "report.md").read_text()
    assert "optimizer steps 4 (KD) vs 8 (no KD), 2.00× apart" in md  # stated whatever the verdict
    assert "**Cannot judge: budgets differ (steps 4 vs 8, labelled rows seen 64 vs 128)" in md
    assert md.index("## Did KD pay?") < md.index("## What the teacher transfers")
    assert "KD: 4 optimizer steps" in md and "No KD: 8 optimizer steps" in md
    card = (tmp_path / "kd" / "README.md").read_text()
    assert card.index("## Did distillation pay?") < card.index("## How it was made")
    assert content["outcome"]["sentence"] in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unexpected arguments"):
        analyze.main(["--run", str(tmp_path / "kd"), "--config", "x.yaml"])
    with pytest.raises(FileNotFoundError, match="output_dir of a finished hf_kd run"):
        analyze.main(["--run", str(tmp_path / "missing")])


def test_tune_sweeps_on_a_carved_validation_split_resumes_and_writes_the_recipe(tmp_path):
    from hf_kd.runs.tune import VALIDATION_SPLIT, tune

    recipe = write_tiny_run(tmp_path)
    trained = []

    def train(argv):
        trained.append(argv)
        return run_distillation(*parse_args(argv)).metrics

    kwargs = dict(alphas=[0.5], taus=[2.0], budgets=[2], budget_field="max_steps", seeds=[0], train=train)
    content = tune(str(recipe), tmp_path / "tune", **kwargs, progress=lambda s: None)
    assert [a[a.index("--output_dir") + 1] for a in trained] == [
        str(tmp_path / "tune" / name / "seed0") for name in ("none_max_steps=2", "a0.5_t2_max_steps=2")
    ]
    assert all(a[a.index("--eval_split") + 1] == VALIDATION_SPLIT for a in trained)  # never the test split
    from datasets import load_from_disk

    carved = load_from_disk(str(tmp_path / "tune" / "data"))
    assert sorted(carved) == ["train", VALIDATION_SPLIT] and len(carved[VALIDATION_SPLIT]) == 13  # 20% of 64
    assert set(content["summary"]) == {"none_max_steps=2", "a0.5_t2_max_steps=2"}
    best = content["summary"][content["best"]]["mean"]
    assert best == max(s["mean"] for s in content["summary"].values())
    recommended = (tmp_path / "tune" / "recommended.yaml").read_text()
    assert recommended.startswith("# Chosen by scripts/tune.py")
    data_args, _, config = parse_args(["--config", str(tmp_path / "tune" / "recommended.yaml")])
    assert config.max_steps == 2 and config.output_dir == str(tmp_path / "out") + "_tuned"
    assert data_args.eval_split == "test"  # the recipe itself still evaluates on its own test split
    assert (tmp_path / "tune" / "tune.png").is_file() and "| setting |" in (
        tmp_path / "tune" / "tune.md"
    ).read_text()
    trained.clear()
    tune(str(recipe), tmp_path / "tune", **kwargs, progress=lambda s: None)
    assert trained == []  # resumed: nothing trained again
