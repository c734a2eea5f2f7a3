"""Feature distillation: losses on hidden states and attention relations."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from hf_kd.config.checks import Group, check_at_least, check_choice
from hf_kd.config.docs import documented
from hf_kd.feature_losses import HIDDEN_LOSSES


@documented()
@dataclass
class FeatureArgs(Group):
    r"""Feature distillation (docs/knowledge.md#feature-distillation; an online teacher only)

    Parameters:
        hidden_loss (`str`, *optional*, defaults to `"none"`):
            A loss on hidden states added to the total: `"mse"` (TinyBERT: mean squared difference over the
            teacher's width) or `"cosine"` (DistilBERT: 1 − cosine), between each student layer and its
            teacher layer of `layer_mapping`, through a learned linear projection when the widths differ
            (trained with the student, not saved into it), on the positions that count (the attention
            mask; tokens with a target for a causal LM). `"none"`: off.
        hidden_weight (`float`, *optional*, defaults to `1.0`):
            Weight ≥ 0 of the hidden-state loss in the total (it is not scaled by α).
        layer_mapping (`dict`, `str` or `None`, *optional*, defaults to `None`):
            `{student_layer: teacher_layer}` (layer numbers count block outputs from 1; 0 is the
            embeddings); a string is read as YAML. `None`: student layer s ↦ teacher layer
            round(s · L_t / L_s), spread evenly over depth.
        attention_weight (`float`, *optional*, defaults to `0.0`):
            Weight ≥ 0 of MiniLM's last-layer self-attention distribution and value-relation KL; needs
            separate query/key/value projections of one width. 0: off.
        attention_relation_heads (`int`, *optional*, defaults to `1`):
            Relation heads R of the attention relations: both models' queries, keys and values are split
            into R heads, so their head counts may differ (R must divide both widths).
    """

    hidden_loss: str = "none"
    hidden_weight: float = 1.0
    layer_mapping: dict | str | None = None
    attention_weight: float = 0.0
    attention_relation_heads: int = 1

    def check(self) -> None:
        if isinstance(self.layer_mapping, str):
            self.layer_mapping = yaml.safe_load(self.layer_mapping)
        check_choice("hidden_loss", self.hidden_loss, HIDDEN_LOSSES)
        check_at_least("hidden_weight", self.hidden_weight, 0)
        check_at_least("attention_weight", self.attention_weight, 0)
        check_at_least("attention_relation_heads", self.attention_relation_heads, 1)
        if self.layer_mapping is not None and not isinstance(self.layer_mapping, dict):
            raise ValueError(
                f"layer_mapping={self.layer_mapping!r}: expected {{student_layer: teacher_layer}}"
            )

    @property
    def uses_features(self) -> bool:
        """Whether a feature loss is on (a hidden-state loss or the attention relations)."""
        return self.hidden_loss != "none" or self.attention_weight > 0
