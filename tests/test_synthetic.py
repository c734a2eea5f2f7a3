"""Synthetic teachers against the formulas of docs/knowledge.md#synthetic-teachers."""

import math

import pytest
import torch
import torch.nn.functional as F
from formulas import kd_loss

from hf_kd.knowledge import class_similarity
from hf_kd.teachers.synthetic import (
    SYNTHETIC_KINDS,
    class_similarity_from_predictions,
    synthetic_target,
    topk_count,
    wrong_class_distribution,
)

N, K = 12, 8


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(N, K, generator=g)
    labels = torch.randint(0, K, (N,), generator=g)
    sim = class_similarity(torch.randn(K, 5, generator=g))
    return logits, labels, sim


@pytest.mark.parametrize("kind", [k for k in SYNTHETIC_KINDS if k != "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_rows_sum_to_one_float32(batch, kind, temperature):
    logits, labels, sim = batch
    rho = synthetic_target(kind, logits, labels, temperature=temperature, k=3, class_similarity=sim)
    assert rho.dtype == torch.float32 and rho.shape == (N, K)
    assert (rho >= 0).all()
    torch.testing.assert_close(rho.sum(-1), torch.ones(N))


def test_ls_loss_is_torch_label_smoothing(batch):
    logits, labels, _ = batch
    z = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    alpha = 0.3
    rho = synthetic_target("ls", logits, labels)
    mixed = kd_loss(z, rho, labels, alpha=alpha, tau=1.0)  # its soft term is KL(u ‖ q) = H(u, q) − log K
    torch.testing.assert_close(mixed + alpha * math.log(K), F.cross_entropy(z, labels, label_smoothing=alpha))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_is_tempered_softmax(batch, temperature):
    logits, labels, _ = batch
    rho = synthetic_target("kd", logits, labels, temperature=temperature)
    torch.testing.assert_close(rho, torch.softmax(logits / temperature, -1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_pt_keeps_true_class_and_uniform_tail(batch, temperature):
    logits, labels, _ = batch
    rho = synthetic_target("kd_pt", logits, labels, temperature=temperature)
    p = torch.softmax(logits / temperature, -1)
    rows = torch.arange(N)
    torch.testing.assert_close(rho[rows, labels], p[rows, labels])
    tail = rho.clone()
    tail[rows, labels] = math.nan
    expected = ((1 - p[rows, labels]) / (K - 1)).unsqueeze(-1).repeat(1, K)
    expected[rows, labels] = math.nan
    torch.testing.assert_close(tail, expected, equal_nan=True)


def test_ignored_label_uses_teacher_argmax(batch):
    logits, labels, sim = batch
    ignored = labels.clone()
    ignored[::2] = -100
    resolved = torch.where(ignored >= 0, ignored, logits.argmax(-1))
    for kind in ("kd_pt", "kd_sim"):
        got = synthetic_target(kind, logits, ignored, class_similarity=sim)
        torch.testing.assert_close(got, synthetic_target(kind, logits, resolved, class_similarity=sim))


def test_kd_sim_is_softmax_of_similarity_row_constant_within_class(batch):
    logits, _, sim = batch
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2, 0, 1, 4])
    beta = 0.2
    rho = synthetic_target("kd_sim", logits, labels, class_similarity=sim, sim_temperature=beta)
    torch.testing.assert_close(rho, torch.softmax(sim[labels] / beta, -1))
    for c in labels.unique():
        rows = rho[labels == c]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))
    assert (rho.argmax(-1) == labels).all()  # cosine self-similarity 1 is the row maximum


def test_kd_topk_with_k_equal_K_is_kd(batch):
    logits, labels, _ = batch
    kd = synthetic_target("kd", logits, labels, temperature=2.0)
    for k in (K, float(K)):  # a fraction must be < 1: 1.0 is one class
        torch.testing.assert_close(synthetic_target("kd_topk", logits, labels, temperature=2.0, k=k), kd)


def test_kd_topk_keeps_top_and_spreads_rest(batch):
    logits, labels, _ = batch
    p = torch.softmax(logits, -1)
    rho = synthetic_target("kd_topk", logits, labels, k=0.25)  # 0.25 · 8 = 2 classes
    top = p.topk(2, -1)
    torch.testing.assert_close(rho.gather(-1, top.indices), top.values)
    rest = rho.scatter(-1, top.indices, math.nan)
    expected = ((1 - top.values.sum(-1)) / (K - 2)).unsqueeze(-1).expand(N, K)
    torch.testing.assert_close(rest, expected.scatter(-1, top.indices, math.nan), equal_nan=True)


def test_topk_count():
    assert topk_count(3, 10) == 3 and topk_count(0.25, 100) == 25 and topk_count(0.01, 10) == 1
    assert topk_count(1.0, 10) == 1 and topk_count(4.0, 10) == 4  # whole floats are counts (config fields)
    for bad in (0, 11, 0.0, 1.5, 11.0, True):
        with pytest.raises(ValueError):
            topk_count(bad, 10)


def test_bad_kinds(batch):
    logits, labels, _ = batch
    for kind, kwargs in (("none", {}), ("bogus", {}), ("kd_sim", {}), ("kd_topk", {})):
        with pytest.raises(ValueError):
            synthetic_target(kind, logits, labels, **kwargs)


def test_wrong_class_distribution(batch):
    logits, labels, _ = batch
    p = torch.softmax(logits, -1)
    rows = torch.arange(N)
    expected = p / (1 - p[rows, labels]).unsqueeze(-1)
    expected[rows, labels] = 0
    torch.testing.assert_close(wrong_class_distribution(logits, labels), expected)


def test_class_similarity_from_predictions_hand_case():
    probs = torch.tensor(
        [
            [0.5, 0.4, 0.1],  # class 0: p̄ = [0, .8, .2]
            [0.6, 0.1, 0.3],  # class 0: p̄ = [0, .25, .75]
            [0.2, 0.6, 0.2],  # class 1: p̄ = [.5, 0, .5]
            [0.9, 0.05, 0.05],  # ignored
        ]
    )
    C = class_similarity_from_predictions(probs, torch.tensor([0, 0, 1, -100]), 3)
    expected = torch.tensor([[1.0, 0.525, 0.475], [0.5, 1.0, 0.5], [0.0, 0.0, 1.0]])  # class 2 unseen
    torch.testing.assert_close(C, expected)
    with pytest.raises(ValueError):
        class_similarity_from_predictions(probs, torch.tensor([0, 0, 1, 2]), 4)
    rho = synthetic_target("kd_sim", probs.log(), torch.tensor([0, 1, 2, 2]), class_similarity=C)
    assert (rho.argmax(-1) == torch.tensor([0, 1, 2, 2])).all()
