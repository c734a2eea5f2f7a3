"""On-policy distillation and sequence-level KD: sampling completions during training."""

from __future__ import annotations

from dataclasses import dataclass

from hf_kd.config.checks import Group, check_at_least, check_range
from hf_kd.config.docs import documented


@documented()
@dataclass
class OnPolicyArgs(Group):
    r"""On-policy distillation (causal-lm; TRL's names; docs in README "On-policy distillation")

    Parameters:
        lmbda (`float`, *optional*, defaults to `0.0`):
            Share λ ∈ [0, 1] of micro-batches whose completions the student samples from the batch's
            prompts, scored by the teacher token by token (GKD); 0 is off-policy KD on the data, 1 fully
            on-policy. Needs an online teacher and a soft term (`alpha` > 0; `alpha: 1` trains on the
            divergence only, as GKD). The coin is seeded: a run and its resumption draw the same.
        seq_kd (`bool`, *optional*, defaults to `False`):
            The micro-batches the student does not write get the teacher's sampled completions instead of
            the data's (sequence-level KD); needs an online teacher (with `alpha: 0` it is SFT on them).
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Most tokens sampled per completion.
        generation_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature (> 0) of generated completions; `temperature` stays the loss's τ.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1].
        top_k (`int`, *optional*, defaults to `0`):
            Sample among the k most likely tokens only; 0 keeps them all.
        log_completions (`bool`, *optional*, defaults to `False`):
            Append a few sampled completions per logging step, with the teacher's and the student's
            log-probability of each of their tokens, to `output_dir/completions.jsonl` (main process).
        num_completions_to_log (`int`, *optional*, defaults to `2`):
            With `log_completions`: completions written per logging step (≥ 1).
    """

    lmbda: float = 0.0
    seq_kd: bool = False
    max_new_tokens: int = 128
    generation_temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    log_completions: bool = False
    num_completions_to_log: int = 2

    def check(self) -> None:
        check_range("lmbda", self.lmbda, 0.0, 1.0)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive number of tokens")
        if not self.generation_temperature > 0:
            raise ValueError(
                f"generation_temperature={self.generation_temperature!r} must be > 0 (it samples; for the most "
                "likely token at every step, greedy, set top_k: 1)"
            )
        check_at_least("top_k", self.top_k, 0, " (0 keeps every token)")
        if self.log_completions and not self.generates:
            raise ValueError(
                "log_completions: true with lmbda=0 and seq_kd: false: nothing is sampled to log; set lmbda > 0 "
                "or seq_kd: true"
            )
        check_at_least("num_completions_to_log", self.num_completions_to_log, 1)

    @property
    def generates(self) -> bool:
        """Whether some completions are sampled during training (``lmbda`` > 0 or ``seq_kd``)."""
        return self.lmbda > 0 or self.seq_kd
