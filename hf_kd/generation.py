"""Sampling completions for on-policy distillation, behind one small interface.

:class:`Generator` is what ``hf_kd.on_policy`` calls: given a model and left-padded prompts, return the
sampled completion tokens. :class:`TransformersGenerator` (the default, tested on CPU) runs Transformers'
batched ``generate`` with the KV cache; a faster engine (e.g. a colocated vLLM on a GPU) is any object
with the same call, passed to the trainer as ``generator=``: the loss never sees which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled (the ``DistillationConfig`` generation fields).

    ``top_k`` 0 keeps every token; ``top_p`` 1.0 keeps the whole nucleus. ``eos_token_ids`` end a
    completion; ``pad_token_id`` fills the rows that ended before the longest one.
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


class Generator(Protocol):
    """A sampler of completions."""

    def __call__(
        self,
        model: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        settings: SamplingSettings,
        seed: int,
    ) -> torch.Tensor:
        """The completion tokens [B, ≤ max_new_tokens] that ``model`` (unwrapped: no DDP wrapper; in eval
        mode, set by the caller) writes after the left-padded ``prompt_ids`` [B, P] (``prompt_mask`` 0 on
        the padding). The same ``seed`` must give the same tokens. What follows a row's first EOS is
        ignored by the caller."""


class TransformersGenerator:
    """Transformers' ``generate``: batched, left-padded, with the KV cache, sampled with a private
    random stream seeded by ``seed`` (the global random state is left as it was). Under ZeRO-3 or FSDP
    with several processes ``generate`` keeps the processes in step (``synced_gpus``) itself."""

    def __call__(self, model, prompt_ids, prompt_mask, settings, seed):
        devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            sequences = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                max_new_tokens=settings.max_new_tokens,
                eos_token_id=list(settings.eos_token_ids),
                pad_token_id=settings.pad_token_id,
                use_cache=True,
            )
        return sequences[:, prompt_ids.shape[1] :]
