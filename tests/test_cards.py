"""The cards package: the markdown pieces every card shares, and the student's card naming each teacher
source and synthetic teacher with the wording defined once beside the option."""

from __future__ import annotations

import pytest

from hf_kd.cards.markdown import code_block, field_table, format_value, markdown_table
from hf_kd.cards.model import SYNTHETIC_TARGETS, DistillationCardInfo, render_model_card
from hf_kd.cards.run import run_card_info
from hf_kd.config import DataArguments, DistillationConfig
from hf_kd.teachers.sources import TEACHER_SOURCES


def _info(**fields) -> DistillationCardInfo:
    return DistillationCardInfo(
        student_id="me/student",
        teacher_id="org/teacher",
        task="text-classification",
        divergence="forward_kl",
        temperature=2.0,
        alpha=0.5,
        hf_kd_version="0.1.0",
        **fields,
    )


def test_code_block_fence_is_longer_than_any_backtick_run_inside():
    text = "run:\n```bash\npython x.py\n```\n"
    block = code_block(text, "yaml")
    assert block.splitlines()[0] == "````yaml" and block.splitlines()[-1] == "````"
    assert block.splitlines()[1:-1] == text.strip("\n").splitlines()
    assert code_block("plain", "bash") == "```bash\nplain\n```"


def test_tables_escape_cells_and_leave_out_missing_fields():
    assert markdown_table(["a", "b"], [["x|y", "1\n2"]]) == "| a | b |\n| --- | --- |\n| x\\|y | 1 2 |"
    table = field_table({"top_k": 20, "teacher_revision": None, "ratio": 0.123456, "ok": True})
    assert table.splitlines() == [
        "| Field | Value |",
        "| --- | --- |",
        "| `top_k` | 20 |",
        "| `ratio` | 0.1235 |",
        "| `ok` | yes |",
    ]
    assert [format_value(v) for v in (None, 1234567, [1, "a"])] == ["—", "1,234,567", '`[1, "a"]`']


@pytest.mark.parametrize("source", sorted(TEACHER_SOURCES))
def test_card_names_every_teacher_source_a_config_accepts(tmp_path, source):
    teachers = [{"name": "a", "model": "m"}] if source == "mixture" else None  # what the source requires
    DistillationConfig(
        output_dir=str(tmp_path),
        teacher_source=source,
        teacher_cache=str(tmp_path / "cache"),
        teachers=teachers,
    )
    text = str(render_model_card(_info(teacher_source=source)))
    assert f"- **Teacher signal:** {source}: {TEACHER_SOURCES[source].description}" in text


def test_card_states_the_synthetic_teacher_and_its_soft_target():
    text = str(render_model_card(_info(synthetic_teacher="ls")))
    assert f"- **Target:** `ls`: {SYNTHETIC_TARGETS['ls']}" in text
    assert "D(uniform^τ ‖ student^τ)" in text
    plain = str(render_model_card(_info(synthetic_teacher="none")))
    assert "- **Loss:** CE(labels, student): plain fine-tuning" in plain and "Divergence" not in plain


@pytest.mark.parametrize(
    ("config_fields", "line"),
    [
        ({"temperature": 4.0, "logit_standardization": True}, "4 (the base τ of logit standardisation)"),
        ({"temperature": 2.0}, "2 (τ² scaling on)"),
        ({"temperature": 1.0, "auto": "not saturated"}, "1, set by `temperature: auto`: not saturated (τ²"),
    ],
)
def test_card_says_how_the_temperature_was_set(tmp_path, config_fields, line):
    auto = config_fields.pop("auto", None)
    config = DistillationConfig(output_dir=str(tmp_path), teacher_model_name_or_path="t", **config_fields)
    info = run_card_info(DataArguments(task="text-classification"), config, student_parameters=10)
    info.temperature_auto = auto
    text = str(render_model_card(info))
    assert f"- **Temperature τ:** {line}" in text
    assert ("standardisation" in text) == bool(config.logit_standardization)


def test_model_index_holds_the_students_scores_not_the_soft_terms_parts():
    """The soft term's parts (matched/unmatched spans, each teacher's share) are the objective's values:
    in the card body, never ``model-index`` results; the student's scores are."""
    info = _info(
        datasets=["local/data"],
        eval_split="test",
        student_metrics={
            "eval_accuracy": 0.8125,
            "eval_loss_hard": 0.5,
            "eval_loss_soft": 0.25,
            "eval_loss_soft_matched": 0.125,
            "eval_loss_soft_teacher_a": 0.0625,
            "eval_loss_soft_teacher_b_unmatched": 0.03125,
        },
    )
    card = str(render_model_card(info))
    index = card[: card.index("\n---", 4)]
    assert "value: 0.8125" in index and "type: cross_entropy" in index
    for part in ("loss_soft", "0.125", "0.0625", "0.03125"):
        assert part not in index, part
    assert "loss_soft_teacher_a" in card  # still in the card's body
