"""hf_kd.losses at language-model shapes: every divergence against a dense formula written out by hand
(values and gradients), chunked == dense, masking, and top-k teachers with zero probabilities."""

import math

import pytest
import torch
from formulas import divergence_by_hand, kd_loss, kl

from hf_kd.losses import DIVERGENCES, HiddenStates, SparseLogits, distillation_loss, divergence

N, V, TAU, BETA, SKEW = 13, 50, 1.7, 0.3, 0.2
SOFT = [d for d in DIVERGENCES if d != "mse"]


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(N, V, generator=g) * 3
    v = torch.randn(N, V, generator=g) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 4, 5, 11]] = -100  # prompt / padding tokens
    return z, v, labels


def by_hand(name, z, v, tau=TAU):
    """The divergences in probability space, straight from their definitions (tests/formulas.py)."""
    return divergence_by_hand(name, z, v, tau, beta=BETA, skew=SKEW)


def value_and_grad(fn, z):
    z = z.clone().requires_grad_(True)
    weights = torch.linspace(0.5, 1.5, z.shape[0])  # a non-uniform upstream gradient
    value = fn(z)
    (value * weights).sum().backward()
    return value.detach(), z.grad


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_values_and_gradients_match_the_definitions(tensors, name):
    z, v, _ = tensors
    got, got_grad = value_and_grad(lambda x: divergence(name, x, v, temperature=TAU, beta=BETA, skew=SKEW), z)
    want, want_grad = value_and_grad(lambda x: by_hand(name, x, v), z)
    assert got.shape == (N,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_kl_gradients_are_the_closed_forms(tensors):
    """∂KL(p‖q)/∂z = (q − p)/τ;  ∂KL(q‖p)/∂z_j = q_j (log q_j − log p_j − KL(q‖p))/τ."""
    z, v, _ = tensors
    p, q = torch.softmax(v / TAU, -1), torch.softmax(z / TAU, -1)

    def grad_of(name):
        x = z.clone().requires_grad_(True)
        return torch.autograd.grad(divergence(name, x, v, temperature=TAU).sum(), x)[0]

    torch.testing.assert_close(grad_of("forward_kl"), (q - p) / TAU, rtol=1e-4, atol=1e-7)
    expected = q * (q.log() - p.log() - kl(q, p).unsqueeze(-1)) / TAU
    torch.testing.assert_close(grad_of("reverse_kl"), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_the_kls_with_gradients(tensors, beta):
    """β = 0 is KL(p ‖ q) and β = 1 is KL(q ‖ p) by definition (TRL's convention), in value and
    gradient, although the mixture formula itself is 0 at both ends."""
    z, v, _ = tensors
    p = torch.softmax(v / TAU, -1)

    def closed_form(x):
        q = torch.softmax(x / TAU, -1)
        return kl(p, q) if beta == 0.0 else kl(q, p)

    got = value_and_grad(lambda x: divergence("jsd", x, v, temperature=TAU, beta=beta), z)
    want = value_and_grad(closed_form, z)
    assert want[0].min() > 0.1  # far from the mixture formula's 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sparse_teacher_matches_its_dense_rebuild_by_hand(tensors):
    """Top-k teacher with the uniform tail: p_i for the k kept ids, tail/(K − k) for the others."""
    z, v, _ = tensors
    k = 6
    sparse = SparseLogits.from_logits(v, k)
    p1 = torch.softmax(v, -1)
    top, idx = p1.topk(k, -1)
    rebuilt = ((1 - top.sum(-1, keepdim=True)) / (V - k)).expand(N, V).clone().scatter(-1, idx, top)
    for name in SOFT:
        got = value_and_grad(
            lambda x, name=name: divergence(name, x, sparse, temperature=TAU, beta=BETA, skew=SKEW), z
        )
        want = value_and_grad(lambda x, name=name: by_hand(name, x, rebuilt.log(), tau=TAU), z)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_zero_teacher_probabilities_give_finite_losses_and_gradients(tensors):
    """A renormalised top-k teacher is exactly 0 outside its k ids: forward KL drops those terms
    (0 · log 0 = 0), and nothing is NaN for any divergence."""
    z, v, _ = tensors
    sparse = SparseLogits.from_logits(v, 4)
    p = sparse.to_dense_log_probs("renormalize").exp()
    q = torch.softmax(z, -1)
    value, _ = value_and_grad(lambda x: divergence("forward_kl", x, sparse, tail="renormalize"), z)
    kept = p > 0
    torch.testing.assert_close(value, torch.where(kept, p * (p.log() - q.log()), 0.0).sum(-1))
    for name in SOFT:
        value, grad = value_and_grad(
            lambda x, name=name: divergence(name, x, sparse, tail="renormalize", beta=BETA, skew=SKEW), z
        )
        assert torch.isfinite(value).all() and torch.isfinite(grad).all(), name


def loss_of(student, teacher, labels, name, chunk_size):
    return distillation_loss(
        student,
        teacher,
        labels,
        alpha=0.6,
        temperature=TAU,
        divergence_name=name,
        chunk_size=chunk_size,
        beta=BETA,
        skew=SKEW,
    )


@pytest.mark.parametrize(("name", "sparse"), [(d, False) for d in DIVERGENCES] + [(d, True) for d in SOFT])
def test_chunked_equals_dense(tensors, name, sparse):
    z, v, labels = tensors
    teacher = SparseLogits.from_logits(v, 7) if sparse else v
    results = []
    for chunk_size in (None, 1, 4, N + 5):
        x = z.clone().requires_grad_(True)
        terms = loss_of(x, teacher, labels, name, chunk_size)
        terms.loss.backward()
        results.append((terms.loss.detach(), terms.hard_sum, terms.soft_sum, x.grad))
    for chunked in results[1:]:
        for got, want in zip(chunked, results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_masked_positions_contribute_nothing(tensors, chunk_size):
    """Changing the logits (student and teacher) at −100 positions changes neither the loss nor any other
    gradient, and their own gradient is exactly 0."""
    z, v, labels = tensors
    masked = labels == -100
    runs = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        zz, vv = z.clone(), v.clone()
        zz[masked] = torch.randn(int(masked.sum()), V, generator=g) * 10
        vv[masked] = torch.randn(int(masked.sum()), V, generator=g) * 10
        zz.requires_grad_(True)
        terms = distillation_loss(
            zz, vv, labels, alpha=0.5, temperature=TAU, divergence_name="jsd", chunk_size=chunk_size
        )
        terms.loss.backward()
        runs.append((terms.loss.detach(), zz.grad))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
    assert torch.all(runs[0][1][masked] == 0)


def test_loss_is_the_per_token_formula(tensors):
    """L = (1 − α) Σ CE / N_tok + α τ² Σ D / N_tok over the unmasked tokens."""
    z, v, labels = tensors
    keep = labels != -100
    alpha = 0.3
    terms = distillation_loss(
        z, v, labels, alpha=alpha, temperature=TAU, divergence_name="reverse_kl", chunk_size=5
    )
    expected = kd_loss(z, torch.softmax(v / TAU, -1), labels, alpha=alpha, tau=TAU, divergence="reverse_kl")
    torch.testing.assert_close(terms.loss, expected)
    soft = by_hand("reverse_kl", z, v)[keep].sum()
    assert math.isclose(terms.soft_sum.item(), soft.item(), rel_tol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_logits_from_hidden_states_chunk_by_chunk_equal_dense(tensors, name):
    """HiddenStates(h, W): the loss and the gradients w.r.t. h and W equal those of the dense z = h Wᵀ."""
    _, v, labels = tensors
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(N, 16, generator=g), torch.randn(V, 16, generator=g) * 0.5
    results = []
    for chunk_size in (None, 4):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        terms = loss_of(h @ w.T if chunk_size is None else HiddenStates(h, w), v, labels, name, chunk_size)
        terms.loss.backward()
        results.append((terms.loss.detach(), terms.soft_sum, h.grad, w.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: chunked logits without gradients
        value = loss_of(HiddenStates(hidden, weight), v, labels, name, 5)
    torch.testing.assert_close(value.loss, results[0][0], rtol=1e-5, atol=1e-6)
