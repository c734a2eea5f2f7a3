"""A few sampled completions per logging step, with each model's per-token log-probabilities
(``log_completions``): what the student (or, with ``seq_kd``, the teacher) wrote, and how likely each
of its tokens is under the teacher and under the student, read from the training step's own forward
passes (no extra model call).

Each line of ``output_dir/completions.jsonl`` is one completion::

    {"step": 3, "writer": "student", "prompt": "...", "completion": "...", "prompt_ids": [...],
     "completion_ids": [...], "teacher_logprobs": [...], "student_logprobs": [...], "teacher_nll": 1.9}

``*_logprobs[i]`` is log p(completion token i | prompt, completion tokens before it) under the model's
own full distribution at temperature 1 (not the loss's τ); ``teacher_nll`` is their negated mean for
the teacher. The main process writes its own completions; each logging step's lines are appended in
one write. A run keeps only the lines of the steps before it starts (``on_train_begin``): a resumed
run writes its later steps again, once; a fresh run starts an empty file. The texts are the tokenizer's decoding (special tokens kept); nothing else of the run is
written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from hf_kd.files import write_atomic
from hf_kd.losses import HiddenStates
from hf_kd.on_policy import prompt_lengths
from hf_kd.tasks.base import NO_LABEL

FILE_NAME = "completions.jsonl"


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """For one row: log p(``ids[t + 1]``) under ``logits[t]`` (temperature 1) at every position whose
    next label is set (the completion tokens)."""
    targets = labels[1:] != NO_LABEL
    log_p = torch.log_softmax(logits[:-1][targets].float(), dim=-1)
    return log_p.gather(-1, ids[1:][targets][:, None]).squeeze(-1).tolist()


class CompletionLog(TrainerCallback):
    """Keeps the first ``limit`` completions of the first generated micro-batch of each logging window
    (:meth:`record`) and appends them to ``output_dir/completions.jsonl`` (:meth:`write`)."""

    def __init__(self, output_dir: str | os.PathLike, limit: int, tokenizer: Any = None):
        self.path, self.limit, self.tokenizer = Path(output_dir) / FILE_NAME, limit, tokenizer
        self.pending: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        """Training starts (or resumes) after ``state.global_step``: forget the lines of later steps."""
        self.keep_until(state.global_step)

    def keep_until(self, step: int) -> None:
        """Rewrite the file (aside, then renamed) with only the lines of steps ≤ ``step``."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = "".join(line for line in lines if json.loads(line)["step"] <= step)
        write_atomic(self.path, lambda tmp: tmp.write_text(kept))

    def record(
        self,
        batch: dict[str, torch.Tensor],
        writer: str,
        step: int,
        student: torch.Tensor | HiddenStates,
        teacher: torch.Tensor | None,
    ) -> None:
        """Keep rows of a generated ``batch`` (its ``input_ids`` and ``labels``) written by ``writer``,
        with the ``student``'s logits [B, T, V] (or its final hidden states and output layer) and the
        ``teacher``'s logits [B, T, V'] (None: no teacher log-probs), unless this window has some."""
        if self.pending:
            return
        ids, labels = batch["input_ids"].detach(), batch["labels"].detach()
        lengths = prompt_lengths(labels, batch.get("attention_mask"))
        for row in range(min(self.limit, len(ids))):
            student_logits = student[row] if torch.is_tensor(student) else self._logits(student, row)
            completion = ids[row][labels[row] != NO_LABEL].tolist()
            entry = {
                "step": step,
                "writer": writer,
                **self._texts(ids[row, : lengths[row]].tolist(), completion),
                "teacher_logprobs": None,
                "student_logprobs": token_log_probs(student_logits.detach(), ids[row], labels[row]),
            }
            if teacher is not None:
                entry["teacher_logprobs"] = token_log_probs(teacher[row].detach(), ids[row], labels[row])
                entry["teacher_nll"] = -sum(entry["teacher_logprobs"]) / max(
                    len(entry["teacher_logprobs"]), 1
                )
            self.pending.append(entry)

    @staticmethod
    def _logits(student: HiddenStates, row: int) -> torch.Tensor:
        """One row's logits from the student's final hidden states and output layer."""
        with torch.no_grad():
            return student.hidden[row] @ student.weight.T

    def _texts(self, prompt: list[int], completion: list[int]) -> dict[str, Any]:
        texts = {"prompt_ids": prompt, "completion_ids": completion}
        if self.tokenizer is not None:
            texts["prompt"] = self.tokenizer.decode(prompt)
            texts["completion"] = self.tokenizer.decode(completion)
        return texts

    def write(self) -> None:
        """Append the kept completions, one JSON line each, in a single write; then forget them."""
        if not self.pending:
            return
        lines = "".join(json.dumps(entry) + "\n" for entry in self.pending).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, lines)
        finally:
            os.close(fd)
        self.pending = []
