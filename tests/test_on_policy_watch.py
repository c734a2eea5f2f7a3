"""The on-policy warning: its rule, and that the trainer raises it from its own logs during training."""

import logging

import pytest
import torch
from test_on_policy import tiny_llama, toy, trainer_for  # noqa: F401 (toy is a fixture)
from tiny import tiny_config

from hf_kd import DistillationTrainer
from hf_kd.on_policy_watch import (
    START_GAP_NATS,
    OnPolicyWatch,
    data_nll,
    generated_far_from_data,
    start_far_from_teacher,
)
from hf_kd.step_addons import OnPolicySampling


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


def test_the_start_rule_fires_above_the_pre_flights_line():
    assert START_GAP_NATS == 1.0
    message = start_far_from_teacher(8.33, 4.68)
    assert message is not None and "3.65 above the teacher's (4.68" in message and "Warm-start" in message
    assert start_far_from_teacher(5.6, 4.68) is None  # 0.92 nats: under the line
    assert start_far_from_teacher(5.6, 4.68, line=0.5) is not None


def test_data_nll_is_each_models_own_causal_lm_loss_on_the_batch(toy):  # noqa: F811
    """Read independently: a Transformers causal LM's own ``loss`` (labels shifted inside the model) on the
    same collated rows is the mean per-token NLL that :func:`data_nll` reads through the task's items."""
    task, train, _ = toy
    batch = task.collate([train[i] for i in range(4)])
    student, teacher = tiny_llama(40, seed=0), tiny_llama(40, seed=1)
    with torch.no_grad():
        expected = [
            m(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss.item()
            for m in (student, teacher)
        ]
    assert data_nll(batch, task, student, teacher) == pytest.approx(expected, rel=1e-5)
    prompts_only = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    assert data_nll(prompts_only, task, student, teacher) is None


def _fully_on_policy(toy, tmp_path, student):  # noqa: F811
    task, train, tokenizer = toy
    args = tiny_config(
        tmp_path, max_steps=2, per_device_train_batch_size=4, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", alpha=1.0, lmbda=1.0, divergence="jsd", max_new_tokens=6,
    )  # fmt: skip
    return DistillationTrainer(
        model=student, teacher_model=tiny_llama(40, seed=1), args=args, task=task, train_dataset=train,
        processing_class=tokenizer,
    )  # fmt: skip


def test_a_fully_on_policy_run_warns_when_its_student_starts_far_from_the_teacher(toy, tmp_path, caplog):  # noqa: F811
    """lmbda 1: no data batch is trained on, so the run reads the first window's data before replacing it.
    A student whose output layer is scaled ×30 (confident and wrong) is far above the teacher's NLL: one
    warning, quoting the NLLs read; a student equal to the teacher is not warned about."""
    far = tiny_llama(40, seed=0)
    with torch.no_grad():
        far.lm_head.weight.mul_(30.0)
    trainer = _fully_on_policy(toy, tmp_path / "far", far)
    (addon,) = [a for a in trainer.addons if isinstance(a, OnPolicySampling)]
    with caplog.at_level(logging.WARNING, logger="hf_kd.on_policy_watch"):
        trainer.train()
    student_nll, teacher_nll = addon.start_nll
    assert student_nll - teacher_nll > START_GAP_NATS
    warnings = [r.getMessage() for r in caplog.records if "on-policy (lmbda: 1)" in r.getMessage()]
    assert len(warnings) == 1 and f"is {student_nll:.2f} nats" in warnings[0]
    assert warnings[0].startswith("step 0:")

    caplog.clear()
    trainer = _fully_on_policy(toy, tmp_path / "same", tiny_llama(40, seed=1))
    (addon,) = [a for a in trainer.addons if isinstance(a, OnPolicySampling)]
    with caplog.at_level(logging.WARNING, logger="hf_kd.on_policy_watch"):
        trainer.train()
    assert addon.start_nll[0] == pytest.approx(addon.start_nll[1], rel=1e-5)
    assert not [r for r in caplog.records if "on-policy (lmbda: 1)" in r.getMessage()]
