"""Teacher signals: one factory picks the source from the config, every source answers the same
attributes, the trainer reads those (never the kind), and one load_teacher loads every teacher."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_config, prepared
from tiny import bert_classifier, save_model, word_tokenizer

from hf_kd import DistillationTrainer
from hf_kd.modeling import load_teacher
from hf_kd.tasks import TextClassificationTask
from hf_kd.teachers.cached import CachedTeacher
from hf_kd.teachers.contract import SignalDefaults
from hf_kd.teachers.online import OnlineTeacher
from hf_kd.teachers.signal import build_teacher_signal
from hf_kd.teachers.synthetic import UniformTeacher


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def test_build_teacher_signal_picks_the_source_from_the_config(tmp_path, tokenizer):
    """alpha = 0 and 'none': no signal; 'ls': uniform over the student's classes; a teacher model: online,
    its classes mapped into the student's order; a soft term without a teacher: a clear error."""
    task, data = prepared(tokenizer, n=4)
    batch = task.collate([data[i] for i in range(4)])
    student = bert_classifier(len(tokenizer))
    teacher = bert_classifier(len(tokenizer), labels=["pos", "neg"], seed=2).eval()
    mapping = {"teacher_label_mapping": {"pos": "positive", "neg": "negative"}}

    assert (
        build_teacher_signal(make_config(tmp_path, alpha=0.0), task, student, teacher_model=teacher) is None
    )
    none = make_config(tmp_path, synthetic_teacher="none")
    assert build_teacher_signal(none, task, student, teacher_model=teacher) is None

    uniform = build_teacher_signal(make_config(tmp_path, synthetic_teacher="ls"), task, student)
    assert isinstance(uniform, UniformTeacher)
    assert (uniform.real_teacher, uniform.model, uniform.output_map) == (False, None, None)
    torch.testing.assert_close(uniform(batch), torch.zeros(4, 2))

    online = build_teacher_signal(make_config(tmp_path, **mapping), task, student, teacher_model=teacher)
    assert isinstance(online, OnlineTeacher)
    assert (online.real_teacher, online.model, online.output_map) == (True, teacher, [1, 0])
    with torch.no_grad():
        raw = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(online(batch), raw[:, [1, 0]])

    with pytest.raises(ValueError, match=r"alpha=0.5 needs a teacher: pass teacher_model or teacher_signal"):
        build_teacher_signal(make_config(tmp_path), task, student)


def test_cached_signal_keeps_its_output_map_as_given():
    """A cached teacher answers output_map as the list it was built with (the same type as an online
    teacher's, which callers index the teacher's logit layer with); no model runs."""
    signal = CachedTeacher(3, [2, 0, 1])
    assert signal.output_map == [2, 0, 1]
    assert (signal.real_teacher, signal.model) == (True, None)
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    torch.testing.assert_close(signal({"kd_teacher_logits": logits}), torch.tensor([[2.0, 0.0, 1.0]]))


class ScaledTeacher(SignalDefaults):
    """A new kind of source: a model's logits times a constant, agreement reported as its flag says."""

    returns = ("dense",)

    def __init__(self, model, real_teacher: bool):
        self.model, self.real_teacher = model, real_teacher

    def __call__(self, batch):
        with torch.no_grad():
            return 3.0 * self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("real_teacher", [True, False])
def test_trainer_reads_the_signals_attributes_not_its_kind(tmp_path, tokenizer, real_teacher):
    """Any object with the TeacherSignal attributes is a source: its logits are distilled, and its
    teacher logits reach the evaluation outputs (for agreement) exactly when ``real_teacher`` says so."""
    task, data = prepared(tokenizer, n=8)
    teacher = bert_classifier(len(tokenizer), seed=2).eval()
    signal = ScaledTeacher(teacher, real_teacher)
    trainer = DistillationTrainer(
        model=bert_classifier(len(tokenizer)),
        teacher_signal=signal,
        args=make_config(tmp_path),
        task=task,
        train_dataset=data,
    )
    assert trainer.teacher_signal is signal
    batch = task.collate([data[i] for i in range(8)])
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    if real_teacher:
        torch.testing.assert_close(outputs["teacher_logits"], signal(batch))
    else:
        assert sorted(outputs) == ["logits"]


def test_load_teacher_loads_frozen_safetensors_with_init_kwargs(tmp_path, tokenizer):
    """load_teacher: the task's model class at the saved weights, frozen (eval, no gradients), the
    config's init kwargs applied (dtype); a folder whose weights are not safetensors is refused."""
    saved = bert_classifier(len(tokenizer), seed=3)
    path = save_model(saved, tokenizer, tmp_path / "teacher")
    task = TextClassificationTask()

    teacher = load_teacher(task, str(path))
    assert type(teacher).__name__ == "BertForSequenceClassification"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.classifier.weight, saved.classifier.weight)
    assert load_teacher(task, str(path), dtype=torch.bfloat16).classifier.weight.dtype == torch.bfloat16

    pickled = tmp_path / "pickled"
    saved.config.save_pretrained(pickled)
    torch.save(saved.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_teacher(task, str(pickled))
