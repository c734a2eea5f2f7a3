"""The cross-tokenizer loss's two parts (hf_kd.losses.cross_tokenizer): the exact part computed on the
student's vocabulary equals the formula on the shared columns for every divergence, value and gradient,
and the ULD part, between the span start's two normalised distributions, teaches the student."""

import pytest
import torch

from hf_kd.losses import DIVERGENCES, AlignedLogits, distillation_loss
from hf_kd.losses.divergences import divergence


def aligned(teacher_logits, matched, student_ids, teacher_ids, **weights) -> AlignedLogits:
    """Every student row starts a span aligned with the teacher row of the same index."""
    return AlignedLogits(
        logits=teacher_logits,
        teacher_row=torch.arange(len(matched)),
        matched=torch.tensor(matched),
        student_ids=torch.tensor(student_ids),
        teacher_ids=torch.tensor(teacher_ids),
        **weights,
    )


def unlabelled(rows: int) -> tuple[torch.Tensor, dict]:
    """No hard labels, every row in the soft term."""
    return torch.full((rows,), -100), {"soft_mask": torch.ones(rows, dtype=torch.bool)}


@pytest.mark.parametrize("name", DIVERGENCES)
def test_exact_part_equals_the_divergence_on_the_shared_columns(name):
    """V_s = 6, V_t = 7, four shared tokens in another order on each side; rows 0, 1, 3 matched."""
    torch.manual_seed(0)
    z, v = torch.randn(4, 6) * 3, torch.randn(4, 7) * 3
    student_ids, teacher_ids = [4, 0, 2, 5], [1, 6, 3, 0]
    teacher = aligned(v, [True, True, False, True], student_ids, teacher_ids, unmatched_weight=0.0)
    tau = 1.5

    def by_hand(z):
        per_row = divergence(name, z[:, student_ids], v[:, teacher_ids], temperature=tau)
        return per_row[[0, 1, 3]].sum()

    z = z.requires_grad_(True)
    expected = by_hand(z)
    (expected_grad,) = torch.autograd.grad(expected, z)
    for chunk_size in (None, 3):
        settings = dict(alpha=1.0, temperature=tau, temperature_squared=False, divergence_name=name)
        labels, mask = unlabelled(4)
        terms = distillation_loss(z, teacher, labels, **mask, chunk_size=chunk_size, **settings)
        torch.testing.assert_close(terms.parts["soft_matched"][0], expected.detach())
        (grad,) = torch.autograd.grad(terms.loss, z)
        torch.testing.assert_close(grad, expected_grad / 4)  # soft normaliser: the 4 soft rows
        assert torch.isfinite(grad).all() and grad[:, [1, 3]].abs().max() == 0  # ids outside S: no gradient


def uld_only(z, teacher, tau=2.0):
    labels, mask = unlabelled(z.shape[0])
    return distillation_loss(z, teacher, labels, **mask, alpha=1.0, temperature=tau)


def test_uld_part_is_zero_for_a_student_with_the_teachers_distribution_and_large_for_a_random_one():
    """The ULD part compares sorted probabilities, so a student whose logits are the teacher's in another
    order (another vocabulary) scores 0, and a random student scores far more: both sides' vectors sum to
    1, so no mass gap hides the student. Its gradient at the random student is material too."""
    torch.manual_seed(0)
    v = torch.randn(3, 8) * 2
    teacher = aligned(v, [False, False, False], [0], [0], matched_weight=0.0)
    permuted = v[:, torch.randperm(8)]
    assert uld_only(permuted, teacher).parts["soft_unmatched"][0] < 1e-6
    student = (torch.randn(3, 8) * 2).requires_grad_(True)
    far = uld_only(student, teacher)
    (grad,) = torch.autograd.grad(far.loss, student)
    assert far.parts["soft_unmatched"][0] > 1.0 and grad.abs().sum() > 0.1


def test_training_on_the_uld_part_alone_lowers_it():
    """Gradient descent on the student's logits with only the unmatched weight: the ULD part falls by more
    than half in 60 steps (its gradient is material)."""
    torch.manual_seed(0)
    v = torch.randn(16, 12) * 3
    teacher = aligned(v, [False] * 16, [0], [0], matched_weight=0.0)
    z = torch.randn(16, 10).requires_grad_(True)
    optimizer = torch.optim.SGD([z], lr=5.0)
    first = None
    for _ in range(60):
        terms = uld_only(z, teacher)
        first = float(terms.parts["soft_unmatched"][0]) if first is None else first
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    last = float(uld_only(z, teacher).parts["soft_unmatched"][0])
    assert first > 8 and last < 0.5 * first


def test_agreement_is_measured_at_the_labelled_matched_span_starts_on_the_shared_tokens():
    """V_s = 6, V_t = 7, shared student ids [4, 0, 2, 5] ↔ teacher ids [1, 6, 3, 0]. Rows 0-3 are labelled
    matched span starts: row 0 agrees (student 4 ↔ teacher 1), row 1 agrees (0 ↔ 6), row 2 disagrees
    (student 2 ↔ 3, teacher 0), row 3's student top-1 (id 1) has no teacher id (its best shared token, 2 ↔ 3,
    is the teacher's top-1: not counted); the teacher is right where its top-1 is the target's teacher id
    (rows 0, 2, 3). Row 4 is unmatched, row 5 unlabelled, row 6 starts no span: all three left out."""
    student_ids, teacher_ids = [4, 0, 2, 5], [1, 6, 3, 0]
    z, v = torch.zeros(7, 6), torch.zeros(7, 7)
    for row, (student_top, teacher_top) in enumerate(
        [(4, 1), (0, 6), (2, 0), (1, 3), (4, 1), (4, 1), (4, 1)]
    ):
        z[row, student_top], v[row, teacher_top] = 5.0, 4.0
    z[3, 2] = 3.0
    labels = torch.tensor([4, 2, 5, 2, 4, -100, 4])
    teacher = AlignedLogits(
        logits=v,
        teacher_row=torch.tensor([0, 1, 2, 3, 4, 5, -1]),
        matched=torch.tensor([True, True, True, True, False, True, True]),
        student_ids=torch.tensor(student_ids),
        teacher_ids=torch.tensor(teacher_ids),
    )
    agreement = teacher.matched_agreement(z, labels)
    torch.testing.assert_close(
        agreement["top1_agreement"], torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        agreement["teacher_accuracy"], torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    )
    p, q = v[:4, teacher_ids].softmax(-1), z[:4, student_ids].softmax(-1)
    torch.testing.assert_close(agreement["kl"].float(), (p * (p.log() - q.log())).sum(-1))
