"""The on-policy warning: its rule, and that the trainer raises it from its own logs during training."""

import logging

import pytest
from test_on_policy import toy, trainer_for  # noqa: F401 (toy is a fixture)

from hf_kd.on_policy_watch import OnPolicyWatch, generated_far_from_data


def test_the_rule_fires_at_the_ratio_and_only_with_both_losses():
    message = generated_far_from_data({"loss_soft_generated": 0.9, "loss_soft_data": 0.2})
    assert message is not None and "4.5×" in message and "Warm-start" in message
    assert generated_far_from_data({"loss_soft_generated": 0.59, "loss_soft_data": 0.2}) is None
    assert (
        generated_far_from_data({"loss_soft_generated": 0.61, "loss_soft_data": 0.2}, ratio=3.0) is not None
    )
    assert generated_far_from_data({"loss_soft_generated": 0.9}) is None  # lmbda 1: nothing to compare
    assert generated_far_from_data({"loss_soft_generated": 0.9, "loss_soft_data": 0.0}) is None


@pytest.mark.parametrize("lmbda, watched", [(0.0, False), (0.5, True), (1.0, False)])
def test_only_a_mixed_on_policy_trainer_is_watched(toy, tmp_path, lmbda, watched):  # noqa: F811
    trainer = trainer_for(toy, tmp_path, lmbda=lmbda)
    assert any(isinstance(c, OnPolicyWatch) for c in trainer.callback_handler.callbacks) == watched


def test_the_trainer_warns_once_from_its_logged_losses(toy, tmp_path, caplog):  # noqa: F811
    """The trainer's own logged windows reach the watch: with its line at 0 × (every window with both
    losses qualifies), a 6-step lmbda 0.5 run warns exactly once, quoting a logged window's numbers."""
    trainer = trainer_for(
        toy, tmp_path, lmbda=0.5, max_steps=6, logging_steps=3, gradient_accumulation_steps=2, alpha=1.0
    )
    (watch,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, OnPolicyWatch)]
    watch.ratio = 0.0
    with caplog.at_level(logging.WARNING, logger="hf_kd.on_policy_watch"):
        trainer.train()
    windows = [h for h in trainer.state.log_history if "loss_soft_generated" in h and "loss_soft_data" in h]
    assert windows, "a 6-step lmbda 0.5 run logs both soft losses in some window"
    warnings = [r.getMessage() for r in caplog.records if "on-policy: the soft loss" in r.getMessage()]
    assert len(warnings) == 1
    assert f"({windows[0]['loss_soft_generated']:.4g})" in warnings[0]
