"""Served teacher: the teacher's top-k log-probabilities for every position of a batch, asked of a server
speaking vLLM's OpenAI-compatible completions API (a stock ``vllm serve``, or ``scripts/serve_teacher.py``).

One request per batch, the batch's rows as token-id prompts::

    POST {url}/v1/completions
    {"model": M, "prompt": [[ids of row 0], [ids of row 1], ...], "max_tokens": 1, "temperature": 0,
     "prompt_logprobs": k}

vLLM answers ``choices[i].prompt_logprobs`` for prompt ``i``: a list over its positions, None at the first,
then at position t a dict ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding the k most
likely ids of the teacher's distribution given the tokens before t (and the prompt's own token t, with its
rank, when it is not among them). The distribution that position t's logits give is that of t + 1: it
becomes :class:`hf_kd.losses.SparseLogits` ``[B, T, k]`` with the tail mass log(1 − Σ top-k), as a cached
top-k is (``sparse_tail`` applies). The last real position of a row and its padding get the collator's
filler (uniform over the k slots, tail −inf): they have no next-token target.

Requests for a batch start when the batch is collated (:meth:`ServedTeacher.collator`), in a thread pool
of ``concurrency`` workers, so the next batch is in flight while the student trains; with
``dataloader_num_workers`` ≥ 1 each DataLoader worker asks for its own batches (``prefetch_factor``
batches each, answers parsed outside the training process). A batch not seen by the collator (the
student's sampled completions) is asked for when it is needed. Each request is tried
``retries + 1`` times with exponential backoff; then :class:`TeacherServerError` stops the run (its
checkpoints are complete: resume once the server is back). Before training the server is checked once:
the model it serves, and its tokenizer against the student's (``tokenizer_hash`` and ``vocab_size``
when the server says them, as ``scripts/serve_teacher.py`` does in ``/v1/models``; the ids of a probe
text through vLLM's ``/tokenize``). The API key is read from the environment variable ``api_key_env``
names and sent as a bearer token; it is never stored in the config, a record or a message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import time
import urllib.error
import urllib.request
from array import array
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import Any

import torch

from hf_kd.losses import SparseLogits
from hf_kd.modeling import logit_layer_weight
from hf_kd.tasks.base import CACHE_PREFIX, Task, processor_fingerprint, split_batch
from hf_kd.teachers.contract import SignalDefaults

logger = logging.getLogger(__name__)

DEFAULTS = {
    "top_k": 20,
    "api_key_env": "HF_KD_TEACHER_API_KEY",
    "timeout": 60.0,
    "retries": 3,
    "backoff": 0.5,
    "concurrency": 4,
}
"""``teacher_options`` of ``teacher_source: served`` besides ``url`` and ``model`` (both required)."""
PROBE_TEXT = "The teacher and the student read the same tokens: 0123456789 ÄÖÜ éà ß 日本 🙂."
"""A text whose token ids, by the server's tokenizer and the student's, must agree."""
SERVED = "served_"
"""The batch columns (``kd_teacher_served_*``) of answers asked in a DataLoader worker."""
PENDING_LIMIT = 64
"""Requested batches kept for their training step at most (older ones are dropped unused)."""


class TeacherServerError(RuntimeError):
    """The teacher server is unreachable, refuses the request, or serves another model or tokenizer."""


def _options(config) -> dict[str, Any]:
    options = {**DEFAULTS, **(config.teacher_options or {})}
    missing = [name for name in ("url", "model") if not options.get(name)]
    if missing:
        raise ValueError(
            f"teacher_source='served' needs teacher_options {missing} (the server and its model)"
        )
    if not (isinstance(options["top_k"], int) and options["top_k"] >= 1):
        raise ValueError(f"teacher_options.top_k={options['top_k']!r} must be a positive number of log-probs")
    for name in ("retries", "concurrency"):
        if not (isinstance(options[name], int) and options[name] >= (1 if name == "concurrency" else 0)):
            raise ValueError(f"teacher_options.{name}={options[name]!r} must be a whole number ≥ 1")
    return options


def _client(options: dict[str, Any]) -> TeacherClient:
    names = ("api_key_env", "timeout", "retries", "backoff")
    return TeacherClient(options["url"], options["model"], **{name: options[name] for name in names})


class TeacherClient:
    """HTTP calls to the server at ``url`` (JSON in, JSON out) with a timeout, retries and backoff."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str = DEFAULTS["api_key_env"],
        timeout: float = DEFAULTS["timeout"],
        retries: int = DEFAULTS["retries"],
        backoff: float = DEFAULTS["backoff"],
    ):
        self.url, self.model = url.rstrip("/"), model
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        key = os.environ.get(api_key_env)
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def request(self, path: str, payload: dict | None = None) -> Any:
        """GET ``path`` (``payload`` None) or POST ``payload`` as JSON; the answer's JSON. A refusal
        (HTTP 4xx) raises at once with the server's message; no answer, or a 5xx, is retried."""
        data = None if payload is None else json.dumps(payload).encode()
        failure = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, headers=self._headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code < 500:
                    raise TeacherServerError(
                        f"the teacher server at {self.url} refused {path} (HTTP {err.code}): {message}"
                    ) from None
                failure = f"HTTP {err.code}: {message}"
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
                failure = str(getattr(err, "reason", err))
        raise TeacherServerError(
            f"the teacher server at {self.url} did not answer {path} after {self.retries + 1} tries "
            f"({failure}); checkpoints written so far are complete: start the server and resume "
            "(resume_from_checkpoint: true)"
        )

    def entry(self) -> dict[str, Any]:
        """The server's ``/v1/models`` entry of :attr:`model`; refused when it serves no such model."""
        served = self.request("/v1/models").get("data", [])
        entry = next((m for m in served if m.get("id") == self.model), None)
        if entry is None:
            raise TeacherServerError(
                f"the teacher server at {self.url} serves {[m.get('id') for m in served]}, not "
                f"teacher_options.model={self.model!r}"
            )
        return entry

    def check(self, processor: Any, vocab_size: int | None) -> None:
        """Refuse a server that does not serve :attr:`model`, or whose tokenizer is not ``processor``:
        its ``tokenizer_hash`` and ``vocab_size`` when its ``/v1/models`` entry has them, the ids of
        :data:`PROBE_TEXT` through ``/tokenize`` otherwise; a ``vocab_size`` it says, smaller than the
        student's ``vocab_size``."""
        entry = self.entry()
        if "tokenizer_hash" in entry:
            own = processor_fingerprint(processor)
            if entry["tokenizer_hash"] != own:
                raise TeacherServerError(
                    f"the teacher server's model {self.model!r} reads another tokenizer than the student "
                    f"(tokenizer hash {entry['tokenizer_hash'][:12]}…, the student's {own[:12]}…): a served "
                    "teacher must share the student's tokenizer"
                )
        else:
            ids = self.request(
                "/tokenize", {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": True}
            ).get("tokens")
            own = processor(PROBE_TEXT)["input_ids"]
            if ids != own:
                raise TeacherServerError(
                    f"the teacher server's model {self.model!r} tokenizes a probe text to {ids}, the student's "
                    f"tokenizer to {own}: a served teacher must share the student's tokenizer"
                )
        served_vocab = entry.get("vocab_size")
        if served_vocab is not None and vocab_size is not None and served_vocab < vocab_size:
            raise TeacherServerError(
                f"the teacher server's model {self.model!r} has {served_vocab} output classes, fewer than the "
                f"student's {vocab_size}"
            )

    def prompt_logprobs(self, prompts: list[list[int]], top_k: int) -> list[list[dict | None]]:
        """vLLM's ``prompt_logprobs`` of each prompt (token ids), in the prompts' order."""
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_k,
        }
        choices = self.request("/v1/completions", payload).get("choices", [])
        if len(choices) != len(prompts):
            raise TeacherServerError(
                f"the teacher server at {self.url} answered {len(choices)} choices for {len(prompts)} prompts"
            )
        answers = [choice.get("prompt_logprobs") for choice in sorted(choices, key=lambda c: c["index"])]
        for prompt, answer in zip(prompts, answers, strict=True):
            if answer is None or len(answer) != len(prompt):
                raise TeacherServerError(
                    f"the teacher server at {self.url} answered no prompt_logprobs over the prompt's "
                    f"{len(prompt)} tokens (got {None if answer is None else len(answer)})"
                )
        return answers


def _error_message(err: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error answer (``{"message": ...}`` or ``{"error": {"message"}}``)."""
    try:
        body = json.loads(err.read())
    except (json.JSONDecodeError, OSError, ValueError):
        return err.reason
    inner = body.get("error", body) if isinstance(body, dict) else body
    return inner.get("message", str(body)) if isinstance(inner, dict) else str(body)


def _within_vocabulary(
    values: list[float], ids: list[int], num_classes: int
) -> tuple[list[float], list[int]]:
    """One position's top-k (log-probs, ids) over the first ``num_classes`` ids: an id beyond them (a
    padded output layer) is dropped and the others renormalised over the mass left (as the online
    teacher's logits are cut to the student's vocabulary); the slots it leaves are padding (log-prob
    −inf, an id not kept)."""
    kept = [(token, value) for token, value in zip(ids, values, strict=True) if token < num_classes]
    dropped = sum(math.exp(value) for token, value in zip(ids, values, strict=True) if token >= num_classes)
    norm = math.log1p(-min(dropped, 1.0 - 1e-12))
    kept_ids = [token for token, _ in kept]
    free = (token for token in range(num_classes) if token not in kept_ids)
    padding = [next(free) for _ in range(len(ids) - len(kept))]
    return [value - norm for _, value in kept] + [-math.inf] * len(padding), kept_ids + padding


def _top_entries(positions: list[dict], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` entries of lowest rank at each of ``positions`` (ties in the order the server gave
    them, as a stable sort of each position's entries by rank keeps them), as (log-probs float64, ids),
    both ``[len(positions), top_k]``: every entry read in one pass, the choice made on tensors."""
    counts = torch.tensor([len(position) for position in positions])
    if int(counts.min()) < top_k:
        raise TeacherServerError(
            f"the teacher server answered {int(counts.min())} log-probs at a position, fewer than top_k={top_k}"
        )
    ids = torch.frombuffer(array("q", map(int, chain.from_iterable(positions))), dtype=torch.long)
    entries = map(operator.itemgetter("logprob", "rank"), chain.from_iterable(p.values() for p in positions))
    pairs = torch.frombuffer(array("d", chain.from_iterable(entries)), dtype=torch.float64).view(-1, 2)
    row = torch.repeat_interleave(torch.arange(len(positions)), counts)
    column = torch.arange(len(ids)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    ranks = torch.full((len(positions), int(counts.max())), math.inf, dtype=torch.float64)
    ranks[row, column] = pairs[:, 1]
    entry = torch.zeros(ranks.shape, dtype=torch.long)  # which entry each [position, slot] holds
    entry[row, column] = torch.arange(len(ids))
    chosen = entry.gather(1, torch.argsort(ranks, dim=1, stable=True)[:, :top_k])  # empty slots sort last
    return pairs[chosen, 0], ids[chosen]


def sparse_from_prompt_logprobs(
    answers: list[list[dict | None]], lengths: list[int], length: int, top_k: int, num_classes: int
) -> SparseLogits:
    """``prompt_logprobs`` answers (one per row of real length ``lengths[b]``) → SparseLogits
    ``[B, length, top_k]`` over ``num_classes`` classes: position t holds the entries of answer position
    t + 1 (:func:`_top_entries`, then :func:`_within_vocabulary` where an id is beyond
    ``num_classes``), the tail its left-out mass; the rest as the collator pads a cached top-k."""
    rows = len(answers)
    log_probs = torch.full((rows, length, top_k), -math.log(top_k))
    indices = torch.arange(top_k).expand(rows, length, top_k).clone()
    tail = torch.full((rows, length), -math.inf)
    positions = [p for answer, n in zip(answers, lengths, strict=True) if n >= 2 for p in answer[1:n]]
    if not positions:
        return SparseLogits(log_probs, indices, tail, num_classes)
    values, ids = _top_entries(positions, top_k)
    for p in (ids >= num_classes).any(-1).nonzero()[:, 0].tolist():  # a padded output layer's ids
        kept_values, kept_ids = _within_vocabulary(values[p].tolist(), ids[p].tolist(), num_classes)
        values[p], ids[p] = torch.tensor(kept_values, dtype=torch.float64), torch.tensor(kept_ids)
    targets = torch.arange(length) < (torch.tensor(lengths) - 1).clamp(min=0)[:, None]  # [B, length]
    log_probs[targets] = values.float()
    indices[targets] = ids
    tail[targets] = torch.log1p(-values.exp().sum(-1).clamp(max=1.0)).float()
    return SparseLogits(log_probs, indices, tail, num_classes)


class ServedTeacher(SignalDefaults):
    """The teacher signal of a server (see the module's docstring). ``num_classes``: the size of the
    output space (the student's vocabulary)."""

    returns = ("sparse",)
    scores_samples = True

    def __init__(self, client: TeacherClient, top_k: int, num_classes: int, concurrency: int = 4):
        self.client, self.top_k, self.num_classes = client, top_k, num_classes
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher-request")
        self._pending: OrderedDict[str, Future] = OrderedDict()

    @staticmethod
    def _rows(batch: dict[str, Any]) -> tuple[list[list[int]], list[int], int]:
        if "position_ids" in batch:
            raise ValueError("a served teacher reads unpacked rows: packing: true is not supported with it")
        ids = batch["input_ids"].cpu()
        mask = batch.get("attention_mask")
        lengths = (
            mask.cpu().sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
        ).tolist()
        if mask is not None and not torch.equal(
            mask.cpu().bool(), torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]
        ):
            raise ValueError(
                "a served teacher reads right-padded rows: each attention mask must be ones, then zeros"
            )
        return [row[:n].tolist() for row, n in zip(ids, lengths, strict=True)], lengths, ids.shape[1]

    @staticmethod
    def _key(prompts: list[list[int]], length: int) -> str:
        return hashlib.sha256(json.dumps([length, prompts]).encode()).hexdigest()

    def _ask(self, prompts: list[list[int]], lengths: list[int], length: int) -> SparseLogits:
        answers = self.client.prompt_logprobs(prompts, self.top_k)
        return sparse_from_prompt_logprobs(answers, lengths, length, self.top_k, self.num_classes)

    def collator(self, collate):
        """``collate``, then the batch's request: in the main process started in the thread pool (the
        step takes its answer); in a DataLoader worker (``dataloader_num_workers`` ≥ 1: several batches
        in flight, the answers parsed outside the training process) asked there and attached to the batch
        as ``kd_teacher_served_*`` columns."""

        def collate_and_request(features):
            batch = collate(features)
            prompts, lengths, length = self._rows(batch)
            if torch.utils.data.get_worker_info() is not None:
                sparse = self._ask(prompts, lengths, length)
                batch |= {
                    CACHE_PREFIX + SERVED + "log_probs": sparse.log_probs,
                    CACHE_PREFIX + SERVED + "indices": sparse.indices,
                    CACHE_PREFIX + SERVED + "tail_log_mass": sparse.tail_log_mass,
                }
                return batch
            key = self._key(prompts, length)
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._ask, prompts, lengths, length)
                while len(self._pending) > PENDING_LIMIT:
                    self._pending.popitem(last=False)
            return batch

        return collate_and_request

    def __call__(self, batch: dict[str, Any]) -> SparseLogits:
        columns = split_batch(batch)[2]
        if SERVED + "log_probs" in columns:  # asked in a DataLoader worker
            names = ("log_probs", "indices", "tail_log_mass")
            return SparseLogits(*(columns[SERVED + name] for name in names), self.num_classes)
        prompts, lengths, length = self._rows(batch)
        future = self._pending.pop(self._key(prompts, length), None)
        sparse = future.result() if future is not None else self._ask(prompts, lengths, length)
        device = batch["input_ids"].device
        return SparseLogits(
            sparse.log_probs.to(device),
            sparse.indices.to(device),
            sparse.tail_log_mass.to(device),
            sparse.num_classes,
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a DataLoader worker started by spawn) without the pool and the pending requests."""
        return {**self.__dict__, "_pool": None, "_pending": OrderedDict()}


def open_served_teacher(config, task: Task, splits, split_names: list[str]):
    """The ``served`` source's opening, before any model loads: its options checked, the task checked
    (causal LM, unpacked rows) and the server asked once which models it serves (down, or not serving
    ``teacher_options.model``: :class:`TeacherServerError`). Returns (the client, the splits as given)."""
    options = _options(config)
    if not task.can_generate:  # whole token sequences of one row each: a causal LM, unpacked
        raise ValueError(
            f"teacher_source='served' scores token sequences: it needs task: causal-lm without packing "
            f"(got task {task.name!r}{', packing: true' if getattr(task, 'packing', False) else ''})"
        )
    client = _client(options)
    client.entry()
    return client, splits


def build_served_teacher(
    config, task: Task, student, *, resource: TeacherClient | None = None, student_processor=None, **_: Any
) -> ServedTeacher:
    """The ``served`` source's signal: the server checked against the student's tokenizer
    (:meth:`TeacherClient.check`) before any training step."""
    options = _options(config)
    client = resource or _client(options)
    num_classes = logit_layer_weight(student).shape[0]
    processor = student_processor if student_processor is not None else getattr(task, "tokenizer", None)
    if processor is None:
        raise ValueError("teacher_source='served' checks the server's tokenizer: pass student_processor")
    client.check(processor, num_classes)
    return ServedTeacher(client, options["top_k"], num_classes, options["concurrency"])
