"""The loss through the output layers (``HiddenStates`` for the student and the teacher): values and
gradients w.r.t. the hidden states and the output-layer weight equal the dense formula computed in
float64 from z = h Wᵀ and v = h_t W_tᵀ, for every divergence, with temperature, masking and the hard-label
term; in float32, in bf16, and under bf16 autocast with float32 weights."""

import pytest
import torch
from formulas import divergence_by_hand

from hf_kd.losses import DIVERGENCES, HiddenStates, distillation_loss
from hf_kd.losses.output_layer import default_chunk_size

N, V, H, HT, TAU, ALPHA, BETA, SKEW = 13, 50, 16, 24, 1.7, 0.6, 0.3, 0.2


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    teacher_hidden, teacher_weight = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.4
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 4, 5, 11]] = -100  # prompt / padding tokens
    soft_mask = labels != -100
    soft_mask[[4, 7]] = ~soft_mask[[4, 7]]  # an unlabelled row with a soft term, a labelled one without
    return hidden, weight, teacher_hidden, teacher_weight, labels, soft_mask


def reference(name, hidden, weight, teacher_hidden, teacher_weight, labels, soft_mask):
    """L = (1 − α) · mean_labelled CE(y, q¹) + α τ² · mean_soft D(p^τ, q^τ) in float64, and its gradients
    w.r.t. the student's hidden states and output layer."""
    h, w = (x.double().requires_grad_(True) for x in (hidden, weight))
    z, v = h @ w.T, teacher_hidden.double() @ teacher_weight.double().T
    labelled = labels != -100
    ce = -torch.log_softmax(z, -1)[labelled].gather(-1, labels[labelled, None]).mean()
    d = divergence_by_hand(name, z, v, TAU, beta=BETA, skew=SKEW)
    loss = (1 - ALPHA) * ce + ALPHA * TAU**2 * d[soft_mask].mean()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def ours(name, hidden, weight, teacher, labels, soft_mask, chunk_size):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    terms = distillation_loss(
        HiddenStates(h, w),
        teacher,
        labels,
        alpha=ALPHA,
        temperature=TAU,
        divergence_name=name,
        soft_mask=soft_mask,
        chunk_size=chunk_size,
        beta=BETA,
        skew=SKEW,
    )
    terms.loss.backward()
    return terms.loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 1, 4, N + 5])
def test_student_and_teacher_heads_equal_the_dense_formula(inputs, name, chunk_size):
    hidden, weight, teacher_hidden, teacher_weight, labels, soft_mask = inputs
    want = reference(name, *inputs)
    for teacher in (teacher_hidden @ teacher_weight.T, HiddenStates(teacher_hidden, teacher_weight)):
        got = ours(name, hidden, weight, teacher, labels, soft_mask, chunk_size)
        for a, b, what in zip(got, want, ("loss", "grad hidden", "grad weight"), strict=True):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=f"{name} {what}")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bf16_heads_are_within_bf16_rounding_of_the_float64_formula(inputs, name):
    """bf16 hidden states and weights (products in bf16, float32 accumulation): the loss within bf16
    rounding of the float64 formula on the same bf16 values, the gradients to a relative error ≤ 2 %."""
    hidden, weight, teacher_hidden, teacher_weight, labels, soft_mask = (
        x.bfloat16() if x.is_floating_point() else x for x in inputs
    )
    want = reference(name, hidden, weight, teacher_hidden, teacher_weight, labels, soft_mask)
    teacher = HiddenStates(teacher_hidden, teacher_weight)
    loss, grad_hidden, grad_weight = ours(name, hidden, weight, teacher, labels, soft_mask, 4)
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want[0], rtol=2e-2, atol=1e-3)
    assert relative_error(grad_hidden, want[1]) < 2e-2
    assert relative_error(grad_weight, want[2]) < 2e-2


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "mse"])
def test_autocast_runs_the_products_in_bf16_and_keeps_float32_gradients(inputs, name):
    """float32 master weights under bf16 autocast (the trainer's mixed precision): the gradients come back
    in float32, accumulated in float32 over the chunks, within bf16 rounding of the float64 formula."""
    hidden, weight, teacher_hidden, teacher_weight, labels, soft_mask = inputs
    teacher = HiddenStates(teacher_hidden, teacher_weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad_hidden, grad_weight = ours(name, hidden, weight, teacher, labels, soft_mask, 3)
    assert grad_hidden.dtype == grad_weight.dtype == torch.float32
    bf16 = [x.bfloat16().float() if x.is_floating_point() else x for x in inputs]  # the values multiplied
    want = reference(name, *bf16)
    torch.testing.assert_close(loss.double(), want[0], rtol=2e-2, atol=1e-3)
    assert relative_error(grad_hidden, want[1]) < 2e-2
    assert relative_error(grad_weight, want[2]) < 2e-2
    exact = reference(name, *inputs)  # and not bitwise the float32 result: the products did run in bf16
    assert relative_error(grad_weight, exact[2]) > 1e-6


def test_the_teachers_logits_are_made_one_chunk_at_a_time(inputs, monkeypatch):
    """A teacher given as hidden states is multiplied by its output layer chunk_size rows at a time, in
    training and in evaluation: its [N, V] logits never exist whole."""
    hidden, weight, teacher_hidden, teacher_weight, labels, soft_mask = inputs
    made = []
    logits = HiddenStates.logits

    def recorded(self, rows=slice(None)):
        out = logits(self, rows)
        made.append((self.hidden.shape[-1], out.shape[0]))
        return out

    monkeypatch.setattr(HiddenStates, "logits", recorded)
    teacher = HiddenStates(teacher_hidden, teacher_weight)
    ours("jsd", hidden, weight, teacher, labels, soft_mask, 4)
    with torch.no_grad():
        distillation_loss(
            HiddenStates(hidden, weight), teacher, labels, alpha=0.5, temperature=2.0, chunk_size=4
        )
    teacher_rows = [rows for width, rows in made if width == HT]
    assert teacher_rows == [4, 4, 4, 1] * 2


def test_default_chunk_size_follows_the_device_rule():
    """Power-of-two rows holding ≤ 2²⁶ logit elements on CUDA, ≤ 2²² on the CPU, at least 16."""
    assert default_chunk_size(128_256, torch.device("cuda")) == 512
    assert default_chunk_size(128_256, torch.device("cpu")) == 32
    assert default_chunk_size(32_000, torch.device("cuda")) == 2048
    assert default_chunk_size(10_000_000, torch.device("cpu")) == 16
    assert default_chunk_size(50, torch.device("cpu")) == 1 << 16
