"""The divergence registry (hf_kd.losses.divergences.DIVERGENCE_REGISTRY) is the one list of divergences:
the config's choices and help, the README and docs/knowledge.md#divergences are checked against it, so
a new divergence is one function, one registration and one hand formula in tests/formulas.py (which
test_losses.py compares with every registered divergence) — the failures below print the lines to add."""

import re
from pathlib import Path

import pytest
import torch

from hf_kd import DistillationConfig
from hf_kd.losses import DIVERGENCE_REGISTRY, DIVERGENCES, divergence, divergence_from_log_probs
from hf_kd.losses.divergences import DIVERGENCE_PARAMS, register_divergence

ROOT = Path(__file__).resolve().parents[1]


def table_row(name: str) -> str:
    """The row of docs/knowledge.md's divergence table for ``name``, as the registry gives it."""
    spec = DIVERGENCE_REGISTRY[name]
    label = f"`{name}` (default)" if name == "forward_kl" else f"`{name}`"
    return " ".join(f"| {label} | {spec.formula.replace('|', chr(92) + '|')} | {spec.parameter} |".split())


def test_the_knowledge_table_is_the_registry():
    text = (ROOT / "docs/knowledge.md").read_text()
    section = text[text.index("### Divergences") :]
    section = section[: section.index("\n\n", section.index("| `divergence`"))]
    rows = [" ".join(line.split()) for line in section.splitlines() if line.startswith("| `")][
        1:
    ]  # no header
    want = [table_row(name) for name in DIVERGENCES]
    assert rows == want, "docs/knowledge.md#divergences should read:\n" + "\n".join(want)


def test_the_readme_names_every_divergence_and_its_parameters():
    """README's `divergence` row (the settings table's, default `forward_kl`) names exactly the registered
    divergences and the parameters they read."""
    (row,) = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `divergence` | `forward_kl` |")
    ]
    named = set(re.findall(r"`([a-z_]+)`", row.split("|")[3]))
    assert named == set(DIVERGENCES) | set(DIVERGENCE_PARAMS), f"README's divergence row: {row}"


def test_the_config_takes_its_choices_and_help_from_the_registry():
    field = DistillationConfig.__dataclass_fields__["divergence"]
    assert all(name in field.metadata["help"] for name in DIVERGENCES)
    for name in DIVERGENCES:
        assert DistillationConfig(output_dir="out", divergence=name, report_to="none").divergence == name
    with pytest.raises(ValueError, match="'kl_div'"):
        DistillationConfig(output_dir="out", divergence="kl_div", report_to="none")


def test_each_divergence_reads_only_its_own_parameters():
    """jsd reads beta, the skewed KLs read skew, the others neither: changing another's parameter
    changes nothing; an unknown parameter is refused by name."""
    g = torch.Generator().manual_seed(0)
    log_q, log_p = (torch.log_softmax(torch.randn(4, 7, generator=g), -1) for _ in range(2))
    for name, spec in DIVERGENCE_REGISTRY.items():
        if spec.on_logits:
            continue
        for param in DIVERGENCE_PARAMS:
            low = divergence_from_log_probs(name, log_q, log_p, **{param: 0.3})
            high = divergence_from_log_probs(name, log_q, log_p, **{param: 0.7})
            assert torch.equal(low, high) == (param not in spec.params), (name, param)
    with pytest.raises(ValueError, match="'betta'"):
        divergence_from_log_probs("jsd", log_q, log_p, betta=0.3)


def test_a_logit_divergence_refuses_log_probabilities_and_a_name_registers_once():
    log_q = torch.log_softmax(torch.randn(2, 3), -1)
    with pytest.raises(ValueError, match="'mse' compares logits"):
        divergence_from_log_probs("mse", log_q, log_q)
    with pytest.raises(ValueError, match="'forward_kl' is already registered"):
        register_divergence("forward_kl", "KL(p ‖ q)")(lambda log_q, log_p: log_q.sum(-1))
    with pytest.raises(ValueError, match="'kl_div' is not one of"):
        divergence("kl_div", log_q, log_q)
