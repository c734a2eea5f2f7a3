"""The teacher contract: every registered source, built by the one factory, satisfies
hf_kd.teachers.contract.TeacherSignal, returns what it declares, gives hidden states exactly when it says
so and scores sequences it has never seen exactly when it says so. A source registered without a case
here fails the suite."""

from __future__ import annotations

import pytest
import torch
from processes import TeacherServer
from test_cache import tiny_gpt_and_texts
from tiny import save_model, tiny_config

from hf_kd.tasks import CausalLMTask
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.contract import OUTPUT_KINDS, SignalDefaults, TeacherSignal, check_teacher_signal
from hf_kd.teachers.signal import build_teacher_signal, open_teacher_source
from hf_kd.teachers.sources import TEACHER_SOURCES, TeacherSource, register_teacher_source

CASES = {}
"""Source name → a function (setup, tmp_path, pytest request) building (its signal, the task, the prepared rows)."""


def case(name):
    def register(build):
        CASES[name] = build
        return build

    return register


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2 teacher saved with its tokenizer, its texts and a student of the same vocabulary."""
    root = tmp_path_factory.mktemp("lm")
    tokenizer, teacher, data = tiny_gpt_and_texts(32)
    save_model(teacher, tokenizer, root / "teacher")
    tokenizer2, student, _ = tiny_gpt_and_texts(32)
    return root, tokenizer, teacher, student, data


def _task_and_rows(tokenizer, splits):
    task = CausalLMTask(max_length=6)
    task.use_processor(tokenizer)
    return task, task.prepare(splits["train"], student_processor=tokenizer)


@case("online")
def online_signal(lm, tmp_path, request):
    root, tokenizer, teacher, student, data = lm
    config = tiny_config(tmp_path, teacher_source="online", alpha=0.5)
    task, rows = _task_and_rows(tokenizer, data)
    return build_teacher_signal(config, task, student, teacher_model=teacher), task, rows


@case("cached")
def cached_signal(lm, tmp_path, request):
    root, tokenizer, teacher, student, data = lm
    kwargs = dict(teacher_id="gpt", top_k=4, batch_size=4, progress=False)
    capture_teacher_logits(teacher, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "cache", **kwargs)
    config = tiny_config(tmp_path, teacher_source="cached", teacher_cache=str(tmp_path / "cache"), alpha=0.5)
    task = CausalLMTask(max_length=6)
    task.use_processor(tokenizer)
    cache, splits = open_teacher_source(config, task, data, ["train"])
    rows = task.prepare(splits["train"], student_processor=tokenizer)
    signal = build_teacher_signal(config, task, student, resource=cache, student_processor=tokenizer)
    return signal, task, rows


def test_every_registered_source_has_a_case_here():
    assert sorted(CASES) == sorted(TEACHER_SOURCES)


@pytest.mark.parametrize("name", sorted(TEACHER_SOURCES))
def test_every_registered_source_satisfies_the_contract(name, lm, tmp_path, request):
    source = TEACHER_SOURCES[name]
    signal, task, rows = CASES[name](lm, tmp_path, request)
    assert isinstance(signal, TeacherSignal)
    check_teacher_signal(signal)
    assert set(signal.returns) <= set(source.returns)
    assert (signal.gives_features, signal.scores_samples) == (source.gives_features, source.scores_samples)

    collate = signal.collator(task.collate)
    batch = collate([rows[i] for i in range(4)])
    assert torch.equal(batch["input_ids"], task.collate([rows[i] for i in range(4)])["input_ids"])
    output = signal(batch)
    assert isinstance(output, tuple(OUTPUT_KINDS[kind] for kind in signal.returns))
    first = output.log_probs if not torch.is_tensor(output) else output
    assert first.shape[:2] == batch["input_ids"].shape  # one distribution per position

    if signal.gives_features:
        assert signal.run(batch, output_hidden_states=True)[1].hidden_states is not None
    else:
        with pytest.raises(ValueError, match="gives no teacher forward output"):
            signal.run(batch, output_hidden_states=True)

    g = torch.Generator().manual_seed(5)  # a sequence no dataset row holds: the student's sample
    fresh_ids = torch.randint(4, 32, (2, 5), generator=g)
    fresh = {"input_ids": fresh_ids, "attention_mask": torch.ones_like(fresh_ids), "labels": fresh_ids}
    if signal.scores_samples:
        scored = signal(fresh)
        first = scored.log_probs if not torch.is_tensor(scored) else scored
        assert first.shape[:2] == fresh_ids.shape
    else:
        with pytest.raises(KeyError):
            signal(fresh)


def test_an_object_missing_the_contract_is_refused_naming_what_it_lacks():
    class Bare:
        output_map, model, real_teacher = None, None, True

        def __call__(self, batch):
            return torch.zeros(1)

    with pytest.raises(
        TypeError, match=r"lacks \['returns', 'gives_features', 'scores_samples', 'run', 'collator'\]"
    ):
        check_teacher_signal(Bare())

    class Odd(SignalDefaults):
        returns = ("probabilities",)

    with pytest.raises(TypeError, match=r"Odd.returns=\('probabilities',\): expected some of"):
        check_teacher_signal(Odd())


def test_registering_a_source_twice_or_with_unknown_outputs_is_refused():
    entry = TEACHER_SOURCES["online"]
    with pytest.raises(ValueError, match="'online' is already registered"):
        register_teacher_source(entry)
    odd = TeacherSource("odd", "", ("logits",), False, False, False, build="x:y")
    with pytest.raises(ValueError, match=r"returns \('logits',\); expected some of"):
        register_teacher_source(odd)
    assert "odd" not in TEACHER_SOURCES


@pytest.fixture(scope="module")
def server(lm):
    root = lm[0]
    with TeacherServer(root / "teacher", "--served-model-name", "gpt") as running:
        yield running


@case("served")
def served_signal(lm, tmp_path, request):
    server = request.getfixturevalue("server")
    root, tokenizer, teacher, student, data = lm
    options = {"url": server.url, "model": "gpt", "top_k": 4}
    config = tiny_config(tmp_path, teacher_source="served", teacher_options=options, alpha=0.5)
    task, rows = _task_and_rows(tokenizer, data)
    client, _ = open_teacher_source(config, task, data, ["train"])
    return (
        build_teacher_signal(config, task, student, resource=client, student_processor=tokenizer),
        task,
        rows,
    )


@case("mixture")
def mixture_signal(lm, tmp_path, request):
    root, tokenizer, teacher, student, data = lm
    kwargs = dict(teacher_id="gpt", top_k=4, batch_size=4, progress=False)
    capture_teacher_logits(teacher, tokenizer, CausalLMTask(max_length=6), data, tmp_path / "cache", **kwargs)
    teachers = [
        {"name": "online", "source": "online", "model": str(root / "teacher"), "weight": 1},
        {"name": "cached", "source": "cached", "cache": str(tmp_path / "cache"), "weight": 2},
    ]
    config = tiny_config(tmp_path, teacher_source="mixture", teachers=teachers, alpha=0.5)
    task = CausalLMTask(max_length=6)
    task.use_processor(tokenizer)
    opened, splits = open_teacher_source(config, task, data, ["train"])
    rows = task.prepare(splits["train"], student_processor=tokenizer)
    return (
        build_teacher_signal(config, task, student, resource=opened, student_processor=tokenizer),
        task,
        rows,
    )
