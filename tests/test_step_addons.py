"""Step add-ons (hf_kd.step_addons): a new one plugs into the trainer's step without editing the trainer,
adding a named part to the loss and a logged value of its own."""

from __future__ import annotations

import pytest
import torch
from test_trainer import trainer_for

from hf_kd.step_addons import StepAddOn, TermGradientNorms, prefix


class LogitNorm(StepAddOn):
    """A penalty c · Σ ‖z‖² / N_hard on the student's logits, logged as ``logit_norm`` (mean ‖z‖²)."""

    name = "logit_norm"

    def __init__(self, weight: float):
        self.weight = weight

    def loss_parts(self, ctx):
        norms = ctx.items.student_logits.float().pow(2).sum(-1)
        ctx.sums["logit_norm"] += norms.sum().detach()
        ctx.sums["n_logit_norm"] += float(norms.numel())
        return {"logit_norm": self.weight * norms.sum() / ctx.counts[0]}

    def sum_keys(self):
        return ("logit_norm", "n_logit_norm")

    def logs(self, mode, totals, reduce):
        if not totals or not totals["n_logit_norm"]:
            return {}
        return {prefix(mode) + "logit_norm": totals["logit_norm"] / totals["n_logit_norm"]}


@pytest.fixture(scope="module")
def tokenizer():
    from tiny import word_tokenizer

    return word_tokenizer()


def test_an_addon_adds_its_loss_part_and_its_log_without_touching_the_trainer(tmp_path, tokenizer):
    trainer, data = trainer_for(tmp_path, tokenizer)
    assert [type(a) for a in trainer.addons] == [TermGradientNorms]  # classification, no option on
    trainer.model.eval()  # no dropout: the two losses differ by the add-on's part alone
    batch = trainer.task.collate([data[i] for i in range(8)])
    base = trainer.compute_loss(trainer.model, dict(batch))
    trainer._kd_sums["eval"].clear()
    trainer.addons.append(LogitNorm(1000.0))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        z = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    norms = z.pow(2).sum(-1)
    assert (loss - base).item() == pytest.approx(1000.0 * norms.sum().item() / 8, rel=1e-4)
    assert (loss - base).item() > 0.05  # the part is not negligible: the check above can fail
    trainer.log({"eval_loss": loss.item()})
    logged = trainer.state.log_history[-1]
    assert logged["eval_logit_norm"] == pytest.approx(norms.mean().item(), rel=1e-5)
    assert "eval_loss_hard" in logged and "eval_loss_soft" in logged  # the trainer's own logs are kept
    assert not trainer._kd_sums["eval"]  # the window's sums, the add-on's included, start again
