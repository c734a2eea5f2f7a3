"""Teacher-cache benchmarks, each measured side by side in one run.

1. step:     cached KD step time / plain fine-tuning step time, same student, same batches, interleaved
             (``DistillationTrainer.training_step`` with α = 0.5 and a ``CachedTeacher`` vs α = 0). Target ≤ 1.05.
2. capture:  capture throughput / raw teacher forward throughput on the same rows and batch size, interleaved.
             Capture is ``capture_teacher_logits`` end to end (tokenizing, fingerprinting the rows, teacher
             forward, writing shards, merging); raw is the teacher's forward alone over pre-collated batches.
             Target ≥ 0.9.
3. storage:  for a causal-LM-sized output space (V = 32,000, Zipf-like synthetic teacher logits): bytes per token
             of the per-token top-k cache columns (as written to disk) at k = 16, 32, 64, and the mean
             KL(full ‖ rebuilt) of the distribution rebuilt from the stored columns with the uniform tail
             (KL(rebuilt ‖ full) for the renormalized top-k, whose KL(full ‖ rebuilt) is infinite).
             Anchor: DistillKit stores about 114–300 bytes/token.

    python scripts/bench_cache.py [--only step|capture|storage] [--repeats 20]

Models are BERT-style from configs (offline, ``bench_overhead.bert``): teacher 256 × 4 layers, student 128 × 2.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import torch
from bench_overhead import bert, timed, trainer
from datasets import Dataset, DatasetDict
from datasets.arrow_writer import ArrowWriter
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.losses import SparseLogits, divergence_from_log_probs
from hf_kd.tasks import TextClassificationTask, split_batch
from hf_kd.teachers.cache import cache_features, capture_teacher_logits, columns_to_arrow, compress_logits
from hf_kd.teachers.cached import CachedTeacher

NUM_LABELS = 4  # bench_overhead.bert's head


def bench_step(args) -> None:
    """Cached KD step vs plain fine-tuning step of the same student on the same batches."""
    plain_student, kd_student = bert(128, 2, args.vocab, seed=1), bert(128, 2, args.vocab, seed=1)
    with tempfile.TemporaryDirectory() as out:
        plain = trainer(plain_student, None, 0.0, out)
        kd_args = DistillationConfig(
            output_dir=out, alpha=0.5, temperature=2.0, use_cpu=True, report_to="none", learning_rate=1e-4
        )
        kd = DistillationTrainer(
            model=kd_student,
            args=kd_args,
            task=TextClassificationTask(),
            teacher_signal=CachedTeacher(NUM_LABELS),
        )
        kd.create_optimizer_and_scheduler(num_training_steps=10_000)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g),
            "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
            "labels": torch.randint(0, NUM_LABELS, (args.batch_size,), generator=g),
            "kd_teacher_logits": 3 * torch.randn(args.batch_size, NUM_LABELS, generator=g),
        }
        for _ in range(4)
    ]
    times = {"plain": [], "cached": []}
    for r in range(args.repeats + 3):  # the first 3 rounds warm up
        batch = batches[r % len(batches)]
        plain_time = timed(plain.training_step, plain.model, dict(batch))
        cached_time = timed(kd.training_step, kd.model, dict(batch))
        if r >= 3:
            times["plain"].append(plain_time), times["cached"].append(cached_time)
    a, c = (statistics.median(times[k]) * 1e3 for k in ("plain", "cached"))
    print(
        f"[step] batch {args.batch_size} × {args.seq_len} tokens, student BERT 128×2, {args.repeats} rounds (medians)"
    )
    print(f"  plain fine-tuning step (α = 0)       {a:8.1f} ms")
    print(f"  cached KD step (α = 0.5, τ = 2)      {c:8.1f} ms")
    print(f"  cached / plain = {c / a:.3f}   (target ≤ 1.05)")


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(vocab - 2)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def bench_capture(args) -> None:
    """capture_teacher_logits end to end vs the teacher's forward over the same pre-collated batches."""
    teacher = bert(256, 4, args.vocab, seed=0).eval()
    tokenizer = word_tokenizer(args.vocab)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (args.rows,), generator=g)
    texts = [
        " ".join(f"w{i}" for i in torch.randint(0, args.vocab - 2, (int(n),), generator=g).tolist())
        for n in lengths
    ]
    data = DatasetDict(
        train=Dataset.from_dict({"text": texts, "label": [i % NUM_LABELS for i in range(args.rows)]})
    )
    task = TextClassificationTask(max_length=args.seq_len)
    prepared = task.prepare(data["train"], student_processor=tokenizer)
    batches = [
        split_batch(task.collate([prepared[i] for i in range(s, min(s + args.batch_size, args.rows))]))[0]
        for s in range(0, args.rows, args.batch_size)
    ]

    def raw_forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                teacher(**batch)

    def capture(out: str) -> None:
        capture_teacher_logits(
            teacher,
            tokenizer,
            task,
            data,
            out,
            teacher_id="bench",
            batch_size=args.batch_size,
            progress=False,
        )

    times = {"raw": [], "capture": []}
    raw_forward()  # warm-up
    for _ in range(args.capture_repeats):
        with tempfile.TemporaryDirectory() as out:
            times["raw"].append(timed(raw_forward))
            times["capture"].append(timed(capture, str(Path(out) / "cache")))
    raw, cap = (statistics.median(times[k]) for k in ("raw", "capture"))
    print(
        f"[capture] {args.rows} rows of {args.seq_len // 2}–{args.seq_len} tokens, batch {args.batch_size}, teacher BERT 256×4,"
    )
    print(f"          full logits float32, {args.capture_repeats} interleaved rounds (medians)")
    print(f"  raw teacher forward   {args.rows / raw:8.1f} rows/s")
    print(f"  capture (end to end)  {args.rows / cap:8.1f} rows/s")
    print(f"  capture / raw = {raw / cap:.3f}   (target ≥ 0.9)")


def zipf_logits(tokens: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """LM-like next-token logits: a Zipf law over a random ranking of the vocabulary, v_r = −a · log r + ε,
    with a per-token sharpness a ~ logNormal(log 2, 0.35) (peaked and flat positions) and ε ~ N(0, 0.5²):
    mean entropy ≈ 2.1 nats, mean top-1 p ≈ 0.57, like an LLM's next-token predictions."""
    sharpness = torch.exp(math.log(2.0) + 0.35 * torch.randn(tokens, 1, generator=generator))
    by_rank = -sharpness * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32)) + 0.5 * torch.randn(
        tokens, vocab, generator=generator
    )
    ranking = torch.argsort(torch.rand(tokens, vocab, generator=generator), dim=-1)
    return torch.empty_like(by_rank).scatter_(-1, ranking, by_rank)


def bench_storage(args) -> None:
    """Bytes per token and reconstruction KL of per-token top-k columns for a 32k vocabulary."""
    g = torch.Generator().manual_seed(0)
    rows, length = args.lm_tokens // 128, 128
    logits = zipf_logits(rows * length, args.lm_vocab, g).reshape(rows, length, args.lm_vocab)
    log_p = torch.log_softmax(logits, -1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean().item()
    top1 = log_p.max(-1).values.exp().mean().item()
    mask = torch.ones(rows, length, dtype=torch.long)
    print(
        f"[storage] {rows * length} tokens, V = {args.lm_vocab}, Zipf-like teacher: mean entropy {entropy:.2f} nats, mean top-1 p {top1:.3f}"
    )
    print(
        "  k   | dtype   | bytes/token | KL(full ‖ rebuilt), uniform | KL(rebuilt ‖ full), renorm | tail mass (means)"
    )
    full_bytes = {"float16": 2 * args.lm_vocab, "float32": 4 * args.lm_vocab}
    for k in (16, 32, 64):
        for dtype in ("float16", "float32"):
            features = cache_features(args.lm_vocab, k, dtype, per_token=True)
            with tempfile.TemporaryDirectory() as out:
                path = Path(out) / "shard.arrow"
                with ArrowWriter(features=features, path=str(path)) as writer:
                    writer.write_table(columns_to_arrow(compress_logits(logits, k), features, mask))
                    writer.finalize()
                size = path.stat().st_size
                stored = Dataset.from_file(str(path)).with_format("torch")[:]
            sparse = SparseLogits(
                stored["kd_teacher_log_probs"].float(),
                stored["kd_teacher_indices"].long(),
                stored["kd_teacher_tail_log_mass"],
                args.lm_vocab,
            )
            uniform = torch.log_softmax(sparse.to_dense_log_probs("uniform"), -1)
            renormalized = torch.log_softmax(sparse.to_dense_log_probs("renormalize"), -1)
            kl_uniform = (
                divergence_from_log_probs("forward_kl", uniform, log_p).mean().item()
            )  # KL(full ‖ uniform-tail)
            kl_renorm = (
                divergence_from_log_probs("forward_kl", log_p, renormalized).mean().item()
            )  # KL(renormalized ‖ full)
            tail = sparse.tail_log_mass.exp().mean().item()
            print(
                f"  {k:<3} | {dtype:<7} | {size / (rows * length):11.1f} | {kl_uniform:27.4f} | {kl_renorm:26.4f} | {tail:.3f}"
            )
    print(
        f"  full logits: {full_bytes['float16']} bytes/token in float16; KL(full ‖ renormalized) = ∞ (the tail gets 0)"
    )
    print("  anchor: DistillKit about 114–300 bytes/token")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("step", "capture", "storage"), default=None)
    parser.add_argument("--repeats", type=int, default=20, help="step benchmark rounds")
    parser.add_argument("--capture_repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rows", type=int, default=512, help="rows captured in the capture benchmark")
    parser.add_argument("--lm_vocab", type=int, default=32000)
    parser.add_argument("--lm_tokens", type=int, default=1024)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, bench in (("step", bench_step), ("capture", bench_capture), ("storage", bench_storage)):
        if args.only in (None, name):
            bench(args)


if __name__ == "__main__":
    main()
