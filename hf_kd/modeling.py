"""Loading models the Hugging Face way, and reading what the knowledge measures need from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel


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


def load_pretrained(
    model_class, name_or_path: str, *, revision: str = "main", trust_remote_code: bool = False, **kwargs: Any
) -> PreTrainedModel:
    """``model_class.from_pretrained`` with safetensors weights only and remote code off unless asked."""
    return model_class.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )


def build_from_config(model_class, config: dict[str, Any], **overrides: Any) -> PreTrainedModel:
    """A freshly initialised model from a config dict with a ``model_type`` (to train a student from scratch)."""
    config = dict(config)
    if "model_type" not in config:
        raise ValueError(
            f"student_config needs a 'model_type' (e.g. 'bert', 'vit', 'llama'); got keys {sorted(config)}"
        )
    model_type = config.pop("model_type")
    return model_class.from_config(AutoConfig.for_model(model_type, **config, **overrides))


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


def logit_layer_weight_or_none(model: torch.nn.Module) -> torch.Tensor | None:
    """:func:`logit_layer_weight` as float32 on the CPU, or None when the model has no layer to read it
    from (the knowledge measures then fall back to soft confusion)."""
    try:
        return logit_layer_weight(model).float().cpu()
    except ValueError:
        return None
