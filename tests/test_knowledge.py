"""Knowledge measures against the formulas of docs/knowledge.md (the three levels and teacher health)."""

import math

import pytest
import torch
import torch.nn.functional as F
from formulas import kd_loss

from hf_kd.data.hierarchy import class_centres
from hf_kd.knowledge import (
    class_similarity,
    effective_smoothing,
    expected_calibration_error,
    hierarchy_score,
    kl_to_uniform,
    most_frequent_classes,
    pearson,
    rank,
    rescaling_summary,
    rescaling_weight,
    saturation_share,
    similarity_agreement,
    spearman,
    tail_flatness,
    teacher_entropy,
    wrong_mass,
)

N, K = 16, 6


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(N, K, generator=g),
        2 * torch.randn(N, K, generator=g),
        torch.randint(0, K, (N,), generator=g),
    )


# ---- level 1 --------------------------------------------------------------------------------


def test_entropy_kl_and_effective_smoothing(batch):
    _, teacher, labels = batch
    p = torch.softmax(teacher / 2, -1)
    H = -(p * p.log()).sum(-1)
    torch.testing.assert_close(teacher_entropy(teacher, temperature=2.0), H / math.log(K))
    torch.testing.assert_close(kl_to_uniform(teacher, temperature=2.0), (p * (K * p).log()).sum(-1))
    torch.testing.assert_close(teacher_entropy(torch.zeros(3, K)), torch.ones(3))
    assert (teacher_entropy(teacher, temperature=4.0) > teacher_entropy(teacher)).all()  # τ ↑ → toward LS
    p_t = p[torch.arange(N), labels]
    torch.testing.assert_close(
        effective_smoothing(teacher, labels, alpha=0.7, temperature=2.0), 0.7 * (1 - p_t)
    )


def test_wrong_mass_stable_and_ignored():
    logits = torch.tensor([[40.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    m = wrong_mass(logits, torch.tensor([0, -100]))
    torch.testing.assert_close(m[0], torch.tensor(2 * math.exp(-40.0)))  # 1 − p_t would round to 0
    assert math.isnan(m[1])


# ---- level 3 --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_rescaling_weight_is_autograd_gradient_ratio(batch, temperature):
    student, teacher, labels = batch
    alpha, tau = 0.6, temperature
    z = student.clone().requires_grad_(True)
    loss = kd_loss(z, torch.softmax(teacher / tau, -1), labels, alpha=alpha, tau=tau)
    (g_kd,) = torch.autograd.grad(loss, z)
    z_ce = student.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z_ce, labels), z_ce)
    rows = torch.arange(N)
    ratio = g_kd[rows, labels] / g_ce[rows, labels]
    w = rescaling_weight(student, teacher, labels, alpha=alpha, temperature=tau)
    torch.testing.assert_close(w, ratio)
    q, q_tau, p_tau = (torch.softmax(x, -1)[rows, labels] for x in (student, student / tau, teacher / tau))
    torch.testing.assert_close(w, (1 - alpha) + alpha * tau * (p_tau - q_tau) / (1 - q))
    if tau != 1.0:  # the form without the τ factor is not the gradient ratio
        assert not torch.allclose(w, (1 - alpha) + alpha * (p_tau - q_tau) / (1 - q))
    else:
        p = torch.softmax(teacher, -1)[rows, labels]
        torch.testing.assert_close(w, 1 - alpha * (1 - p) / (1 - q))


def test_rescaling_weight_ignored_rows_and_summary(batch):
    student, teacher, labels = batch
    labels = labels.clone()
    labels[0] = -100
    w = rescaling_weight(student, teacher, labels, alpha=0.9)
    assert math.isnan(w[0]) and torch.isfinite(w[1:]).all()
    p_t = 1 - wrong_mass(teacher, labels)
    s = rescaling_summary(w, p_t, difficulty=-p_t, bins=5)
    valid = w[1:]
    assert s["count"] == N - 1 and sum(s["histogram"]) == N - 1 and len(s["bin_edges"]) == 6
    assert s["share_below_zero"] == pytest.approx((valid < 0).float().mean().item())
    assert s["mean"] == pytest.approx(valid.mean().item(), rel=1e-5)
    assert s["spearman_difficulty"] == pytest.approx(-s["spearman_teacher_prob"])
    assert rescaling_summary(w, p_t)["spearman_difficulty"] is None


def test_rescaling_weight_grows_with_teacher_confidence():
    student = torch.zeros(5, 4)
    teacher = torch.zeros(5, 4)
    teacher[:, 0] = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    w = rescaling_weight(student, teacher, torch.zeros(5, dtype=torch.long), alpha=0.9)
    assert (w.diff() > 0).all() and w[0] < 0  # hard (for the teacher) examples are down-weighted
    p_t = 1 - wrong_mass(teacher, torch.zeros(5, dtype=torch.long))
    assert rescaling_summary(w, p_t)["spearman_teacher_prob"] == pytest.approx(1.0)


# ---- correlations ---------------------------------------------------------------------------


def test_spearman_with_ties_hand_computed():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0])
    y = torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert rank(x).tolist() == [1.0, 2.5, 2.5, 4.0]
    # ranks x: [1, 2.5, 2.5, 4], y: [1, 3, 2, 4] → 4.5 / √(4.5 · 5)
    assert spearman(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert spearman(x, x.exp()) == pytest.approx(1.0)


def test_pearson_matches_corrcoef():
    a, b = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    assert pearson(a, b) == pytest.approx(torch.corrcoef(torch.stack([a, b]))[0, 1].item(), rel=1e-5)
    assert pearson(a, 3 * a + 1) == pytest.approx(1.0)


# ---- level 2 --------------------------------------------------------------------------------


def test_class_similarity_is_cosine():
    W = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    S = class_similarity(W)
    torch.testing.assert_close(S, F.cosine_similarity(W.unsqueeze(1), W.unsqueeze(0), dim=-1))
    torch.testing.assert_close(class_similarity(W, torch.tensor([1, 3])), S[[1, 3]][:, [1, 3]])


def test_similarity_agreement():
    S = class_similarity(torch.randn(6, 4, generator=torch.Generator().manual_seed(5)))
    self_agreement = similarity_agreement(S, S)
    assert self_agreement.pearson == pytest.approx(1.0) and self_agreement.spearman == pytest.approx(1.0)
    flipped = similarity_agreement(S, -S)
    assert flipped.pearson == pytest.approx(-1.0) and flipped.spearman == pytest.approx(-1.0)
    noisy = S + 0.01 * torch.randn(6, 6, generator=torch.Generator().manual_seed(6))
    assert similarity_agreement(S, noisy.fill_diagonal_(-5.0)).pearson > 0.95  # diagonal is ignored
    classes = most_frequent_classes(torch.tensor([0, 2, 2, 5, 5, 5, 1, 1, 1, 1, -100]), 6, 3)
    assert classes.tolist() == [1, 2, 5]
    restricted = similarity_agreement(S, noisy, classes)
    pairs = [(1, 2), (1, 5), (2, 1), (2, 5), (5, 1), (5, 2)]
    a, b = (torch.stack([m[i, j] for i, j in pairs]) for m in (S, noisy))
    assert restricted.num_classes == 3
    assert restricted.pearson == pytest.approx(pearson(a, b)) and restricted.spearman == pytest.approx(
        spearman(a, b)
    )


def test_hierarchy_score():
    S = torch.tensor(
        [[1.0, 0.6, -0.2, -0.4], [0.6, 1.0, 0.0, -0.2], [-0.2, 0.0, 1.0, 0.2], [-0.4, -0.2, 0.2, 1.0]]
    )
    within = ((1 + 0.6) / 2 + (1 + 0.2) / 2) / 2
    between = sum((1 + s) / 2 for s in (-0.2, -0.4, 0.0, -0.2)) / 4
    assert hierarchy_score(S, [0, 0, 1, 1]) == pytest.approx(within / between)
    assert hierarchy_score(torch.full((4, 4), -0.3), [0, 0, 1, 1]) == pytest.approx(1.0)


def test_hierarchy_score_on_ground_truth_centres():
    groups = [c // 4 for c in range(16)]
    S = class_similarity(torch.tensor(class_centres(4, 4, 32, seed=0)))
    assert hierarchy_score(S, groups) > 1.5
    shuffled = [groups[i] for i in torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    assert hierarchy_score(S, shuffled) < hierarchy_score(S, groups)


# ---- teacher health -------------------------------------------------------------------------


def test_expected_calibration_error_hand_case():
    probs = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # conf .9, correct
            [0.1, 0.7, 0.1, 0.1],  # conf .7, wrong
            [0.4, 0.3, 0.2, 0.1],  # conf .4, correct
            [0.25, 0.25, 0.2, 0.3],  # conf .3, wrong
            [0.1, 0.1, 0.1, 0.7],  # ignored
        ]
    )
    labels = torch.tensor([0, 0, 0, 0, -100])
    # bin (0, .5]: acc .5, conf .35 → 2/4 · .15;  bin (.5, 1]: acc .5, conf .8 → 2/4 · .3
    assert expected_calibration_error(probs.log(), labels, num_bins=2) == pytest.approx(0.225, abs=1e-6)
    assert expected_calibration_error(probs.log(), labels, num_bins=1) == pytest.approx(abs(0.5 - 0.575))


def test_saturation_share_and_tail_flatness():
    logits = torch.tensor(
        [[10.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [10.0, 5.0, 0.0, -5.0], [0.0, 0.0, 0.0, 9.0]]
    )
    labels = torch.tensor([0, 0, 0, -100])
    assert saturation_share(logits, labels) == pytest.approx(2 / 3)  # rows 0, 2 have p_t > .99
    flat = tail_flatness(logits, labels)
    torch.testing.assert_close(flat[:2], torch.ones(2))  # flat tails
    p_bar = torch.softmax(torch.tensor([5.0, 0.0, -5.0]), -1)
    torch.testing.assert_close(flat[2], -(p_bar * p_bar.log()).sum() / math.log(3))
    assert math.isnan(flat[3])


def test_logit_layer_weight_or_none():
    """The classifier's rows as float32 on the CPU, or None for a model with no layer of num_labels outputs."""
    from types import SimpleNamespace

    from hf_kd.modeling import logit_layer_weight_or_none

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3).to(torch.bfloat16))
    model.config = SimpleNamespace(num_labels=3)
    weight = logit_layer_weight_or_none(model)
    assert weight.dtype == torch.float32 and weight.device.type == "cpu"
    torch.testing.assert_close(weight, model[1].weight.detach().float())
    model.config.num_labels = 5
    assert logit_layer_weight_or_none(model) is None


def test_teacher_agreement_counts_top1_matches_and_the_kl_on_labelled_items():
    from hf_kd.knowledge.measures import teacher_agreement

    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [0.0, 9.0, 0.0]])
    labels = torch.tensor([0, 2, 1, -100])  # the last item has no label: left out
    out = teacher_agreement(student, teacher, labels)
    assert out["top1_agreement"] == pytest.approx(2 / 3)
    assert out["teacher_accuracy"] == pytest.approx(2 / 3)
    p, q = torch.softmax(teacher[:3], -1), torch.softmax(student[:3], -1)
    assert out["kl"] == pytest.approx((p * (p / q).log()).sum(-1).mean().item(), rel=1e-6)
    assert teacher_agreement(teacher, teacher, labels)["kl"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="every label is < 0"):
        teacher_agreement(student, teacher, torch.full((4,), -100))
