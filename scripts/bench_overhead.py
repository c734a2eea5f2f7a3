"""Online-KD overhead: is a KD training step just a student step plus a teacher forward?

Measures, interleaved on the same batches in one run, the time of
  (a) a plain fine-tuning step of the student (``DistillationTrainer.training_step`` with α = 0),
  (b) the teacher's forward pass alone (no autograd),
  (c) an online KD step (``training_step`` with α = 0.5, τ = 2: student step + teacher forward + loss),
and prints the ratio c / (a + b). Target ≤ 1.10: no work wasted beyond the teacher's forward.

    python scripts/bench_overhead.py [--repeats 30] [--batch_size 32] [--seq_len 128]

Models are BERT-style, built from configs (offline): teacher hidden 256 × 4 layers, student 128 × 2.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.tasks import TextClassificationTask


def bert(hidden: int, layers: int, vocab: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        num_labels=4,
    )
    return BertForSequenceClassification(config)


def trainer(student, teacher, alpha: float, out: str) -> DistillationTrainer:
    args = DistillationConfig(
        output_dir=out, alpha=alpha, temperature=2.0, use_cpu=True, report_to="none", learning_rate=1e-4
    )
    t = DistillationTrainer(
        model=student, teacher_model=teacher if alpha > 0 else None, args=args, task=TextClassificationTask()
    )
    t.create_optimizer_and_scheduler(num_training_steps=10_000)
    t.current_gradient_accumulation_steps = 1  # what train() sets; training_step reads it (Transformers 5.17)
    return t


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8000)
    args = parser.parse_args()

    teacher = bert(256, 4, args.vocab, seed=0)
    plain_student, kd_student = bert(128, 2, args.vocab, seed=1), bert(128, 2, args.vocab, seed=1)
    with tempfile.TemporaryDirectory() as out:
        plain = trainer(plain_student, None, 0.0, out)
        kd = trainer(kd_student, teacher, 0.5, out)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g),
            "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
            "labels": torch.randint(0, 4, (args.batch_size,), generator=g),
        }
        for _ in range(4)
    ]
    student_inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]

    def teacher_forward(i: int) -> None:
        with torch.no_grad():
            kd.teacher_model(**student_inputs[i])

    times = {"a": [], "b": [], "c": []}
    for r in range(args.repeats + 3):  # the first 3 rounds warm up
        i = r % len(batches)
        a = timed(plain.training_step, plain.model, dict(batches[i]))
        b = timed(teacher_forward, i)
        c = timed(kd.training_step, kd.model, dict(batches[i]))
        if r >= 3:
            times["a"].append(a), times["b"].append(b), times["c"].append(c)
    a, b, c = (statistics.median(times[k]) * 1e3 for k in "abc")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} × {args.seq_len} tokens, {args.repeats} rounds (medians)"
    )
    print(f"(a) student fine-tuning step  {a:8.1f} ms")
    print(f"(b) teacher forward           {b:8.1f} ms")
    print(f"(c) online KD step            {c:8.1f} ms")
    print(f"c / (a + b) = {c / (a + b):.3f}   (target ≤ 1.10)")


if __name__ == "__main__":
    main()
