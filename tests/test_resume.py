"""A distillation interrupted mid-training and resumed from its last checkpoint ends with the same
weights as the run that was never interrupted (optimizer, scheduler, RNG and data order restored)."""

from __future__ import annotations

import pytest
import torch
from tiny import bert_classifier, sentiment_dataset, tiny_config, word_tokenizer
from transformers import TrainerCallback

from hf_kd import DistillationTrainer
from hf_kd.tasks import TextClassificationTask


class Interrupt(TrainerCallback):
    """Raises KeyboardInterrupt at the end of step ``step`` (as a Ctrl-C or a killed job would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"interrupted at step {self.step}")


def _trainer(output_dir, callbacks=()):
    tokenizer = word_tokenizer()
    task = TextClassificationTask(max_length=16)
    train = task.prepare(sentiment_dataset(48, seed=0), student_processor=tokenizer)
    config = tiny_config(
        output_dir,
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        alpha=0.5,
        temperature=2.0,
        logging_steps=3,
    )
    return DistillationTrainer(
        model=bert_classifier(len(tokenizer), seed=0),
        teacher_model=bert_classifier(len(tokenizer), hidden=32, seed=1),
        args=config,
        task=task,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    straight = _trainer(tmp_path / "straight")
    straight.train()

    interrupted = _trainer(tmp_path / "resumed", callbacks=[Interrupt(4)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir() and not (
        tmp_path / "resumed" / "checkpoint-6"
    ).exists()
    partial = {k: v.clone() for k, v in interrupted.model.state_dict().items()}

    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    final, reference = resumed.model.state_dict(), straight.model.state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(partial[name], reference[name]) for name in reference), (
        "the interruption left work undone"
    )
    assert (tmp_path / "resumed" / "checkpoint-6" / "model.safetensors").is_file()
