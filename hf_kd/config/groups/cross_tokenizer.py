"""A teacher of another tokenizer: the weights of the exact and the approximate (ULD) parts."""

from __future__ import annotations

from dataclasses import dataclass

from hf_kd.config.checks import Group, check_at_least
from hf_kd.config.docs import documented


@documented()
@dataclass
class CrossTokenizerArgs(Group):
    r"""Different tokenizers (causal-lm; docs/knowledge.md#different-tokenizers)

    Parameters:
        cross_tokenizer_matched_weight (`float`, *optional*, defaults to `1.0`):
            When the teacher's tokenizer (`teacher_processor`, default the teacher's own) has another
            vocabulary than the student's, the soft term is `w_m · Σ D + w_u · Σ ULD`: this is w_m ≥ 0, the
            weight of the exact part, the divergence `divergence` on the tokens both vocabularies share, at
            the spans where both tokenizers cut the text into the same single token.
        cross_tokenizer_unmatched_weight (`float`, *optional*, defaults to `0.1`):
            w_u ≥ 0, the weight of the approximate part at every other aligned span: ULD, the L1 distance
            between the sorted next-token probability vectors of both models at the span's start (like
            TRL GOLD's `uld_hybrid_unmatched_weight`). Not both 0. Unused when the tokenizers agree. ULD
            matches only the shape of the sorted distribution: at weight 1 it hurt where a fifth of the
            spans were unmatched, at 0.1 it was neutral (docs/knowledge.md#different-tokenizers).
    """

    cross_tokenizer_matched_weight: float = 1.0
    cross_tokenizer_unmatched_weight: float = 0.1

    def check(self) -> None:
        check_at_least("cross_tokenizer_matched_weight", self.cross_tokenizer_matched_weight, 0)
        check_at_least("cross_tokenizer_unmatched_weight", self.cross_tokenizer_unmatched_weight, 0)
        if self.cross_tokenizer_matched_weight == 0 and self.cross_tokenizer_unmatched_weight == 0:
            raise ValueError(
                "cross_tokenizer_matched_weight and cross_tokenizer_unmatched_weight are both 0: a teacher with "
                "another tokenizer would teach nothing (set alpha: 0 for no teacher)"
            )
