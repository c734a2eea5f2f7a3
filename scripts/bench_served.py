"""Served-teacher benchmark, measured side by side in one run: the KD step of a student whose teacher's
top-k comes from a server (``scripts/serve_teacher.py`` on this machine, ``teacher_source: served``) vs the
KD step of the same student from a teacher cache of the same teacher and top-k (``teacher_source:
cached``). Whole ``Trainer.train`` runs of ``--steps`` steps (data loading, the collator's requests in
flight while the student trains, the loss), alternated ``--rounds`` times; the ratio of medians of the
time per step, with the collator's requests in the training process (``dataloader_num_workers: 0``) and in
``--workers`` DataLoader workers (the cache read the same way). Target ≤ 1.1. Also the round trip of one batch's request, asked synchronously (what
the prefetch hides), and where it goes: the server's teacher forward and its answer's JSON text (timed in
this process on the same model), the client's ``json.loads`` and its conversion to SparseLogits; and the
part of the served step spent in the teacher signal (waiting for the batch's answer).

Two settings (``--settings``), their runs alternated round by round too: ``shared``, every process on every
core of the machine; ``pinned``, the server process (all its threads) on the first core and this
process, the trainer, with its request threads and its DataLoader workers (forked from it, they inherit
its affinity), on the others, for both sources: a model of the server on other hardware, on one machine.

    python scripts/bench_served.py [--steps 30] [--rounds 3] [--batch_size 8] [--seq_len 64] [--settings shared,pinned]

Models are Llamas from configs (offline): teacher ``--teacher_hidden`` × ``--teacher_layers``, student
``--student_hidden`` × ``--student_layers``, over a word-level vocabulary of ``--vocab`` tokens; each process uses ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.tasks import CausalLMTask
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.served import ServedTeacher, sparse_from_prompt_logprobs
from hf_kd.teachers.signal import build_teacher_signal, open_teacher_source

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from serve_teacher import Teacher  # noqa: E402  (the server's own code, timed in this process)


def llama(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tokenizer_of(vocab: int) -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of process ``pid`` on ``cores`` (threads and processes it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def profile(
    url: str, model: str, teacher: Teacher, prompts: list[list[int]], top_k: int, vocab: int
) -> tuple[dict[str, float], int]:
    """Seconds of one batch's request by part: the round trip (raw answer), the client's ``json.loads`` and
    conversion; the server's forward and answer text (its ``Teacher`` in this process). And the answer's
    size in bytes."""
    payload = {
        "model": model,
        "prompt": prompts,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": top_k,
    }
    request = urllib.request.Request(
        url + "/v1/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    times, start = {}, time.perf_counter()
    with urllib.request.urlopen(request) as answer:
        raw = answer.read()
    times["round trip (answer received)"], start = time.perf_counter() - start, time.perf_counter()
    choices = json.loads(raw)["choices"]
    times["client: json.loads"], start = time.perf_counter() - start, time.perf_counter()
    lengths = [len(p) for p in prompts]
    sparse_from_prompt_logprobs([c["prompt_logprobs"] for c in choices], lengths, max(lengths), top_k, vocab)
    times["client: to SparseLogits"] = time.perf_counter() - start
    ids = torch.tensor(prompts)  # the bench's rows all have the same length
    with torch.inference_mode():
        start = time.perf_counter()
        torch.log_softmax(teacher.model(input_ids=ids).logits.float(), dim=-1)
        times["server: teacher forward"], start = time.perf_counter() - start, time.perf_counter()
        teacher.completions(payload)
        times["server: forward + answer text"] = time.perf_counter() - start
    return times, len(raw)


class TimedServedTeacher(ServedTeacher):
    """The served signal, each call's seconds kept: in a step, the wait for the batch's answer (its
    request in flight since the batch was collated) and, in the training process, its conversion."""

    calls: list[float] = []

    def __call__(self, batch):
        start = time.perf_counter()
        try:
            return super().__call__(batch)
        finally:
            self.calls.append(time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--teacher_hidden", type=int, default=128)
    parser.add_argument("--teacher_layers", type=int, default=2)
    parser.add_argument("--student_hidden", type=int, default=64)
    parser.add_argument("--student_layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers of the second pair of runs."
    )
    parser.add_argument(
        "--settings", default="shared,pinned", help="shared (every process on every core), pinned, or both."
    )
    args = parser.parse_args()
    settings = args.settings.split(",")
    if not settings or set(settings) - {"shared", "pinned"}:
        parser.error(f"--settings {args.settings!r}: expected shared, pinned or shared,pinned")
    everywhere = os.sched_getaffinity(0)
    if "pinned" in settings and len(everywhere) < 2:
        parser.error(f"--settings pinned needs 2 cores or more; this process may use {sorted(everywhere)}")
    server_cores, trainer_cores = {min(everywhere)}, everywhere - {min(everywhere)}
    load = [os.getloadavg()[0]]
    torch.set_num_threads(args.threads)
    tokenizer = tokenizer_of(args.vocab)
    g = torch.Generator().manual_seed(0)
    rows = args.steps * args.batch_size
    texts = [
        " ".join(f"w{i}" for i in torch.randint(0, args.vocab - 3, (args.seq_len,), generator=g).tolist())
        for _ in range(rows)
    ]
    data = DatasetDict(train=Dataset.from_dict({"text": texts}))
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        teacher = llama(args.teacher_hidden, args.teacher_layers, args.vocab, seed=0).eval()
        teacher.save_pretrained(out / "teacher")
        tokenizer.save_pretrained(out / "teacher")
        task = CausalLMTask(max_length=args.seq_len)
        capture_teacher_logits(
            teacher, tokenizer, task, data, out / "cache", teacher_id="teacher", top_k=args.top_k, batch_size=16, progress=False
        )  # fmt: skip
        port = free_port()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
        }
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/serve_teacher.py"), "--model", str(out / "teacher"), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the teacher server did not start") from None
                    time.sleep(0.2)
            cached = dict(teacher_source="cached", teacher_cache=str(out / "cache"))
            options = {"url": f"http://127.0.0.1:{port}", "model": str(out / "teacher"), "top_k": args.top_k}
            served = dict(teacher_source="served", teacher_options=options)
            w = args.workers
            sources = {
                "cached": (cached, 0),
                "served": (served, 0),
                f"cached, {w} workers": (cached, w),
                f"served, {w} workers": (served, w),
            }
            per_step = {(setting, name): [] for setting in settings for name in sources}
            round_trip = {setting: [] for setting in settings}
            waited = {key: [] for key in per_step if key[1].startswith("served")}
            parts = {}
            in_process = Teacher(str(out / "teacher"), options["model"], 16384)
            for r in range(args.rounds + 1):  # round 0 warms up
                for setting, name in per_step:
                    fields, num_workers = sources[name]
                    pin(server.pid, server_cores if setting == "pinned" else everywhere)
                    pin(os.getpid(), trainer_cores if setting == "pinned" else everywhere)
                    config = DistillationConfig(
                        output_dir=str(out / name), alpha=0.5, temperature=2.0, use_cpu=True, report_to="none",
                        learning_rate=1e-4, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                        save_strategy="no", logging_steps=args.steps, disable_tqdm=True, seed=0,
                        dataloader_num_workers=num_workers, **fields,
                    )  # fmt: skip
                    run_task = CausalLMTask(max_length=args.seq_len)
                    run_task.use_processor(tokenizer)
                    resource, splits = open_teacher_source(config, run_task, data, ["train"])
                    student = llama(args.student_hidden, args.student_layers, args.vocab, seed=1)
                    signal = build_teacher_signal(
                        config, run_task, student, resource=resource, student_processor=tokenizer
                    )
                    if isinstance(signal, ServedTeacher):
                        signal.__class__ = TimedServedTeacher
                        TimedServedTeacher.calls = []
                    prepared = run_task.prepare(splits["train"], student_processor=tokenizer)
                    trainer = DistillationTrainer(
                        model=student, args=config, task=run_task, teacher_signal=signal, train_dataset=prepared,
                        processing_class=tokenizer,
                    )  # fmt: skip
                    start = time.perf_counter()
                    trainer.train()
                    elapsed = (time.perf_counter() - start) / args.steps
                    if r:
                        per_step[setting, name].append(elapsed)
                        if isinstance(signal, ServedTeacher):
                            waited[setting, name].append(sum(TimedServedTeacher.calls) / args.steps)
                    if name == "served" and r:  # the round trip the prefetch hides, and its parts
                        batch = run_task.collate([prepared[i] for i in range(args.batch_size)])
                        start = time.perf_counter()
                        signal(batch)  # not collated by the signal's collator: asked now
                        round_trip[setting].append(time.perf_counter() - start)
                        prompts = batch["input_ids"].tolist()
                        timed, answer_bytes = profile(
                            options["url"], options["model"], in_process, prompts, args.top_k, args.vocab
                        )
                        for part, seconds in timed.items():
                            parts.setdefault((setting, part), []).append(seconds)
                load.append(os.getloadavg()[0])
        finally:
            server.terminate()
            server.wait()
    median = {key: statistics.median(times) * 1e3 for key, times in per_step.items()}
    print(f"[served] one batch's answer: {answer_bytes / 1e3:.0f} kB of JSON")
    size = sum(p.numel() for p in teacher.parameters()) / 1e6
    print(
        f"[served] batch {args.batch_size} × {args.seq_len} tokens, vocabulary {args.vocab}, top-{args.top_k}; teacher "
        f"Llama {args.teacher_hidden}×{args.teacher_layers} ({size:.2f}M), student Llama {args.student_hidden}×{args.student_layers}; {args.threads} thread(s) "
        f"per process; {args.rounds} rounds of {args.steps} steps (medians of time per step, whole train()); "
        f"1-minute load average {min(load):.1f}–{max(load):.1f} over the run"
    )
    w = args.workers
    for setting in settings:
        where = (
            "every core"
            if setting == "shared"
            else f"server on {sorted(server_cores)}, trainer on {sorted(trainer_cores)}"
        )
        print(f" {setting} ({where}):")
        for name in sources:
            print(f"  KD step, {name:<28} {median[setting, name]:8.1f} ms")
            if (setting, name) in waited:
                print(
                    f"    of which in the teacher signal (waiting) {statistics.median(waited[setting, name]) * 1e3:8.1f}"
                )
        print(
            f"  one batch's request asked synchronously  {statistics.median(round_trip[setting]) * 1e3:8.1f} ms"
        )
        for (where_timed, part), seconds in parts.items():
            if where_timed == setting:
                print(f"    {part:<37} {statistics.median(seconds) * 1e3:8.1f}")
        ratio = median[setting, "served"] / median[setting, "cached"]
        print(f"  served / cached, in-process prefetch       = {ratio:.3f}   (target ≤ 1.1)")
        ratio = median[setting, f"served, {w} workers"] / median[setting, f"cached, {w} workers"]
        print(f"  served / cached, {w} DataLoader workers    = {ratio:.3f}   (target ≤ 1.1)")


if __name__ == "__main__":
    main()
