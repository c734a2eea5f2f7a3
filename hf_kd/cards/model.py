"""The model card of a distilled student.

``render_model_card`` turns a :class:`DistillationCardInfo` into a ``huggingface_hub.ModelCard``:
YAML metadata (``base_model`` = the teacher, tags, datasets, pipeline tag, ``model-index`` results)
and a body that says how the student was made, how it compares with its teacher, what was
transferred and how to reproduce it. A run without a teacher gets an ordinary fine-tuning card.
``write_model_card`` writes it as ``README.md``; ``retitle_card`` names the student after the Hub
repository it is pushed to (``hf_kd.hub.push_student``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_kd.cards.markdown import code_block, field_table, format_value, markdown_table
from hf_kd.files import write_atomic
from hf_kd.redact import redact
from hf_kd.teachers.sources import TEACHER_SOURCES

PIPELINE_TAGS = {
    "text-classification": "text-classification",
    "image-classification": "image-classification",
    "causal-lm": "text-generation",
}
"""Hub ``pipeline_tag`` of each hf_kd task."""

SYNTHETIC_TARGETS = {
    "none": "no teacher: plain fine-tuning on the labels",
    "kd": "the teacher's own distribution (standard knowledge distillation)",
    "ls": "the uniform distribution, i.e. label smoothing (knowledge of the universe)",
    "kd_pt": "partial teacher: the teacher's probability of the true class, the rest spread uniformly "
    "(universe + instance knowledge)",
    "kd_sim": "class-similarity targets from the teacher's logit-layer weights (universe + domain knowledge)",
    "kd_topk": "the teacher's top-k probabilities, the remaining mass spread uniformly over the other classes",
}
"""What the student was pulled toward, per ``synthetic_teacher`` kind (``hf_kd.teachers.synthetic``)."""

_BOOKKEEPING_METRICS = {"runtime", "samples_per_second", "steps_per_second", "epoch"}
_NOT_RESULTS = {"loss", "loss_soft", "agreement"}
"""The training objective's values and the agreement with the teacher: in the card body, not in the
``model-index`` results (what the model scores on the data). The soft term's parts (``loss_soft_<part>``:
matched/unmatched spans, each teacher's share) are objective values too."""
_SOFT_PARTS = "loss_soft_"
_METRIC_PREFIX = re.compile(r"^(eval|test|predict)_")
METRIC_NAMES = {"loss_hard": "cross_entropy"}
"""Card names of logged measures: ``loss_hard`` is the mean cross-entropy on the labels (tokens for a LM)."""


def _installed_hf_kd_version() -> str:
    """The installed hf_kd version (read from package metadata, so no import cycle with hf_kd)."""
    return version("hf_kd")


@dataclass
class DistillationCardInfo:
    """Everything the model card of a distilled student says.

    Metric dicts map names to values as the Trainer reports them (``{"eval_accuracy": 0.95}``);
    the ``eval_``/``test_``/``predict_`` prefix is dropped in the card, and throughput bookkeeping
    (runtime, samples per second, epoch) is left out. Every optional field left as ``None`` (or
    empty) is omitted from the card.
    """

    student_id: str
    """Name or Hub repo id of the student."""
    teacher_id: str | None
    """Hub id (or local path) of the teacher; None: no teacher, an ordinary fine-tuning card."""
    task: str
    """hf_kd task: ``text-classification``, ``image-classification`` or ``causal-lm``."""
    divergence: str
    """Soft-term divergence, e.g. ``forward_kl``."""
    temperature: float | str
    """Softmax temperature τ applied to teacher and student logits (``"auto"`` until the run sets it)."""
    alpha: float
    """Weight α of the soft term; the hard-label term gets 1 − α."""
    teacher_revision: str | None = None
    datasets: list[str] = field(default_factory=list)
    """Dataset names: Hub ids go into the metadata, every name into the body."""
    eval_split: str | None = None
    """The split both models were evaluated on (``model-index`` results)."""
    student_source: str | None = None
    """The checkpoint the student started from (None: built from a config); a fine-tuning card's base."""
    student_init: str | None = None
    """How the student was initialised from the teacher's layers (``hf_kd.student_init``), or None."""
    feature_losses: str | None = None
    """The feature losses added to the logit terms (hidden states, attention relations), or None."""
    tokenizers: str | None = None
    """The two tokenizers of a teacher with another vocabulary (cross-tokenizer distillation), or None."""
    temperature_squared: bool = True
    """Whether the soft term was multiplied by τ²."""
    logit_standardization: bool = False
    """Whether both models' logits were z-scored before the softmax at τ."""
    temperature_auto: str | None = None
    """Why ``temperature: auto`` chose τ (the pre-flight's τ rule on the teacher's first training rows), or
    None for a τ set by the recipe."""
    synthetic_teacher: str | None = None
    """The run's ``synthetic_teacher`` kind (``ls``, ``kd_pt``, ``kd_sim``, ``kd_topk`` ...), or None
    (the teacher's own distribution)."""
    teacher_source: str = "online"
    """Where the teacher's outputs came from, one of ``hf_kd.teachers.sources.TEACHER_SOURCES``."""
    cache_provenance: dict[str, Any] | None = None
    """Metadata of the teacher cache (teacher id, revision, dataset fingerprint ...), or None."""
    teacher_metrics: dict[str, float] = field(default_factory=dict)
    student_metrics: dict[str, float] = field(default_factory=dict)
    teacher_parameters: int | None = None
    student_parameters: int | None = None
    knowledge_summary: str | None = None
    """Markdown summary of the three knowledge levels, or None."""
    command: str | None = None
    """The exact command line that trained the student."""
    recipe_yaml: str | None = None
    """The recipe YAML text used with the command."""
    hf_kd_version: str = field(default_factory=_installed_hf_kd_version)
    license: str | None = None
    outcome: str | None = None
    """Markdown: did KD pay against the no-KD twin (``hf_kd.knowledge.outcome``), the card's first section."""


def render_model_card(info: DistillationCardInfo) -> ModelCard:
    """Render the model card: Hub metadata and a readable body, absent values omitted."""
    sections = [
        _intro_section(info),
        _outcome_section(info),
        _method_section(info),
        _results_section(info),
        _knowledge_section(info),
        _reproduce_section(info),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{card_metadata(info).to_yaml()}\n---\n\n{body}\n")


def card_metadata(info: DistillationCardInfo) -> ModelCardData:
    """The card's YAML metadata; values that are not Hub ids (local paths) are left out. The student's
    final scores are its ``model-index`` results, each metric named in ``metrics`` has one."""
    results = _eval_results(info)
    base = info.teacher_id if info.teacher_id is not None else info.student_source
    distilled = ["knowledge-distillation"] if info.teacher_id is not None else []
    return ModelCardData(
        base_model=base if base is not None and _is_hub_id(base) else None,
        datasets=[name for name in info.datasets if _is_hub_id(name)] or None,
        tags=[*distilled, "hf_kd", info.task],
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(info.task),
        metrics=sorted({result.metric_type for result in results}) or None,
        license=info.license,
        model_name=info.student_id if results else None,
        eval_results=results or None,
    )


def _eval_results(info: DistillationCardInfo) -> list[EvalResult]:
    """The student's scores (not :data:`_NOT_RESULTS`, not bookkeeping) as ``model-index`` results on the first
    dataset; none without a dataset name. A local dataset is named by its folder."""
    if not info.datasets:
        return []
    dataset = info.datasets[0] if _is_hub_id(info.datasets[0]) else Path(info.datasets[0]).name
    scores = {_metric_name(key): value for key, value in info.student_metrics.items()}
    return [
        EvalResult(
            task_type=PIPELINE_TAGS.get(info.task, info.task),
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=info.eval_split,
            metric_type=name,
            metric_value=float(value),
        )
        for name, value in scores.items()
        if name not in _BOOKKEEPING_METRICS | _NOT_RESULTS
        and not name.startswith(_SOFT_PARTS)
        and isinstance(value, (int, float))
    ]


def write_model_card(info: DistillationCardInfo, output_dir: str | os.PathLike) -> Path:
    """Write the card as ``output_dir/README.md`` atomically (temp file in the same dir, then rename), every
    secret redacted (``hf_kd.redact.redact``)."""
    path = Path(output_dir) / "README.md"
    text = redact(str(render_model_card(info)))  # whatever field a secret came in by
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def retitle_card(path: Path, repo_id: str) -> None:
    """Name the student ``repo_id`` in the hf_kd card at ``path`` (its title and ``model-index`` name),
    so a folder pushed under another name is not titled by the folder. Other files are left alone."""
    if not path.is_file():
        return
    card = ModelCard.load(path)
    if "hf_kd" not in (card.data.tags or []):
        return
    if card.data.eval_results:
        card.data.model_name = repo_id
    body = re.sub(r"^# .*$", f"# {repo_id}", card.text, count=1, flags=re.MULTILINE)
    text = f"---\n{card.data.to_yaml()}\n---\n{body}"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


# -- card sections: each returns markdown, or "" when it has nothing to say -----------------------


def _intro_section(info: DistillationCardInfo) -> str:
    if info.teacher_id is None:
        start = f"from `{info.student_source}`" if info.student_source else "from a freshly built model"
        made = f"fine-tuned {start} on labelled data, without a teacher,"
    else:
        made = f"a student distilled from the teacher {_teacher_ref(info)}"
    return f"# {info.student_id}\n\nThis model is {made} with hf_kd {info.hf_kd_version}, for {info.task}."


def _outcome_section(info: DistillationCardInfo) -> str:
    return f"## Did distillation pay?\n\n{info.outcome.strip()}" if info.outcome else ""


def _method_section(info: DistillationCardInfo) -> str:
    lines = ["## How it was made", ""]
    if info.teacher_id is not None:
        lines.append(f"- **Teacher:** {_teacher_ref(info)}")
    if info.datasets:
        lines.append(f"- **Data:** {', '.join(f'`{name}`' for name in info.datasets)}")
    if info.student_init:
        lines.append(f"- **Student initialisation:** {info.student_init}")
    if info.feature_losses:
        lines.append(f"- **Feature losses:** {info.feature_losses}")
    if info.tokenizers:
        lines.append(f"- **Tokenizers:** {info.tokenizers}")
    soft = _soft_target(info)
    if soft is None:
        lines.append("- **Loss:** CE(labels, student): plain fine-tuning")
        return "\n".join(lines)
    scale = "τ² · " if info.temperature_squared else ""
    lines += [
        f"- **Loss:** (1 − α) · CE(labels, student) + α · {scale}D({soft}^τ ‖ student^τ)",
        f"- **Divergence D:** `{info.divergence}`",
        f"- **Temperature τ:** {_temperature(info)} (τ² scaling {'on' if info.temperature_squared else 'off'})",
        f"- **Alpha α:** {format_value(info.alpha)}",
    ]
    if info.synthetic_teacher is not None:
        meaning = SYNTHETIC_TARGETS.get(info.synthetic_teacher)
        lines.append(f"- **Target:** `{info.synthetic_teacher}`" + (f": {meaning}" if meaning else ""))
    if info.teacher_id is None:
        return "\n".join(lines)
    source = TEACHER_SOURCES.get(info.teacher_source)
    lines.append(
        f"- **Teacher signal:** {info.teacher_source}" + (f": {source.description}" if source else "")
    )
    if info.cache_provenance:
        lines += [
            "",
            "### Teacher cache",
            "",
            field_table(info.cache_provenance),
        ]
    return "\n".join(lines)


def _soft_target(info: DistillationCardInfo) -> str | None:
    """What the soft term pulled the student toward ("teacher", "uniform"), or None without one."""
    if info.alpha == 0 or info.synthetic_teacher == "none":
        return None
    return "uniform" if info.synthetic_teacher == "ls" else "teacher"


def _results_section(info: DistillationCardInfo) -> str:
    rows = _metric_rows(info.teacher_metrics, info.student_metrics)
    if info.teacher_parameters is not None or info.student_parameters is not None:
        rows.append(
            ["parameters", _format_count(info.teacher_parameters), _format_count(info.student_parameters)]
        )
    if not rows:
        return ""
    scored = info.eval_split and (info.teacher_metrics or info.student_metrics)
    split = f"On the `{info.eval_split}` split.\n\n" if scored else ""
    if info.teacher_id is None:  # no teacher column
        return f"## Results\n\n{split}{markdown_table(['', 'Score'], [[row[0], row[2]] for row in rows])}"
    text = f"## Results\n\n{split}{markdown_table(['', 'Teacher', 'Student'], rows)}"
    if info.teacher_parameters and info.student_parameters:
        ratio = info.teacher_parameters / info.student_parameters
        share = 100 * info.student_parameters / info.teacher_parameters
        text += f"\n\nCompression: {ratio:.2f}× fewer parameters than the teacher (the student is {share:.1f}% of its size)."
    return text


def _knowledge_section(info: DistillationCardInfo) -> str:
    if not info.knowledge_summary:
        return ""
    return f"## What was transferred\n\n{info.knowledge_summary.strip()}"


def _reproduce_section(info: DistillationCardInfo) -> str:
    parts = []
    if info.command:
        parts.append(f"Command:\n\n{code_block(redact(info.command), 'bash')}")
    if info.recipe_yaml:
        parts.append(f"Recipe:\n\n{code_block(redact(info.recipe_yaml), 'yaml')}")
    if not parts:
        return ""
    return "## Reproduce\n\n" + f"With hf_kd {info.hf_kd_version}.\n\n" + "\n\n".join(parts)


# -- formatting helpers ---------------------------------------------------------------------------


def _temperature(info: DistillationCardInfo) -> str:
    """τ as the run used it: a number, chosen by ``temperature: auto`` (with why), with or without logit
    standardisation (then a base τ)."""
    tau = format_value(info.temperature)
    if info.temperature_auto:
        tau = f"{tau}, set by `temperature: auto`: {info.temperature_auto}"
    return f"{tau} (the base τ of logit standardisation)" if info.logit_standardization else tau


def _teacher_ref(info: DistillationCardInfo) -> str:
    """The teacher as inline code, with its revision when known."""
    revision = f" (revision `{info.teacher_revision}`)" if info.teacher_revision else ""
    return f"`{info.teacher_id}`{revision}"


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub repo id (local paths are not)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _metric_name(key: str) -> str:
    """``eval_accuracy`` → ``accuracy``, ``eval_loss_hard`` → ``cross_entropy``."""
    name = _METRIC_PREFIX.sub("", key)
    return METRIC_NAMES.get(name, name)


def _metric_rows(teacher: dict[str, float], student: dict[str, float]) -> list[list[str]]:
    """One row per metric (teacher's first), with "—" where one side has no value."""
    teacher_values = {_metric_name(key): value for key, value in teacher.items()}
    student_values = {_metric_name(key): value for key, value in student.items()}
    names = dict.fromkeys([*teacher_values, *student_values])
    return [
        [name, format_value(teacher_values.get(name)), format_value(student_values.get(name))]
        for name in names
        if name not in _BOOKKEEPING_METRICS
    ]


def _format_count(count: int | None) -> str:
    """``4385920`` → ``4,385,920 (4.39M)``."""
    if count is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count:,} ({count / size:.3g}{unit})"
    return f"{count:,}"
