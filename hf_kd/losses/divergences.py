"""The divergences D(p^τ, q^τ) between a teacher p and a student q, dense or from a sparse teacher. Each
returns one value per position, shape ``logits.shape[:-1]``, in float32 (docs/knowledge.md#divergences)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_kd.losses.cross_tokenizer import uld_distance
from hf_kd.losses.sparse import SparseLogits


def teacher_log_probs(
    teacher: torch.Tensor | SparseLogits, temperature: float, tail: str = "uniform"
) -> torch.Tensor:
    """log p^τ = log_softmax(v / τ). A sparse teacher is first rebuilt with ``tail`` handling, then its
    log-probabilities play the part of v (softmax(log p / τ) = p^τ for the kept entries)."""
    logits = teacher.to_dense_log_probs(tail) if isinstance(teacher, SparseLogits) else teacher.float()
    return torch.log_softmax(logits / temperature, dim=-1)


LOG_ZERO = -1.0e4
"""Stands for log 0 in a teacher's log-probabilities: e^LOG_ZERO is exactly 0 in float32, and unlike −inf
it gives 0 · (LOG_ZERO − log q) = 0 rather than NaN, so the KL sums need no masking pass."""


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_i a_i (log a_i − log b_i) for finite log-probabilities (a_i = 0 terms give 0)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w · a + (1 − w) · b) computed in log space."""
    w = torch.tensor(weight_a, dtype=log_a.dtype, device=log_a.device)
    return torch.logaddexp(log_a + torch.log(w), log_b + torch.log1p(-w))


@dataclass(frozen=True)
class Divergence:
    """One registered divergence D(p, q) between a teacher p and a student q.

    Attributes:
        name: the value of ``DistillationConfig.divergence`` that selects it.
        function: ``function(log_q, log_p, **params) -> [...]`` on log-probabilities [..., K] (teacher log p
            with zeros as LOG_ZERO), or, with ``on_logits``, ``function(z, v, τ)`` on the logits.
        formula: D(p, q) as docs/knowledge.md#divergences writes it (a test compares the two).
        params: the keyword parameters ``function`` reads, named as the config fields that set them.
        parameter: the parameter as the documentation's table describes it ("" when there is none).
        on_logits: compares logits, not probabilities: needs dense teacher logits and the real teacher.
    """

    name: str
    function: Callable[..., torch.Tensor]
    formula: str
    params: tuple[str, ...] = ()
    parameter: str = ""
    on_logits: bool = False


DIVERGENCE_REGISTRY: dict[str, Divergence] = {}
"""Every divergence, by name, in the order the documentation lists them (:func:`register_divergence`)."""


def register_divergence(
    name: str, formula: str, *, params: tuple[str, ...] = (), parameter: str = "", on_logits: bool = False
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator adding a divergence function to :data:`DIVERGENCE_REGISTRY` under ``name``."""

    def add(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in DIVERGENCE_REGISTRY:
            raise ValueError(f"divergence {name!r} is already registered")
        DIVERGENCE_REGISTRY[name] = Divergence(name, function, formula, params, parameter, on_logits)
        return function

    return add


@register_divergence("forward_kl", "KL(p ‖ q) = Σ p (log p − log q)")
def forward_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p (log p − log q)."""
    return _kl(log_p, log_q)


@register_divergence("reverse_kl", "KL(q ‖ p) = Σ q (log q − log p)")
def reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) = Σ q (log q − log p)."""
    return _kl(log_q, log_p)


@register_divergence(
    "jsd",
    "β · KL(p ‖ m) + (1 − β) · KL(q ‖ m), m = β p + (1 − β) q",
    params=("beta",),
    parameter="β = `beta` ∈ [0, 1], default 0.5",
)
def jsd(log_q: torch.Tensor, log_p: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    """β · KL(p ‖ m) + (1 − β) · KL(q ‖ m), m = β p + (1 − β) q (TRL's generalized JSD; β = 0 is defined
    as forward KL and β = 1 as reverse KL, as in TRL)."""
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


@register_divergence("tvd", "½ Σ_i |p_i − q_i|")
def tvd(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """½ Σ |p − q|."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


@register_divergence(
    "skew_kl",
    "KL(p ‖ s p + (1 − s) q)",
    params=("skew",),
    parameter="s = `skew` ∈ (0, 1], default 0.1",
)
def skew_kl(log_q: torch.Tensor, log_p: torch.Tensor, *, skew: float = 0.1) -> torch.Tensor:
    """KL(p ‖ s p + (1 − s) q) (DistiLLM, s = ``skew``)."""
    return _kl(log_p, _log_mix(log_p, log_q, skew))


@register_divergence("skew_rkl", "KL(q ‖ (1 − s) p + s q)", params=("skew",), parameter="s = `skew`")
def skew_rkl(log_q: torch.Tensor, log_p: torch.Tensor, *, skew: float = 0.1) -> torch.Tensor:
    """KL(q ‖ (1 − s) p + s q) (DistiLLM, s = ``skew``)."""
    return _kl(log_q, _log_mix(log_p, log_q, 1.0 - skew))


@register_divergence("uld", "Σ_i |sort↓(p)_i − sort↓(q)_i|")
def uld(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """ULD (Boizard et al. 2024): the L1 distance between the two probability vectors sorted in
    decreasing order, blind to which token has which probability (the cross-tokenizer loss's unmatched
    part, ``hf_kd.losses.cross_tokenizer.uld_distance``)."""
    return uld_distance(log_q.exp(), log_p.exp())


@register_divergence("mse", "(1/K) Σ_i (z_i/τ − v_i/τ)²", on_logits=True)
def mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(1/K) Σ (z/τ − v/τ)², from the logits z and v (float32)."""
    return ((student_logits.float() - teacher_logits.float()) / temperature).pow(2).mean(-1)


DIVERGENCES = tuple(DIVERGENCE_REGISTRY)
"""The registered divergences' names (the choices of ``DistillationConfig.divergence``)."""
DIVERGENCE_PARAMS = tuple(dict.fromkeys(p for d in DIVERGENCE_REGISTRY.values() for p in d.params))
"""Every parameter a registered divergence reads (the config fields passed as ``params``)."""


def get_divergence(name: str) -> Divergence:
    """The registered divergence ``name``, or a ValueError naming the value and the choices."""
    if name not in DIVERGENCE_REGISTRY:
        raise ValueError(f"divergence={name!r} is not one of {tuple(DIVERGENCE_REGISTRY)}")
    return DIVERGENCE_REGISTRY[name]


def divergence_from_log_probs(
    name: str, log_q: torch.Tensor, log_p: torch.Tensor, **params: float
) -> torch.Tensor:
    """Per-position divergence ``name`` (:data:`DIVERGENCE_REGISTRY`) between teacher p and student q
    given as log-probabilities. ``params`` may hold any of :data:`DIVERGENCE_PARAMS`; each divergence
    reads its own (``beta`` of jsd, ``skew`` of the skewed KLs) and takes its default for a missing one.

    A zero teacher probability (log p = −inf: a renormalised top-k teacher, a synthetic target) is
    taken as e^LOG_ZERO: it adds nothing to the KL terms weighted by p, and a large finite penalty
    instead of +inf to those weighted by q (reverse_kl).
    """
    spec = get_divergence(name)
    if spec.on_logits:
        raise ValueError(f"divergence={name!r} compares logits, not log-probabilities")
    unknown = set(params) - set(DIVERGENCE_PARAMS)
    if unknown:
        raise ValueError(f"divergence parameters {sorted(unknown)} are not among {DIVERGENCE_PARAMS}")
    own = {key: value for key, value in params.items() if key in spec.params}
    return spec.function(log_q, log_p.clamp(min=LOG_ZERO), **own)


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseLogits,
    *,
    temperature: float = 1.0,
    tail: str = "uniform",
    **params: float,
) -> torch.Tensor:
    """D(p^τ, q^τ) per position, float32, shape ``student_logits.shape[:-1]``.

    Temperature divides both logits (q^τ = softmax(z/τ), p^τ = softmax(v/τ)); the τ² factor is the
    caller's. ``mse`` is the mean over classes of (z/τ − v/τ)² and needs dense teacher logits. See
    :func:`divergence_from_log_probs` for the others; ``params`` are ``beta`` (jsd) and ``skew``.
    """
    if get_divergence(name).on_logits:
        if isinstance(teacher_logits, SparseLogits):
            raise ValueError(
                f"divergence={name!r} compares logits and needs a dense teacher, not top-k logits"
            )
        return get_divergence(name).function(student_logits, teacher_logits, temperature)
    if isinstance(teacher_logits, SparseLogits) and tail == "bucket":
        log_q = torch.log_softmax(student_logits.float(), dim=-1)
        return bucket_divergence(
            name, log_q.gather(-1, teacher_logits.gather_index()), teacher_logits, temperature, params
        )
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher_logits, SparseLogits) and closed_form_tail(name, tail):
        return sparse_divergence(name, log_q, teacher_logits, temperature, tail)
    return divergence_from_log_probs(
        name, log_q, teacher_log_probs(teacher_logits, temperature, tail), **params
    )


def bucket_divergence(
    name: str, log_q_kept: torch.Tensor, teacher: SparseLogits, temperature: float, params: dict
) -> torch.Tensor:
    """D over the k + 1 outcomes of ``sparse_tail: bucket`` from the student's log q¹ at the teacher's kept
    slots [..., k] (padding slots are ignored): both sides tempered alike on those outcomes."""
    student = teacher.bucket_from_kept(log_q_kept)
    log_q, log_p = (torch.log_softmax(x / temperature, -1) for x in (student, teacher.bucket()))
    return divergence_from_log_probs(name, log_q.clamp(min=LOG_ZERO), log_p, **params)


SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl")
"""Divergences that :func:`sparse_divergence` computes from a sparse teacher without rebuilding it."""
CLOSED_FORM_TAILS = ("uniform", "renormalize")
"""Tails that give every tail class one value, so that :func:`sparse_divergence` needs no dense teacher."""


def closed_form_tail(name: str, tail: str) -> bool:
    """Whether :func:`sparse_divergence` computes divergence ``name`` from a sparse teacher with ``tail``."""
    return name in SPARSE_DIVERGENCES and tail in CLOSED_FORM_TAILS


def sparse_divergence(
    name: str, log_q: torch.Tensor, teacher: SparseLogits, temperature: float, tail: str
) -> torch.Tensor:
    """forward_kl or reverse_kl of the student's log q^τ [..., K] from a sparse teacher, equal to
    :func:`divergence_from_log_probs` on ``teacher_log_probs(teacher, temperature, tail)`` but without the
    dense [..., K] teacher: p^τ takes one value t on every tail class (``uniform``: the tail mass spread
    evenly, ``renormalize``: 0, taken as e^LOG_ZERO), so the tail's share of each sum is closed-form.

        KL(p ‖ q) = Σ_kept p_i (log p_i − log q_i) + e^t · (n_tail · t − Σ_tail log q)
        KL(q ‖ p) = Σ q log q − Σ_kept q_i log p_i − t · Σ_tail q,    Σ_tail x = Σ_all x − Σ_kept x
    """
    log_q_kept = log_q.gather(-1, teacher.gather_index())
    total = log_q.sum(-1) if name == "forward_kl" else (log_q.exp() * log_q).sum(-1)
    return sparse_divergence_from_stats(name, log_q_kept, total, teacher, temperature, tail)


def sparse_divergence_from_stats(
    name: str,
    log_q_kept: torch.Tensor,
    total: torch.Tensor,
    teacher: SparseLogits,
    temperature: float,
    tail: str,
) -> torch.Tensor:
    """:func:`sparse_divergence` from the only dense statistics it reads: the student's log q^τ at the
    teacher's kept slots [..., k] and ``total`` [...] — Σ_all log q^τ (forward_kl) or Σ_all q^τ log q^τ
    (reverse_kl)."""
    if tail not in CLOSED_FORM_TAILS:
        raise ValueError(f"tail={tail!r} is not one of {CLOSED_FORM_TAILS} (a closed-form tail)")
    K = teacher.num_classes
    kept = teacher.log_probs.float()
    stored = kept > -math.inf
    n_tail = (K - stored.sum(-1)).float()
    scaled = torch.where(stored, kept / temperature, -math.inf)
    tail_each = teacher.tail_log_mass.float() - torch.log(n_tail.clamp(min=1))  # τ = 1, uniform
    if tail == "renormalize":
        tail_each = torch.full_like(tail_each, -math.inf)
    tail_each = torch.where(n_tail > 0, tail_each / temperature, -math.inf)
    log_z = torch.logaddexp(
        torch.logsumexp(scaled, -1), tail_each + torch.log(n_tail.clamp(min=1))
    )  # tail_each = −inf when there is no tail
    log_p = (scaled - log_z[..., None]).clamp(min=LOG_ZERO)  # padding slots: LOG_ZERO, weight 0
    t = (tail_each - log_z).clamp(min=LOG_ZERO)
    if name == "forward_kl":
        tail_log_q = total - (log_q_kept * stored).sum(-1)
        return (log_p.exp() * (log_p - log_q_kept)).sum(-1) + t.exp() * (n_tail * t - tail_log_q)
    q_kept = log_q_kept.exp() * stored
    tail_q = torch.where(n_tail > 0, (1.0 - q_kept.sum(-1)).clamp(min=0.0), 0.0)  # exact 0: no tail
    return total - (q_kept * log_p).sum(-1) - t * tail_q
