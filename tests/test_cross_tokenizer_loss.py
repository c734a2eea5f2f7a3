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
