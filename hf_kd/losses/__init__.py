"""Distillation losses: pure tensor math, no Trainer plumbing.

Notation (``docs/knowledge.md#notation``): p is the teacher distribution, q the student's, both at temperature
τ (the logits are divided by τ before the softmax). Every divergence returns one value per position,
shape ``logits.shape[:-1]``, in float32.

The training loss mixes the hard-label cross-entropy with one divergence:

    L = (1 − α) · H(y, q¹) + α · s · D(p^τ, q^τ),      s = τ² (Hinton) or 1

and :func:`distillation_loss` computes it over flattened positions, optionally in chunks of
positions so that no full-vocabulary float32 tensor for all positions is alive at once.

- ``hf_kd.losses.sparse``: a top-k teacher (:class:`SparseLogits`) and how its left-out mass is read;
- ``hf_kd.losses.divergences``: the divergence registry (name → function, parameters, formula), dense or
  from a sparse teacher;
- ``hf_kd.losses.distillation``: the training loss (:func:`distillation_loss`) and how each chunk of it is
  computed;
- ``hf_kd.losses.closed_form``: one chunk's sums with closed-form gradients, in one pass (a top-k or a
  dense teacher);
- ``hf_kd.losses.chunked``: the loss chunk by chunk, forward and backward in the forward pass;
- ``hf_kd.losses.output_layer``: the student's or teacher's logits made from hidden states
  (:class:`HiddenStates`) chunk by chunk, with the output layer's gradients;
- ``hf_kd.losses.standardization``: logit standardisation (``logit_standardization``);
- ``hf_kd.losses.cross_tokenizer``: a teacher of another tokenizer (:class:`AlignedLogits`): the matched
  part on the shared tokens and ULD on the rest;
- ``hf_kd.losses.several_teachers``: several teachers of different tokenizers (:class:`WeightedTeachers`):
  the weighted sum of their soft terms.

The names below are the package's public interface.
"""

from hf_kd.losses.cross_tokenizer import AlignedLogits, uld_distance
from hf_kd.losses.distillation import LossTerms, TargetFn, distillation_loss
from hf_kd.losses.divergences import (
    DIVERGENCE_REGISTRY,
    DIVERGENCES,
    LOG_ZERO,
    Divergence,
    divergence,
    divergence_from_log_probs,
    register_divergence,
    teacher_log_probs,
)
from hf_kd.losses.output_layer import HiddenStates
from hf_kd.losses.several_teachers import WeightedTeachers
from hf_kd.losses.sparse import TAIL_MODES, SparseLogits, TailSketch
from hf_kd.losses.standardization import standardize_logits

__all__ = [
    "AlignedLogits",
    "DIVERGENCE_REGISTRY",
    "DIVERGENCES",
    "Divergence",
    "LOG_ZERO",
    "TAIL_MODES",
    "HiddenStates",
    "LossTerms",
    "SparseLogits",
    "TailSketch",
    "TargetFn",
    "WeightedTeachers",
    "distillation_loss",
    "divergence",
    "divergence_from_log_probs",
    "register_divergence",
    "standardize_logits",
    "teacher_log_probs",
    "uld_distance",
]
