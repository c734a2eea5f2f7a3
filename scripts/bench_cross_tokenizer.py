"""Cross-tokenizer distillation on real text: a student distilled from a teacher with another tokenizer vs
one distilled from a teacher with its own tokenizer vs no KD, same budget, same seeds, held-out bits per
byte (so the two tokenizers compare), paired differences; TRL's GOLD trainer beside, same pair and data.

Text: Python's standard-library sources (``bench_cache.stdlib_texts``; every 10th file held out), cut at
line ends into chunks of at most ``--chunk_bytes`` bytes that both tokenizers encode in fewer than
``--seq_len`` tokens. Two byte-level BPEs (``bench_cache.byte_bpe``): the student's, ``--bpe`` tokens on
all training files, and the cross teacher's, ``--cross_bpe`` tokens on every other training file (a
different sample of the text, as two model families' tokenizers are): many tokens shared, not all.
Teachers (``bench_cache.train_lm``: Llama 128 × 2, ``--teacher_steps`` steps on all training files, each
in its own tokens): T_same (the student's tokenizer) and T_cross, saved with their tokenizers so the
product loads them as a user's. Students: Llama 64 × 2 from the same saved initialisation per seed, each
a ``run_distillation`` run (as ``scripts/distill.py``) on the same chunks. Arms (``--arms``):

    none    α = 0: labels only
    same    KD from T_same (the usual path)
    cross   KD from T_cross: vocabularies differ, so the product's cross-tokenizer path
    cross-exact  the same with the exact part only (``cross_tokenizer_unmatched_weight: 0``; not by default)
    cross-u1     the same with the ULD part at weight 1 (the default is 0.1; not by default)
    gold    TRL's ``GOLDTrainer`` (ULD hybrid loss) from T_cross, hyperparameters mapped (``gold_args``)
    mix     KD from both teachers at once (``teacher_source: mixture``, weights 1 and 1): T_same and T_cross,
            whose vocabularies differ, so their soft terms summed by weight (not by default)

Bits per byte of a model on held-out chunks: the summed token NLL (in bits) of every token after the
first, over the UTF-8 bytes those tokens cover (a byte-level BPE token string has one character a byte).

    OMP_NUM_THREADS=1 python scripts/bench_cross_tokenizer.py [--seeds 0 1 2]

The ``gold`` arm needs TRL (``pip install trl``; not a dependency of this project).
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
import torch.nn.functional as F
import transformers
from bench_cache import byte_bpe, stdlib_texts, token_rows, train_lm
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_kd.config import DataArguments, DistillationConfig, ModelArguments
from hf_kd.runs.distill import run_distillation
from hf_kd.tasks.base import ALIGNMENT_PREFIX
from hf_kd.tasks.causal_lm import CausalLMTask

ARMS = {  # name: (teacher, DistillationConfig fields)
    "none": ("same", {"alpha": 0.0}),
    "same": ("same", {}),
    "cross": ("cross", {}),
    "cross-exact": ("cross", {"cross_tokenizer_unmatched_weight": 0.0}),
    "cross-u1": ("cross", {"cross_tokenizer_unmatched_weight": 1.0}),
    "gold": ("cross", {}),
    "mix": ("mix", {"teacher_source": "mixture"}),
}
DEFAULT_ARMS = ["none", "same", "cross", "gold"]


def chunks(texts: list[str], max_bytes: int) -> list[str]:
    """Each text cut at line ends into pieces of at most ``max_bytes`` UTF-8 bytes (longer lines alone)."""
    pieces = []
    for text in texts:
        piece = ""
        for line in text.splitlines(keepends=True):
            if piece and len((piece + line).encode()) > max_bytes:
                pieces.append(piece)
                piece = ""
            piece += line
        if piece.strip():
            pieces.append(piece)
    return [p for p in pieces if p.strip() and len(p.encode()) <= max_bytes]


def fitting(pieces: list[str], tokenizers, max_tokens: int) -> list[str]:
    """The pieces that every tokenizer encodes in at most ``max_tokens`` tokens."""
    lengths = [[len(ids) for ids in tok(pieces)["input_ids"]] for tok in tokenizers]
    return [p for p, *n in zip(pieces, *lengths, strict=True) if max(n) <= max_tokens]


def bits_per_byte(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Summed NLL (bits) of every token after each text's first, over the bytes those tokens cover."""
    model.eval()
    bits, n_bytes = 0.0, 0
    for start in range(0, len(texts), batch_size):
        part = texts[start : start + batch_size]
        enc = tokenizer(part, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        targets = enc["input_ids"][:, 1:]
        log_p = F.log_softmax(logits[:, :-1], -1).gather(-1, targets[..., None]).squeeze(-1)
        bits -= (log_p * enc["attention_mask"][:, 1:]).sum().item() / math.log(2)
        first = tokenizer.convert_ids_to_tokens(enc["input_ids"][:, 0].tolist())
        n_bytes += sum(len(t.encode()) for t in part) - sum(len(token) for token in first)
    return bits / n_bytes


def span_shares(student_tok, teacher_tok, texts: list[str], max_length: int) -> str:
    """How the product's alignment (``CausalLMTask.prepare``) splits the student's prediction rows of
    ``texts``: span starts matched (exact part) or not (ULD), and the rest (inside a multi-token span, or a
    token without a predictor on the teacher's side)."""
    rows = CausalLMTask(max_length=max_length).prepare(
        Dataset.from_dict({"text": texts}), student_processor=student_tok, teacher_processor=teacher_tok
    )
    total = sum(len(ids) - 1 for ids in rows["input_ids"])
    counts = {
        "matched": sum(map(sum, rows[ALIGNMENT_PREFIX + "matched"])),
        "starts": sum(sum(p >= 0 for p in row) for row in rows[ALIGNMENT_PREFIX + "teacher_position"]),
    }
    unmatched = counts["starts"] - counts["matched"]
    rest = total - counts["starts"]
    return (
        f"{total} student prediction rows: {counts['matched'] / total:.1%} matched span starts, "
        f"{unmatched / total:.1%} unmatched span starts, {rest / total:.1%} no span start (inside a "
        "multi-token span, or no predictor)"
    )


def prepare(root: Path, args) -> tuple[list[str], list[str]]:
    """Tokenizers, teachers (saved under ``root``), training and held-out chunks; prints their figures."""
    train_files, held_files = stdlib_texts()
    student_tok, cross_tok = byte_bpe(train_files, args.bpe), byte_bpe(train_files[1::2], args.cross_bpe)
    shared = set(student_tok.get_vocab()) & set(cross_tok.get_vocab())
    print(
        f"[xtok] tokenizers: student BPE {len(student_tok)}, cross BPE {len(cross_tok)}, {len(shared)} token "
        f"strings shared ({len(student_tok) - len(shared)} student-only, {len(cross_tok) - len(shared)} cross-only)"
    )
    order = torch.Generator().manual_seed(0)
    train = fitting(chunks(train_files, args.chunk_bytes), (student_tok, cross_tok), args.seq_len - 1)
    train = [train[i] for i in torch.randperm(len(train), generator=order)[: args.train_rows]]
    held = fitting(chunks(held_files, args.chunk_bytes), (student_tok, cross_tok), args.seq_len - 1)
    held = [held[i] for i in torch.randperm(len(held), generator=order)[: args.held_out_rows]]
    print(
        f"[xtok] alignment of the training chunks: {span_shares(student_tok, cross_tok, train, args.seq_len)}"
    )
    for name, tok in (("same", student_tok), ("cross", cross_tok)):
        start = time.perf_counter()
        teacher = train_lm(len(tok), token_rows(tok, train_files, args.seq_len), args.teacher_steps)
        teacher.save_pretrained(root / f"teacher-{name}")
        tok.save_pretrained(root / f"teacher-{name}")
        print(
            f"[xtok] T_{name}: {args.teacher_steps} steps, held-out bits/byte "
            f"{bits_per_byte(teacher, tok, held):.4f} ({time.perf_counter() - start:.0f} s)"
        )
    args.vocab_size = len(student_tok)
    mean_bytes = statistics.fmean(len(t.encode()) for t in train)
    print(
        f"[xtok] {len(train)} training chunks ({mean_bytes:.0f} bytes on average), {len(held)} held-out chunks"
    )
    DatasetDict(train=Dataset.from_dict({"text": train})).save_to_disk(str(root / "data"))
    return train, held


def student_init(root: Path, seed: int, args) -> Path:
    """A fresh student (Llama 64 × 2) from ``seed``, saved once: every arm of a seed starts from it."""
    path = root / f"student-init-{seed}"
    if not path.is_dir():
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=args.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=args.seq_len,
            pad_token_id=0, eos_token_id=1, bos_token_id=None,
        )  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def kd_config(root: Path, arm: str, seed: int, args) -> DistillationConfig:
    """The student's training settings, shared by the hf_kd arms (and mapped onto GOLD)."""
    teacher, fields = ARMS[arm]
    settings = {
        "output_dir": str(root / f"run-{arm}-{seed}"), "seed": seed, "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size, "learning_rate": args.lr, "alpha": 0.5,
        "temperature": args.temperature, "use_cpu": True, "report_to": "none", "save_strategy": "no",
        "eval_strategy": "no", "logging_steps": args.steps, "disable_tqdm": True,
        "teacher_model_name_or_path": str(root / f"teacher-{teacher}"),
    }  # fmt: skip
    if teacher == "mix":  # both teachers, each in its own tokens
        settings["teacher_model_name_or_path"] = None
        settings["teachers"] = [
            {"name": name, "model": str(root / f"teacher-{name}")} for name in ("same", "cross")
        ]
    return DistillationConfig(**(settings | fields))


def train_hf_kd(root: Path, arm: str, seed: int, held: list[str], args) -> tuple[float, float, dict]:
    """One ``run_distillation`` run: (held-out bits/byte, seconds per step, the last logged losses)."""
    data_args = DataArguments(
        task="causal-lm", dataset_name=str(root / "data"), eval_split=None, max_length=args.seq_len
    )
    model_args = ModelArguments(
        student_model_name_or_path=str(student_init(root, seed, args)),
        student_processor=str(root / "teacher-same"),
    )
    result = run_distillation(data_args, model_args, kd_config(root, arm, seed, args))
    trainer = result.trainer
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items() if k.startswith("loss")}
    runtime = next(e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e)
    return bits_per_byte(trainer.model, trainer.processing_class, held), runtime / args.steps, logs


def gold_args(root: Path, seed: int, args):
    """``GOLDConfig`` with hf_kd's settings where they map: off-policy only (``lmbda`` 0), forward KL
    (``beta`` 0), τ on both sides, ``alpha`` split into the cross-entropy and distillation weights (τ² folded
    into the latter, as hf_kd scales its soft term), the hybrid ULD loss (matched tokens: KL; the rest:
    sorted-probability L1) with the matched / unmatched weights 1 / 1."""
    from trl.experimental.gold import GOLDConfig

    config = kd_config(root, "gold", seed, args)
    scale = config.temperature**2 if config.temperature_squared else 1.0
    return GOLDConfig(
        output_dir=config.output_dir, seed=seed, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, use_cpu=True, report_to="none", save_strategy="no", logging_steps=args.steps,
        disable_tqdm=True, bf16=False, gradient_checkpointing=False, max_length=args.seq_len,
        max_completion_length=args.seq_len - 1,  # generation only: unused off-policy
        lmbda=0.0, beta=0.0, seq_kd=False, use_uld_loss=True, use_extended_uld=True, uld_use_hybrid_loss=True,
        uld_hybrid_matched_weight=1.0, uld_hybrid_unmatched_weight=1.0,
        uld_crossentropy_weight=1 - config.alpha, uld_distillation_weight=config.alpha * scale,
        uld_student_temperature=config.temperature, uld_teacher_temperature=config.temperature,
        teacher_tokenizer_name_or_path=str(root / "teacher-cross"), dataloader_drop_last=False,
    )  # fmt: skip


def gold_dataset(tokenizer, texts: list[str]) -> Dataset:
    """The same chunks as prompt / completion rows: GOLD needs a non-empty prompt, so the prompt is each
    chunk's first student token, which hf_kd's students do not predict either."""
    ends = [offsets[0][1] for offsets in tokenizer(texts, return_offsets_mapping=True)["offset_mapping"]]
    return Dataset.from_dict(
        {
            "prompt": [t[:e] for t, e in zip(texts, ends, strict=True)],
            "completion": [t[e:] for t, e in zip(texts, ends, strict=True)],
        }
    )


def train_gold(root: Path, seed: int, train: list[str], held: list[str], args) -> tuple[float, float, dict]:
    """One ``GOLDTrainer`` run from T_cross: (held-out bits/byte, seconds per step, the last logged losses)."""
    from trl.experimental.gold import GOLDTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "teacher-same")
    transformers.set_seed(seed)
    trainer = GOLDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_init(root, seed, args)),
        teacher_model=str(root / "teacher-cross"),
        args=gold_args(root, seed, args),
        train_dataset=gold_dataset(tokenizer, train),
        processing_class=tokenizer,
    )
    output = trainer.train()
    logs = {
        k: v for e in trainer.state.log_history for k, v in e.items() if "loss" in k and "runtime" not in k
    }
    return bits_per_byte(trainer.model, tokenizer, held), output.metrics["train_runtime"] / args.steps, logs


def paired(results: dict[str, dict[int, float]], arm: str, base: str, seeds: list[int]) -> list[float]:
    """Per-seed differences arm − base."""
    return [results[arm][s] - results[base][s] for s in seeds]


def spread(values: list[float]) -> str:
    """mean ± std (sample) of ``values``."""
    return f"{statistics.fmean(values):+.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def report(bpb: dict[str, dict[int, float]], seconds: dict[str, dict[int, float]], seeds: list[int]) -> None:
    """Per-seed bits/byte, seconds per step, paired differences and the recovered fraction."""
    print("[xtok] held-out bits/byte | seconds/step (median over seeds)")
    print("  arm         | " + " | ".join(f"seed {s}" for s in seeds) + " | mean   | s/step")
    for arm in bpb:
        values = [bpb[arm][s] for s in seeds]
        print(
            f"  {arm:<11} | "
            + " | ".join(f"{v:.4f}" for v in values)
            + f" | {statistics.fmean(values):.4f} | {statistics.median(seconds[arm].values()):.3f}"
        )
    print("[xtok] paired Δ bits/byte (negative: better), mean ± std over seeds (per seed)")
    for arm, base in (
        ("same", "none"),
        ("cross", "none"),
        ("gold", "none"),
        ("cross-exact", "none"),
        ("cross", "same"),
        ("cross", "cross-exact"),
        ("cross-u0.1", "cross-exact"),
        ("cross", "gold"),
        ("mix", "none"),
        ("mix", "same"),
        ("mix", "cross"),
    ):
        if arm in bpb and base in bpb:
            deltas = paired(bpb, arm, base, seeds)
            print(f"  {arm} − {base}: {spread(deltas)}   ({' '.join(f'{d:+.4f}' for d in deltas)})")
    for arm in ("cross", "cross-exact", "gold"):
        if {arm, "same", "none"} <= bpb.keys():
            fractions = [
                c / s
                for c, s in zip(
                    paired(bpb, arm, "none", seeds), paired(bpb, "same", "none", seeds), strict=True
                )
            ]
            print(
                f"[xtok] {arm}: recovered fraction of same-tokenizer KD's gain (Δ{arm} / Δsame): per seed "
                f"{' '.join(f'{f:.2f}' for f in fractions)}; of the means "
                f"{statistics.fmean(paired(bpb, arm, 'none', seeds)) / statistics.fmean(paired(bpb, 'same', 'none', seeds)):.2f}"
            )
    for arm, base in (("cross", "same"), ("gold", "cross"), ("mix", "same")):
        if arm in seconds and base in seconds:
            ratios = [seconds[arm][s] / seconds[base][s] for s in seeds]
            print(f"[xtok] time per step {arm} / {base}: median {statistics.median(ratios):.2f} (per seed "
                  f"{' '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    parser.add_argument("--steps", type=int, default=120, help="student optimizer steps")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--train_rows", type=int, default=960, help="training chunks of the students")
    parser.add_argument("--held_out_rows", type=int, default=256)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--chunk_bytes", type=int, default=320)
    parser.add_argument("--bpe", type=int, default=4096, help="the student's (and T_same's) BPE vocabulary")
    parser.add_argument("--cross_bpe", type=int, default=4096, help="T_cross's BPE vocabulary")
    parser.add_argument("--teacher_steps", type=int, default=300)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bpb = {arm: {} for arm in args.arms}
    seconds = {arm: {} for arm in args.arms}
    with tempfile.TemporaryDirectory() as out:
        root = Path(out)
        train, held = prepare(root, args)
        for seed in args.seeds:
            for arm in args.arms:  # interleaved: every arm of a seed before the next seed
                start = time.perf_counter()
                if arm == "gold":
                    bpb[arm][seed], seconds[arm][seed], logs = train_gold(root, seed, train, held, args)
                else:
                    bpb[arm][seed], seconds[arm][seed], logs = train_hf_kd(root, arm, seed, held, args)
                shown = " ".join(f"{k} {v:.4g}" for k, v in logs.items())
                print(
                    f"[xtok] seed {seed} {arm}: bits/byte {bpb[arm][seed]:.4f}, {seconds[arm][seed]:.3f} s/step, "
                    f"last logs: {shown} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    report(bpb, seconds, args.seeds)


if __name__ == "__main__":
    main()
