"""Classification of plain feature vectors (e.g. the synthetic hierarchy task of ``hf_kd.data.hierarchy``).

The model is a small multilayer perceptron written as a ``PreTrainedModel``, so it trains, saves
(safetensors) and reloads like any Hugging Face classifier; its last linear layer is the logit layer
whose rows are the class templates of level 2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_kd.tasks.base import CACHE_PREFIX, NO_LABEL
from hf_kd.tasks.classification import ClassificationTask, to_label


class MLPClassifierConfig(PretrainedConfig):
    """``input_dim`` features → ``num_hidden_layers`` × (Linear(hidden_size) + GELU) → Linear(num_labels)."""

    model_type = "hf_kd_mlp"

    def __init__(
        self,
        input_dim: int = 32,
        hidden_size: int = 64,
        num_hidden_layers: int = 1,
        dropout: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if input_dim < 1 or hidden_size < 1 or num_hidden_layers < 0:
            raise ValueError(
                f"input_dim={input_dim}, hidden_size={hidden_size} must be ≥ 1 and num_hidden_layers={num_hidden_layers} ≥ 0"
            )
        self.input_dim, self.hidden_size, self.num_hidden_layers, self.dropout = (
            input_dim,
            hidden_size,
            num_hidden_layers,
            dropout,
        )


class MLPForFeatureClassification(PreTrainedModel):
    """Logits z = W h + b of an MLP over ``features`` [B, input_dim]; ``classifier`` is the logit layer."""

    config_class = MLPClassifierConfig
    base_model_prefix = "mlp"

    def __init__(self, config: MLPClassifierConfig):
        super().__init__(config)
        layers, width = [], config.input_dim
        for _ in range(config.num_hidden_layers):
            layers += [nn.Linear(width, config.hidden_size), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.hidden_size
        self.mlp = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, config.num_labels)
        self.post_init()

    @classmethod
    def from_config(cls, config: MLPClassifierConfig, **kwargs: Any) -> MLPForFeatureClassification:
        """A freshly initialised model, as ``AutoModel...from_config`` gives for the library's own models."""
        return cls._from_config(config, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=5**0.5)  # torch's default Linear init
            bound = 1 / module.in_features**0.5
            nn.init.uniform_(module.bias, -bound, bound)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> SequenceClassifierOutput:
        logits = self.classifier(self.mlp(features))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels, ignore_index=NO_LABEL)
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MLPClassifierConfig.model_type, MLPClassifierConfig, exist_ok=True)


class FeatureClassificationTask(ClassificationTask):
    """Rows hold a fixed-length float vector (``feature_column``) and a class label; no processor."""

    name = "feature-classification"
    needs_processor = False
    input_column = "features"

    def __init__(self, feature_column: str = "features", label_column: str = "label"):
        self.feature_column, self.label_column = feature_column, label_column

    def raw_columns(self) -> tuple[str, ...]:
        return (self.feature_column,)

    def model_class(self):
        return MLPForFeatureClassification

    def load_processor(self, name_or_path, *, revision="main", trust_remote_code=False):
        """Feature vectors are model inputs as they are: there is no processor."""
        return None

    def prepare(self, dataset, *, student_processor=None, teacher_processor=None):
        if self.feature_column not in dataset.column_names:
            raise ValueError(
                f"feature_column={self.feature_column!r} is not a column of the dataset; columns: {dataset.column_names}"
            )
        label_column = self.label_column

        def encode(rows):
            n = len(rows[self.feature_column])
            labels = [to_label(v) for v in rows[label_column]] if label_column in rows else [NO_LABEL] * n
            return {"features": rows[self.feature_column], "labels": labels}

        drop = [c for c in dataset.column_names if not c.startswith(CACHE_PREFIX) and c != "features"]
        return dataset.map(encode, batched=True, remove_columns=drop, desc="Reading features")

    def collate(self, features):
        batch = {
            "features": torch.tensor([f["features"] for f in features], dtype=torch.float32),
            "labels": self._collate_labels(features),
        }
        return self._collate_cache(features, batch)
