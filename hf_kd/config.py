"""Configuration: the distillation hyper-parameters (a ``TrainingArguments`` subclass), the model and
data arguments of ``scripts/distill.py``, and recipe parsing (YAML + command line, command line wins).
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from hf_kd.feature_losses import HIDDEN_LOSSES
from hf_kd.losses import DIVERGENCE_REGISTRY, DIVERGENCES, TAIL_MODES
from hf_kd.recipe import load_yaml, refuse, typed_recipe
from hf_kd.redact import redact, redact_value
from hf_kd.teachers.sources import TEACHER_SOURCES, TeacherSource, teacher_source
from hf_kd.teachers.synthetic import SYNTHETIC_KINDS

RESERVED_INIT_KWARGS = {"revision", "trust_remote_code", "use_safetensors"}
"""``from_pretrained`` arguments hf_kd sets itself (from its own fields), not through teacher_model_init_kwargs."""
NO_SPLIT = ("none", "null", "")
"""Values of eval_split that turn evaluation off (compared lower-case)."""
STUDENT_INITS = ("config", "teacher")
"""The values of ``student_init``: fresh weights from ``student_config``, or the teacher's own layers."""
TASKS = ("text-classification", "image-classification", "causal-lm", "feature-classification")


@dataclass
class DistillationConfig(TrainingArguments):
    r"""Training arguments of :class:`hf_kd.DistillationTrainer`.

    The loss is ``(1 − alpha) · CE(labels, student) + alpha · s · D(teacher^τ, student^τ)`` with
    τ = ``temperature``, D = ``divergence`` and s = τ² when ``temperature_squared`` is on
    (docs/knowledge.md#the-distillation-loss). The fields below are the ones this class adds; every
    other field is a ``transformers.TrainingArguments`` field.

    Parameters:
        > Teacher

        teacher_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            The teacher: a Hub model id or a local directory. Not needed when `alpha` is 0, when
            `synthetic_teacher` is `"none"` or `"ls"`, or when the teacher is cached.
        teacher_model_revision (`str`, *optional*, defaults to `"main"`):
            Revision (branch, tag or commit) of `teacher_model_name_or_path`.
        teacher_model_init_kwargs (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Extra keyword arguments of the teacher's `from_pretrained`, e.g. `{"dtype": "bfloat16"}`; a
            string is read as YAML. `revision`, `trust_remote_code` and `use_safetensors` are refused here
            (set by `teacher_model_revision`, `trust_remote_code`, and always safetensors).
        teacher_cpu_offload (`bool`, *optional*, defaults to `False`):
            Keep the online teacher's weights in CPU memory and move them to the device layer by layer
            (`hf_kd.teachers.placement`).
        teacher_source (`str`, *optional*, defaults to `"online"`):
            Where the teacher's logits come from, a source registered in `hf_kd.teachers.sources`:
            `"online"` (the teacher runs at every step), `"cached"` (read from `teacher_cache`), `"served"`
            (asked of a server speaking vLLM's API: `teacher_options`) or `"mixture"` (several `teachers`).
        teacher_options (`dict`, `str` or `None`, *optional*, defaults to `None`):
            The options of `teacher_source`, as its registry entry names them; a string is read as YAML.
        teachers (`list`, `str` or `None`, *optional*, defaults to `None`):
            With `teacher_source="mixture"`: the teachers, each `{name, source, weight, model, revision, cache,
            options}` (`hf_kd.teachers.mixture`); a string is read as YAML.
        teacher_routing_column (`str` or `None`, *optional*, defaults to `None`):
            With `teacher_source="mixture"`: a dataset column naming each example's teacher; each example is
            then taught by that teacher alone instead of the weighted mixture.
        teacher_cache (`str` or `None`, *optional*, defaults to `None`):
            With `teacher_source="cached"`: a local cache directory or a Hub dataset id written by
            `scripts/cache_teacher.py`.
        teacher_label_mapping (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Teacher label name → student label name, when the two label lists differ in order or naming;
            a string is read as YAML.

        > Loss

        temperature (`float` or `"auto"`, *optional*, defaults to `2.0`):
            Softmax temperature τ > 0 that divides both the teacher's and the student's logits in the
            soft term (the hard term uses τ = 1). `"auto"` sets it per item: logit standardisation (Sun
            et al., CVPR 2024), each item's logits z-scored before the softmax at the base τ
            `AUTO_BASE_TEMPERATURE` = 2, so its effective τ is 2·σ(logits) — the same as
            `logit_standardization: true` with `temperature: 2`, which is what the parsed config holds.
            Needs a full row of teacher logits (online teacher or a full-logit cache); a top-k cache or a
            teacher of another tokenizer is refused. See docs/knowledge.md#logit-standardisation.
        logit_standardization (`bool`, *optional*, defaults to `False`):
            Z-score both models' logits per item before the soft term's softmax at `temperature`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight α ∈ [0, 1] of the soft term: 0 is plain fine-tuning on labels, 1 the soft term only.
        divergence (`str`, *optional*, defaults to `"forward_kl"`):
            The soft term's divergence D, a name of the registry `hf_kd.losses.DIVERGENCE_REGISTRY` (the
            `--help` text lists them; docs/knowledge.md#divergences gives each formula). `"mse"` compares
            logits (the real teacher only).
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
            final hidden states and the loss makes its logits chunk by chunk through its output layer, in the
            same pass as the student's, so the [tokens × vocabulary] teacher logits never exist either
            (`loss_chunk_size`, or the device's default: 512 positions at a 128k vocabulary on a GPU). Needs
            a teacher output layer without bias; not with a cached teacher, feature losses, a teacher of
            another tokenizer, or a teacher sharded by ZeRO-3.

        > Different tokenizers (causal-lm; docs/knowledge.md#different-tokenizers)

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

        > Synthetic teachers (docs/knowledge.md#synthetic-teachers)

        synthetic_teacher (`str`, *optional*, defaults to `"kd"`):
            The target distilled: `"kd"` (the teacher's own distribution), or a synthetic teacher that
            keeps only some knowledge levels: `"none"` (α = 0, labels only), `"ls"` (uniform: label
            smoothing), `"kd_pt"` (the teacher's p_t with a uniform tail), `"kd_sim"` (class-similarity
            targets) or `"kd_topk"` (the teacher's top-k with a uniform tail).
        synthetic_topk (`float` or `None`, *optional*, defaults to `None`):
            k of `synthetic_teacher="kd_topk"` (required there): a whole count ≥ 1, or a fraction of the
            classes in (0, 1).
        synthetic_sim_temperature (`float`, *optional*, defaults to `1.0`):
            β > 0 of `synthetic_teacher="kd_sim"`: the target is softmax(S[t] / β), S the teacher's class
            similarity.

        > Feature distillation (docs/knowledge.md#feature-distillation; an online teacher only)

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

        > On-policy distillation (causal-lm; TRL's names; docs in README "On-policy distillation")

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

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a Hub model id or a local directory (not needed when alpha = 0 or the teacher is cached)."
        },
    )
    teacher_model_revision: str = field(
        default="main", metadata={"help": "Teacher revision (branch, tag or commit)."}
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra keyword arguments of the teacher's `from_pretrained`, e.g. {'dtype': 'bfloat16'}."
        },
    )
    teacher_cpu_offload: bool = field(
        default=False,
        metadata={
            "help": "Keep the online teacher's weights in CPU memory, moved to the device layer by layer (see hf_kd.teachers.placement)."
        },
    )
    teacher_source: str = field(
        default="online",
        metadata={
            "help": "Where the teacher's logits come from: a source of hf_kd.teachers.sources ('online': run "
            "the teacher each step; 'cached'; 'served'; 'mixture')."
        },
    )
    teacher_options: dict | str | None = field(
        default=None,
        metadata={"help": "The options of teacher_source (see its entry in hf_kd.teachers.sources)."},
    )
    teachers: list | str | None = field(
        default=None,
        metadata={
            "help": "teacher_source='mixture': the teachers, each {name, source, weight, model, cache, options}."
        },
    )
    teacher_routing_column: str | None = field(
        default=None,
        metadata={"help": "teacher_source='mixture': a column naming each example's teacher (routing)."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "With teacher_source='cached': a local cache directory or a Hub dataset id (see scripts/cache_teacher.py)."
        },
    )
    temperature: float | str = field(
        default=2.0,
        metadata={
            "help": "Softmax temperature τ > 0 applied to both teacher and student logits, or 'auto' (logit "
            "standardisation at base τ 2)."
        },
    )
    logit_standardization: bool = field(
        default=False,
        metadata={
            "help": "Z-score both models' logits per item before the soft term's softmax (Sun et al. 2024)."
        },
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the soft (teacher) term in [0, 1]: 0 = plain fine-tuning on labels, 1 = soft term only."
        },
    )
    divergence: str = field(
        default="forward_kl", metadata={"help": f"Soft-term divergence, one of {DIVERGENCES}."}
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Interpolation β in [0, 1] of the generalized 'jsd' (0 = forward KL, 1 = reverse KL)."
        },
    )
    skew: float = field(
        default=0.1, metadata={"help": "Skew s in (0, 1] of 'skew_kl' / 'skew_rkl' (DistiLLM)."}
    )
    temperature_squared: bool = field(
        default=True,
        metadata={
            "help": "Multiply the soft term by τ² (Hinton et al.) so its gradient scale does not shrink with τ."
        },
    )
    synthetic_teacher: str = field(
        default="kd",
        metadata={
            "help": f"Target distilled, one of {SYNTHETIC_KINDS}: the real teacher ('kd') or one of the paper's synthetic teachers."
        },
    )
    synthetic_topk: float | None = field(
        default=None,
        metadata={
            "help": "k of synthetic_teacher='kd_topk': a count (≥ 1) or a fraction of the classes (< 1)."
        },
    )
    synthetic_sim_temperature: float = field(
        default=1.0,
        metadata={
            "help": "β of synthetic_teacher='kd_sim': the target is softmax(S[t] / β), S the teacher's class similarity."
        },
    )
    sparse_tail: str = field(
        default="uniform",
        metadata={
            "help": f"How a top-k teacher's left-out mass is treated, one of {TAIL_MODES}: uniform spreads it "
            "evenly over the other classes, renormalize drops it, bucket matches it as one outcome to the "
            "student's own mass outside the kept tokens (no shape imposed on the tail; best for flat teachers, "
            "where temperature 1 and alpha 0.8 measured best from a cache), sketch spreads it like the low-rank "
            "sketch of the teacher's logits that a cache captured with sketch_rank > 0 stores."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Compute the loss this many positions at a time (bounds memory for large vocabularies)."
        },
    )
    student_logits_from_hidden_states: bool = field(
        default=False,
        metadata={
            "help": "causal-lm, with loss_chunk_size: the student's forward stops at its final hidden states and "
            "the loss makes its logits chunk by chunk through the output layer, so the [tokens × vocab] "
            "student logits never exist (output layer without bias; no compute_metrics, FSDP or ZeRO-3)."
        },
    )
    teacher_logits_from_hidden_states: bool = field(
        default=False,
        metadata={
            "help": "causal-lm, online teacher of the student's tokenizer: the teacher's forward stops at its final "
            "hidden states and the loss makes its logits chunk by chunk, so the [tokens × vocab] teacher logits "
            "never exist (output layer without bias; no cached teacher, feature losses or ZeRO-3)."
        },
    )
    cross_tokenizer_matched_weight: float = field(
        default=1.0,
        metadata={
            "help": "Teacher with another tokenizer: weight ≥ 0 of the exact part (the divergence on shared "
            "tokens at spans of one identical token each side)."
        },
    )
    cross_tokenizer_unmatched_weight: float = field(
        default=0.1,
        metadata={
            "help": "Teacher with another tokenizer: weight ≥ 0 of the ULD part (sorted-probability L1 at the "
            "other aligned spans, between both models' distributions at the span's start)."
        },
    )
    hidden_loss: str = field(
        default="none",
        metadata={
            "help": f"Hidden-state loss, one of {HIDDEN_LOSSES}: mse (TinyBERT) or cosine (DistilBERT) between "
            "mapped student and teacher layers, through a learned projection when widths differ."
        },
    )
    hidden_weight: float = field(default=1.0, metadata={"help": "Weight ≥ 0 of the hidden-state loss."})
    layer_mapping: dict | str | None = field(
        default=None,
        metadata={
            "help": "{student_layer: teacher_layer} of the hidden loss (0 = embeddings); default: spread evenly over depth."
        },
    )
    attention_weight: float = field(
        default=0.0,
        metadata={"help": "Weight ≥ 0 of MiniLM's last-layer attention and value-relation KL (0: off)."},
    )
    attention_relation_heads: int = field(
        default=1,
        metadata={"help": "Relation heads of the attention relations (must divide both models' widths)."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Resume training: true = from the latest complete checkpoint-N in output_dir, or a checkpoint path."
        },
    )
    teacher_label_mapping: dict | str | None = field(
        default=None,
        metadata={
            "help": "Maps teacher label names to student label names when the two label lists differ in order or naming."
        },
    )

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Share in [0, 1] of micro-batches whose completions the student samples, scored by the "
            "teacher (on-policy KD, GKD); 0 = off-policy KD on the data. causal-lm, online teacher, alpha > 0."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "The micro-batches the student does not write get the teacher's sampled completions "
            "instead of the data's (sequence-level KD); needs an online teacher."
        },
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "On-policy / seq_kd: most tokens sampled per completion."}
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={
            "help": "On-policy / seq_kd: sampling temperature (> 0); `temperature` stays the loss's τ."
        },
    )
    top_p: float = field(
        default=1.0, metadata={"help": "On-policy / seq_kd: nucleus sampling mass in (0, 1] (1 = off)."}
    )
    top_k: int = field(
        default=0, metadata={"help": "On-policy / seq_kd: sample among the k most likely tokens (0 = all)."}
    )
    log_completions: bool = field(
        default=False,
        metadata={
            "help": "On-policy / seq_kd: append a few sampled completions per logging step, with the teacher's "
            "and the student's per-token log-probs, to output_dir/completions.jsonl."
        },
    )
    num_completions_to_log: int = field(
        default=2, metadata={"help": "With log_completions: completions written per logging step (≥ 1)."}
    )

    def __post_init__(self) -> None:
        check_finite(self)
        super().__post_init__()
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = yaml.safe_load(self.teacher_model_init_kwargs)
        reserved = sorted(set(self.teacher_model_init_kwargs or {}) & RESERVED_INIT_KWARGS)
        if reserved:
            raise ValueError(
                f"teacher_model_init_kwargs sets {reserved}: use the fields teacher_model_revision and "
                "trust_remote_code instead (weights always load as safetensors)"
            )
        if isinstance(self.teacher_label_mapping, str):
            self.teacher_label_mapping = yaml.safe_load(self.teacher_label_mapping)
        if isinstance(self.layer_mapping, str):
            self.layer_mapping = yaml.safe_load(self.layer_mapping)
        if isinstance(self.teacher_options, str):
            self.teacher_options = yaml.safe_load(self.teacher_options)
        if self.teacher_options is not None and not isinstance(self.teacher_options, dict):
            raise ValueError(
                f"teacher_options={self.teacher_options!r}: expected a mapping of option → value"
            )
        if isinstance(self.teachers, str):
            self.teachers = yaml.safe_load(self.teachers)
        _check_choice("teacher_source", self.teacher_source, tuple(TEACHER_SOURCES))
        if (self.teachers or self.teacher_routing_column) and self.teacher_source != "mixture":
            raise ValueError(
                f"teachers / teacher_routing_column are read with teacher_source: mixture, not {self.teacher_source!r}"
            )
        self._check_feature_losses()
        self.resume_from_checkpoint = _resume_flag(self.resume_from_checkpoint)
        _check_range("alpha", self.alpha, 0.0, 1.0)
        _check_range("beta", self.beta, 0.0, 1.0)
        _check_range("skew", self.skew, 0.0, 1.0, low_open=True)
        self.temperature = temperature_value(self.temperature)
        if self.temperature == "auto":
            self.temperature, self.logit_standardization = AUTO_BASE_TEMPERATURE, True
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check_choice("synthetic_teacher", self.synthetic_teacher, SYNTHETIC_KINDS)
        _check_choice("sparse_tail", self.sparse_tail, TAIL_MODES)
        if self.synthetic_teacher == "kd_topk" and (self.synthetic_topk is None or self.synthetic_topk <= 0):
            raise ValueError(
                f"synthetic_topk={self.synthetic_topk!r}: synthetic_teacher='kd_topk' needs a k > 0"
            )
        if not self.synthetic_sim_temperature > 0:
            raise ValueError(f"synthetic_sim_temperature={self.synthetic_sim_temperature!r} must be > 0")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(
                f"loss_chunk_size={self.loss_chunk_size!r} must be a positive number of positions"
            )
        if self.student_logits_from_hidden_states and self.loss_chunk_size is None:
            raise ValueError(
                "student_logits_from_hidden_states: true needs loss_chunk_size (the positions per chunk of "
                "student logits made from the hidden states)"
            )
        if self.teacher_logits_from_hidden_states and self.teacher_source == "cached":
            raise ValueError(
                "teacher_logits_from_hidden_states: true needs an online teacher; teacher_source='cached' "
                "stores top-k logits, not hidden states"
            )
        for name in ("cross_tokenizer_matched_weight", "cross_tokenizer_unmatched_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be ≥ 0")
        if self.cross_tokenizer_matched_weight == 0 and self.cross_tokenizer_unmatched_weight == 0:
            raise ValueError(
                "cross_tokenizer_matched_weight and cross_tokenizer_unmatched_weight are both 0: a teacher with "
                "another tokenizer would teach nothing (set alpha: 0 for no teacher)"
            )
        self.source.check_config(self)
        self._check_generation()
        if DIVERGENCE_REGISTRY[self.divergence].on_logits and self.synthetic_teacher not in ("kd", "none"):
            raise ValueError(
                f"divergence={self.divergence!r} compares logits; synthetic_teacher={self.synthetic_teacher!r} gives probabilities"
            )

    def _check_feature_losses(self) -> None:
        """The feature-distillation fields, checked before anything loads."""
        _check_choice("hidden_loss", self.hidden_loss, HIDDEN_LOSSES)
        for name in ("hidden_weight", "attention_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be ≥ 0")
        if self.attention_relation_heads < 1:
            raise ValueError(f"attention_relation_heads={self.attention_relation_heads!r} must be ≥ 1")
        if self.layer_mapping is not None and not isinstance(self.layer_mapping, dict):
            raise ValueError(
                f"layer_mapping={self.layer_mapping!r}: expected {{student_layer: teacher_layer}}"
            )
        if not self.uses_features:
            return
        if not self.uses_teacher:
            raise ValueError(
                f"hidden_loss / attention_weight need the teacher: alpha={self.alpha} with "
                f"synthetic_teacher={self.synthetic_teacher!r} runs none (use alpha > 0 and a teacher-based target)"
            )
        if not self.source.gives_features:
            raise ValueError(
                f"hidden_loss / attention_weight read the teacher's hidden states, which a {self.teacher_source} "
                f"teacher does not have: use teacher_source: {_sources_that('gives_features')}"
            )
        for name in ("student_logits_from_hidden_states", "teacher_logits_from_hidden_states"):
            if getattr(self, name):
                raise ValueError(f"hidden_loss / attention_weight are not supported with {name}")

    def __getstate__(self) -> dict[str, Any]:
        """The pickled state (``training_args.bin``, written next to every saved student) without any
        secret (``hf_kd.redact.redact_value``): ``hub_token`` and every secret-named key at any depth
        (``teacher_model_init_kwargs: {token: …}``) become None, credential-shaped strings ``<redacted>``.
        A secret never reaches a file or the Hub (a ``copy.deepcopy`` has none either)."""
        return redact_value({**self.__dict__, "hub_token": None}, (self.hub_token,), replacement=None)

    def to_dict(self) -> dict[str, Any]:
        """``TrainingArguments.to_dict`` (what ``str(config)``, logs and integrations show) with every secret
        redacted (``hf_kd.redact.redact_value``)."""
        return redact_value(super().to_dict(), (self.hub_token,))

    def __repr__(self) -> str:
        """``TrainingArguments``' listing of every field, every secret redacted (``hf_kd.redact.redact``)."""
        return redact(TrainingArguments.__str__(self), (self.hub_token,))

    __str__ = __repr__

    def _check_generation(self) -> None:
        """The on-policy fields: ranges, and a teacher that can score (or write) new tokens."""
        _check_range("lmbda", self.lmbda, 0.0, 1.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive number of tokens")
        if not self.generation_temperature > 0:
            raise ValueError(
                f"generation_temperature={self.generation_temperature!r} must be > 0 (it samples; for the most "
                "likely token at every step, greedy, set top_k: 1)"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be ≥ 0 (0 keeps every token)")
        if self.log_completions and not self.generates:
            raise ValueError(
                "log_completions: true with lmbda=0 and seq_kd: false: nothing is sampled to log; set lmbda > 0 "
                "or seq_kd: true"
            )
        if self.num_completions_to_log < 1:
            raise ValueError(f"num_completions_to_log={self.num_completions_to_log!r} must be ≥ 1")
        if (self.lmbda > 0 and not self.source.scores_samples) or (
            self.seq_kd and not self.source.loads_model
        ):
            raise ValueError(
                f"lmbda={self.lmbda} / seq_kd={self.seq_kd} with teacher_source={self.teacher_source!r}: a "
                f"{self.teacher_source} teacher cannot score (or write) newly sampled tokens; use teacher_source: "
                f"{_sources_that('scores_samples' if self.lmbda > 0 else 'loads_model')}, or lmbda: 0 and seq_kd: false"
            )
        if self.lmbda > 0 and not self.uses_teacher:
            raise ValueError(
                f"lmbda={self.lmbda} with alpha={self.alpha} and synthetic_teacher={self.synthetic_teacher!r}: "
                "on the student's own samples only the teacher's soft term teaches anything; set alpha > 0 "
                "with synthetic_teacher: kd"
            )

    @property
    def generates(self) -> bool:
        """Whether some completions are sampled during training (``lmbda`` > 0 or ``seq_kd``)."""
        return self.lmbda > 0 or self.seq_kd

    @property
    def source(self) -> TeacherSource:
        """The registered teacher source ``teacher_source`` names (``hf_kd.teachers.sources``)."""
        return teacher_source(self.teacher_source)

    @property
    def needs_teacher_model(self) -> bool:
        """Whether the run loads the teacher's weights (a source that does, like ``online``): for the soft
        term, or to write completions."""
        return self.source.loads_model and (self.uses_teacher or self.seq_kd)

    @property
    def uses_teacher(self) -> bool:
        """Whether the soft term is on (alpha > 0 and a teacher-based target)."""
        return self.alpha > 0 and self.synthetic_teacher not in ("none", "ls")

    @property
    def uses_features(self) -> bool:
        """Whether a feature loss is on (a hidden-state loss or the attention relations)."""
        return self.hidden_loss != "none" or self.attention_weight > 0


def check_finite(arguments: Any) -> None:
    """Refuse inf and nan in every float field of an argument dataclass, naming the field and value."""
    for f in fields(arguments):
        value = getattr(arguments, f.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value!r}: expected a finite number")


def _resume_flag(value: str | bool | None) -> str | bool | None:
    """``resume_from_checkpoint`` as ``Trainer.train`` takes it: "true" (command line) or true (recipe) →
    True (the latest checkpoint), "false"/false/"" → None, anything else a checkpoint path."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        value = value.strip().lower() == "true"
    return value or None


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if not (low < value <= high if low_open else low <= value <= high):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value!r} is out of range: expected a number in {bracket}{low}, {high}]")


def _sources_that(capability: str) -> str:
    """The registered teacher sources with ``capability`` (a flag of ``TeacherSource``), as a recipe names them."""
    return " or ".join(name for name, source in TEACHER_SOURCES.items() if getattr(source, capability))


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


@dataclass
class ModelArguments:
    """The student model and the processors (``scripts/distill.py``).

    Parameters:
        student_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            The student: a Hub model id or a local directory. One of it and `student_config` is required.
        student_model_revision (`str`, *optional*, defaults to `"main"`):
            Revision (branch, tag or commit) of `student_model_name_or_path`.
        student_config (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Build the student from this model config instead, untrained (e.g.
            `{"model_type": "vit", "hidden_size": 32, ...}`); a string is read as YAML.
        student_processor (`str` or `None`, *optional*, defaults to `None`):
            The student's tokenizer or image processor (Hub id or directory); `None`: the student model's own.
        teacher_processor (`str` or `None`, *optional*, defaults to `None`):
            The teacher's tokenizer or image processor; `None`: the teacher model's own. For a causal LM,
            a tokenizer with another vocabulary than the student's makes the run a cross-tokenizer one
            (docs/knowledge.md#different-tokenizers): the teacher reads the same text through it.
        teacher_tokenizer (`str` or `None`, *optional*, defaults to `None`):
            Another name for `teacher_processor`, for causal LMs (the teacher's tokenizer); set one of them.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow model (and metric) code from the Hub. Leave it off unless you trust the repository.
        student_init (`str`, *optional*, defaults to `"config"`):
            How the student starts when it is not a checkpoint: `"config"` (fresh weights from
            `student_config`) or `"teacher"` (a copy of the teacher keeping only the layers
            `student_layers` / every `every_k`-th one, with its embeddings, head and norms: DistilBERT's
            initialisation; `hf_kd.student_init`). The teacher's labels must be the dataset's, in order.
        student_layers (`list[int]` or `None`, *optional*, defaults to `None`):
            With `student_init="teacher"`: the teacher layers kept (0-based, increasing), e.g. `[0, 2, 4]`.
        every_k (`int` or `None`, *optional*, defaults to `None`):
            With `student_init="teacher"`: keep teacher layers 0, k, 2k, ... instead of `student_layers`.
    """

    student_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Student: a Hub model id or local directory (or use student_config to train from scratch)."
        },
    )
    student_model_revision: str = field(default="main", metadata={"help": "Student revision."})
    student_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Build the student from this config instead (e.g. {'model_type': 'vit', 'hidden_size': 32, ...})."
        },
    )
    student_processor: str | None = field(
        default=None,
        metadata={"help": "Student tokenizer/image processor (default: the student model's own)."},
    )
    teacher_processor: str | None = field(
        default=None,
        metadata={"help": "Teacher tokenizer/image processor (default: the teacher model's own)."},
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={"help": "Another name for teacher_processor (a causal-LM teacher's tokenizer); set one."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the Hub. Off unless you trust the repository."},
    )
    student_init: str = field(
        default="config",
        metadata={
            "help": f"One of {STUDENT_INITS}: fresh weights from student_config, or the teacher's own layers "
            "(student_layers / every_k) with its embeddings and head."
        },
    )
    student_layers: list[int] | None = field(
        default=None, metadata={"help": "student_init=teacher: the teacher layers kept (0-based)."}
    )
    every_k: int | None = field(
        default=None, metadata={"help": "student_init=teacher: keep teacher layers 0, k, 2k, ..."}
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.teacher_tokenizer is not None:
            if self.teacher_processor not in (None, self.teacher_tokenizer):
                raise ValueError(
                    f"teacher_tokenizer={self.teacher_tokenizer!r} and teacher_processor={self.teacher_processor!r} "
                    "name the same thing (the teacher's tokenizer) differently; set one of them"
                )
            self.teacher_processor = self.teacher_tokenizer
        if isinstance(self.student_config, str):
            self.student_config = yaml.safe_load(self.student_config)
        _check_choice("student_init", self.student_init, STUDENT_INITS)
        if self.student_init == "teacher":
            if self.student_model_name_or_path or self.student_config:
                raise ValueError(
                    "student_init: teacher builds the student from the teacher's layers; remove "
                    "student_model_name_or_path / student_config"
                )
            if (self.student_layers is None) == (self.every_k is None):
                raise ValueError("student_init: teacher needs exactly one of student_layers and every_k")
            return
        if self.student_layers is not None or self.every_k is not None:
            raise ValueError("student_layers / every_k need student_init: teacher")
        if self.student_model_name_or_path is None and self.student_config is None:
            raise ValueError(
                "Give a student: student_model_name_or_path (Hub id or path) or student_config (train from scratch)"
            )


@dataclass
class DataArguments:
    """The dataset and the task (``scripts/distill.py``).

    Parameters:
        task (`str`, *optional*, defaults to `"text-classification"`):
            One of `"text-classification"`, `"image-classification"`, `"causal-lm"`,
            `"feature-classification"`.
        dataset_name (`str` or `None`, *optional*, defaults to `None`):
            A Hub dataset id, a directory written by `save_to_disk`, or a data-file builder name (`csv`,
            `json`, `parquet`, ...).
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            The dataset's configuration name.
        data_files (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Data files of a builder dataset; a string starting with `{` is read as YAML.
        train_split (`str`, *optional*, defaults to `"train"`):
            The training split.
        eval_split (`str` or `None`, *optional*, defaults to `"test"`):
            The evaluation split; `None`: no evaluation.
        text_column (`str`, *optional*, defaults to `"text"`):
            The text column (text tasks).
        text_pair_column (`str` or `None`, *optional*, defaults to `None`):
            The second text column of sentence-pair tasks.
        messages_column (`str`, *optional*, defaults to `"messages"`):
            causal-lm: the column of conversations (`[{role, content}, ...]`, rendered with the chat
            template).
        prompt_column (`str` or `None`, *optional*, defaults to `None`):
            causal-lm: read plain-text prompts from this column instead of conversations or text (with a
            chat template, when the tokenizer has one, a prompt is one user turn and its completion the
            assistant's reply; without one, prompt tokens then completion tokens). Rows without a
            completion are prompts only: their completions must all be generated (`lmbda: 1` or `seq_kd`).
        completion_column (`str`, *optional*, defaults to `"completion"`):
            causal-lm with `prompt_column`: the column of plain-text completions, when the dataset has it.
        completion_only_loss (`bool`, *optional*, defaults to `True`):
            causal-lm chat data: train (hard and soft term) on the assistant's tokens only; `False`: on
            every token.
        packing (`bool`, *optional*, defaults to `False`):
            causal-lm: pack whole examples into rows of `max_length` tokens (position ids restart per
            example).
        image_column (`str`, *optional*, defaults to `"image"`):
            The image column (image tasks).
        feature_column (`str`, *optional*, defaults to `"features"`):
            The feature-vector column (feature-classification).
        label_column (`str`, *optional*, defaults to `"label"`):
            The label column; a label of -1 or -100, or a missing one, marks an unlabelled row (soft term
            only).
        max_length (`int`, *optional*, defaults to `128`):
            Maximum tokens per example (≥ 1).
        max_train_samples (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first N training rows.
        max_eval_samples (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first N evaluation rows.
        num_labeled_examples (`int` or `None`, *optional*, defaults to `None`):
            Keep the labels of only N training rows (picked with the seed); the others become unlabelled
            transfer data.
        use_unlabeled (`bool`, *optional*, defaults to `True`):
            Train on rows without a label too (soft term only: the teacher labels them); `False` drops
            them.
        metrics (`list[str]`, *optional*, defaults to `["accuracy"]`):
            `evaluate` metrics: a built-in of hf_kd (`accuracy`, `f1`), a local module path, or a Hub
            metric name (runs its code: needs `trust_remote_code`).
    """

    task: str = field(default="text-classification", metadata={"help": f"One of {TASKS}."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub dataset id, a directory written by `save_to_disk`, or a data-file builder name (csv, json, ...)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: dict | str | None = field(
        default=None, metadata={"help": "Data files for a builder dataset (csv/json/parquet)."}
    )
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(
        default="test", metadata={"help": "Evaluation split ('none', null or empty: no evaluation)."}
    )
    text_column: str = field(default="text", metadata={"help": "Text column (text tasks)."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text column for sentence-pair tasks."}
    )
    messages_column: str = field(
        default="messages",
        metadata={
            "help": "causal-lm: column of conversations ([{role, content}, ...], rendered with the chat template)."
        },
    )
    prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "causal-lm: column of plain-text prompts (as a user turn when the tokenizer has a chat "
            "template); without completion_column the completions are all generated (lmbda: 1 or seq_kd)."
        },
    )
    completion_column: str = field(
        default="completion",
        metadata={"help": "causal-lm with prompt_column: column of plain-text completions, if any."},
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "causal-lm chat data: train (CE and KD) on the assistant's tokens only; false: on every token."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "causal-lm: pack whole examples into rows of max_length tokens (position_ids restart per example)."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Image column (image tasks)."})
    feature_column: str = field(
        default="features", metadata={"help": "Feature-vector column (feature-classification)."}
    )
    label_column: str = field(
        default="label", metadata={"help": "Label column; -1, -100 or missing = unlabelled (soft term only)."}
    )
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training rows."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation rows."}
    )
    num_labeled_examples: int | None = field(
        default=None,
        metadata={
            "help": "Keep the labels of only N training rows (picked with the seed); the rest become unlabelled transfer data."
        },
    )
    use_unlabeled: bool = field(
        default=True,
        metadata={
            "help": "Train on rows without a label too (soft term only: the teacher labels them); false drops them."
        },
    )
    metrics: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "`evaluate` metrics: a built-in of hf_kd (accuracy, f1), a local module path, or a Hub metric name (runs its code: needs trust_remote_code)."
        },
    )

    def __post_init__(self) -> None:
        check_finite(self)
        _check_choice("task", self.task, TASKS)
        if self.eval_split is not None and self.eval_split.strip().lower() in NO_SPLIT:
            self.eval_split = None
        if isinstance(self.data_files, str) and self.data_files.lstrip().startswith("{"):
            self.data_files = yaml.safe_load(self.data_files)
        if self.num_labeled_examples is not None and self.num_labeled_examples < 0:
            raise ValueError(f"num_labeled_examples={self.num_labeled_examples!r} must be ≥ 0")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length!r} must be a positive number of tokens")


ARGUMENT_CLASSES = (DataArguments, ModelArguments, DistillationConfig)

AUTO_BASE_TEMPERATURE = 2.0
"""The base τ of ``temperature: auto`` (logit standardisation), the authors' default."""


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


def load_recipe(path: str | Path, classes: tuple[type, ...] = ARGUMENT_CLASSES) -> dict[str, Any]:
    """Read a YAML recipe (:func:`load_yaml`: safe types, no key twice) and reject keys none of ``classes``
    knows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    recipe = load_yaml(path.read_text(), f"recipe {str(path)!r}") or {}
    if not isinstance(recipe, dict):
        raise ValueError(
            f"recipe {str(path)!r} must be a mapping of field: value, got {type(recipe).__name__}"
        )
    known = {f.name for cls in classes for f in fields(cls) if f.init}
    for key in recipe:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown field {key!r} in recipe {str(path)!r}{hint}")
    return recipe


def parse_args(argv: list[str] | None = None, classes: tuple[type, ...] = ARGUMENT_CLASSES) -> tuple:
    """``--config recipe.yaml [--field value ...]``: defaults < recipe < command line.

    Unknown recipe keys and unknown flags are errors; the recipe's values become the parser's
    defaults, so any flag given on the command line wins. ``classes`` are the argument dataclasses
    (default: a distillation run's); one instance of each is returned, in order.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(classes)
    parser.error = refuse  # one line, not argparse's usage dump and exit
    for action in parser._actions:
        if action.dest == "temperature":  # a number or "auto": argparse's float would refuse "auto"
            action.type = temperature_value
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a recipe path")
        recipe = typed_recipe(load_recipe(argv[i + 1], classes), parser, Path(argv[i + 1]))
        argv = argv[:i] + argv[i + 2 :]
        # Required fields (output_dir) may come from the recipe: give argparse their defaults.
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
        parser.set_defaults(**recipe)
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # e.g. flags no field knows, quoted back: never with a secret
        raise ValueError(redact(str(error))) from None
