"""A task declares what it can do (``Task.token_level``, ``scores_bytes``, ``can_generate``,
``aligns_tokenizers``); the code asks the task, it does not test the task's type or name."""

import re
from pathlib import Path

import pytest

from hf_kd.tasks import (
    CausalLMTask,
    FeatureClassificationTask,
    ImageClassificationTask,
    Task,
    TextClassificationTask,
)

ROOT = Path(__file__).resolve().parents[1]

CAPABILITIES = ("token_level", "scores_bytes", "can_generate", "aligns_tokenizers")


@pytest.mark.parametrize(
    ("task", "declared"),
    [
        (CausalLMTask(), dict.fromkeys(CAPABILITIES, True)),
        (CausalLMTask(packing=True), dict.fromkeys(CAPABILITIES, True) | {"can_generate": False}),
        (TextClassificationTask(), dict.fromkeys(CAPABILITIES, False)),
        (ImageClassificationTask(), dict.fromkeys(CAPABILITIES, False)),
        (FeatureClassificationTask(), dict.fromkeys(CAPABILITIES, False)),
    ],
)
def test_each_task_declares_its_capabilities(task, declared):
    assert {name: getattr(task, name) for name in CAPABILITIES} == declared
    assert all(getattr(Task, name) is False for name in CAPABILITIES)  # a new task declares none by default


TASK_CLASSES = "|".join(
    cls.__name__
    for cls in (CausalLMTask, TextClassificationTask, ImageClassificationTask, FeatureClassificationTask)
)
TYPE_OR_NAME_TEST = re.compile(
    rf"isinstance\([^)]*\b({TASK_CLASSES}|ClassificationTask)\b"
    rf"|\btask(_name|\.name)\s*[!=]=\s*(\"|({TASK_CLASSES})\.name)"
)


def test_no_module_tests_a_tasks_type_or_name():
    found = {}
    for path in sorted((ROOT / "hf_kd").rglob("*.py")):
        if path.parent.name == "tasks":
            continue  # the tasks themselves (build_task maps a task name to its class)
        count = len(TYPE_OR_NAME_TEST.findall(path.read_text()))
        if count:
            found[str(path.relative_to(ROOT))] = count
    assert not found, f"declare a capability on the Task instead of testing its type or name: {found}"
