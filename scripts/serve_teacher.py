"""Serve a local Transformers causal LM as a teacher, speaking the part of vLLM's OpenAI-compatible API
that ``teacher_source: served`` uses (for machines without vLLM, for CPUs, for the tests).

    python scripts/serve_teacher.py --model PATH --port 8000 [--host 127.0.0.1] [--served-model-name NAME]

- ``GET /v1/models``: the one model, as vLLM lists it, with ``vocab_size`` (its output classes) and
  ``tokenizer_hash`` (``hf_kd.tasks.base.processor_fingerprint``) added, which the client checks;
- ``POST /tokenize``: ``{"model", "prompt": text, "add_special_tokens"}`` → ``{"tokens", "count", "max_model_len"}``;
- ``POST /v1/completions``: ``prompt`` as token ids (one list, or a list of lists), ``max_tokens: 1``,
  ``prompt_logprobs: k`` → vLLM's answer: ``choices[i].prompt_logprobs``, None at position 0, then a dict
  ``{"<id>": {"logprob", "rank", "decoded_token"}}`` of the k most likely ids given the tokens before,
  plus the prompt's own token with its rank; ``text`` the most likely next token.

Errors are answered as vLLM's (``{"object": "error", "message", "type", "code"}``). It listens on
127.0.0.1 unless ``--host`` says otherwise; with ``--api-key-env NAME`` set in its environment, requests
must carry ``Authorization: Bearer <that key>``. Safetensors weights only; no remote code.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoTokenizer

from hf_kd.modeling import load_teacher
from hf_kd.tasks import CausalLMTask
from hf_kd.tasks.base import processor_fingerprint


class BadRequest(Exception):
    """A request this server answers with HTTP ``code`` and ``message``."""

    def __init__(self, message: str, code: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.code, self.kind = code, kind


class Teacher:
    """The model, its tokenizer and the answers they give (one forward at a time)."""

    def __init__(self, path: str, name: str, max_batch_tokens: int):
        self.name, self.path = name, path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_teacher(CausalLMTask(), path)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.decoded = [self.tokenizer.decode([i]) for i in range(self.vocab_size)]  # vLLM's decoded_token
        # each id's JSON text around its log-prob and rank, as json.dumps writes them
        self.entry_head = [f'"{i}": {{"logprob": ' for i in range(self.vocab_size)]
        self.entry_tail = [f', "decoded_token": {json.dumps(token)}}}' for token in self.decoded]
        self.max_model_len = getattr(self.model.config, "max_position_embeddings", None)
        self.max_batch_tokens = max_batch_tokens
        self.lock = threading.Lock()

    def models(self) -> dict:
        entry = {
            "id": self.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "hf_kd",
            "root": self.path,
            "parent": None,
            "max_model_len": self.max_model_len,
            "vocab_size": self.vocab_size,
            "tokenizer_hash": processor_fingerprint(self.tokenizer),
        }
        return {"object": "list", "data": [entry]}

    def check_model(self, body: dict) -> None:
        if body.get("model") != self.name:
            raise BadRequest(f"The model `{body.get('model')}` does not exist.", 404, "NotFoundError")

    def tokenize(self, body: dict) -> dict:
        self.check_model(body)
        if not isinstance(body.get("prompt"), str):
            raise BadRequest("prompt must be a string")
        ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))[
            "input_ids"
        ]
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    def prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt)
        ):
            raise BadRequest(
                "this server reads prompts as token ids: a list of ints, or a list of such lists"
            )
        for p in prompt:
            if max(p) >= self.vocab_size or min(p) < 0:
                raise BadRequest(f"token id out of range [0, {self.vocab_size})")
            if self.max_model_len and len(p) > self.max_model_len:
                raise BadRequest(f"a prompt of {len(p)} tokens exceeds max_model_len={self.max_model_len}")
        return prompt

    def completions(self, body: dict) -> str:
        """vLLM's completion object as JSON text: the text ``json.dumps`` writes of it, built from
        precomputed pieces (the answer is about 80 bytes per log-prob; dicts then ``json.dumps`` cost
        the server as much as the teacher's forward)."""
        self.check_model(body)
        prompts = self.prompts(body)
        if body.get("max_tokens", 16) != 1:
            raise BadRequest("this server answers max_tokens: 1 only (prompt log-probs)")
        k = body.get("prompt_logprobs")
        if k is not None and not (isinstance(k, int) and 0 <= k <= self.vocab_size):
            raise BadRequest(f"prompt_logprobs must be an int in [0, {self.vocab_size}]")
        choices = []
        step = max(1, self.max_batch_tokens // max(len(p) for p in prompts))
        for start in range(0, len(prompts), step):
            choices += self._answer(prompts[start : start + step], k, start)
        tokens = sum(len(p) for p in prompts)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
        }
        usage = {
            "prompt_tokens": tokens,
            "total_tokens": tokens + len(prompts),
            "completion_tokens": len(prompts),
        }
        return f'{json.dumps(head)[:-1]}, "choices": [{", ".join(choices)}], "usage": {json.dumps(usage)}}}'

    def _answer(self, prompts: list[list[int]], k: int | None, first_index: int) -> list[str]:
        """The JSON text of each prompt's choice."""
        length = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p)], mask[b, : len(p)] = torch.tensor(p), 1
        with self.lock, torch.inference_mode():
            log_p = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        choices = []
        for b, p in enumerate(prompts):
            n = len(p)
            next_id = int(log_p[b, n - 1].argmax())
            choice = {
                "index": first_index + b,
                "text": self.decoded[next_id],
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
            positions = (
                "null"
                if k is None
                else f"[{', '.join(['null', *self._positions(log_p[b, : n - 1], p[1:], k)])}]"
            )
            choices.append(f'{json.dumps(choice)[:-1]}, "prompt_logprobs": {positions}}}')
        return choices

    def _positions(self, log_p: torch.Tensor, tokens: list[int], k: int) -> list[str]:
        """At each position, the JSON text of the dict of the k most likely ids (rank 1..k) and the
        prompt's own next token with its rank (1 + the number of ids more likely), from ``log_p``
        [positions, V]."""
        if not tokens:
            return []
        own = torch.tensor(tokens)
        own_log_p = log_p.gather(1, own[:, None])
        own_rank = ((log_p > own_log_p).sum(-1) + 1).tolist()
        top_log_p, top_ids = torch.topk(log_p, k, dim=-1)
        # every log-prob written once by json.dumps (its floats as Python writes them, ±Infinity, NaN)
        rows = json.dumps(torch.cat([top_log_p, own_log_p], 1).tolist())[2:-2].split("], [")
        head, tail = self.entry_head, self.entry_tail
        answers = []
        for ids, row, token, rank in zip(top_ids.tolist(), rows, tokens, own_rank, strict=True):
            values = row.split(", ")
            entries = [
                f'{head[i]}{value}, "rank": {r}{tail[i]}'
                for r, (i, value) in enumerate(zip(ids, values[:k], strict=True), start=1)
            ]
            if token not in ids:
                entries.append(f'{head[token]}{values[-1]}, "rank": {rank}{tail[token]}')
            answers.append(f"{{{', '.join(entries)}}}")
        return answers


def handler(teacher: Teacher, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet: one line per request is noise for training
            pass

        def _send(self, code: int, payload: dict | str) -> None:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: BadRequest) -> None:
            self._send(
                err.code,
                {"object": "error", "message": str(err), "type": err.kind, "param": None, "code": err.code},
            )

        def _authorised(self) -> bool:
            if api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}":
                return True
            self._send(401, {"error": "Unauthorized"})
            return False

        def do_GET(self):
            if not self._authorised():
                return
            if self.path == "/v1/models":
                self._send(200, teacher.models())
            elif self.path == "/health":
                self._send(200, {})
            else:
                self._error(BadRequest(f"no route {self.path}", 404, "NotFoundError"))

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not self._authorised():
                return
            routes = {"/v1/completions": teacher.completions, "/tokenize": teacher.tokenize}
            try:
                if self.path not in routes:
                    raise BadRequest(f"no route {self.path}", 404, "NotFoundError")
                try:
                    request = json.loads(body)
                except json.JSONDecodeError as err:
                    raise BadRequest(f"the body is not JSON: {err}") from None
                self._send(200, routes[self.path](request))
            except BadRequest as err:
                self._error(err)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A local directory with the model and its tokenizer.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--host", default="127.0.0.1", help="The address to listen on (default: this machine only)."
    )
    parser.add_argument(
        "--served-model-name", default=None, help="The model's name in the API (default: --model)."
    )
    parser.add_argument(
        "--api-key-env", default=None, help="An environment variable holding the key requests must carry."
    )
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="Tokens per forward at most.")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    torch.set_grad_enabled(False)
    teacher = Teacher(args.model, args.served_model_name or args.model, args.max_batch_tokens)
    server = ThreadingHTTPServer((args.host, args.port), handler(teacher, api_key))
    print(f"serving {teacher.name} on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
