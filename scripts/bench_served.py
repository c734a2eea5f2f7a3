"""Served-teacher benchmark, measured side by side in one run: the KD step of a student whose teacher's
top-k comes from a server (``scripts/serve_teacher.py`` on this machine, ``teacher_source: served``) vs the
KD step of the same student from a teacher cache of the same teacher and top-k (``teacher_source:
cached``). Whole ``Trainer.train`` runs of ``--steps`` steps (data loading, the collator's requests in
flight while the student trains, the loss), alternated ``--rounds`` times; the ratio of medians of the
time per step, with the collator's requests in the training process (``dataloader_num_workers: 0``) and in
``--workers`` DataLoader workers (the cache read the same way). Target ≤ 1.1. Also the round trip of one batch's request, asked synchronously (what
the prefetch hides).

    python scripts/bench_served.py [--steps 30] [--rounds 3] [--batch_size 8] [--seq_len 64]

Models are Llamas from configs (offline): teacher ``--teacher_hidden`` × ``--teacher_layers``, student
``--student_hidden`` × ``--student_layers``, over a word-level vocabulary of ``--vocab`` tokens; each process uses ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.tasks import CausalLMTask
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.signal import build_teacher_signal, open_teacher_source

ROOT = Path(__file__).resolve().parents[1]


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
    args = parser.parse_args()
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
            per_step = {name: [] for name in sources}
            round_trip = []
            for r in range(args.rounds + 1):  # round 0 warms up
                for name, (fields, num_workers) in sources.items():
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
                    prepared = run_task.prepare(splits["train"], student_processor=tokenizer)
                    trainer = DistillationTrainer(
                        model=student, args=config, task=run_task, teacher_signal=signal, train_dataset=prepared,
                        processing_class=tokenizer,
                    )  # fmt: skip
                    start = time.perf_counter()
                    trainer.train()
                    elapsed = (time.perf_counter() - start) / args.steps
                    if r:
                        per_step[name].append(elapsed)
                    if name == "served" and r:  # the round trip the prefetch hides
                        batch = run_task.collate([prepared[i] for i in range(args.batch_size)])
                        start = time.perf_counter()
                        signal(batch)  # not collated by the signal's collator: asked now
                        round_trip.append(time.perf_counter() - start)
        finally:
            server.terminate()
            server.wait()
    median = {name: statistics.median(times) * 1e3 for name, times in per_step.items()}
    size = sum(p.numel() for p in teacher.parameters()) / 1e6
    print(
        f"[served] batch {args.batch_size} × {args.seq_len} tokens, vocabulary {args.vocab}, top-{args.top_k}; teacher "
        f"Llama {args.teacher_hidden}×{args.teacher_layers} ({size:.2f}M), student Llama {args.student_hidden}×{args.student_layers}; {args.threads} thread(s) "
        f"per process; {args.rounds} rounds of {args.steps} steps (medians of time per step, whole train())"
    )
    for name, value in median.items():
        print(f"  KD step, {name:<28} {value:8.1f} ms")
    print(f"  one batch's request asked synchronously  {statistics.median(round_trip) * 1e3:8.1f} ms")
    w = args.workers
    print(
        f"  served / cached, in-process prefetch       = {median['served'] / median['cached']:.3f}   (target ≤ 1.1)"
    )
    print(
        f"  served / cached, {w} DataLoader workers    = "
        f"{median[f'served, {w} workers'] / median[f'cached, {w} workers']:.3f}   (target ≤ 1.1)"
    )


if __name__ == "__main__":
    main()
