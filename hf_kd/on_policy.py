"""On-policy batches: the completions of a causal-LM batch replaced by sampled ones, before the loss.

With probability ``lmbda`` a micro-batch's completions are written by the student from the batch's
prompts (GKD, Agarwal et al. 2024; ``lmbda: 1`` is fully on-policy); with ``seq_kd`` the other
micro-batches get the teacher's completions instead of the data's (sequence-level KD, Kim & Rush 2016).
A row's prompt is everything before its last run of labelled tokens: a conversation without its last
assistant turn (``completion_only_loss``), or the ``prompt_column`` part of a prompt/completion row; a
row without any label (a ``prompt_column`` row without completion) is a prompt as a whole.

The new batch has the layout of a collated one (right-padded ``input_ids``, ``attention_mask``,
``labels``), with labels on the sampled tokens only: the prompt, the padding and everything after a
completion's first EOS are masked (the EOS itself is a target, so the student learns to stop). The loss,
the teacher signal and the item counts then treat it as any other batch.

Every random choice is a function of (seed, optimizer step, micro-batch index[, process]): a run is
reproducible and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from hf_kd.generation import Generator, SamplingSettings, TransformersGenerator
from hf_kd.tasks.base import NO_LABEL
from hf_kd.tasks.causal_lm import assistant_spans, encode_with_eos, vocab_size_of
from hf_kd.teachers.online import check_cross_tokenizer

logger = logging.getLogger(__name__)

GENERATED_KEY = "kd_generated_by"
"""Batch key naming who wrote a generated batch's completions ("student" or "teacher"); the trainer pops
it before the forward passes."""


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, where its prompt ends: the start of its last run of labelled tokens (the prompt's length in
    a right-padded row); with the ``attention_mask`` (padded on either side), a row without any label is
    a prompt only, ending after its last attended token. Raises ValueError when a row has no (attended)
    prompt token (labels from its first token: plain text without a prompt; or no labels and no
    ``attention_mask``)."""
    labelled = labels != NO_LABEL
    starts = labelled & ~F.pad(labelled[:, :-1], (1, 0), value=False)
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    ends = torch.where(starts, positions, -1).max(dim=1).values
    attended = torch.ones_like(labelled) if attention_mask is None else attention_mask.bool()
    if attention_mask is not None:
        last = torch.where(attended, positions, -1).max(dim=1).values
        ends = torch.where(labelled.any(dim=1), ends, last + 1)
    if bool(((attended & (positions < ends[:, None])).sum(dim=1) == 0).any()):
        raise ValueError(
            "on-policy distillation needs a prompt in every row: conversations (completion_only_loss: true, "
            "the last assistant turn is the completion) or a prompt_column; this batch has a row whose "
            "labels start at its first token or that has no label"
        )
    return ends


def left_padded_prompts(
    input_ids: torch.Tensor, ends: torch.Tensor, pad_token_id: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of each row before ``ends[b]`` (only the attended ones, given the ``attention_mask``:
    a batch padded on the left or the right), left-padded (as ``generate`` wants them), and their mask."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    keep = positions < ends[:, None]
    if attention_mask is not None:
        keep &= attention_mask.bool()
    width = int(keep.sum(dim=1).max())
    source = torch.argsort(keep.int(), dim=1, stable=True)[:, -width:]  # the kept tokens last, in order
    mask = keep.gather(1, source)
    ids = input_ids.gather(1, source).masked_fill(~mask, pad_token_id)
    return ids, mask.to(input_ids.dtype)


def completion_lengths(completions: torch.Tensor, eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """Per row, its tokens up to and including its first EOS (all of them without one)."""
    is_eos = torch.isin(completions, torch.tensor(eos_token_ids, device=completions.device))
    first = is_eos.int().argmax(dim=1) + 1
    return torch.where(is_eos.any(dim=1), first, completions.shape[1])


def completion_batch(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: torch.Tensor,
    settings: SamplingSettings,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts and their completions as a collated causal-LM batch: each row its prompt then
    its completion through the first EOS, right-padded; labels on the completion tokens only. Built with
    whole-batch index arithmetic (no per-row loop)."""
    prompt_width, completion_width = prompt_ids.shape[1], completions.shape[1]
    prompt_length = prompt_mask.sum(dim=1)[:, None]
    end = prompt_length + completion_lengths(completions, settings.eos_token_ids)[:, None]
    positions = torch.arange(int(end.max()), device=prompt_ids.device)[None]
    in_prompt, in_completion = positions < prompt_length, (positions >= prompt_length) & (positions < end)
    from_prompt = prompt_ids.gather(1, (positions + prompt_width - prompt_length).clamp(max=prompt_width - 1))
    from_completion = completions.gather(1, (positions - prompt_length).clamp(0, completion_width - 1))
    input_ids = torch.where(
        in_prompt, from_prompt, torch.where(in_completion, from_completion, settings.pad_token_id)
    )
    return {
        "input_ids": input_ids,
        "attention_mask": (in_prompt | in_completion).to(prompt_ids.dtype),
        "labels": torch.where(in_completion, input_ids, NO_LABEL),
    }


def draw(seed: int, step: int, index: int, *extra: int) -> int:
    """A 32-bit number fixed by (seed, optimizer step, micro-batch index, extra...)."""
    return zlib.crc32("/".join(map(str, (seed, step, index, *extra))).encode())


class OnPolicyBatches:
    """Replaces the completions of the micro-batches that the ``lmbda`` coin (or ``seq_kd``) picks.

    Args:
        lmbda: the share of micro-batches whose completions the student writes.
        seq_kd: the other micro-batches get the teacher's completions (else they keep the data's).
        settings: how completions are sampled.
        seed: the run's seed.
        generator: the sampler (default :class:`hf_kd.generation.TransformersGenerator`).
        process_index: this process's rank: each process samples its own prompts with its own stream.
        max_length: the most tokens of a generated row, prompt included, as of a data row (None: no
            limit): a micro-batch samples at most ``max_length`` minus its longest prompt new tokens.
    """

    def __init__(
        self,
        *,
        lmbda: float,
        seq_kd: bool,
        settings: SamplingSettings,
        seed: int,
        generator: Generator | None = None,
        process_index: int = 0,
        max_length: int | None = None,
    ):
        self.lmbda, self.seq_kd, self.settings, self.seed = lmbda, seq_kd, settings, seed
        self.generator = generator or TransformersGenerator()
        self.process_index = process_index
        self.max_length = max_length
        self._seconds = 0.0
        self._tokens = 0
        self._completions = 0
        self._since = time.perf_counter()

    def writer(self, step: int, index: int) -> str | None:
        """Who writes micro-batch ``index`` of optimizer step ``step``: "student" (probability ``lmbda``;
        the same on every process), "teacher" (``seq_kd``), or None (the data's completions)."""
        if random.Random(draw(self.seed, step, index)).random() < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else None

    def settings_for(self, prompt_width: int) -> SamplingSettings:
        """The sampling settings for prompts of at most ``prompt_width`` tokens: no row longer than
        ``max_length``."""
        if self.max_length is None:
            return self.settings
        room = self.max_length - prompt_width
        if room < 1:
            raise ValueError(
                f"a prompt of {prompt_width} tokens leaves no room for a completion within "
                f"max_length={self.max_length} (check_prompt_rows refuses such rows before training)"
            )
        return replace(self.settings, max_new_tokens=min(self.settings.max_new_tokens, room))

    def __call__(
        self,
        batch: dict[str, Any],
        *,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        step: int,
        index: int,
    ) -> dict[str, Any]:
        """``batch``, or its prompts with sampled completions (marked with :data:`GENERATED_KEY`).
        ``student`` and ``teacher`` are the unwrapped models; the writer samples in eval mode and is put
        back in its own mode afterwards."""
        writer = self.writer(step, index)
        if writer is None:
            return batch
        model = student if writer == "student" else teacher
        if model is None:
            raise ValueError("seq_kd: true needs an online teacher model to generate completions")
        mask = batch.get("attention_mask")
        ends = prompt_lengths(batch["labels"], mask)
        prompt_ids, prompt_mask = left_padded_prompts(
            batch["input_ids"], ends, self.settings.pad_token_id, mask
        )
        started, was_training = time.perf_counter(), model.training
        model.eval()  # sampling without dropout; back in its mode for the loss
        try:
            seed = draw(self.seed, step, index, self.process_index)
            settings = self.settings_for(prompt_ids.shape[1])
            completions = self.generator(model, prompt_ids, prompt_mask, settings, seed)
        finally:
            model.train(was_training)
        self._seconds += time.perf_counter() - started
        generated = completion_batch(prompt_ids, prompt_mask, completions, self.settings)
        self._tokens += int((generated["labels"] != NO_LABEL).sum())
        self._completions += len(prompt_ids)
        return {**generated, GENERATED_KEY: writer}

    def pop_logs(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Since the last call, when something was generated: ``completion_length`` (mean tokens per
        generated completion, EOS included) and ``generation_time_share`` (share of the wall time spent
        generating). ``reduce`` sums a tensor over the processes (every process must call it then): both
        are then over every process (all completions; the processes' generation time over their wall time)."""
        now = time.perf_counter()
        totals = torch.tensor(
            [self._tokens, self._completions, self._seconds, now - self._since], dtype=torch.float64
        )
        if reduce is not None:
            totals = reduce(totals)
        tokens, completions, seconds, elapsed = totals.tolist()
        self._seconds, self._tokens, self._completions, self._since = 0.0, 0, 0, now
        if not completions:
            return {}
        return {
            "completion_length": tokens / completions,
            "generation_time_share": seconds / max(elapsed, 1e-9),
        }


def check_prompts_only(
    config: Any, columns: list[str], task: Any, where: str = "the training set", evaluation: bool = False
) -> None:
    """Rows that are prompts only (the task's ``prompt_column`` without its ``completion_column`` in
    ``columns``) hold nothing to learn from unless every micro-batch's completions are generated
    (``lmbda: 1`` or ``seq_kd``): refuse them otherwise, before anything loads. An ``evaluation`` set is
    never sampled (it scores the data's completions): prompt-only rows there would score 0, and are
    always refused."""
    prompt_column = getattr(task, "prompt_column", None)
    if prompt_column is None or task.completion_column in columns:
        return
    missing = (
        f"prompt_column={prompt_column!r} without completions (no column {task.completion_column!r} "
        f"(completion_column) in {where}; its columns: {columns})"
    )
    if evaluation:
        raise ValueError(
            f"{missing}: evaluation scores the data's completions (it never samples), so every loss would "
            "read 0; give an evaluation set with completions, or none"
        )
    if config.lmbda == 1 or config.seq_kd:
        return
    raise ValueError(
        f"{missing}: every completion must be generated, so set lmbda: 1 or seq_kd: true "
        f"(lmbda={config.lmbda}, seq_kd={config.seq_kd})"
    )


def check_prompt_rows(dataset: Any, max_length: int, batch_size: int = 1024) -> None:
    """Refuse, before training, the first prepared causal-LM row that on-policy distillation cannot sample
    for: a row without a prompt (labels from its first token: plain text); a prompt of ``max_length``
    tokens or more (cut by the truncation: no room is left for a completion); or tokens after the row's
    last labelled run (a conversation that goes on after its last assistant reply: the reply would be
    sampled from the turns before it, and the later turns dropped)."""
    ids_and_labels = dataset.select_columns([c for c in ("input_ids", "labels") if c in dataset.column_names])
    for start in range(0, len(dataset), batch_size):
        rows = ids_and_labels[start : start + batch_size]
        lengths = torch.tensor([len(ids) for ids in rows["input_ids"]])
        positions = torch.arange(int(lengths.max()))[None]
        mask = positions < lengths[:, None]
        labels = torch.full(mask.shape, NO_LABEL)
        labels[mask] = torch.tensor([i for row in rows.get("labels", rows["input_ids"]) for i in row])
        prompts = _prompt_lengths_naming_row(labels, mask, start)
        labelled = labels != NO_LABEL
        ends = torch.where(labelled, positions + 1, 0).max(dim=1).values
        no_room, trailing = prompts >= max_length, labelled.any(dim=1) & (ends < lengths)
        problems = {
            "its prompt is {prompt} tokens: cut at max_length={max_length}, with no room left for a "
            "completion; raise max_length or drop the rows whose prompt is that long": no_room,
            "it goes on for {tail} tokens after its last labelled token (a conversation whose last turn is "
            "not the assistant's): the reply would be sampled from the turns before them, and they would be "
            "dropped; end each conversation with an assistant turn, or give prompts without any": trailing,
        }
        for why, bad in problems.items():
            if bool(bad.any()):
                row = int(bad.int().argmax())
                tail, prompt = int(lengths[row] - ends[row]), int(prompts[row])
                raise ValueError(
                    f"on-policy distillation (lmbda > 0 or seq_kd): row {start + row} of the training set: "
                    + why.format(prompt=prompt, max_length=max_length, tail=tail)
                )


def _prompt_lengths_naming_row(labels: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """:func:`prompt_lengths` of rows ``start``, ``start + 1``, ... of the training set; its error names
    the first row without a prompt."""
    try:
        return prompt_lengths(labels, mask.long())
    except ValueError as error:
        for row in range(len(labels)):
            try:
                prompt_lengths(labels[row : row + 1], mask[row : row + 1].long())
            except ValueError:
                raise ValueError(f"{error} (row {start + row} of the training set)") from None
        raise


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The chat template's end-of-turn token: the first special token after the content of an assistant
    reply as the template renders it (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``: often not the
    tokenizer's EOS); None without a template, or when a reply ends on no special token."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ((start, end),) = assistant_spans(tokenizer, messages, text)
    content_end = text.index("y", start) + 1
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids, offsets, _ = encode_with_eos(tokenizer, text, False, False)
    after = [
        i for i, (char, _) in zip(ids, offsets, strict=True) if i in special and content_end <= char < end
    ]
    return after[0] if after else None


def eos_token_ids(processor: Any, model: torch.nn.Module) -> tuple[int, ...]:
    """The ids that end a completion: the tokenizer's EOS, its chat template's end-of-turn token (what
    ends the data's replies) and every id of the model's generation config's and config's
    ``eos_token_id`` (a list for chat models that stop on an end-of-turn or an end-of-text token, as
    Llama 3 or Qwen), in that order, each once. Raises ValueError when none is known (a completion would
    never end before max_new_tokens)."""
    candidates = [
        getattr(processor, "eos_token_id", None),
        end_of_turn_id(processor),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ]
    ids = [i for c in candidates if c is not None for i in (c if isinstance(c, list | tuple) else [c])]
    if ids:
        return tuple(dict.fromkeys(int(i) for i in ids))
    raise ValueError(
        "on-policy distillation needs an end-of-sequence token: give processing_class a tokenizer with an "
        "eos_token, or set the student's config.eos_token_id"
    )


def readable_vocab_size(processor: Any, *models: torch.nn.Module | None) -> int:
    """How many ids every one of ``models`` (None: absent) and the tokenizer know: the only ids worth
    sampling. Past the tokenizer a model's embedding may have padding rows (sizes rounded up), which
    decode to nothing; past the smaller model's vocabulary the other model has no embedding."""
    sizes = [vocab_size_of(model.config) for model in models if model is not None]
    if processor is not None and hasattr(processor, "get_vocab"):
        sizes.append(len(processor))
    return min(sizes)


def on_policy_batches(
    config: Any,
    task: Any,
    student: torch.nn.Module,
    processor: Any,
    *,
    teacher: torch.nn.Module | None = None,
    process_index: int = 0,
    generator=None,
) -> OnPolicyBatches | None:
    """The run's :class:`OnPolicyBatches` from a ``DistillationConfig`` (None when nothing is generated);
    checks that the task is an unpacked causal LM whose teacher reads the student's tokens. Sampling keeps
    to the ids the tokenizer, the student and the ``teacher`` share, and each generated row to the task's
    ``max_length``."""
    if not config.generates:
        return None
    if not getattr(task, "can_generate", False):
        raise ValueError(
            f"lmbda={config.lmbda} / seq_kd={config.seq_kd}: on-policy distillation needs task causal-lm "
            "without packing (completions are generated per prompt)"
        )
    if getattr(task, "vocabulary", None) is not None:  # a teacher of another tokenizer, however it was built
        check_cross_tokenizer(config)
    settings = SamplingSettings(
        max_new_tokens=config.max_new_tokens,
        temperature=config.generation_temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        eos_token_ids=eos_token_ids(processor, student),
        pad_token_id=task.pad_token_id,
        vocab_size=readable_vocab_size(processor, student, teacher),
    )
    return OnPolicyBatches(
        lmbda=config.lmbda,
        seq_kd=config.seq_kd,
        settings=settings,
        seed=config.seed,
        generator=generator,
        process_index=process_index,
        max_length=getattr(task, "max_length", None),
    )
