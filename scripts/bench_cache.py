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
4. curve:    bytes/token vs fidelity of the per-token top-k (float16, k = 16/32/64) and of the
             ``topk-packed`` codec at several settings — KL(full ‖ rebuilt, uniform tail), top-1 agreement,
             overlap of the stored tokens with the full top-10, mean kept mass, decode µs/token — on
             (a) the Zipf-like synthetic logits of ``storage`` and (b) real LM logits: a small Llama trained
             here, offline, on Python's standard-library sources (byte-level BPE of ``--lm_bpe`` tokens),
             measured on held-out files; on (b) also the KL when the tail mass is spread like the
             teacher's mean distribution over 32 other held-out rows instead of uniformly (what a cached
             prior could give). Then, on that LM: a KD step from the compressed cache (decoded in
             the collator) vs a plain step of the same student (target ≤ 1.05), and a compressed capture
             vs the raw teacher forward (target ≥ 0.95).

5. sketch:   on the real LM of ``curve`` (``--lm_steps`` steps), KL(full ‖ rebuilt) at τ = 1 and τ = 2 (the
             tempered distributions) of the best ``topk-golomb`` settings at ≤ 64 bytes/token with the uniform
             tail vs a smaller ``topk-golomb`` top-k plus a low-rank sketch of the logits (rank, bits) with
             the tail spread like the sketch (``sparse_tail: sketch``); the sketch is fitted on the first
             4,096 training positions, as a capture fits it. Bytes/token as stored (both columns).

    python scripts/bench_cache.py [--only step|capture|storage|curve|lm-step|sketch] [--repeats 20]

Models are BERT-style from configs (offline, ``bench_overhead.bert``): teacher 256 × 4 layers, student 128 × 2.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_overhead import bert, timed, trainer
from datasets import Dataset, DatasetDict, Features
from datasets.arrow_writer import ArrowWriter
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.losses import SparseLogits, divergence_from_log_probs
from hf_kd.tasks import TextClassificationTask, split_batch
from hf_kd.tasks.causal_lm import CausalLMTask
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.cache.format import cache_features
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.cache.rows import columns_to_arrow, compress_logits, packed_to_arrow
from hf_kd.teachers.cached import CachedTeacher
from hf_kd.teachers.codec import CODECS, TopkCodec
from hf_kd.teachers.sketch import FIT_POSITIONS, LogitSketch

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


CODEC_SETTINGS = [  # (codec, max_k, mass, bits, step)
    ("topk-packed", 32, 0.98, 4, 0.4),
    ("topk-packed", 64, 0.99, 4, 0.4),
    ("topk-golomb", 32, 0.98, 4, 0.4),
    ("topk-golomb", 52, 0.99, 4, 0.4),
    ("topk-golomb", 64, 0.99, 4, 0.4),
    ("topk-golomb", 64, 0.98, 3, 0.5),
    ("topk-golomb", 64, 0.99, 3, 0.7),
    ("topk-golomb", 128, 0.99, 4, 0.4),
]
DEFAULT_SETTING = 3  # topk-golomb k ≤ 52, 4 bits × 0.4: the curve's pick (≤ 64 B/token, flat and peaked)


def codec_of(setting: tuple) -> TopkCodec:
    """The codec of a ``CODEC_SETTINGS`` entry."""
    name, *parameters = setting
    return CODECS[name](*parameters)


def stdlib_texts() -> tuple[list[str], list[str]]:
    """Python's standard-library sources (top-level ``*.py``): every 10th file held out."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(errors="replace") for f in files]
    return [t for i, t in enumerate(texts) if i % 10], [t for i, t in enumerate(texts) if i % 10 == 0]


def byte_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts`` (``<pad>`` 0, ``<eos>`` 1)."""
    from tokenizers import decoders, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def token_rows(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """``texts`` tokenized, each followed by the EOS, concatenated and cut into rows [R, length]."""
    ids = torch.tensor([i for t in texts for i in tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]])
    return ids[: len(ids) // length * length].reshape(-1, length)


def train_lm(vocab_size: int, train: torch.Tensor, steps: int, hidden: int = 128):
    """A Llama ``hidden`` × 2 trained from seed 0 for ``steps`` AdamW steps of 16 random rows of ``train``."""
    model = sized_llama(f"{hidden}x2", vocab_size, train.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward(), optimizer.step(), optimizer.zero_grad()
    return model.eval()


def real_lm(args):
    """A small Llama trained here on the standard library: (model, tokenizer, training rows [R, T],
    held-out rows [R', T]), ``args.seq_len`` tokens a row."""
    train_texts, held_out = stdlib_texts()
    tokenizer = byte_bpe(train_texts, args.lm_bpe)
    train, test = (
        token_rows(tokenizer, train_texts, args.seq_len),
        token_rows(tokenizer, held_out, args.seq_len),
    )
    model = train_lm(len(tokenizer), train, args.lm_steps, args.lm_hidden)
    with torch.no_grad():
        held = test[: args.lm_tokens // args.seq_len]
        ppl = math.exp(model(input_ids=held, labels=held).loss.item())
    print(
        f"[curve] real LM: Llama {args.lm_hidden}×2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
        f"{args.lm_steps} steps on {train.numel() / 1e6:.2f}M standard-library tokens, BPE {len(tokenizer)}, "
        f"held-out perplexity {ppl:.1f}"
    )
    return model, tokenizer, train, test


def sized_llama(size: str, vocab: int, seq_len: int, heads: int = 4, kv_heads: int = 2):
    """A Llama of ``size`` = HIDDENxLAYERS with random weights (seeded: the same model on every call)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (int(x) for x in size.split("x"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def stored_bytes(features, table) -> int:
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "shard.arrow"
        with ArrowWriter(features=features, path=str(path)) as writer:
            writer.write_table(table)
            writer.finalize()
        return path.stat().st_size


def fidelity(
    log_p: torch.Tensor, sparse: SparseLogits, prior: torch.Tensor | None = None
) -> dict[str, float]:
    """KL(full ‖ rebuilt), top-1 agreement, overlap of the stored tokens with the full top-10, kept mass;
    with a ``prior`` [V], also the KL when the tail mass is spread like the prior instead of uniformly."""
    rebuilt = torch.log_softmax(sparse.to_dense_log_probs("uniform"), -1)
    stored = sparse.log_probs > -math.inf
    kl_prior = math.nan
    if prior is not None:
        kept = torch.zeros_like(log_p, dtype=torch.bool).scatter_(
            -1, torch.where(stored, sparse.indices, 0), stored
        )
        tail = torch.where(kept, 0.0, prior)
        shaped = torch.where(
            kept, rebuilt, sparse.tail_log_mass[:, None] + (tail / tail.sum(-1, keepdim=True)).log()
        )
        kl_prior = divergence_from_log_probs("forward_kl", shaped, log_p).mean().item()
    top10 = log_p.topk(10, -1).indices
    hits = (top10[:, :, None] == torch.where(stored, sparse.indices, -1)[:, None, :]).any(-1)
    return {
        "kl": divergence_from_log_probs("forward_kl", rebuilt, log_p).mean().item(),
        "top1": (rebuilt.argmax(-1) == log_p.argmax(-1)).float().mean().item(),
        "top10": hits.float().mean().item(),
        "kept": sparse.log_probs.exp().masked_fill(~stored, 0).sum(-1).mean().item(),
        "kl_prior": kl_prior,
    }


def curve(name: str, logits: torch.Tensor, prior: torch.Tensor | None = None) -> None:
    """Bytes/token and fidelity of plain float16 top-k and of the codec on logits [R, T, V] (and the KL
    with the tail spread like ``prior``, the teacher's mean distribution on other positions)."""
    rows, length, vocab = logits.shape
    tokens, mask = rows * length, torch.ones(rows, length, dtype=torch.long)
    log_p = torch.log_softmax(logits.reshape(tokens, vocab).float(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean().item()
    print(
        f"  {name}: {tokens} tokens, V = {vocab}, mean entropy {entropy:.2f} nats, mean top-1 p {log_p.exp().max(-1).values.mean():.3f}"
    )
    print(
        "    storage                         | bytes/token | KL(full ‖ rebuilt) | top-1 agree | top-10 stored | kept mass | decode µs/token | KL, tail ∝ mean teacher"
    )
    for k in (16, 32, 64):
        features = cache_features(vocab, k, "float16", per_token=True)
        size = stored_bytes(features, columns_to_arrow(compress_logits(logits, k), features, mask))
        sparse = SparseLogits(**compress_logits(logits.reshape(tokens, vocab), k), num_classes=vocab)
        sparse.log_probs = sparse.log_probs.half().float()
        f = fidelity(log_p, sparse, prior)
        print(
            f"    top-{k:<3} float16                 | {size / tokens:11.1f} | {f['kl']:18.4f} | {f['top1']:11.3f} | {f['top10']:13.3f} | {f['kept']:9.3f} | {'':15} | {f['kl_prior']:.4f}"
        )
    for setting in CODEC_SETTINGS:
        codec = codec_of(setting)
        features = cache_features(vocab, codec.max_k, "float32", True, codec.spec())
        table, _ = packed_to_arrow(codec, logits, mask, features)
        size = stored_bytes(features, table)
        packed = table.column(0).to_pylist()
        start = time.perf_counter()
        sparse = codec.decode(packed, [length] * rows, vocab)
        decode = (time.perf_counter() - start) / tokens * 1e6
        f = fidelity(log_p, sparse, prior)
        label = f"{codec.name} k≤{codec.max_k}, {codec.mass}, {codec.bits} × {codec.step}"
        print(
            f"    {label:<31} | {size / tokens:11.1f} | {f['kl']:18.4f} | {f['top1']:11.3f} | {f['top10']:13.3f} | {f['kept']:9.3f} | {decode:15.2f} | {f['kl_prior']:.4f}"
        )


def lm_step_and_capture(args, teacher, tokenizer, test) -> None:
    """On the real LM: compressed capture vs raw teacher forward, and KD steps from the compressed and
    the uncompressed cache vs a plain step of the same student (decoding runs in the collator)."""
    codec = codec_of(CODEC_SETTINGS[args.codec_setting])
    texts = [tokenizer.decode(row) for row in test[: args.lm_capture_rows]]
    data = DatasetDict(train=Dataset.from_dict({"text": texts}))
    task = CausalLMTask(max_length=args.seq_len)
    prepared = task.prepare(data["train"], student_processor=tokenizer)
    batches = [
        split_batch(task.collate([prepared[i] for i in range(s, min(s + 8, len(prepared)))]))[0]
        for s in range(0, len(prepared), 8)
    ]

    if args.capture_teacher is None:
        capturing = teacher
    else:
        capturing = sized_llama(args.capture_teacher, len(tokenizer), args.seq_len).eval()

    def raw_forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                capturing(**batch)

    def capture(path: Path, compression: TopkCodec | None) -> None:
        capture_teacher_logits(
            capturing, tokenizer, task, data, path, teacher_id="lm", batch_size=8, progress=False,
            top_k=codec.max_k, compression=compression, dtype="float16", sketch_rank=args.lm_sketch[0],
            sketch_bits=args.lm_sketch[1],
        )  # fmt: skip

    times = {"raw": [], "packed": [], "top-k": []}
    raw_forward()
    kd_batches, collate_us, sketches = {}, {}, {}
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.capture_repeats):
            times["raw"].append(timed(raw_forward))
            times["packed"].append(timed(capture, Path(out) / f"c{r}", codec))
            times["top-k"].append(timed(capture, Path(out) / f"p{r}", None))
        for name, path in (("packed", "c0"), ("top-k", "p0")):
            cache = load_teacher_cache(Path(out) / path)
            task.cache_decoder, sketches[name] = cache.decoder(), cache.sketch
            rows = task.prepare(cache.splits["train"], student_processor=tokenizer)
            starts = range(0, len(rows) - 7, 8)
            start = time.perf_counter()
            kd_batches[name] = [task.collate([rows[i] for i in range(s, s + 8)]) for s in starts]
            collate_us[name] = (time.perf_counter() - start) / (len(starts) * 8 * args.seq_len) * 1e6
    raw, packed, plain = (statistics.median(times[k]) for k in ("raw", "packed", "top-k"))
    size = sum(p.numel() for p in capturing.parameters()) / 1e6
    print(
        f"[curve] capture over {len(texts)} rows × {args.seq_len} tokens, teacher {size:.1f}M parameters"
        f"{'' if args.capture_teacher is None else ' (random weights)'}, {args.capture_repeats} rounds (medians)"
    )
    print(f"  compressed {codec.spec()} capture / raw forward = {raw / packed:.3f}   (target ≥ 0.95)")
    print(f"  uncompressed top-{codec.max_k} float16 capture / raw forward = {raw / plain:.3f}")
    print(
        f"  collate (padding; decoding the packed rows) µs/token: compressed {collate_us['packed']:.2f}, "
        f"uncompressed {collate_us['top-k']:.2f} (in the step's process unless dataloader_num_workers ≥ 1)"
    )

    trainers = {}
    with tempfile.TemporaryDirectory() as out:
        for name, alpha in (("plain", 0.0), ("packed", 0.5), ("top-k", 0.5)):
            config = DistillationConfig(
                output_dir=out,
                alpha=alpha,
                temperature=args.lm_temperature,
                sparse_tail=args.lm_sparse_tail,
                use_cpu=True,
                report_to="none",
                learning_rate=1e-4,
            )
            student = sized_llama(args.lm_student, len(tokenizer), args.seq_len, heads=2, kv_heads=1)
            trainers[name] = DistillationTrainer(
                model=student, args=config, task=task,
                teacher_signal=CachedTeacher(len(tokenizer), sketch=sketches[name]) if alpha else None,
            )  # fmt: skip
            trainers[name].create_optimizer_and_scheduler(num_training_steps=10_000)
    step_times = {name: [] for name in trainers}
    for r in range(args.repeats + 3):  # the first 3 rounds warm up
        for name, kd in trainers.items():
            batch = dict(kd_batches["top-k" if name == "plain" else name][r % len(kd_batches["top-k"])])
            if name == "plain":
                batch = {k: v for k, v in batch.items() if not k.startswith("kd_teacher_")}
            elapsed = timed(kd.training_step, kd.model, batch)
            if r >= 3:
                step_times[name].append(elapsed)
    print(
        f"[curve] LM student Llama {args.lm_student} ({student.num_parameters() / 1e6:.1f}M), batch 8 × {args.seq_len} tokens, τ = {args.lm_temperature}, "
        f"sparse_tail {args.lm_sparse_tail}, {args.repeats} rounds (medians, then minima: the least "
        "disturbed by other load)"
    )
    for stat, label in ((statistics.median, ""), (min, "min ")):
        a, c, t = (stat(step_times[k]) * 1e3 for k in ("plain", "packed", "top-k"))
        print(f"  {label}plain step (α = 0)                   {a:7.1f} ms")
        print(
            f"  {label}KD step, uncompressed top-{codec.max_k} cache    {t:7.1f} ms   ratio to plain {t / a:.3f}"
        )
        print(
            f"  {label}KD step, compressed cache            {c:7.1f} ms   ratio to plain {c / a:.3f}, to top-k {c / t:.3f}"
        )


def bench_curve(args) -> None:
    """The bytes/token vs fidelity curve on synthetic and real LM logits, then the LM step and capture."""
    g = torch.Generator().manual_seed(0)
    print("[curve] bytes/token vs fidelity (uniform tail)")
    curve("(a) synthetic Zipf", zipf_logits(args.lm_tokens, args.lm_vocab, g).reshape(-1, 128, args.lm_vocab))
    teacher, tokenizer, _, test = real_lm(args)
    measured = args.lm_tokens // args.seq_len
    with torch.no_grad():
        logits = teacher(input_ids=test[:measured]).logits
        prior = torch.softmax(teacher(input_ids=test[measured : measured + 32]).logits.float(), -1).mean(
            (0, 1)
        )
    curve("(b) real LM, held-out standard-library files", logits, prior)
    lm_step_and_capture(args, teacher, tokenizer, test)


SKETCH_SETTINGS = [  # (max_k of topk-golomb at mass 0.99, 4 × 0.4; sketch rank; sketch bits)
    (k, rank, bits) for k in (8, 16, 24, 32) for rank in (8, 16, 32) for bits in (4, 8)
]


def tempered_kl(log_p: torch.Tensor, rebuilt: torch.Tensor, temperature: float) -> float:
    """Mean KL(p^τ ‖ p̂^τ) of full and rebuilt log-distributions [N, V]."""
    p, q = (torch.log_softmax(x / temperature, -1) for x in (log_p, rebuilt))
    return divergence_from_log_probs("forward_kl", q, p).mean().item()


def bench_sketch(args) -> None:
    """KL at τ 1 and 2 of top-k + uniform tail vs a smaller top-k + the logit sketch's tail (real LM)."""
    teacher, _, train, test = real_lm(args)
    held = test[: args.lm_tokens // args.seq_len]
    with torch.no_grad():
        logits = teacher(input_ids=held).logits
        fit = teacher(input_ids=train[: FIT_POSITIONS // args.seq_len]).logits.flatten(0, 1)
    rows, length, vocab = logits.shape
    tokens, mask = rows * length, torch.ones(rows, length, dtype=torch.long)
    log_p = torch.log_softmax(logits.reshape(tokens, vocab).float(), -1)
    print(f"[sketch] {tokens} held-out tokens, V = {vocab}; sketch fitted on {len(fit)} training positions")
    print("  storage                                  | bytes/token | KL τ=1 | KL τ=2 | rebuild µs/token")

    def packed(max_k: int, sketch: LogitSketch | None) -> tuple[float, SparseLogits, float]:
        codec = codec_of(("topk-golomb", max_k, 0.99, 4, 0.4))
        spec = None if sketch is None else sketch.spec()
        features = cache_features(vocab, codec.max_k, "float32", True, codec.spec(), spec)
        output = Features({k: v for k, v in features.items() if k.endswith("packed")})
        table, _ = packed_to_arrow(codec, logits, mask, output)
        if sketch is not None:
            codes = {"sketch": sketch.encode(logits.flatten(0, 1)).reshape(rows, length, -1)}
            extra = columns_to_arrow(
                codes, Features({k: features[k] for k in features if k not in output}), mask
            )
            table = table.append_column(extra.schema.field(0), extra.column(0))
        sparse = codec.decode(table.column(0).to_pylist(), [length] * rows, vocab)
        start = time.perf_counter()
        if sketch is not None:
            stored = torch.tensor(table.column(1).to_pylist(), dtype=torch.uint8).flatten(0, 1)
            sparse.sketch = sketch.tail_sketch(stored)
        rebuilt = sparse.to_dense_log_probs("uniform" if sketch is None else "sketch")
        elapsed = (time.perf_counter() - start) / tokens * 1e6
        return stored_bytes(features, table) / tokens, rebuilt, elapsed

    for max_k in (32, 46, 52):
        size, rebuilt, _ = packed(max_k, None)
        label = f"topk-golomb k≤{max_k}, uniform tail"
        print(
            f"  {label:<40} | {size:11.1f} | {tempered_kl(log_p, rebuilt, 1):.4f} | {tempered_kl(log_p, rebuilt, 2):.4f} |"
        )
    fitted = LogitSketch.fit(fit, max(rank for _, rank, _ in SKETCH_SETTINGS), 8)
    for max_k, rank, bits in SKETCH_SETTINGS:  # a rank-r fit is the first r directions of a larger one
        sketch = LogitSketch(fitted.directions[:, :rank], fitted.scales[:rank], fitted.mean, bits)
        size, rebuilt, elapsed = packed(max_k, sketch)
        label = f"topk-golomb k≤{max_k} + sketch {rank} × {bits} bits"
        print(
            f"  {label:<40} | {size:11.1f} | {tempered_kl(log_p, rebuilt, 1):.4f} | {tempered_kl(log_p, rebuilt, 2):.4f} | {elapsed:.2f}"
        )


def bench_lm_step(args) -> None:
    """The curve's LM KD-step (and capture) comparison alone, without the curve."""
    teacher, tokenizer, _, test = real_lm(args)
    lm_step_and_capture(args, teacher, tokenizer, test)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        choices=("step", "capture", "storage", "curve", "lm-step", "sketch"),
        default=None,
        help="lm-step: the curve's LM KD step vs plain step (and capture) without the curve",
    )
    parser.add_argument("--repeats", type=int, default=20, help="step benchmark rounds")
    parser.add_argument("--capture_repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rows", type=int, default=512, help="rows captured in the capture benchmark")
    parser.add_argument("--lm_vocab", type=int, default=32000)
    parser.add_argument("--lm_tokens", type=int, default=1024)
    parser.add_argument("--lm_bpe", type=int, default=4096, help="curve: BPE vocabulary of the real LM")
    parser.add_argument("--lm_steps", type=int, default=300, help="curve: training steps of the real LM")
    parser.add_argument("--lm_hidden", type=int, default=128, help="curve: hidden size of the real LM")
    parser.add_argument("--lm_capture_rows", type=int, default=32, help="curve: rows of the LM capture")
    parser.add_argument(
        "--codec_setting",
        type=int,
        default=DEFAULT_SETTING,
        help="curve: CODEC_SETTINGS index for step/capture",
    )
    parser.add_argument(
        "--capture_teacher",
        default=None,
        help="curve/lm-step: capture a random-weights Llama of HIDDENxLAYERS (e.g. 512x4: 13.6M) instead of the real LM",
    )
    parser.add_argument(
        "--lm_student", default="64x2", help="curve/lm-step: HIDDENxLAYERS of the student of the LM KD steps"
    )
    parser.add_argument("--lm_temperature", type=float, default=2.0, help="τ of the LM KD steps")
    parser.add_argument("--lm_sparse_tail", default="uniform", help="sparse_tail of the LM KD steps")
    parser.add_argument(
        "--lm_sketch",
        type=int,
        nargs=2,
        default=[0, 4],
        metavar=("RANK", "BITS"),
        help="lm-step: capture both caches with a logit sketch of this rank and bits (for --lm_sparse_tail sketch)",
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    benches = (
        ("step", bench_step),
        ("capture", bench_capture),
        ("storage", bench_storage),
        ("curve", bench_curve),
        ("lm-step", bench_lm_step),
        ("sketch", bench_sketch),
    )
    for name, bench in benches:
        if args.only == name or (args.only is None and name not in ("lm-step", "sketch")):
            bench(args)


if __name__ == "__main__":
    main()
