"""End to end on a real LM with a flat teacher: students distilled from a compressed teacher cache vs
online KD vs no KD, same budget, same seeds, held-out perplexity and paired differences.

The teacher is the small Llama that ``bench_cache.py --only curve`` trains here, offline, on Python's
standard-library sources (byte-level BPE, ``bench_cache.real_lm``); held-out files are every 10th file.
Everything then goes through the product's own path: the teacher and tokenizer are saved, the
training text is a ``save_to_disk`` dataset, ``run_capture`` writes the caches (as
``scripts/cache_teacher.py``) and every student is a ``run_distillation`` run (as ``scripts/distill.py``)
from ``student_config`` (Llama 64 × 2, ~0.6M parameters). Arms (``--arms``):

    none         α = 0: labels only
    online       the teacher runs every step
    packed       the compressed cache (``--codec_name``, ``--codec``), ``sparse_tail: uniform``
    packed-renorm  the same cache, ``sparse_tail: renormalize``
    packed-bucket  the same cache, ``sparse_tail: bucket`` (the tail matched as one outcome)
    wide-bucket  a second compressed cache (``--wide_codec``: more tokens, fewer bits), ``bucket``
    topk16       an uncompressed top-16 float16 cache, ``sparse_tail: uniform``
    topk128-bucket, topk512-bucket  uncompressed top-128 / top-512 float16 caches, ``bucket`` (how much
                 of the online gain a much larger k recovers)
    sketch       a compressed cache (``--sketch_codec``) with a low-rank sketch of the logits
                 (``--sketch``: rank, bits), ``sparse_tail: sketch`` (the tail spread like the sketch)

Every arm runs at α = 0.5, τ = 2 unless suffixes say otherwise: ``online:t1`` is online KD at τ = 1,
``packed-bucket:t1:a0.8`` the bucket arm at τ = 1 and α = 0.8, ``online:tauto`` online KD at
``temperature: auto``.

    OMP_NUM_THREADS=1 python scripts/bench_cache_students.py [--seeds 0 1 2] [--steps 120] [--arms ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
from bench_cache import real_lm
from datasets import Dataset, DatasetDict

from hf_kd.config import DataArguments, DistillationConfig, ModelArguments
from hf_kd.runs.capture import CacheArguments, run_capture
from hf_kd.runs.distill import run_distillation

ARMS = {  # name: (DistillationConfig fields, cache name)
    "none": ({"alpha": 0.0}, None),
    "online": ({}, None),
    "packed": ({"sparse_tail": "uniform"}, "packed"),
    "packed-renorm": ({"sparse_tail": "renormalize"}, "packed"),
    "packed-bucket": ({"sparse_tail": "bucket"}, "packed"),
    "wide-bucket": ({"sparse_tail": "bucket"}, "wide"),
    "topk16": ({"sparse_tail": "uniform"}, "topk16"),
    "topk128-bucket": ({"sparse_tail": "bucket"}, "topk128"),
    "topk512-bucket": ({"sparse_tail": "bucket"}, "topk512"),
    "sketch": ({"sparse_tail": "sketch"}, "sketch"),
}
SUFFIXES = {"t": "temperature", "a": "alpha"}  # arm suffix letter: DistillationConfig field


def parse_arm(arm: str) -> tuple[dict, str | None]:
    """(DistillationConfig fields, cache name) of an arm name with optional ``:t<τ>`` / ``:a<α>`` suffixes."""
    base, *suffixes = arm.split(":")
    if base not in ARMS:
        raise argparse.ArgumentTypeError(f"arm {arm!r}: {base!r} is not one of {list(ARMS)}")
    fields, cache = ARMS[base]
    fields = dict(fields)
    for suffix in suffixes:
        if suffix[:1] not in SUFFIXES:
            raise argparse.ArgumentTypeError(f"arm {arm!r}: suffix {suffix!r} is not :t<τ>, :tauto or :a<α>")
        value = suffix[1:]
        fields[SUFFIXES[suffix[0]]] = value if value == "auto" else float(value)
    return fields, cache


def arm_name(arm: str) -> str:
    """The ``--arms`` value after checking that it parses."""
    parse_arm(arm)
    return arm


def flatness(teacher, rows: torch.Tensor) -> str:
    """The teacher's held-out perplexity, mean top-1 probability and mass of its top-16/top-32."""
    with torch.no_grad():
        out = teacher(input_ids=rows, labels=rows)
    top = torch.log_softmax(out.logits.float(), -1).topk(32, -1).values.exp()
    return (
        f"perplexity {math.exp(out.loss.item()):.1f}, mean top-1 p {top[..., 0].mean():.3f}, "
        f"top-16 mass {top[..., :16].sum(-1).mean():.3f}, top-32 mass {top.sum(-1).mean():.3f}"
    )


def perplexity(model, rows: torch.Tensor) -> float:
    """Held-out perplexity of ``model`` on full rows of token ids."""
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=batch, labels=batch).loss.item() for batch in rows.split(16)]
    return math.exp(statistics.fmean(losses))


def capture(root: Path, data_args: DataArguments, name: str, args) -> Path:
    """A cache of the saved teacher over the training split, through ``run_capture``."""
    if name.startswith("topk"):
        settings = {"top_k": int(name.removeprefix("topk")), "logits_dtype": "float16"}
    else:
        max_k, mass, bits, step = {"wide": args.wide_codec, "sketch": args.sketch_codec}.get(name, args.codec)
        settings = {
            "top_k": int(max_k), "compression": args.codec_name, "compression_mass": mass,
            "compression_bits": int(bits), "compression_step": step,
        }  # fmt: skip
        if name == "sketch":
            settings |= {"sketch_rank": args.sketch[0], "sketch_bits": args.sketch[1]}
    out = root / f"cache-{name}"
    start = time.perf_counter()
    metadata = run_capture(
        data_args,
        CacheArguments(
            teacher_model_name_or_path=str(root / "teacher"), output_dir=str(out), batch_size=32,
            use_cpu=True, **settings,
        ),
    )  # fmt: skip
    size = sum(f.stat().st_size for f in out.rglob("*.arrow"))
    tokens = metadata.splits["train"]["num_rows"] * args.seq_len
    print(
        f"[students] cache {name}: {settings}, {size / tokens:.1f} bytes/token, {time.perf_counter() - start:.0f} s"
    )
    return out


def train_student(root: Path, data_args, arm: str, seed: int, caches: dict[str, Path], args) -> float:
    """One ``run_distillation`` run of arm ``arm``; the student's held-out perplexity."""
    fields, cache = parse_arm(arm)
    settings = {
        "output_dir": str(root / f"run-{arm.replace(':', '_')}-{seed}"), "seed": seed, "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size, "learning_rate": args.lr, "alpha": 0.5,
        "temperature": 2.0, "teacher_model_name_or_path": str(root / "teacher"), "use_cpu": True,
        "report_to": "none", "save_strategy": "no", "eval_strategy": "no", "logging_steps": args.steps,
        "disable_tqdm": True,
    }  # fmt: skip
    if cache:
        settings |= {"teacher_source": "cached", "teacher_cache": str(caches[cache])}
    config = DistillationConfig(**(settings | fields))
    model_args = ModelArguments(student_config=args.student, student_processor=str(root / "teacher"))
    result = run_distillation(data_args, model_args, config)
    return perplexity(result.trainer.model, args.held_out)


def report(results: dict[str, dict[int, float]], seeds: list[int]) -> None:
    """Per-seed perplexities, means, and paired log-perplexity differences against no KD and online KD."""
    print("[students] held-out perplexity")
    print("  arm                    | " + " | ".join(f"seed {s}" for s in seeds) + " | mean")
    for arm, by_seed in results.items():
        values = [by_seed[s] for s in seeds]
        print(
            f"  {arm:<22} | "
            + " | ".join(f"{v:6.1f}" for v in values)
            + f" | {statistics.fmean(values):6.1f}"
        )
    print("[students] paired Δ log-perplexity (nats; negative: better), mean ± std over seeds")
    for base in ("none", "online"):
        if base not in results:
            continue
        for arm in results:
            if arm == base:
                continue
            deltas = [math.log(results[arm][s] / results[base][s]) for s in seeds]
            spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            per_seed = " ".join(f"{d:+.3f}" for d in deltas)
            print(f"  {arm:<22} − {base:<7}: {statistics.fmean(deltas):+.3f} ± {spread:.3f}   ({per_seed})")


def setup_real_lm(args, tag: str):
    """The real LM's teacher, tokenizer and rows (``bench_cache.real_lm``), progress bars off, the held-out
    rows (``args.held_out``) and the 0.6M student's config (``args.student``) set on ``args``."""
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    args.lm_tokens = args.held_out_rows * args.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    teacher, tokenizer, train, test = real_lm(args)
    args.held_out = test[: args.held_out_rows]
    print(f"[{tag}] teacher on held-out files: {flatness(teacher, args.held_out)}")
    args.student = {
        "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": args.seq_len, "pad_token_id": 0,
    }  # fmt: skip
    return teacher, tokenizer, train, test


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--arms",
        nargs="+",
        type=arm_name,
        default=["none", "online", "packed", "packed-bucket"],
        help=f"arms {list(ARMS)}, each with optional :t<τ> / :a<α> suffixes",
    )
    parser.add_argument("--steps", type=int, default=120, help="student optimizer steps")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--train_rows", type=int, default=960, help="training rows (captured) of the students"
    )
    parser.add_argument("--held_out_rows", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--lm_bpe", type=int, default=4096)
    parser.add_argument("--lm_steps", type=int, default=300, help="teacher training steps")
    parser.add_argument("--lm_hidden", type=int, default=128, help="teacher hidden size")
    parser.add_argument("--codec_name", default="topk-golomb", help="codec of the packed and wide caches")
    parser.add_argument(
        "--codec", type=float, nargs=4, default=[46, 0.99, 4, 0.4], metavar=("MAX_K", "MASS", "BITS", "STEP")
    )
    parser.add_argument(
        "--wide_codec",
        type=float,
        nargs=4,
        default=[40, 0.98, 3, 0.6],
        metavar=("MAX_K", "MASS", "BITS", "STEP"),
        help="codec of the wide-bucket arm's cache (more tokens at fewer bits)",
    )
    parser.add_argument(
        "--sketch_codec",
        type=float,
        nargs=4,
        default=[24, 0.99, 4, 0.4],
        metavar=("MAX_K", "MASS", "BITS", "STEP"),
        help="codec of the sketch arm's cache (fewer tokens: the sketch carries the tail)",
    )
    parser.add_argument(
        "--sketch",
        type=int,
        nargs=2,
        default=[32, 4],
        metavar=("RANK", "BITS"),
        help="the sketch arm's sketch",
    )
    args = parser.parse_args()
    teacher, tokenizer, train, test = setup_real_lm(args, "students")
    results: dict[str, dict[int, float]] = {arm: {} for arm in args.arms}
    with tempfile.TemporaryDirectory() as out:
        root = Path(out)
        teacher.save_pretrained(root / "teacher")
        tokenizer.save_pretrained(root / "teacher")
        texts = [
            tokenizer.decode(row)
            for row in train[
                torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.train_rows]
            ]
        ]
        DatasetDict(train=Dataset.from_dict({"text": texts})).save_to_disk(str(root / "data"))
        data_args = DataArguments(
            task="causal-lm", dataset_name=str(root / "data"), eval_split=None, max_length=args.seq_len
        )
        names = {parse_arm(arm)[1] for arm in args.arms} - {None}
        caches = {name: capture(root, data_args, name, args) for name in sorted(names)}
        for seed in args.seeds:
            for arm in args.arms:
                start = time.perf_counter()
                results[arm][seed] = train_student(root, data_args, arm, seed, caches, args)
                print(
                    f"[students] seed {seed} {arm}: perplexity {results[arm][seed]:.1f} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    report(results, args.seeds)


if __name__ == "__main__":
    main()
