"""The model card of a distilled student, and pushing the student to the Hugging Face Hub.

``render_model_card`` turns a :class:`DistillationCardInfo` into a ``huggingface_hub.ModelCard``:
YAML metadata (``base_model`` = the teacher, tags, datasets, pipeline tag, metric names) and a body
that says how the student was made, how it compares with its teacher, what was transferred and how
to reproduce it. ``write_model_card`` writes it as ``README.md``; ``push_student`` uploads a saved
student folder (weights, config, processor files, card) to a Hub repository.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_kd.files import write_atomic

logger = logging.getLogger(__name__)

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
"""What the student was pulled toward, per synthetic target kind (see docs/knowledge.md#synthetic-teachers)."""

TEACHER_SOURCES = {
    "online": "online: the teacher ran alongside the student at every step",
    "cached": "cached: the teacher's outputs were computed once and read back from a cache",
}

PUSH_IGNORE_PATTERNS = ("checkpoint-*", "teacher*")
"""Never uploaded by :func:`push_student`: Trainer checkpoints and any teacher file or folder."""

_BOOKKEEPING_METRICS = {"runtime", "samples_per_second", "steps_per_second", "epoch"}
_METRIC_PREFIX = re.compile(r"^(eval|test|predict)_")


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
    teacher_id: str
    """Hub id (or local path) of the teacher."""
    task: str
    """hf_kd task: ``text-classification``, ``image-classification`` or ``causal-lm``."""
    divergence: str
    """Soft-term divergence, e.g. ``forward_kl``."""
    temperature: float
    """Softmax temperature τ applied to teacher and student logits."""
    alpha: float
    """Weight α of the soft term; the hard-label term gets 1 − α."""
    teacher_revision: str | None = None
    datasets: list[str] = field(default_factory=list)
    """Dataset names: Hub ids go into the metadata, every name into the body."""
    temperature_squared: bool = True
    """Whether the soft term was multiplied by τ²."""
    synthetic_target: str | None = None
    """Synthetic target kind (``ls``, ``kd_pt``, ``kd_sim``, ``kd_topk`` ...), or None."""
    teacher_source: str = "online"
    """``online`` or ``cached``."""
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


def render_model_card(info: DistillationCardInfo) -> ModelCard:
    """Render the model card: Hub metadata and a readable body, absent values omitted."""
    sections = [
        _intro_section(info),
        _method_section(info),
        _results_section(info),
        _knowledge_section(info),
        _reproduce_section(info),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{card_metadata(info).to_yaml()}\n---\n\n{body}\n")


def card_metadata(info: DistillationCardInfo) -> ModelCardData:
    """The card's YAML metadata; values that are not Hub ids (local paths) are left out."""
    metric_names = {_metric_name(key) for key in (*info.teacher_metrics, *info.student_metrics)}
    return ModelCardData(
        base_model=info.teacher_id if _is_hub_id(info.teacher_id) else None,
        datasets=[name for name in info.datasets if _is_hub_id(name)] or None,
        tags=["knowledge-distillation", "hf_kd", info.task],
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(info.task),
        metrics=sorted(metric_names - _BOOKKEEPING_METRICS - {"loss"}) or None,
        license=info.license,
    )


def write_model_card(info: DistillationCardInfo, output_dir: str | os.PathLike) -> Path:
    """Write the card as ``output_dir/README.md`` atomically (temp file in the same dir, then rename)."""
    path = Path(output_dir) / "README.md"
    text = str(render_model_card(info))
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def push_student(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload student distilled with hf_kd",
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload the saved student folder in one commit.

    Uploads everything ``save_pretrained`` wrote (safetensors weights, config, processor files,
    ``README.md``) except :data:`PUSH_IGNORE_PATTERNS`. A ``revision`` other than a pull-request
    ref is created as a branch first. ``token`` is passed to huggingface_hub and never logged.
    Returns the commit info (a ``str`` subclass: the commit URL).
    """
    folder = Path(output_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the student with save_pretrained first")
    return upload_folder_to_repo(
        folder,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=list(PUSH_IGNORE_PATTERNS),
    )


def upload_folder_to_repo(
    folder: Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str,
    ignore_patterns: list[str] | None = None,
) -> CommitInfo:
    """Create ``repo_id`` (of ``repo_type``) if needed, create ``revision`` as a branch unless it is a
    pull-request ref, and upload ``folder`` in one commit. ``token`` is passed on, never logged."""
    api = HfApi()
    repo_url = api.create_repo(repo_id, repo_type=repo_type, token=token, private=private, exist_ok=True)
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_url.repo_id, branch=revision, repo_type=repo_type, token=token, exist_ok=True)
    logger.info("Pushing %s to %s %s (revision %s)", folder, repo_type, repo_url.repo_id, revision or "main")
    return api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=folder,
        repo_type=repo_type,
        commit_message=commit_message,
        token=token,
        revision=revision,
        ignore_patterns=ignore_patterns,
    )


# -- card sections: each returns markdown, or "" when it has nothing to say -----------------------


def _intro_section(info: DistillationCardInfo) -> str:
    return (
        f"# {info.student_id}\n\n"
        f"This model is a student distilled from the teacher {_teacher_ref(info)} "
        f"with hf_kd {info.hf_kd_version}, for {info.task}."
    )


def _method_section(info: DistillationCardInfo) -> str:
    scale = "τ² · " if info.temperature_squared else ""
    lines = [
        "## How it was made",
        "",
        f"- **Teacher → student:** {_teacher_ref(info)} → `{info.student_id}`",
    ]
    if info.datasets:
        lines.append(f"- **Data:** {', '.join(f'`{name}`' for name in info.datasets)}")
    lines += [
        f"- **Loss:** (1 − α) · CE(labels, student) + α · {scale}D(teacher^τ ‖ student^τ)",
        f"- **Divergence D:** `{info.divergence}`",
        f"- **Temperature τ:** {format_value(info.temperature)}"
        f" (τ² scaling {'on' if info.temperature_squared else 'off'})",
        f"- **Alpha α:** {format_value(info.alpha)}",
    ]
    if info.synthetic_target is not None:
        meaning = SYNTHETIC_TARGETS.get(info.synthetic_target)
        lines.append(f"- **Target:** `{info.synthetic_target}`" + (f": {meaning}" if meaning else ""))
    lines.append(f"- **Teacher signal:** {TEACHER_SOURCES.get(info.teacher_source, info.teacher_source)}")
    if info.cache_provenance:
        lines += [
            "",
            "### Teacher cache",
            "",
            markdown_table(["Field", "Value"], _provenance_rows(info.cache_provenance)),
        ]
    return "\n".join(lines)


def _results_section(info: DistillationCardInfo) -> str:
    rows = _metric_rows(info.teacher_metrics, info.student_metrics)
    if info.teacher_parameters is not None or info.student_parameters is not None:
        rows.append(
            ["parameters", _format_count(info.teacher_parameters), _format_count(info.student_parameters)]
        )
    if not rows:
        return ""
    text = f"## Results\n\n{markdown_table(['', 'Teacher', 'Student'], rows)}"
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
        parts.append(f"Command:\n\n{_code_block(info.command, 'bash')}")
    if info.recipe_yaml:
        parts.append(f"Recipe:\n\n{_code_block(info.recipe_yaml, 'yaml')}")
    if not parts:
        return ""
    return "## Reproduce\n\n" + f"With hf_kd {info.hf_kd_version}.\n\n" + "\n\n".join(parts)


# -- formatting helpers ---------------------------------------------------------------------------


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
    """``eval_accuracy`` → ``accuracy``."""
    return _METRIC_PREFIX.sub("", key)


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


def _provenance_rows(provenance: dict[str, Any]) -> list[list[str]]:
    """One row per cache metadata field that has a value."""
    return [[f"`{key}`", format_value(value)] for key, value in provenance.items() if value is not None]


def format_value(value: Any) -> str:
    """A readable cell: 4 significant digits for floats, JSON for containers, "—" for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value, sort_keys=True, default=str)}`"
    return str(value)


def _format_count(count: int | None) -> str:
    """``4385920`` → ``4,385,920 (4.39M)``."""
    if count is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count:,} ({count / size:.3g}{unit})"
    return f"{count:,}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; pipes and newlines in cells are escaped."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def _code_block(text: str, language: str) -> str:
    """A fenced code block whose fence is longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text.strip("\n")
    return f"{fence}{language}\n{body}\n{fence}"
