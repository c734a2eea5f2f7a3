"""logit_standardization: true — logit standardisation (Sun et al., CVPR 2024) against its formula, through every
loss path that has a full row of teacher logits, refused where there is none, and parsed from a recipe."""

import pytest
import torch
import yaml
from formulas import kl

from hf_kd.config import DistillationConfig, parse_args
from hf_kd.losses import HiddenStates, SparseLogits, distillation_loss, standardize_logits


def test_standardized_logits_have_mean_0_and_bessel_std_1_and_ignore_shift_and_scale():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 11, generator=g) * 3 + 2
    s = standardize_logits(z)
    torch.testing.assert_close(s.mean(-1), torch.zeros(5), atol=1e-6, rtol=0)
    by_hand = (z - z.mean(-1, keepdim=True)) / (
        ((z - z.mean(-1, keepdim=True)) ** 2).sum(-1, keepdim=True) / 10
    ).sqrt()
    torch.testing.assert_close(s, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(standardize_logits(4.0 * z - 7.0), s, atol=1e-5, rtol=1e-5)
    assert torch.equal(standardize_logits(torch.ones(2, 4)), torch.zeros(2, 4))  # constant row: eps, no NaN


def formula(z, v, labels, alpha, tau):
    """(1 − α) · mean H(y, softmax(z)) + α τ² · mean KL(softmax(Z(v)/τ) ‖ softmax(Z(z)/τ)), Z by hand."""

    def zscore(x):
        c = x - x.mean(-1, keepdim=True)
        return c / ((c**2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()

    ce = torch.nn.functional.cross_entropy(z, labels)
    p, q = torch.softmax(zscore(v) / tau, -1), torch.softmax(zscore(z) / tau, -1)
    return (1 - alpha) * ce + alpha * tau**2 * kl(p, q).mean()


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_standardized_loss_and_gradient_match_the_formula(chunk_size):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(8, 7, generator=g) * 2).requires_grad_(True)
    v = torch.randn(8, 7, generator=g) * 6  # a teacher of another logit scale
    labels = torch.randint(0, 7, (8,), generator=g)
    terms = distillation_loss(
        z, v, labels, alpha=0.9, temperature=2.0, standardize=True, chunk_size=chunk_size
    )
    (grad,) = torch.autograd.grad(terms.loss, z)
    z2 = z.detach().clone().requires_grad_(True)
    expected = formula(z2, v, labels, 0.9, 2.0)
    expected.backward()
    torch.testing.assert_close(terms.loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, z2.grad, atol=1e-5, rtol=1e-4)
    plain = distillation_loss(z, v, labels, alpha=0.9, temperature=2.0)
    assert abs(plain.loss.item() - terms.loss.item()) > 1e-3  # it changes the loss


def test_standardized_loss_from_hidden_states_equals_the_one_from_logits():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 4, generator=g).requires_grad_(True)
    weight = torch.randn(9, 4, generator=g).requires_grad_(True)
    v, labels = torch.randn(6, 9, generator=g), torch.randint(0, 9, (6,), generator=g)
    settings = dict(alpha=0.5, temperature=2.0, standardize=True)
    chunked = distillation_loss(HiddenStates(hidden, weight), v, labels, chunk_size=4, **settings)
    gh, gw = torch.autograd.grad(chunked.loss, (hidden, weight))
    dense = distillation_loss(hidden @ weight.T, v, labels, **settings)
    eh, ew = torch.autograd.grad(dense.loss, (hidden, weight))
    torch.testing.assert_close(chunked.loss, dense.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, eh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, ew, atol=1e-5, rtol=1e-4)


def test_a_top_k_or_cross_tokenizer_teacher_is_refused_with_the_reason():
    z, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    sparse = SparseLogits.from_logits(torch.randn(4, 10), 3)
    with pytest.raises(ValueError, match="logit_standardization .* SparseLogits teacher"):
        distillation_loss(z, sparse, labels, alpha=0.5, temperature=2.0, standardize=True)


def test_temperature_auto_parses_from_the_recipe_and_the_command_line(tmp_path):
    base = {"output_dir": str(tmp_path / "o"), "student_config": {"model_type": "vit"}, "use_cpu": True}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(base | {"temperature": "auto"}))
    *_, config = parse_args(["--config", str(recipe)])
    assert config.temperature == "auto" and config.logit_standardization is False  # the run sets it
    *_, config = parse_args(["--config", str(recipe), "--temperature", "3"])
    assert config.temperature == 3.0 and config.logit_standardization is False
    recipe.write_text(yaml.safe_dump(base))
    *_, config = parse_args(["--config", str(recipe), "--temperature", "auto"])
    assert config.temperature == "auto"
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        DistillationConfig(output_dir=str(tmp_path / "o"), temperature=0.0, use_cpu=True)
    recipe.write_text(yaml.safe_dump(base | {"temperature": "hot"}))
    with pytest.raises(ValueError, match="temperature: 'hot' .* expected a number > 0 or 'auto'"):
        parse_args(["--config", str(recipe)])
    with pytest.raises(ValueError, match="temperature='hot': expected a number > 0 or 'auto'"):
        DistillationConfig(output_dir=str(tmp_path / "o"), temperature="hot", use_cpu=True)
