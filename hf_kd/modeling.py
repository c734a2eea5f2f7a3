"""Loading models the Hugging Face way, and reading what the knowledge measures need from them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from hf_kd.teachers.finite import check_teacher_weights

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
"""Config fields that size a model's learned position table, in the order they are read."""


def looks_like_local_path(name_or_path: str) -> bool:
    """A path rather than a Hub id: starts with ., /, ~ or has more than one '/' separator."""
    return (
        name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or Path(name_or_path).exists()
    )


def check_model_source(field_name: str, name_or_path: str) -> None:
    """Fail before any expensive work when a local model directory does not exist or holds no model."""
    if looks_like_local_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{field_name}={name_or_path!r}: no such directory (expected a model saved with save_pretrained or a Hub id)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{field_name}={name_or_path!r} has no config.json: not a saved model directory"
            )


class DamagedWeightsError(ValueError):
    """A weights file that cannot be read whole (truncated by an interrupted copy, or damaged)."""


def check_weight_files(folder: str | os.PathLike) -> None:
    """Open the header of every ``*.safetensors`` file of a local ``folder`` (cheap: no tensor is read);
    one that is truncated or damaged raises :class:`DamagedWeightsError` naming the file, its size and
    safetensors' own reason, instead of a bare ``SafetensorError`` from deep inside the load."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise DamagedWeightsError(
                f"{str(path)!r} ({path.stat().st_size} bytes) is not a whole safetensors file ({error}): "
                "truncated or damaged (an interrupted copy, download or save?). Copy or save it again"
            ) from None


def load_pretrained(
    model_class, name_or_path: str, *, revision: str = "main", trust_remote_code: bool = False, **kwargs: Any
) -> PreTrainedModel:
    """``model_class.from_pretrained`` with safetensors weights only and remote code off unless asked; the
    weight files of a local folder are checked whole first (:func:`check_weight_files`)."""
    if Path(name_or_path).expanduser().is_dir():
        check_weight_files(Path(name_or_path).expanduser())
    return model_class.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )


class TeacherWeightsError(ValueError):
    """A teacher checkpoint that does not hold every weight of the model it is loaded as: the missing
    ones would be randomly initialised, and the student taught by noise."""


def load_teacher(
    task, name_or_path: str, *, revision: str = "main", trust_remote_code: bool = False, **init_kwargs: Any
) -> PreTrainedModel:
    """The teacher for ``task`` (its ``model_class``), frozen (:func:`freeze`), loaded by
    :func:`load_pretrained`: safetensors weights only, and model code from the Hub only when the user's
    ``trust_remote_code`` says so. ``init_kwargs``: further ``from_pretrained`` arguments (the
    config's ``teacher_model_init_kwargs``, e.g. ``dtype``).

    Refused (:class:`TeacherWeightsError`): a checkpoint missing weights of that model, or holding them at
    another shape (Transformers would initialise them at random: a causal LM loaded as a sequence
    classifier has no ``score.weight``); and (:class:`hf_kd.teachers.finite.NonFiniteTeacherError`) weights
    holding a NaN or an infinity."""
    model, info = load_pretrained(
        task.model_class(),
        name_or_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        **init_kwargs,
    )
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(
        f"{key} (checkpoint {list(old)}, model {list(new)})"
        for key, old, new in info.get("mismatched_keys") or ()
    )
    if missing or mismatched:
        found = [f"missing: {', '.join(missing)}"] if missing else []
        found += [f"at another shape: {', '.join(mismatched)}"] if mismatched else []
        raise TeacherWeightsError(
            f"the teacher {name_or_path!r} loaded as {type(model).__name__} (task={task.name!r}) lacks weights "
            f"of that model ({'; '.join(found)}): Transformers would initialise them at random and the student "
            "would learn noise. Use a teacher trained for this task (with its head and labels), e.g. a causal "
            "LM only for task=causal-lm"
        )
    check_teacher_weights(model, name_or_path)
    return freeze(model)


def config_from_dict(
    config: dict[str, Any], defaults: dict[str, Any] | None = None, **overrides: Any
) -> PretrainedConfig:
    """A model config from a dict with a ``model_type`` (``student_config``, to train from scratch);
    ``defaults`` fill the keys the dict leaves unset, ``overrides`` replace them."""
    config = {**(defaults or {}), **config, **overrides}
    if "model_type" not in config:
        raise ValueError(
            f"student_config needs a 'model_type' (e.g. 'bert', 'vit', 'llama'); got keys {sorted(config)}"
        )
    return AutoConfig.for_model(config.pop("model_type"), **config)


def tokenizer_sizes(processor: Any) -> dict[str, int]:
    """``vocab_size`` and ``pad_token_id`` of a model built for a tokenizer (nothing for an image
    processor; no pad id when the tokenizer has none)."""
    if not hasattr(processor, "get_vocab"):
        return {}
    sizes = {"vocab_size": len(processor)}
    if processor.pad_token_id is not None:
        sizes["pad_token_id"] = processor.pad_token_id
    return sizes


def check_model_fits(
    task, config: PretrainedConfig, role: str, *, processor: Any = None, max_length: int | None = None
) -> None:
    """Refuse, before any weights load, a model (``role``: 'student' or 'teacher') whose architecture
    has no head for ``task``, whose embedding has fewer rows than the tokenizer has tokens, or whose
    position table is shorter than ``max_length``."""
    model_class = task.model_class()
    mapping = getattr(model_class, "_model_mapping", None)
    fits = type(config) in mapping if mapping is not None else isinstance(config, model_class.config_class)
    if not fits:
        raise ValueError(
            f"the {role} is a {config.model_type!r} model, which has no head for task={task.name!r}: "
            f"pick a {role} built for that task, or the task of this {role}"
        )
    text = config.get_text_config()
    if hasattr(processor, "get_vocab") and getattr(text, "vocab_size", None) is not None:
        if text.vocab_size < len(processor):
            raise ValueError(
                f"the {role}'s vocab_size={text.vocab_size} is smaller than its tokenizer ({len(processor)} tokens): "
                f"token ids beyond {text.vocab_size - 1} have no embedding"
            )
    if max_length is None or hasattr(text, "rope_parameters"):  # rotary positions: no table to overflow
        return
    for name in POSITION_FIELDS:
        size = getattr(text, name, None)
        if isinstance(size, int):
            if size < max_length:
                raise ValueError(
                    f"max_length={max_length} is longer than the {role}'s position table ({name}={size}): "
                    f"lower max_length to at most {size}"
                )
            return


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: how a teacher is used."""
    model.eval()
    model.requires_grad_(False)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logit_layer_weight(model: PreTrainedModel) -> torch.Tensor:
    """Rows w_k of the layer that produces the logits (z_k = hᵀ w_k): ``lm_head`` for causal LMs, the
    last linear layer with ``num_labels`` outputs for classifiers."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        num_labels = model.config.num_labels
        linears = [
            m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels
        ]
        if not linears:
            raise ValueError(
                f"{type(model).__name__} has no linear layer with {num_labels} outputs to read class templates from"
            )
        head = linears[-1]
    return head.weight.detach()


def logit_layer_weight_or_none(
    model: torch.nn.Module, output_map: list[int] | None = None
) -> torch.Tensor | None:
    """:func:`logit_layer_weight` as float32 on the CPU, its rows reordered by ``output_map`` (a teacher's
    classes in the student's label order, see ``TeacherSignal.output_map``), or None when the model has
    no layer to read it from (the knowledge measures then fall back to soft confusion)."""
    try:
        weight = logit_layer_weight(model).float().cpu()
    except ValueError:
        return None
    return weight if output_map is None else weight[output_map]
