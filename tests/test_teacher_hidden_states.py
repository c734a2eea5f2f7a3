"""teacher_logits_from_hidden_states: the online teacher's logits made chunk by chunk inside the loss from
its final hidden states and output layer give the same loss, gradients, update and evaluation as its full
logits; what it cannot do is refused before training."""

import pytest
import torch
from test_causal_lm import one_step_config, prepared_rows, tiny_llama, toy  # noqa: F401 (fixture)
from transformers import CohereConfig, CohereForCausalLM

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.losses import HiddenStates


def config(tmp_path, teacher_hidden: bool, student_hidden: bool = False, **fields) -> DistillationConfig:
    fields = {"per_device_train_batch_size": 4, **fields}
    return one_step_config(
        tmp_path / f"run-{teacher_hidden}-{student_hidden}",
        teacher_logits_from_hidden_states=teacher_hidden,
        student_logits_from_hidden_states=student_hidden,
        **fields,
    )


@pytest.mark.parametrize("divergence", ["jsd", "forward_kl", "mse"])
def test_loss_and_gradients_equal_the_full_teacher_logits(toy, tmp_path, divergence):  # noqa: F811
    """The teacher's vocabulary padded beyond the student's (48 vs 40: its output layer's rows are cut);
    with the student's logits whole, with both made from hidden states in the same chunks, and with no
    loss_chunk_size (the device's default chunk)."""
    task, rows = prepared_rows(toy, [0, 3, 7, 11])
    batch = task.collate(list(rows))
    teacher = tiny_llama(48, seed=1)
    results = []
    for teacher_hidden, student_hidden, chunk in (
        (False, False, 5),
        (True, False, 5),
        (True, True, 5),
        (True, False, None),
    ):
        student = tiny_llama(40, seed=0, layers=2).train()
        args = config(tmp_path, teacher_hidden, student_hidden, divergence=divergence, loss_chunk_size=chunk)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, task=task)
        made = trainer.teacher_signal(dict(batch))
        assert isinstance(made, HiddenStates) == teacher_hidden
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in student.named_parameters()}))
    (reference, grads), *others = results
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for loss, other_grads in others:
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_training_and_evaluation_match(toy, tmp_path):  # noqa: F811
    """Through Trainer.train (accumulation of 2) and Trainer.evaluate: same update, same eval losses, and
    the teacher's own evaluation scores (teacher_hard_totals) from its logits made whole."""
    task, rows = prepared_rows(toy, range(8))
    teacher = tiny_llama(48, seed=1)
    runs = []
    for teacher_hidden in (False, True):
        student = tiny_llama(40, seed=0)
        args = config(tmp_path, teacher_hidden, per_device_train_batch_size=2, gradient_accumulation_steps=2)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, task=task, train_dataset=rows, eval_dataset=rows
        )
        trainer.train()
        metrics, teacher_totals = trainer.evaluate(), trainer.teacher_hard_totals(rows)
        runs.append(
            (torch.cat([p.detach().flatten() for p in student.parameters()]), metrics, teacher_totals)
        )
    (params, metrics, totals), (hidden_params, hidden_metrics, hidden_totals) = runs
    torch.testing.assert_close(hidden_params, params, rtol=1e-5, atol=1e-6)
    for key in ("eval_loss", "eval_loss_hard", "eval_loss_soft"):
        assert hidden_metrics[key] == pytest.approx(metrics[key], rel=1e-5)
    assert totals[0] > 0 and hidden_totals == pytest.approx(totals, rel=1e-5)


def test_what_it_cannot_do_is_refused(toy, tmp_path):  # noqa: F811
    task, rows = prepared_rows(toy, range(4))
    with pytest.raises(ValueError, match="teacher_logits_from_hidden_states: true needs an online teacher"):
        config(tmp_path, True, teacher_source="cached", teacher_cache=str(tmp_path))
    with pytest.raises(ValueError, match="not supported with teacher_logits_from_hidden_states"):
        config(tmp_path, True, hidden_loss="mse")
    # Cohere multiplies its logits by logit_scale after the output layer: caught on the first batch.
    torch.manual_seed(0)
    cohere = CohereForCausalLM(
        CohereConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            logit_scale=0.5,
            pad_token_id=0,
            use_cache=False,
        )
    )
    trainer = DistillationTrainer(
        model=tiny_llama(40), teacher_model=cohere, args=config(tmp_path, True), task=task
    )
    with pytest.raises(
        ValueError, match="teacher_logits_from_hidden_states: true: CohereForCausalLM's logits are not"
    ):
        trainer.compute_loss(trainer.model, task.collate(list(rows)))
