"""Sampling completions for on-policy distillation, behind one small interface.

:class:`Generator` is what ``hf_kd.on_policy`` calls: given a model and left-padded prompts, return the
sampled completion tokens. :class:`TransformersGenerator` (the default, tested on CPU) runs Transformers'
batched ``generate`` with the KV cache; a faster engine (e.g. a colocated vLLM on a GPU) is any object
with the same call, passed to the trainer as ``generator=``: the loss never sees which one ran.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig

from hf_kd.tasks.causal_lm import vocab_size_of


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled (the ``DistillationConfig`` generation fields).

    ``top_k`` 0 keeps every token; ``top_p`` 1.0 keeps the whole nucleus. ``eos_token_ids`` end a
    completion; ``pad_token_id`` fills the rows that ended before the longest one. Ids from
    ``vocab_size`` on (None: every id) are never sampled: the rows a model's embedding has past its
    tokenizer, or past the other model's vocabulary, are no tokens both models can read.
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int | None = None


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
        the padding). The same ``seed`` must give the same tokens; no id ≥ ``settings.vocab_size`` may be
        sampled. What follows a row's first EOS is ignored by the caller."""


def unreadable_ids(model: torch.nn.Module, vocab_size: int | None) -> list[int] | None:
    """The ids of ``model``'s output layer from ``vocab_size`` on (None when there are none): suppressed
    before the temperature, top-k and top-p see the scores, so they never pick one."""
    rows = vocab_size_of(model.config)  # the config's: under ZeRO-3 the weight's local shape is empty
    return None if vocab_size is None or vocab_size >= rows else list(range(vocab_size, rows))


@contextmanager
def only_these_settings(model: torch.nn.Module, config: GenerationConfig):
    """``model.generation_config`` is ``config`` inside the block: ``generate`` fills what a call leaves
    unset from the model's own generation config, so a checkpoint's ``repetition_penalty``,
    ``min_new_tokens``, ``no_repeat_ngram_size``... would otherwise reshape the samples (no longer the
    model's distribution)."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


class TransformersGenerator:
    """Transformers' ``generate``: batched, left-padded, with the KV cache, sampled with a private
    random stream seeded by ``seed`` (the global random state is left as it was), from the model's own
    distribution: only ``settings`` shape it, never the model's saved generation config. Under ZeRO-3 or
    FSDP with several processes ``generate`` keeps the processes in step (``synced_gpus``) itself."""

    def __call__(self, model, prompt_ids, prompt_mask, settings, seed):
        config = GenerationConfig(
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=list(settings.eos_token_ids),
            pad_token_id=settings.pad_token_id,
            use_cache=True,
            suppress_tokens=unreadable_ids(model, settings.vocab_size),
        )
        devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), only_these_settings(model, config):
            torch.manual_seed(seed)
            sequences = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=config,
            )
        return sequences[:, prompt_ids.shape[1] :]
