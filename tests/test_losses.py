"""hf_kd.losses against formulas written out by hand (docs/knowledge.md#the-distillation-loss)."""

import math

import pytest
import torch
import torch.nn.functional as F
from formulas import divergence_by_hand, kd_logit_gradient, kd_loss

from hf_kd.losses import DIVERGENCES, SparseLogits, distillation_loss, divergence


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2


def _probs(x, tau):
    return torch.softmax(x / tau, -1)


def test_divergences_match_hand_formulas(logits):
    z, v = logits
    tau, beta, s = 2.0, 0.4, 0.3
    for name in DIVERGENCES:
        want = divergence_by_hand(name, z, v, tau, beta=beta, skew=s)
        got = divergence(name, z, v, temperature=tau, beta=beta, skew=s)
        assert got.shape == (6,) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_unknown_divergence_names_the_value(logits):
    with pytest.raises(ValueError, match="'kl_div'"):
        divergence("kl_div", *logits)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_gradient_is_the_papers_expression(logits, tau):
    """∂L/∂z_i = (1 − α)(q_i − y_i) + α τ (q^τ_i − p^τ_i), for one item (N = 1 normalisers)."""
    z, v = logits
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    alpha = 0.7
    z = z.clone().requires_grad_(True)
    terms = distillation_loss(z, v, labels, alpha=alpha, temperature=tau, num_hard=1, num_soft=1)
    terms.loss.backward()
    want = kd_logit_gradient(z.detach(), v, labels, alpha=alpha, tau=tau)
    torch.testing.assert_close(z.grad, want, rtol=1e-5, atol=1e-6)


def test_loss_value_and_parts(logits):
    z, v = logits
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    terms = distillation_loss(z, v, labels, alpha=0.25, temperature=2.0)
    torch.testing.assert_close(terms.loss, kd_loss(z, _probs(v, 2.0), labels, alpha=0.25, tau=2.0))
    torch.testing.assert_close(terms.hard_sum, F.cross_entropy(z, labels, reduction="sum"))
    torch.testing.assert_close(terms.soft_sum, divergence_by_hand("forward_kl", z, v, 2.0).sum())


def test_unlabelled_rows_take_only_the_soft_term(logits):
    z, v = logits
    labels = torch.tensor([0, 1, -100, -100, 4, 0])
    soft_mask = torch.ones(6, dtype=torch.bool)
    alpha, tau = 0.5, 2.0
    terms = distillation_loss(z, v, labels, alpha=alpha, temperature=tau, soft_mask=soft_mask)
    expected = kd_loss(z, _probs(v, tau), labels, alpha=alpha, tau=tau, soft_rows=soft_mask)
    torch.testing.assert_close(terms.loss, expected)
    kl = divergence_by_hand("forward_kl", z, v, tau)
    # An unlabelled row alone contributes exactly α·τ²·D and no CE.
    only = distillation_loss(
        z[2:3], v[2:3], labels[2:3], alpha=alpha, temperature=tau, soft_mask=soft_mask[2:3]
    )
    torch.testing.assert_close(only.loss, alpha * tau**2 * kl[2])
    assert only.hard_sum.item() == 0.0


@pytest.mark.parametrize("name", [d for d in DIVERGENCES])
def test_chunked_equals_dense(name):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(37, 11, generator=g) * 3
    v = torch.randn(37, 11, generator=g) * 3
    labels = torch.randint(0, 11, (37,), generator=g)
    labels[::5] = -100
    grads = []
    for chunk in (None, 8):
        zz = z.clone().requires_grad_(True)
        terms = distillation_loss(
            zz, v, labels, alpha=0.4, temperature=1.5, divergence_name=name, chunk_size=chunk, beta=0.3
        )
        terms.loss.backward()
        grads.append((terms.loss.detach(), terms.hard_sum, terms.soft_sum, zz.grad))
    for dense, chunked in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)


def test_sparse_topk_with_k_equal_K_is_dense(logits):
    z, v = logits
    sparse = SparseLogits.from_logits(v, k=5)
    assert torch.all(sparse.tail_log_mass == -math.inf)
    for tail in ("uniform", "renormalize"):
        torch.testing.assert_close(
            divergence("forward_kl", z, sparse, temperature=2.0, tail=tail),
            divergence("forward_kl", z, v, temperature=2.0),
        )


def test_sparse_tail_handling_by_hand():
    v = torch.tensor([[3.0, 1.0, 0.0, -1.0, -2.0]])
    p = torch.softmax(v, -1)[0]
    sparse = SparseLogits.from_logits(v, k=2)
    torch.testing.assert_close(sparse.tail_log_mass.exp(), (1 - p[:2].sum()).reshape(1))
    uniform = sparse.to_dense_log_probs("uniform").exp()[0]
    tail_each = (1 - p[0] - p[1]) / 3
    torch.testing.assert_close(uniform, torch.stack([p[0], p[1], tail_each, tail_each, tail_each]))
    renorm = sparse.to_dense_log_probs("renormalize").exp()[0]
    torch.testing.assert_close(renorm, torch.stack([p[0], p[1], *([torch.tensor(0.0)] * 3)]) / (p[0] + p[1]))
