"""The KD loss from a top-k teacher in one pass (``hf_kd.losses.closed_form.SparseKDSums``): the same values and
gradients as the hard cross-entropy plus the divergence on the dense rebuild (bucket: on the dense
student's k + 1 outcomes), with one log-softmax over the full output space for both terms (two when the
soft term is tempered on all K classes) and no dense teacher."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_kd.losses import (
    DIVERGENCE_REGISTRY,
    SparseLogits,
    distillation,
    distillation_loss,
    divergence,
    divergence_from_log_probs,
    teacher_log_probs,
)
from tests.test_codec import V, lm_like_logits
from tests.test_codec import value_and_grad as value_and_grad_per_position

N, K_TOP, ALPHA = 24, 16, 0.3


def sparse_teacher() -> SparseLogits:
    """Top-16 of flat-to-peaked positions; rows 3–5 keep fewer tokens (padding slots, their mass moved to
    the tail) and row 6 has no tail at all (every class with mass is kept)."""
    logits = lm_like_logits(N, seed=2)
    logits[6] = torch.full((V,), -math.inf).index_fill(0, torch.arange(10), 1.0)
    teacher = SparseLogits.from_logits(logits, K_TOP)
    teacher.log_probs[3:6, 9:] = -math.inf
    kept = teacher.log_probs[3:6].exp().sum(-1)
    teacher.tail_log_mass[3:6] = torch.log1p(-kept)
    assert teacher.tail_log_mass[6].item() == -math.inf
    return teacher


def reference(z, teacher, labels, soft_mask, name, temperature, tail):
    """The loss as the unfused path computes it, through the dense rebuild where one exists."""
    hard = F.cross_entropy(z, labels, ignore_index=-100, reduction="sum")
    if tail == "bucket":
        per_item = divergence(name, z, teacher, temperature=temperature, tail=tail)
    else:
        log_q = torch.log_softmax(z / temperature, -1)
        per_item = divergence_from_log_probs(name, log_q, teacher_log_probs(teacher, temperature, tail))
    soft = torch.where(soft_mask, per_item, 0.0).sum()
    num_hard, num_soft = (labels != -100).sum(), soft_mask.sum()
    return (1 - ALPHA) * hard / num_hard + ALPHA * temperature**2 * soft / num_soft


def count_full_softmaxes(monkeypatch) -> list:
    """Count the log-softmaxes over the V classes; make cross-entropy and the dense rebuild fail."""
    log_softmax, calls = torch.log_softmax, []

    def counted(x, *args, **kwargs):
        calls.extend([x.shape] if x.shape[-1] == V else [])
        return log_softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", counted)
    monkeypatch.setattr(distillation.F, "cross_entropy", None)
    monkeypatch.setattr(SparseLogits, "to_dense_log_probs", None)
    return calls


CASES = [
    *[(name, tail) for name in ("forward_kl", "reverse_kl") for tail in ("uniform", "renormalize")],
    *[(name, "bucket") for name, spec in DIVERGENCE_REGISTRY.items() if not spec.on_logits],
]


@pytest.mark.parametrize(("name", "tail"), CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_fused_sparse_loss_equals_the_dense_rebuild(monkeypatch, name, tail, temperature, chunk_size):
    teacher = sparse_teacher()
    g = torch.Generator().manual_seed(1)
    student = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 11]] = -100
    soft_mask = torch.ones(N, dtype=torch.bool)
    soft_mask[[4, 11, 20]] = False
    expected, expected_grad = value_and_grad_per_position(
        lambda z: reference(z, teacher, labels, soft_mask, name, temperature, tail), student
    )
    with monkeypatch.context() as patch:
        calls = count_full_softmaxes(patch)
        value, grad = value_and_grad_per_position(
            lambda z: distillation_loss(
                z, teacher, labels, alpha=ALPHA, temperature=temperature, divergence_name=name,
                soft_mask=soft_mask, tail=tail, chunk_size=chunk_size,
            ).loss,
            student,
        )  # fmt: skip
    # one log-softmax per chunk serves the hard and the soft term (τ = 1, or bucket: τ on k + 1 outcomes)
    chunks = 1 if chunk_size is None else math.ceil(N / chunk_size)
    assert len(calls) == chunks * (1 if tail == "bucket" or temperature == 1.0 else 2)
    # float32 round-off, relative to the largest entry (renormalised reverse KL: e^−LOG_ZERO penalties)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6 * expected.abs())
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * expected_grad.abs().max())


def test_fused_sparse_loss_keeps_the_logits_dtype_and_reports_both_terms():
    """bfloat16 logits get a bfloat16 gradient; the hard and soft sums are the unfused ones."""
    teacher = sparse_teacher()
    student = (torch.randn(N, V, generator=torch.Generator().manual_seed(4)) * 2).bfloat16()
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    z = student.clone().requires_grad_(True)
    terms = distillation_loss(z, teacher, labels, alpha=ALPHA, temperature=2.0, tail="bucket")
    terms.loss.backward()
    assert z.grad.dtype == torch.bfloat16 and bool(z.grad.abs().sum() > 0)
    zf = student.float()
    hard = F.cross_entropy(zf, labels, reduction="sum")
    soft = divergence("forward_kl", zf, teacher, temperature=2.0, tail="bucket").sum()
    torch.testing.assert_close(terms.hard_sum, hard, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms.soft_sum, soft, rtol=1e-5, atol=1e-4)
