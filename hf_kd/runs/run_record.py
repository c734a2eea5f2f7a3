"""A run's own record, ``run_record.json`` in its ``output_dir``: the recipe it ran (every data and model
field and the distillation settings a report needs) and its budget (optimizer steps, epochs, labelled and
unlabelled rows, inert rows dropped, parameter counts). With the Trainer's ``trainer_state.json`` and
``eval_results.json`` it is all that ``scripts/analyze.py`` needs to report on the run and compare it with
its no-KD twin, without the recipe file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from hf_kd.cards.model import DistillationCardInfo, write_model_card
from hf_kd.cards.run import with_latest_evaluation
from hf_kd.config import ARGUMENT_CLASSES
from hf_kd.files import write_atomic
from hf_kd.knowledge.facts import RunFacts
from hf_kd.redact import redact_value

RECORD_NAME = "run_record.json"

TRAINING_LOGS = ("learning_rate", "loss_hard", "loss_soft", "grad_norm_hard", "grad_norm_soft")
"""The distillation trainer's logged training measures a :class:`RunFacts` keeps."""

RECORDED_SETTINGS = (
    "alpha",
    "temperature",
    "temperature_squared",
    "logit_standardization",
    "divergence",
    "synthetic_teacher",
    "teacher_model_name_or_path",
    "teacher_model_revision",
    "teacher_source",
    "teacher_cache",
    "teachers",
    "teacher_routing_column",
    "hidden_loss",
    "hidden_weight",
    "layer_mapping",
    "attention_weight",
    "attention_relation_heads",
    "cross_tokenizer_matched_weight",
    "cross_tokenizer_unmatched_weight",
    "per_device_eval_batch_size",
    "seed",
    "output_dir",
    "use_cpu",
)
"""The ``DistillationConfig`` fields a run records (no token, no Hub settings)."""


def run_record(
    data_args,
    model_args,
    config,
    state,
    card: DistillationCardInfo,
    *,
    labelled_rows: int,
    unlabelled_rows: int,
    inert_rows_dropped: int,
) -> dict[str, Any]:
    """The record of a finished run: ``recipe`` (fields that rebuild its arguments), ``budget``, and
    ``card`` (the facts of its model card, to render it again with the outcome)."""
    recipe = asdict(data_args) | asdict(model_args) | {k: getattr(config, k) for k in RECORDED_SETTINGS}
    return {
        "recipe": recipe,
        "card": asdict(card),
        "budget": {
            "optimizer_steps": state.global_step,
            "epochs": float(state.epoch or 0.0),
            "batch_size": config.train_batch_size * config.gradient_accumulation_steps * config.world_size,
            "labelled_rows": labelled_rows,
            "unlabelled_rows": unlabelled_rows,
            "inert_rows_dropped": inert_rows_dropped,
            "student_parameters": card.student_parameters,
            "teacher_parameters": card.teacher_parameters,
        },
    }


def write_run_record(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """``output_dir/run_record.json``, written aside then renamed, every secret redacted
    (``hf_kd.redact.redact_value``: secret-named keys at any depth, credential-shaped strings)."""
    text = json.dumps(redact_value(record), indent=2)
    return write_atomic(Path(output_dir) / RECORD_NAME, lambda p: p.write_text(text))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a run folder, or a clear error naming what is missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: is {str(path.parent)!r} the output_dir of a finished hf_kd run?"
        )
    return json.loads(path.read_text())


def recipe_arguments(output_dir: str | Path) -> tuple:
    """The ``(DataArguments, ModelArguments, DistillationConfig)`` a run recorded."""
    recipe = read_json(Path(output_dir) / RECORD_NAME)["recipe"]
    if recipe.get("teacher_source") == "mixture" and "teachers" not in recipe:
        raise ValueError(
            f"{Path(output_dir) / RECORD_NAME} records teacher_source='mixture' without its teachers (a record "
            "written before teachers were recorded): analyse it with --config and the run's recipe"
        )
    return HfArgumentParser(ARGUMENT_CLASSES).parse_dict(recipe)


def read_run(output_dir: str | Path, metric: str = "eval_accuracy") -> RunFacts:
    """The :class:`RunFacts` of a finished run folder: its record, its final scores (``eval_results.json``;
    the teacher's as ``teacher_<metric>``) and its logged training losses (``trainer_state.json``)."""
    folder = Path(output_dir)
    record = read_json(folder / RECORD_NAME)
    state = read_json(folder / "trainer_state.json")
    results = read_json(folder / "eval_results.json") if (folder / "eval_results.json").is_file() else {}
    if results and metric not in results:
        raise ValueError(
            f"metric {metric!r} is not in {folder / 'eval_results.json'}: it has {sorted(results)}"
        )
    recipe, budget = record["recipe"], record["budget"]
    history = state.get("log_history", [])
    losses = tuple(
        {k: entry[k] for k in ("step", "loss", *TRAINING_LOGS) if k in entry}
        for entry in history
        if "loss" in entry
    )
    evaluated = {entry["step"]: entry[metric] for entry in history if metric in entry}  # final: once
    evals = tuple({"step": step, "metric": value} for step, value in sorted(evaluated.items()))
    return RunFacts(
        name=str(folder),
        seed=recipe["seed"],
        alpha=recipe["alpha"],
        temperature=recipe["temperature"],
        temperature_squared=recipe["temperature_squared"],
        metric=results.get(metric),
        teacher_metric=results.get(f"teacher_{metric}"),
        optimizer_steps=budget["optimizer_steps"],
        epochs=budget["epochs"],
        labelled_rows=budget["labelled_rows"],
        unlabelled_rows=budget["unlabelled_rows"],
        inert_rows_dropped=budget["inert_rows_dropped"],
        batch_size=budget["batch_size"],
        student_parameters=budget["student_parameters"],
        teacher_parameters=budget["teacher_parameters"],
        agreement=results.get("eval_agreement"),
        losses=losses,
        evals=evals,
    )


def write_outcome_card(output_dir: str | Path, outcome_markdown: str) -> Path:
    """Render the run's model card again (``README.md`` in ``output_dir``, written aside then renamed) with
    ``outcome_markdown`` as its first section; the weights and every other file are left as they are."""
    folder = Path(output_dir)
    record = read_json(folder / RECORD_NAME)
    state = read_json(folder / "trainer_state.json")
    info = with_latest_evaluation(DistillationCardInfo(**record["card"]), state.get("log_history", []))
    return write_model_card(replace(info, outcome=outcome_markdown), folder)
