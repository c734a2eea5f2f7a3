"""Several teachers whose distributions cannot be averaged into one, because their vocabularies differ
(``teacher_source: mixture`` with teachers of other tokenizers; docs/knowledge.md#several-teachers).

Distributions over different vocabularies have no common support to average on, so the teachers are not
mixed: the soft term is the weighted sum of each teacher's own soft term,

    S = Σ_i w_i · S_i,      w_i ≥ 0, Σ_i w_i = 1,

with S_i what the loss computes for teacher i alone (routed: over the items that teacher teaches, each
item taught by one teacher, every w_i = 1) (a teacher of the student's tokenizer: Σ D(p_i^τ, q^τ)
over the soft items; one of another tokenizer: w_m · Σ D_matched + w_u · Σ U, ``hf_kd.losses.
cross_tokenizer``). Teachers of the student's tokenizer are still mixed first, in probability space, into
one part.

Why this is the same objective where both are defined: for the forward KL,

    Σ_i w_i KL(p_i ‖ q) = Σ_i w_i Σ_k p_ik log p_ik − Σ_k (Σ_i w_i p_ik) log q_k
                        = KL(p̄ ‖ q) + H(p̄) − Σ_i w_i H(p_i),      p̄ = Σ_i w_i p_i,

and the last two terms (the teachers' Jensen–Shannon spread) do not depend on the student: with one
vocabulary the two losses have exactly the same gradient with respect to the student's logits. Two
limits: this holds at τ = 1 only (the mixture mixes the teachers' τ = 1 distributions and then applies
τ to the mixture; the sum applies τ to each teacher, and softmax(log p̄ / τ) ≠ Σ_i w_i p_i^τ), and for
the forward KL only: for the other divergences Σ_i w_i D(p_i, q) and D(p̄, q) differ, and so do their
minimisers (Σ_i w_i KL(q ‖ p_i) is least at the normalised geometric mean Π_i p_i^{w_i}, KL(q ‖ p̄) at
p̄). The weighted sum is the one of the two that is defined across vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_kd.losses.cross_tokenizer import AlignedLogits
from hf_kd.losses.sparse import SparseLogits


@dataclass
class WeightedTeachers:
    """Several teachers' outputs over the same student items, each with its weight (see the module).

    Attributes:
        outputs: each teacher's output over the flattened items: dense logits [N, K], top-k
            :class:`SparseLogits` [N, k], or :class:`AlignedLogits` (a teacher of another tokenizer).
        weights: w_i > 0, one per output, summing to 1.
        names: each output's name (its part of the soft sum is logged as ``loss_soft_teacher_<name>``).
        rows: routing (each item taught by one teacher): per output, the items [N] bool it teaches, no item
            in two; every weight is then 1. None: every output teaches every item.
    """

    outputs: list[torch.Tensor | SparseLogits | AlignedLogits]
    weights: list[float]
    names: list[str]
    rows: list[torch.Tensor] | None = None

    def __post_init__(self):
        if not (len(self.outputs) == len(self.weights) == len(self.names)) or not self.outputs:
            raise ValueError(
                f"WeightedTeachers needs one weight and one name per output; got {len(self.outputs)} outputs, "
                f"{len(self.weights)} weights, {len(self.names)} names"
            )
        if self.rows is not None and (
            len(self.rows) != len(self.outputs) or any(w != 1 for w in self.weights)
        ):
            raise ValueError(
                f"WeightedTeachers with rows (routing) needs one row mask per output and every weight 1; got "
                f"{len(self.rows)} masks, weights={self.weights}"
            )
        if self.rows is None and (any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1) > 1e-6):
            raise ValueError(f"WeightedTeachers weights={self.weights}: expected numbers > 0 summing to 1")
