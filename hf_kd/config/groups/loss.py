"""The loss: its soft term (temperature, weight, divergence) and how it is computed (chunks, logits from hidden states)."""

from __future__ import annotations

from dataclasses import dataclass

from hf_kd.config.checks import Group, check_choice, check_range
from hf_kd.config.docs import documented
from hf_kd.losses import DIVERGENCES, TAIL_MODES


def temperature_value(value: float | str) -> float | str:
    """A temperature from YAML or the command line: a number, or ``"auto"``."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"temperature={value!r}: expected {temperature_value.expected}") from None
    return value


temperature_value.expected = "a number > 0 or 'auto'"  # what a recipe's refusal says it takes


@documented(DIVERGENCES=DIVERGENCES)
@dataclass
class LossArgs(Group):
    r"""Loss

    Parameters:
        temperature (`float` or `"auto"`, *optional*, defaults to `2.0`):
            Softmax temperature τ > 0 that divides both the teacher's and the student's logits in the
            soft term (the hard term uses τ = 1). `"auto"`: the run sets τ itself before its first step,
            by the pre-flight's τ rule (`hf_kd.knowledge.preflight.choose_temperature`) on the teacher's
            outputs over the first 512 training rows (4,096 positions of a causal LM): τ 1 unless the
            teacher is saturated (p_t > 0.99 on half the items), else the smallest of 2, 4 at which it
            puts at least a tenth of its mass off the true class. The chosen τ and why are logged and written in
            the model card and the run record. Measured against fixed-τ sweeps (3 seeds, BENCHMARKS.md
            "Before you train"): τ 1 was the best or within the seed spread of it on digits, two text
            tasks and a real-text LM, where logit standardisation at base τ 2 lost on a text task and the
            LM. See docs/knowledge.md#temperature-auto.
        logit_standardization (`bool`, *optional*, defaults to `False`):
            Z-score both models' logits per item before the soft term's softmax at `temperature` (Sun et
            al., CVPR 2024; each item's effective τ is `temperature`·σ(logits)). Needs a full row of
            teacher logits (online teacher or a full-logit cache); a top-k cache or a teacher of another
            tokenizer is refused. See docs/knowledge.md#logit-standardisation.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight α ∈ [0, 1] of the soft term: 0 is plain fine-tuning on labels, 1 the soft term only.
        divergence (`str`, *optional*, defaults to `"forward_kl"`):
            The soft term's divergence D, one of {DIVERGENCES} (the registry
            `hf_kd.losses.DIVERGENCE_REGISTRY`; docs/knowledge.md#divergences gives each formula).
            `"mse"` compares logits (the real teacher only).
        beta (`float`, *optional*, defaults to `0.5`):
            Interpolation β ∈ [0, 1] of the generalised `"jsd"`; 0 is forward KL, 1 reverse KL.
        skew (`float`, *optional*, defaults to `0.1`):
            Skew s ∈ (0, 1] of `"skew_kl"` and `"skew_rkl"` (DistiLLM).
        temperature_squared (`bool`, *optional*, defaults to `True`):
            Multiply the soft term by τ² (Hinton et al.), so that its gradient scale does not shrink as τ
            grows; `False` multiplies by 1.
        sparse_tail (`str`, *optional*, defaults to `"uniform"`):
            How a top-k (cached) teacher's left-out mass is used: `"uniform"` spreads it evenly over the
            other classes, `"renormalize"` drops it and rescales the top-k, `"bucket"` matches it as one
            outcome, `"sketch"` spreads it like the cache's low-rank sketch of the teacher's logits. See
            docs/knowledge.md#top-k-sparse-teachers.
        loss_chunk_size (`int` or `None`, *optional*, defaults to `None`):
            Compute the loss and its gradient this many items (token positions) at a time, with the same
            result, to bound memory for large vocabularies; `None` computes it in one piece.
        student_logits_from_hidden_states (`bool`, *optional*, defaults to `False`):
            causal-lm with `loss_chunk_size` only: the student's forward stops at its final hidden states
            and the loss makes its logits chunk by chunk through the output layer, so the
            [tokens × vocabulary] student logits never exist. Needs an output layer without bias; not with
            `compute_metrics`, FSDP or ZeRO-3.
        teacher_logits_from_hidden_states (`bool`, *optional*, defaults to `False`):
            causal-lm, online teacher of the student's tokenizer only: the teacher's forward stops at its
            final hidden states and the loss makes its logits chunk by chunk through its output layer, in
            the same pass as the student's, so the [tokens × vocabulary] teacher logits never exist either
            (`loss_chunk_size`, or the device's default: 512 positions at a 128k vocabulary on a GPU).
            Needs a teacher output layer without bias; not with a cached teacher, feature losses, a
            teacher of another tokenizer, or a teacher sharded by ZeRO-3.
    """

    temperature: float | str = 2.0
    logit_standardization: bool = False
    alpha: float = 0.5
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    temperature_squared: bool = True
    sparse_tail: str = "uniform"
    loss_chunk_size: int | None = None
    student_logits_from_hidden_states: bool = False
    teacher_logits_from_hidden_states: bool = False

    def check(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("beta", self.beta, 0.0, 1.0)
        check_range("skew", self.skew, 0.0, 1.0, low_open=True)
        self.temperature = temperature_value(self.temperature)
        if self.temperature != "auto" and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("sparse_tail", self.sparse_tail, TAIL_MODES)
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(
                f"loss_chunk_size={self.loss_chunk_size!r} must be a positive number of positions"
            )
        if self.student_logits_from_hidden_states and self.loss_chunk_size is None:
            raise ValueError(
                "student_logits_from_hidden_states: true needs loss_chunk_size (the positions per chunk of "
                "student logits made from the hidden states)"
            )
