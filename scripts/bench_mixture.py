"""Several teachers on real text: a student distilled from the mixture of two domain teachers vs from
either teacher alone vs no KD (and routed by domain), same budget, same seeds, held-out accuracy on both
domains and on their union, paired differences.

Text: ``hf_kd.data.stdlib_text`` (the docstrings of 8 standard-library packages, labelled by package),
split into two domains (``--split``):

    class  by package: domain A = the first four packages (asyncio, email, unittest, logging), domain B =
           the last four (xml, multiprocessing, importlib, http); each teacher knows its own domain's
           classes and nothing of the other's
    style  by where the docstring was written (its ``kind``): domain A = methods' docstrings (functions
           defined in a class body), domain B = the others (modules, classes, other functions); both
           domains hold all 8 packages

Teachers (BERT 64 × 4, α = 0, from scratch, the 8-class head): T_A trained on domain A's training rows
only, T_B on domain B's only. Students (BERT 64 × 1, the same saved
initialisation per seed in every arm) train on the training rows of both domains, each a
``run_distillation`` run (as ``scripts/distill.py``). Arms (``--arms``):

    none     α = 0: labels only
    A        KD from T_A alone
    B        KD from T_B alone
    mixture  ``teacher_source: mixture``, T_A and T_B at weight 1 each: p = (p_A + p_B) / 2
    route    ``teacher_routing_column: domain``: each row taught by its own domain's teacher

Accuracy on the held-out rows of domain A, of domain B and of both (the union); Δ paired by seed against
the mixture. The mixture student's top-1 agreement with each teacher on the union is printed too.

    OMP_NUM_THREADS=1 python scripts/bench_mixture.py [--split class|style] [--seeds 0 1 2] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from datasets import DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

from hf_kd.config import DataArguments, DistillationConfig, ModelArguments
from hf_kd.data.stdlib_text import PACKAGES, stdlib_text_dataset, word_tokenizer
from hf_kd.knowledge.measures import teacher_agreement
from hf_kd.runs.distill import run_distillation

DOMAINS = ("A", "B")
SPLITS = {
    "class": lambda row: "A" if row["label"] < len(PACKAGES) // 2 else "B",
    "style": lambda row: "A" if row["kind"] == "method" else "B",
}
ARMS = ("none", "A", "B", "mixture", "route")
MAX_LENGTH = 32


def bert(vocab_size: int, layers: int) -> BertConfig:
    """BERT 64 wide, ``layers`` deep, with the 8 packages as labels."""
    return BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=len(PACKAGES),
        id2label=dict(enumerate(PACKAGES)), label2id={p: i for i, p in enumerate(PACKAGES)},
    )  # fmt: skip


def prepare(root: Path, split: str) -> DatasetDict:
    """The data (a ``domain`` column added, by ``split``) and its tokenizer under ``root``, and one dataset
    per domain."""
    data = stdlib_text_dataset(kind=split == "style")
    data = data.map(lambda row: {"domain": SPLITS[split](row)})
    word_tokenizer(data["train"]).save_pretrained(str(root / "tokenizer"))
    data.save_to_disk(str(root / "data-both"))
    for name in DOMAINS:
        data.filter(lambda row, name=name: row["domain"] == name).save_to_disk(str(root / f"data-{name}"))
    return data


def logits(model, tokenizer, rows) -> torch.Tensor:
    """``model``'s logits [N, 8] on ``rows`` (``text``), tokenized as the runs do."""
    model.eval()
    enc = tokenizer(
        list(rows["text"]), truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**enc).logits


def accuracy(model, tokenizer, rows) -> float:
    """Top-1 accuracy of ``model`` on ``rows`` (``text``, ``label``)."""
    return (
        (logits(model, tokenizer, rows).argmax(-1) == torch.tensor(list(rows["label"]))).float().mean().item()
    )


def settings(root: Path, name: str, seed: int, **fields) -> DistillationConfig:
    return DistillationConfig(
        output_dir=str(root / name), seed=seed, per_device_train_batch_size=32, learning_rate=2e-3,
        weight_decay=0.05, warmup_steps=0.1, lr_scheduler_type="cosine", use_cpu=True, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, logging_steps=50, **fields,
    )  # fmt: skip


def train_teacher(root: Path, domain: str, args) -> Path:
    """T_<domain>: BERT 64 × 4 from scratch on that domain's training rows (α = 0)."""
    data_args = DataArguments(
        task="text-classification",
        dataset_name=str(root / f"data-{domain}"),
        eval_split=None,
        max_length=MAX_LENGTH,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    model_args = ModelArguments(
        student_config=bert(len(tokenizer), 4).to_dict(), student_processor=str(root / "tokenizer")
    )
    config = settings(root, f"teacher-{domain}", 0, alpha=0.0, num_train_epochs=args.teacher_epochs)
    run_distillation(data_args, model_args, config)
    return root / f"teacher-{domain}"


def student_init(root: Path, seed: int, vocab_size: int) -> Path:
    """A fresh student (BERT 64 × 1) from ``seed``, saved once: every arm of a seed starts from it."""
    path = root / f"student-init-{seed}"
    if not path.is_dir():
        torch.manual_seed(seed)
        BertForSequenceClassification(bert(vocab_size, 1)).save_pretrained(path)
    return path


def arm_fields(root: Path, arm: str, args) -> dict:
    teachers = [
        {"name": d, "source": "online", "model": str(root / f"teacher-{d}"), "weight": 1.0} for d in DOMAINS
    ]
    kd = {"alpha": args.alpha, "temperature": args.temperature}
    if arm == "none":
        return {"alpha": 0.0}
    if arm in DOMAINS:
        return kd | {"teacher_model_name_or_path": str(root / f"teacher-{arm}")}
    if arm == "mixture":
        return kd | {"teacher_source": "mixture", "teachers": teachers}
    if arm == "route":
        return kd | {"teacher_source": "mixture", "teachers": teachers, "teacher_routing_column": "domain"}
    raise ValueError(f"--arms: unknown arm {arm!r}; expected some of {ARMS}")


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", default="class", choices=tuple(SPLITS), help="how the two domains differ")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every student")
    parser.add_argument("--teacher_epochs", type=float, default=12)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--workdir", default=None, help="where models are written (default: a temporary folder)"
    )
    args = parser.parse_args()
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        data = prepare(root, args.split)
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        test = {d: data["test"].filter(lambda row, d=d: row["domain"] == d) for d in DOMAINS}
        test["both"] = data["test"]
        print(
            f"[mixture] split by {args.split}: {len(data['train'])} train / {len(data['test'])} test rows; "
            + "; ".join(
                f"domain {d}: {sum(x == d for x in data['train']['domain'])} train / {len(test[d])} test, "
                f"packages {sorted({PACKAGES[y] for y in test[d]['label']})}"
                for d in DOMAINS
            )
            + f"; vocabulary {len(tokenizer)}"
        )
        teachers = {}
        for domain in DOMAINS:
            teachers[domain] = AutoModelForSequenceClassification.from_pretrained(
                str(train_teacher(root, domain, args))
            )
            scores = ", ".join(
                f"{part} {accuracy(teachers[domain], tokenizer, test[part]):.4f}" for part in test
            )
            print(f"[mixture] T_{domain} test accuracy: {scores}")

        results: dict[str, dict[str, list[float]]] = {arm: {part: [] for part in test} for arm in args.arms}
        agreement: dict[str, list[float]] = {d: [] for d in DOMAINS}
        for seed in args.seeds:
            init = student_init(root, seed, len(tokenizer))
            for arm in args.arms:
                data_args = DataArguments(
                    task="text-classification", dataset_name=str(root / "data-both"), eval_split=None,
                    max_length=MAX_LENGTH,
                )  # fmt: skip
                model_args = ModelArguments(
                    student_model_name_or_path=str(init), student_processor=str(root / "tokenizer")
                )
                config = settings(
                    root, f"run-{arm}-{seed}", seed, max_steps=args.steps, **arm_fields(root, arm, args)
                )
                model = run_distillation(data_args, model_args, config).trainer.model.cpu()
                for part in test:
                    results[arm][part].append(accuracy(model, tokenizer, test[part]))
                if arm == "mixture":
                    for d in DOMAINS:
                        z, v = (
                            logits(model, tokenizer, test["both"]),
                            logits(teachers[d], tokenizer, test["both"]),
                        )
                        labels = torch.tensor(list(test["both"]["label"]))
                        agreement[d].append(teacher_agreement(z, v, labels)["top1_agreement"])
                print(
                    f"[mixture] seed {seed} {arm}: "
                    + ", ".join(f"{part} {results[arm][part][-1]:.4f}" for part in test),
                    flush=True,
                )

        print(
            f"\nsplit by {args.split}, {len(args.seeds)} seeds ({args.seeds}), {args.steps} steps, α {args.alpha}, τ {args.temperature}"
        )
        print(
            "| arm | "
            + " | ".join(f"{part} (mean ± std)" for part in test)
            + " | Δ union vs mixture (per seed) |"
        )
        print("|---|" + "---|" * (len(test) + 1))
        for arm in args.arms:
            cells = [mean_std(results[arm][part]) for part in test]
            if arm == "mixture" or "mixture" not in results:
                delta = "—"
            else:
                diffs = [a - m for a, m in zip(results[arm]["both"], results["mixture"]["both"], strict=True)]
                delta = f"{statistics.fmean(diffs):+.4f} (" + " / ".join(f"{d:+.3f}" for d in diffs) + ")"
            print(f"| {arm} | " + " | ".join(cells) + f" | {delta} |")
        if agreement["A"]:
            print(
                "mixture student's top-1 agreement with each teacher on the union: "
                + ", ".join(f"T_{d} {mean_std(agreement[d])}" for d in DOMAINS)
            )
        print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
