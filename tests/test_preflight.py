"""The pre-flight check: its measures against their formulas, its rules on teachers built to trip them, and
the whole check from a recipe (online and cached teacher, a causal LM) before any training."""

import json
import math

import pytest
import torch
import yaml
from distill_run import cache_tiny_teacher, write_tiny_run

from hf_kd.knowledge.preflight import PREFLIGHT_RULES, recommend
from hf_kd.knowledge.profile import heldout_scores, kept_mass_by_k, teacher_profile
from scripts import preflight

PLAN = dict(planned_steps=100, train_rows=320, batch_size=32)


def teacher_logits(n: int, k: int, margin: float, seed: int = 0):
    """Logits whose true class leads by ``margin`` over Gaussian noise: larger margin, more confident."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += margin
    return logits, labels


def test_kept_mass_is_the_top_k_probability_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    masses = kept_mass_by_k(logits, ks=(1, 2, 3, 8))
    assert sorted(masses) == [1, 2, 3]  # k ≥ K is no cache
    assert masses[1]["mean"] == pytest.approx((0.5 + 0.2) / 2)
    assert masses[2]["mean"] == pytest.approx((0.8 + 0.4) / 2)
    assert masses[3]["mean"] == pytest.approx((0.9 + 0.6) / 2)


def test_profile_measures_match_their_formulas():
    logits, labels = teacher_logits(400, 10, margin=2.0)
    profile = teacher_profile(logits, labels, temperatures=(1.0, 3.0))
    p = torch.softmax(logits, -1)
    t = profile["teacher"]
    assert t["accuracy"] == pytest.approx((logits.argmax(-1) == labels).double().mean().item())
    nll = -p[torch.arange(400), labels].log().mean().item()
    assert t["nll"] == pytest.approx(nll, rel=1e-5) and t["perplexity"] == pytest.approx(
        math.exp(nll), rel=1e-5
    )
    assert t["confidence_mean"] == pytest.approx(p.max(-1).values.mean().item(), rel=1e-5)
    for tau in (1.0, 3.0):
        p_tau = torch.softmax(logits / tau, -1)
        row = profile["by_temperature"][tau]
        assert row["soft_signal"] == pytest.approx(
            1 - p_tau[torch.arange(400), labels].mean().item(), rel=1e-5
        )
        entropy = -(p_tau * p_tau.log()).sum(-1).mean().item() / math.log(10)
        assert row["teacher_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert profile["majority_share"] == pytest.approx(torch.bincount(labels).max().item() / 400)
    c = logits - logits.mean(-1, keepdim=True)
    sigma = ((c**2).sum(-1) / 9).sqrt()  # Bessel's correction, as logit standardisation
    p_z = torch.softmax(c / sigma[:, None] / 2.0, -1)  # z-scored at base τ 2
    s = profile["standardized"]
    assert s["logit_std"] == pytest.approx(sigma.mean().item(), rel=1e-5)
    assert s["soft_signal"] == pytest.approx(1 - p_z[torch.arange(400), labels].mean().item(), rel=1e-4)
    h = -(p_z * p_z.log()).sum(-1).mean().item()
    assert s["teacher_entropy"] == pytest.approx(h / math.log(10), rel=1e-4)
    assert s["kl_to_uniform"] == pytest.approx(math.log(10) - h, rel=1e-4)


def test_a_healthy_teacher_gets_alpha_09_and_the_smallest_temperature_with_soft_signal():
    logits, labels = teacher_logits(400, 10, margin=2.5)
    profile = teacher_profile(logits, labels)
    signal = {t: r["soft_signal"] for t, r in profile["by_temperature"].items()}
    assert signal[1.0] >= PREFLIGHT_RULES["soft_signal"]  # the rule's own premise, on this teacher
    rec = recommend(profile, **PLAN)
    assert rec.fields["temperature"].value == 1.0 and rec.fields["alpha"].value == 0.9
    assert rec.fields["divergence"].value == "forward_kl"
    assert rec.fields["max_steps"].value == 150  # 15 passes over 320 rows of batch 32 > the planned 100
    assert not any("unlikely" in w or "Over-confident" in w for w in rec.warnings)


def test_a_confident_unsaturated_teacher_keeps_temperature_1():
    """As the text task's teacher: little mass off the true class at τ 1 (< 0.1), yet none saturated."""
    logits, labels = teacher_logits(400, 8, margin=5.5)
    profile = teacher_profile(logits, labels)
    assert profile["by_temperature"][1.0]["soft_signal"] < PREFLIGHT_RULES["soft_signal"]
    assert profile["teacher"]["saturation_share"] < PREFLIGHT_RULES["saturated_share"]
    assert recommend(profile, **PLAN).fields["temperature"].value == 1.0


def test_a_saturated_teacher_gets_a_higher_temperature_a_lower_alpha_and_a_warning():
    logits, labels = teacher_logits(400, 10, margin=12.0)
    profile = teacher_profile(logits, labels)
    assert profile["teacher"]["saturation_share"] > 0.9
    assert profile["by_temperature"][1.0]["soft_signal"] < PREFLIGHT_RULES["soft_signal"]
    rec = recommend(profile, **PLAN, teacher_parameters=1000, student_parameters=100)
    assert rec.fields["temperature"].value > 1.0
    assert rec.fields["alpha"].value == 0.5
    assert any(w.startswith("Over-confident teacher") for w in rec.warnings)
    assert any(w.startswith("Size gap") for w in rec.warnings)


def test_a_teacher_no_better_than_the_students_reference_is_called_unlikely_to_help():
    logits, labels = teacher_logits(400, 10, margin=1.0)
    profile = teacher_profile(logits, labels)
    accuracy = profile["teacher"]["accuracy"]
    rec = recommend(profile, **PLAN, student_reference=accuracy - 0.01)
    assert any("unlikely to help" in w for w in rec.warnings)
    rec = recommend(profile, **PLAN, student_reference=accuracy - 0.1)
    assert not any("unlikely to help" in w for w in rec.warnings)
    held_logits, held_labels = teacher_logits(200, 10, margin=0.0, seed=1)  # memorised: chance held out
    profile["heldout"] = heldout_scores(held_logits, held_labels)
    assert profile["heldout"]["accuracy"] == pytest.approx(
        (held_logits.argmax(-1) == held_labels).double().mean().item()
    )
    rec = recommend(profile, **PLAN, student_reference=accuracy - 0.1)
    assert any("unlikely to help: its held-out accuracy" in w for w in rec.warnings)


def test_a_flat_tailed_teacher_is_warned_about():
    labels = torch.arange(300) % 10
    logits = torch.zeros(300, 10)
    logits[torch.arange(300), labels] = 3.0  # every wrong class alike: a label-smoothed teacher
    rec = recommend(teacher_profile(logits, labels), **PLAN)
    assert any(w.startswith("Flat tail") for w in rec.warnings) and rec.fields["alpha"].value == 0.5


def test_on_policy_from_a_student_far_from_the_teacher_is_warned_and_the_cache_width_chosen():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 500, (600,), generator=g)
    teacher = torch.randn(600, 500, generator=g)
    teacher[torch.arange(600), labels] += 6.0  # a good LM teacher
    student = torch.randn(600, 500, generator=g) * 0.01  # an untrained student: near uniform
    profile = teacher_profile(teacher, labels, student_logits=student, token_level=True)
    assert profile["student"]["nll"] == pytest.approx(math.log(500), abs=0.05)
    on = recommend(profile, **PLAN, token_level=True, lmbda=1.0, divergence="jsd")
    assert any(w.startswith("On-policy KD from a student") for w in on.warnings)
    assert on.fields["divergence"].value == "jsd" and on.fields["alpha"].value == 0.9  # dense: α_reliable
    off = recommend(profile, **PLAN, token_level=True, lmbda=0.0)
    cached = recommend(profile, **PLAN, token_level=True, top_k_cache=True)
    assert cached.fields["alpha"].value == 0.8 and "top-k cache" in cached.fields["alpha"].because
    assert off.fields["alpha"].value == 0.9 and "read densely" in off.fields["alpha"].because
    assert not any(w.startswith("On-policy") for w in off.warnings)
    k = on.fields["cache_top_k"].value
    masses = profile["kept_mass"]
    assert masses[k]["mean"] >= PREFLIGHT_RULES["kept_mass"]
    assert all(m["mean"] < PREFLIGHT_RULES["kept_mass"] for kk, m in masses.items() if kk < k)
    assert "cache_top_k" not in on.recipe_fields()


def test_preflight_script_writes_the_report_and_a_recipe_distill_accepts(tmp_path):
    recipe = write_tiny_run(tmp_path, num_labeled_examples=16, use_unlabeled=False)
    report = tmp_path / "preflight"
    content = preflight.main(["--config", str(recipe), "--report_dir", str(report), "--max_samples", "48"])
    assert sorted(p.name for p in report.iterdir()) == ["preflight.json", "preflight.md", "recommended.yaml"]
    profile = content["profile"]
    assert profile["num_items"] == 48 and profile["num_classes"] == 3
    assert profile["heldout"]["num_items"] == 32  # the recipe's evaluation split, all 32 rows
    written = yaml.safe_load((report / "recommended.yaml").read_text())
    fields = content["recommendation"]["fields"]
    for name in ("alpha", "temperature", "divergence", "max_steps"):
        assert written[name] == fields[name]["value"]
    assert written["output_dir"] == str(tmp_path / "out") + "_preflight"
    assert written["max_steps"] == max(4, math.ceil(15 * 16 / 16))  # 15 passes over 16 labelled rows
    assert json.loads((report / "preflight.json").read_text())["profile"]["teacher"] == profile["teacher"]
    from hf_kd.config import parse_args

    parse_args(["--config", str(report / "recommended.yaml")])  # a recipe distill.py accepts
    no_kd = preflight.main(
        ["--config", str(recipe), "--report_dir", str(tmp_path / "p0"), "--max_samples", "48"]
        + ["--alpha", "0"]
    )
    assert no_kd["profile"] == content["profile"]  # a no-KD recipe: its teacher is measured all the same
    with pytest.raises(ValueError, match="report_dir"):  # never written into an input
        preflight.main(["--config", str(recipe), "--report_dir", str(tmp_path / "teacher" / "x")])


def test_a_cached_teacher_gives_the_same_measures_as_the_online_one(tmp_path):
    recipe = write_tiny_run(tmp_path)
    cache_tiny_teacher(tmp_path, recipe, logits_dtype="float32")
    online = preflight.main(["--config", str(recipe), "--report_dir", str(tmp_path / "p1")])
    cached = preflight.main(
        [
            "--config", str(recipe), "--report_dir", str(tmp_path / "p2"),
            "--teacher_source", "cached", "--teacher_cache", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    for key, value in online["profile"]["teacher"].items():
        assert cached["profile"]["teacher"][key] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert cached["recommendation"]["fields"] == online["recommendation"]["fields"]


def test_a_causal_lm_preflight_measures_the_student_and_the_cache_widths(tmp_path):
    """The tiny on-policy recipe: the untrained student's NLL, the teacher's kept mass per k, both equal to
    the same numbers computed from the two models' own logits, and the on-policy warning for lmbda 1."""
    from tiny import tiny_llama
    from transformers import AutoTokenizer

    from hf_kd.data.toy_chat import write_toy_chat

    data = write_toy_chat(tmp_path / "toy_chat", num_train=16, num_test=4)
    teacher_dir = tmp_path / "teacher"
    tiny_llama(48, seed=1, pad_token_id=0, eos_token_id=5).save_pretrained(teacher_dir)
    AutoTokenizer.from_pretrained(str(data / "tokenizer")).save_pretrained(teacher_dir)
    argv = ["--config", "recipes/causal_lm/tiny/on_policy.yaml", "--dataset_name", str(data)]
    argv += ["--student_processor", str(data / "tokenizer"), "--teacher_model_name_or_path", str(teacher_dir)]
    argv += ["--report_dir", str(tmp_path / "p"), "--max_tokens", "40", "--lmbda", "1.0"]
    content = preflight.main(argv)
    profile = content["profile"]
    assert 0 < profile["num_items"] <= 40 and "student" in profile and profile["kept_mass"]
    masses = [m["mean"] for _, m in sorted(profile["kept_mass"].items())]
    assert masses == sorted(masses) and all(0 < m < 1 for m in masses)  # wider keeps more
    fields = content["recommendation"]["fields"]
    assert fields["alpha"]["value"] == PREFLIGHT_RULES["alpha_reliable"]  # an online LM teacher: dense
    assert "cache_top_k" in fields and "cache_top_k" not in yaml.safe_load(
        (tmp_path / "p" / "recommended.yaml").read_text()
    )
    gap = profile["student"]["nll"] - profile["teacher"]["nll"]
    warned = any(w.startswith("On-policy KD from a student") for w in content["recommendation"]["warnings"])
    assert warned == (gap > PREFLIGHT_RULES["on_policy_gap_nats"])
