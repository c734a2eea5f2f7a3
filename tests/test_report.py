"""Knowledge report, KnowledgeCallback, synthetic teachers through the real trainer/pipeline, and the
label-smoothed-teacher failure diagnosis, on the synthetic hierarchy task (hf_kd.data.hierarchy)."""

import json
import math
from pathlib import Path

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from formulas import kd_loss
from tiny import tiny_config

from hf_kd import DistillationTrainer, parse_args, run_distillation
from hf_kd.cards.run import knowledge_summary
from hf_kd.data.hierarchy import class_groups, make_hierarchy_dataset, write_hierarchy_dataset
from hf_kd.knowledge import class_similarity, rescaling_weight, soft_confusion
from hf_kd.knowledge.diagnosis import THRESHOLDS, diagnose
from hf_kd.knowledge.measures import Predictions, knowledge_measures, nested_measures, scalar_measures
from hf_kd.knowledge.report import write_report
from hf_kd.losses import distillation_loss
from hf_kd.predictions import collect_predictions, teacher_class_similarity
from hf_kd.tasks.features import FeatureClassificationTask, MLPClassifierConfig, MLPForFeatureClassification
from hf_kd.teachers.synthetic import SyntheticTargetFn, synthetic_target
from scripts import analyze

ROOT = Path(__file__).resolve().parent.parent
K = 16


def mlp(hidden: int, layers: int, seed: int) -> MLPForFeatureClassification:
    torch.manual_seed(seed)
    names = [f"g{c // 4}_c{c % 4}" for c in range(K)]  # the hierarchy task's label names (4 groups of 4)
    config = MLPClassifierConfig(
        input_dim=32,
        hidden_size=hidden,
        num_hidden_layers=layers,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    return MLPForFeatureClassification(config)


def fit(model, x, loss_fn, steps: int = 300):
    """Full-batch Adam: a few hundred steps train these MLPs on 1,280 rows in about a second."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(features=x).logits).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def hierarchy():
    data = make_hierarchy_dataset(seed=0)
    train, test = data["train"].with_format("torch")[:], data["test"].with_format("torch")[:]
    return data, train["features"], train["label"], test["features"], test["label"], test["difficulty"]


@pytest.fixture(scope="module")
def teachers(hierarchy):
    """The same teacher trained without and with label smoothing (ε = 0.3), and a KD student of each."""
    _, x, y, xt, yt, _ = hierarchy
    out = {}
    for name, smoothing in (("plain", 0.0), ("smoothed", 0.3)):
        teacher = fit(mlp(64, 2, 0), x, lambda z, s=smoothing: F.cross_entropy(z, y, label_smoothing=s))
        with torch.no_grad():
            v = teacher(features=x).logits
        student = fit(
            mlp(16, 1, 10), x, lambda z, v=v: distillation_loss(z, v, y, alpha=0.9, temperature=2.0).loss
        )
        with torch.no_grad():
            out[name] = (teacher, student, teacher(features=xt).logits, student(features=xt).logits)
    return out


# ---- synthetic teachers through the real loss path --------------------------------------------


def test_ls_through_trainer_is_torch_label_smoothing(hierarchy, tmp_path):
    """'ls' at τ = 1 through DistillationTrainer.compute_loss: (1 − α) CE + α KL(u ‖ q) equals
    cross_entropy(label_smoothing = α) − α log K (KL = H(u, q) − log K), with the same gradient."""
    _, x, y, _, _, _ = hierarchy
    alpha, model = 0.3, mlp(8, 1, 0)
    args = tiny_config(tmp_path, synthetic_teacher="ls", alpha=alpha, temperature=1.0)
    trainer = DistillationTrainer(model=model, args=args, task=FeatureClassificationTask())
    batch = {"features": x[:64], "labels": y[:64]}
    loss = trainer.compute_loss(model, batch)
    (grad,) = torch.autograd.grad(loss, model.classifier.weight)
    expected = F.cross_entropy(model(features=x[:64]).logits, y[:64], label_smoothing=alpha)
    (expected_grad,) = torch.autograd.grad(expected, model.classifier.weight)
    torch.testing.assert_close(loss + alpha * math.log(K), expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("kind", ["kd_pt", "kd_sim", "kd_topk"])
def test_target_fn_loss_is_kl_to_synthetic_target(kind):
    """distillation_loss with SyntheticTargetFn = (1 − α) CE + α τ² KL(ρ ‖ q^τ), ρ = synthetic_target(kind, v, y, τ)."""
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(10, K, generator=g), 3 * torch.randn(10, K, generator=g)
    y = torch.randint(0, K, (10,), generator=g)
    sim = class_similarity(torch.randn(K, 4, generator=g))
    alpha, tau = 0.4, 2.0
    fn = SyntheticTargetFn(kind, k=4.0, class_similarity=sim, sim_temperature=0.5)
    loss = distillation_loss(z, v, y, alpha=alpha, temperature=tau, target_fn=fn).loss
    rho = synthetic_target(kind, v, y, temperature=tau, k=4, class_similarity=sim, sim_temperature=0.5)
    torch.testing.assert_close(loss, kd_loss(z, rho, y, alpha=alpha, tau=tau))


def test_kd_topk_with_k_equal_K_is_kd_through_loss():
    g = torch.Generator().manual_seed(1)
    z, v, y = (
        torch.randn(6, K, generator=g),
        torch.randn(6, K, generator=g),
        torch.randint(0, K, (6,), generator=g),
    )
    topk = distillation_loss(
        z, v, y, alpha=0.5, temperature=2.0, target_fn=SyntheticTargetFn("kd_topk", k=K)
    ).loss
    torch.testing.assert_close(topk, distillation_loss(z, v, y, alpha=0.5, temperature=2.0).loss)


def test_synthetic_target_fn_rejects_bad_input():
    with pytest.raises(ValueError, match="kd_sim"):
        SyntheticTargetFn("kd_sim")
    with pytest.raises(ValueError, match="kd_topk"):
        SyntheticTargetFn("kd_topk")
    with pytest.raises(ValueError, match="whole number"):
        SyntheticTargetFn("kd_topk", k=2.5)
    with pytest.raises(ValueError, match="'ls'"):
        SyntheticTargetFn("ls")


def test_teacher_class_similarity_weights_then_fallback(teachers, hierarchy):
    teacher = teachers["plain"][0]
    sim, source = teacher_class_similarity(teacher)
    assert source == "logit-layer weights"
    torch.testing.assert_close(sim, class_similarity(teacher.classifier.weight))
    perm = list(reversed(range(K)))
    torch.testing.assert_close(teacher_class_similarity(teacher, output_map=perm)[0], sim[perm][:, perm])
    # A cached teacher (no model): the soft confusion of its predictions.
    _, _, _, _, yt, _ = hierarchy
    v = teachers["plain"][2]
    sim, source = teacher_class_similarity(None, lambda: Predictions(None, v, yt))
    assert source == "soft confusion of predictions"
    torch.testing.assert_close(sim, soft_confusion(torch.softmax(v, -1), yt, K))


# ---- measures and diagnosis ------------------------------------------------------------------------


def test_self_agreement_is_one_and_measures_match_formulas(teachers, hierarchy):
    data, _, _, _, yt, d = hierarchy
    teacher, _, v, _ = teachers["plain"]
    w = teacher.classifier.weight.detach()
    m = knowledge_measures(
        v,
        yt,
        student_logits=v,
        alpha=0.5,
        temperature=2.0,
        groups=class_groups(data),
        teacher_weight=w,
        student_weight=w,
    )
    for kind in ("agreement_confusion", "agreement_weights"):
        assert m["level2"][kind]["pearson"] == pytest.approx(1.0) and m["level2"][kind][
            "spearman"
        ] == pytest.approx(1.0)
    assert m["health"]["top1_agreement"] == 1.0
    p = torch.softmax(v, -1)
    assert m["health"]["teacher_accuracy"] == pytest.approx((p.argmax(-1) == yt).double().mean().item())
    pt = p.gather(-1, yt[:, None]).squeeze(-1)
    assert m["level1"]["effective_smoothing"] == pytest.approx(
        0.5 * (1 - torch.softmax(v / 2, -1).gather(-1, yt[:, None])).mean().item(), rel=1e-5
    )
    w_t = rescaling_weight(v, v, yt, alpha=0.5, temperature=2.0)
    assert m["level3"]["rescaling"]["mean"] == pytest.approx(0.5, abs=1e-5) and torch.allclose(
        w_t, torch.full_like(w_t, 0.5)
    )
    assert m["level3"]["teacher_true_prob_mean"] == pytest.approx(pt.double().mean().item(), rel=1e-5)
    # A trained teacher sees the class groups and finds the ground-truth hard instances hard.
    assert m["level2"]["teacher_hierarchy_confusion"] > 1.15
    assert m["level3"]["spearman_teacher_prob_difficulty"] is None
    m = knowledge_measures(v, yt, alpha=0.5, temperature=2.0, difficulty=d)
    assert m["level3"]["spearman_teacher_prob_difficulty"] < -0.3
    assert "agreement_confusion" not in m["level2"] and "rescaling" not in m["level3"]


def test_large_vocabulary_restricted_to_frequent_classes():
    g = torch.Generator().manual_seed(0)
    v, y = torch.randn(200, 50, generator=g), torch.randint(0, 5, (200,), generator=g)
    m = knowledge_measures(v, y, student_logits=v, alpha=0.5, temperature=1.0, max_classes=5)
    assert m["level2"]["agreement_confusion"]["num_classes"] == 5
    assert m["level2"]["agreement_confusion"]["spearman"] == pytest.approx(1.0)


def test_label_smoothed_teacher_is_diagnosed(teachers, hierarchy):
    """The paper's failure case: a label-smoothed teacher has a flatter tail and its student agrees less
    with it (class similarity and instance ranking) than the same teacher trained without, and the
    report says so in words."""
    _, _, _, _, yt, _ = hierarchy
    measures = {}
    for name, (_, _, v, z) in teachers.items():
        measures[name] = knowledge_measures(v, yt, student_logits=z, alpha=0.9, temperature=2.0)
    plain, smoothed = measures["plain"], measures["smoothed"]
    assert (
        smoothed["health"]["tail_flatness"]
        >= THRESHOLDS["flat_tail"]
        > plain["health"]["tail_flatness"] + 0.5
    )
    assert (
        smoothed["level2"]["agreement_confusion"]["spearman"]
        < plain["level2"]["agreement_confusion"]["spearman"]
    )
    assert (
        smoothed["level3"]["spearman_student_teacher_prob"]
        < plain["level3"]["spearman_student_teacher_prob"] - 0.1
    )
    assert any("Label-smoothed teacher pattern" in s for s in diagnose(smoothed)["failures"])
    assert not any("Label-smoothed" in s for s in diagnose(plain)["failures"])
    assert "does not offer it (its wrong-class tail is flat)" in diagnose(smoothed)["levels"][1]


def test_saturated_teacher_is_diagnosed():
    y = torch.arange(10) % 4
    v = F.one_hot(y, 4).float() * 20  # p_t ≈ 1 everywhere
    m = knowledge_measures(v, y, alpha=0.5, temperature=1.0)
    assert m["health"]["saturation_share"] == 1.0
    assert any("Over-confident" in s for s in diagnose(m)["failures"])


def test_binary_task_level2_is_undefined_not_offered():
    """K = 2: one wrong class, tail flatness H(p̄)/log(K − 1) is 0/0 = NaN and the class-similarity
    agreement has nothing to rank. The diagnosis says level 2 is undefined, prints no NaN and derives no
    failure pattern from it, both from the measures and from the logged scalars (no num_classes)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    v, z = torch.randn(40, 2, generator=g) * 3, torch.randn(40, 2, generator=g)
    m = knowledge_measures(v, y, student_logits=z, alpha=0.5, temperature=2.0)
    assert math.isnan(m["health"]["tail_flatness"])
    for measures in (
        m,
        nested_measures(scalar_measures(m)) | {"settings": {"alpha": 0.5, "temperature": 2.0}},
    ):
        diagnosis = diagnose(measures)
        level2 = diagnosis["levels"][1]
        assert level2.startswith("Level 2 (domain): undefined") and "no class relations" in level2
        assert "offer" not in level2 and "transferred" not in level2
        sentences = diagnosis["levels"] + diagnosis["failures"]
        assert not any("nan" in sentence.lower() for sentence in sentences if sentence is not level2)
        assert not any("Label-smoothed" in s or "the tail is not flat" in s for s in diagnosis["failures"])
    assert "K = 2 classes" in diagnose(m)["levels"][1]


def test_undefined_class_similarity_agreement_is_not_called_a_transfer():
    """A student whose soft confusion is constant (zero logits: every entry 1/K) gives a NaN Spearman:
    the teacher's offer is still judged from its tail, the transfer is called undefined."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 4
    v = torch.randn(60, 4, generator=g) * 3
    m = knowledge_measures(v, y, student_logits=torch.zeros(60, 4), alpha=0.5, temperature=2.0)
    assert math.isnan(m["level2"]["agreement_confusion"]["spearman"])
    level2 = diagnose(m)["levels"][1]
    assert "offers it" in level2 and "undefined" in level2 and "not transferred" not in level2


def test_model_card_summary_repeats_the_reports_diagnosis():
    """The card's knowledge section is built from the flat logged measures (eval_knowledge/...): the
    same sentences as diagnose() on the nested measures, then the table."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    v, z = torch.randn(40, 4, generator=g) * 3, torch.randn(40, 4, generator=g)
    m = knowledge_measures(v, y, student_logits=z, alpha=0.5, temperature=2.0)
    assert scalar_measures(nested_measures(scalar_measures(m))) == scalar_measures(m)  # a round trip
    summary = knowledge_summary(scalar_measures(m), alpha=0.5, temperature=2.0)
    diagnosis = diagnose(m)
    for sentence in diagnosis["levels"] + diagnosis["failures"]:
        assert f"- {sentence}" in summary
    assert "| `level1/teacher_entropy` |" in summary


def test_write_report_offline(teachers, hierarchy, tmp_path):
    data, _, _, _, yt, d = hierarchy
    teacher, student, v, z = teachers["smoothed"]
    content = write_report(
        tmp_path / "report",
        Predictions(z, v, yt),
        alpha=0.9,
        temperature=2.0,
        groups=class_groups(data),
        difficulty=d,
        teacher_weight=teacher.classifier.weight.detach(),
        student_weight=student.classifier.weight.detach(),
    )
    assert matplotlib.get_backend().lower() == "agg"
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == ["histograms.png", "report.json", "report.md", "rescaling.png", "similarity.png"]
    for png in ("histograms.png", "rescaling.png", "similarity.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["measures"]["health"]["tail_flatness"] == pytest.approx(
        content["measures"]["health"]["tail_flatness"]
    )
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Label-smoothed teacher pattern" in text and "![similarity.png](similarity.png)" in text
    assert "| health/tail_flatness |" in text


# ---- end to end: pipeline (kd_sim, callback) and scripts/analyze.py ---------------------------------


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    data = write_hierarchy_dataset(root / "data", n_per_class=40)
    argv = [
        "--config",
        str(ROOT / "recipes/paper/teacher.yaml"),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(root / "teacher"),
    ]
    run_distillation(*parse_args(argv + ["--num_train_epochs", "10", "--disable_tqdm", "true"]))
    return root, data


def test_pipeline_kd_sim_and_knowledge_callback(saved_teacher):
    root, data = saved_teacher
    argv = [
        "--config", str(ROOT / "recipes/paper/student_kd.yaml"), "--dataset_name", str(data), "--teacher_model_name_or_path",
        str(root / "teacher"), "--output_dir", str(root / "student"), "--synthetic_teacher", "kd_sim", "--num_train_epochs", "2",
        "--num_labeled_examples", "200", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = run_distillation(*parse_args(argv))
    trainer = result.trainer
    assert isinstance(trainer.target_fn, SyntheticTargetFn) and trainer.target_fn.kind == "kd_sim"
    teacher_weight = trainer.teacher_signal.model.classifier.weight
    torch.testing.assert_close(trainer.target_fn.class_similarity, class_similarity(teacher_weight))
    logged = [entry for entry in trainer.state.log_history if "eval_knowledge/health/tail_flatness" in entry]
    assert len(logged) == 1
    prepared = trainer.eval_dataset
    predictions = collect_predictions(
        prepared, trainer.task, student=trainer.model, teacher_signal=trainer.teacher_signal
    )
    expected = scalar_measures(
        knowledge_measures(
            predictions.teacher_logits, predictions.labels, student_logits=predictions.student_logits, alpha=0.5, temperature=2.0,
            teacher_weight=teacher_weight, student_weight=trainer.model.classifier.weight,
        )
    )  # fmt: skip
    assert logged[0]["eval_knowledge/health/tail_flatness"] == pytest.approx(expected["health/tail_flatness"])
    assert logged[0]["eval_knowledge/level2/agreement_weights/spearman"] == pytest.approx(
        expected["level2/agreement_weights/spearman"]
    )


def test_analyze_script_writes_report(saved_teacher, capsys):
    root, data = saved_teacher
    argv = ["--config", str(ROOT / "recipes/paper/student_kd.yaml"), "--dataset_name", str(data)]
    argv += ["--teacher", str(root / "teacher"), "--student", "none", "--output_dir", str(root / "unused")]
    report_dir = analyze.main(argv)
    assert report_dir == root / "unused" / "report"
    saved = json.loads((report_dir / "report.json").read_text())
    assert (
        saved["measures"]["level2"]["teacher_hierarchy_confusion"] > 1.0
    )  # groups read from the g{i}_c{j} names
    assert saved["measures"]["level3"]["spearman_teacher_prob_difficulty"] is not None
    assert f"knowledge report: {report_dir / 'report.md'}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no such directory"):
        analyze.main(argv[:4] + ["--teacher", str(root / "missing")])


def test_analyze_refuses_token_level_task_before_loading(saved_teacher):
    root, _ = saved_teacher
    argv = ["--config", str(ROOT / "recipes/causal_lm/tiny/student.yaml"), "--output_dir", str(root / "lm")]
    with pytest.raises(ValueError, match="task='causal-lm'.*classification tasks"):
        analyze.main(argv + ["--teacher", str(root / "teacher"), "--student", "none"])


def test_analyze_names_a_missing_label_column(saved_teacher):
    root, data = saved_teacher
    argv = ["--config", str(ROOT / "recipes/paper/student_kd.yaml"), "--dataset_name", str(data)]
    argv += ["--teacher", str(root / "teacher"), "--student", "none", "--output_dir", str(root / "unused")]
    with pytest.raises(ValueError, match=r"split 'train' .* has no column 'grade' \(label_column\).*'label'"):
        analyze.main(argv + ["--label_column", "grade"])


def test_analyze_loads_the_recipes_teacher_at_its_revision(saved_teacher, monkeypatch):
    """Weights and processor of the recipe's teacher at teacher_model_revision; a --teacher that is not
    the recipe's at main (the recipe's revision names a commit of another model)."""
    import hf_kd.modeling as modeling
    from hf_kd.tasks.features import FeatureClassificationTask

    root, data = saved_teacher
    seen = []
    real_load, real_processor = modeling.load_pretrained, FeatureClassificationTask.load_processor

    def load_pretrained(model_class, name_or_path, *, revision="main", **kwargs):
        seen.append(("weights", revision))
        return real_load(model_class, name_or_path, **kwargs)  # a local folder has no revisions

    def load_processor(self, name_or_path, *, revision="main", trust_remote_code=False):
        seen.append(("processor", revision))
        return real_processor(self, name_or_path)

    monkeypatch.setattr(modeling, "load_pretrained", load_pretrained)  # what load_teacher calls
    monkeypatch.setattr(FeatureClassificationTask, "load_processor", load_processor)
    argv = ["--config", str(ROOT / "recipes/paper/student_kd.yaml"), "--dataset_name", str(data)]
    argv += ["--student", "none", "--output_dir", str(root / "revision"), "--max_samples", "32"]
    teacher = ["--teacher_model_name_or_path", str(root / "teacher"), "--teacher_model_revision", "v1.0"]
    analyze.main(argv + teacher)
    assert seen == [("weights", "v1.0"), ("processor", "v1.0")]
    seen.clear()
    analyze.main(argv + teacher + ["--teacher", str(root / "teacher") + "/"])
    assert seen == [("weights", "main"), ("processor", "main")]


def test_pipeline_kd_sim_with_cached_teacher_uses_soft_confusion(saved_teacher):
    """A cached teacher has no logit layer to read: kd_sim's similarity is the soft confusion of the
    cached logits on the training rows, equal to that of the teacher model run on the same rows."""
    from hf_kd.config import DataArguments
    from hf_kd.runs.capture import CacheArguments, run_capture

    root, data = saved_teacher
    capture = [
        "--task",
        "feature-classification",
        "--dataset_name",
        str(data),
        "--teacher_model_name_or_path",
        str(root / "teacher"),
    ]
    run_capture(
        *parse_args(
            capture + ["--output_dir", str(root / "cache"), "--use_cpu", "true"],
            classes=(DataArguments, CacheArguments),
        )
    )
    argv = [
        "--config", str(ROOT / "recipes/paper/student_kd.yaml"), "--dataset_name", str(data), "--teacher_source", "cached",
        "--teacher_cache", str(root / "cache"), "--teacher_model_name_or_path", str(root / "teacher"),
        "--output_dir", str(root / "student_cached"), "--synthetic_teacher", "kd_sim",
        "--num_train_epochs", "1", "--num_labeled_examples", "200", "--disable_tqdm", "true",
    ]  # fmt: skip
    trainer = run_distillation(*parse_args(argv)).trainer
    teacher = MLPForFeatureClassification.from_pretrained(str(root / "teacher")).eval()
    rows = trainer.train_dataset.with_format("torch")[:]
    with torch.no_grad():
        probs = torch.softmax(teacher(features=rows["features"]).logits, -1)
    expected = soft_confusion(probs, rows["labels"], K)
    torch.testing.assert_close(trainer.target_fn.class_similarity, expected, atol=1e-5, rtol=1e-4)
    assert any(
        "eval_knowledge/level2/agreement_confusion/spearman" in entry for entry in trainer.state.log_history
    )


def test_write_report_of_a_near_uniform_teacher(tmp_path):
    """A teacher whose logits barely differ (an untrained or collapsed model): its normalised entropies
    all lie within float precision of 1, which 30 automatic histogram bins cannot split; the report is
    still written, its entropy measure at 1."""
    g = torch.Generator().manual_seed(0)
    v, z = torch.randn(50, 10, generator=g) * 1e-4, torch.randn(50, 10, generator=g)
    content = write_report(
        tmp_path / "report", Predictions(z, v, torch.arange(50) % 10), alpha=0.5, temperature=2.0
    )
    assert (tmp_path / "report" / "histograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert content["measures"]["level1"]["teacher_entropy"] == pytest.approx(1.0, abs=1e-6)
