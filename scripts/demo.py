"""The embedded default: a real distillation, offline, on CPU, in a few minutes (``make demo``).

1. write scikit-learn's handwritten digits as a ``datasets`` image dataset (``outputs/data/digits``);
2. train a ViT teacher on every training label (``recipes/demo/teacher.yaml``);
3. train a 1-layer ViT student that sees only 150 labels, three ways, over five seeds:
   without KD (α = 0), with KD (``recipes/demo/student_kd.yaml``), and with KD plus the other
   training images as unlabelled transfer data (the teacher labels them);
4. print one table: accuracy (mean ± std over seeds), parameters, evaluation speed.

It prints one line per run; everything a run prints or logs goes to ``<output_dir>/logs/<run>.log``.

    python scripts/demo.py [--seeds 0 1 2 3 4] [--output_dir outputs/demo]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
import transformers

from hf_kd import parse_args, run_distillation
from hf_kd.data.digits import write_digits
from hf_kd.runs.report import build_report

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "demo"
STUDENT_ARMS = {
    "student without KD": ["--alpha", "0.0"],
    "student with KD": [],
    "student with KD + unlabeled data": ["--use_unlabeled", "true"],
}
"""Command-line overrides of recipes/demo/student_kd.yaml for each student row of the table."""


@contextlib.contextmanager
def run_line(description: str, log: Path) -> Iterator[dict]:
    """One line per run: ``[demo] description ...`` now, the accuracy the block puts into the yielded dict,
    the time and the log file when it ends. What the block prints (stdout, stderr) and what transformers
    logs goes to the file ``log``."""
    print(f"[demo] {description} ...", end="", flush=True)
    started, result = time.perf_counter(), {}
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("w") as file, contextlib.redirect_stdout(file), contextlib.redirect_stderr(file):
            handler = logging.StreamHandler(file)
            transformers.utils.logging.disable_default_handler()  # it writes to the terminal's stderr
            transformers.utils.logging.add_handler(handler)
            try:
                yield result
            finally:
                transformers.utils.logging.remove_handler(handler)
                transformers.utils.logging.enable_default_handler()
    except BaseException:
        print(f" failed (log: {log})", flush=True)
        raise
    accuracy = f"accuracy {result['accuracy']:.3f}, " if "accuracy" in result else ""
    print(f" {accuracy}{time.perf_counter() - started:.0f} s (log: {log})", flush=True)


def train(recipe: str, output_dir: Path, *overrides: str):
    """One ``scripts/distill.py`` run, in process."""
    argv = [
        "--config",
        str(RECIPES / recipe),
        "--output_dir",
        str(output_dir),
        "--disable_tqdm",
        "true",
        "--logging_strategy",
        "no",
        *overrides,
    ]
    return run_distillation(*parse_args(argv))


@torch.no_grad()
def eval_speed(
    model: torch.nn.Module, batch_size: int = 256, image_size: int = 8, repeats: int = 20
) -> float:
    """Images per second of the model alone (no teacher) on random 8×8 inputs, CPU, batch ``batch_size``."""
    model.eval()
    pixels = torch.randn(batch_size, 3, image_size, image_size, device=model.device)
    model(pixel_values=pixels)
    start = time.perf_counter()
    for _ in range(repeats):
        model(pixel_values=pixels)
    return repeats * batch_size / (time.perf_counter() - start)


def mean_std(values: list[float]) -> str:
    """Mean ± std over seeds (sample std), or the value alone for a single run."""
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean().item():.3f} ± {t.std().item():.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args()

    datasets.disable_progress_bars()  # ten short runs: one line of progress each is enough
    transformers.utils.logging.disable_progress_bar()
    write_digits("outputs/data/digits")
    started = time.perf_counter()
    logs = args.output_dir / "logs"
    description = "teacher (ViT, hidden 64 × 4 layers, all 1,258 training labels)"
    with run_line(description, logs / "teacher.log") as line:
        teacher = train("teacher.yaml", args.output_dir / "teacher")
        line["accuracy"] = teacher.metrics["eval_accuracy"]
    rows = [
        (
            "teacher",
            [teacher.metrics["eval_accuracy"]],
            teacher.student_parameters,
            eval_speed(teacher.trainer.model),
        )
    ]
    for name, overrides in STUDENT_ARMS.items():
        accuracies, result = [], None
        for seed in args.seeds:
            folder = name.replace(" ", "_").replace("+", "plus")
            with run_line(f"{name}, seed {seed}", logs / f"{folder}-seed{seed}.log") as line:
                result = train(
                    "student_kd.yaml",
                    args.output_dir / folder / f"seed{seed}",
                    "--seed",
                    str(seed),
                    "--teacher_model_name_or_path",
                    str(args.output_dir / "teacher"),
                    *overrides,
                )
                line["accuracy"] = result.metrics["eval_accuracy"]
            accuracies.append(result.metrics["eval_accuracy"])
        rows.append((name, accuracies, result.student_parameters, eval_speed(result.trainer.model)))

    print(
        f"\nDigits test set (539 images), {len(args.seeds)} seeds; students see 150 labels. {time.perf_counter() - started:.0f} s in all.\n"
    )
    print(f"| {'model':<34} | {'accuracy':<13} | {'parameters':>10} | {'eval images/s':>13} |")
    print(f"|{'-' * 36}|{'-' * 15}|{'-' * 12}|{'-' * 15}|")
    for name, accuracies, parameters, speed in rows:
        print(f"| {name:<34} | {mean_std(accuracies):<13} | {parameters:>10,} | {speed:>13,.0f} |")
    baseline = rows[1][1]
    for name, accuracies, _, _ in rows[2:]:
        gains = ", ".join(f"{a - b:+.3f}" for a, b in zip(accuracies, baseline, strict=True))
        print(f"{name} − student without KD, same seed: {gains}")

    kd_student = args.output_dir / "student_with_KD" / f"seed{args.seeds[0]}"
    report_dir = args.output_dir / "report"
    data_args, _, config = parse_args(
        ["--config", str(RECIPES / "student_kd.yaml"), "--output_dir", str(kd_student)]
    )
    print()
    with run_line(f"knowledge report of the KD student (seed {args.seeds[0]})", logs / "report.log"):
        build_report(
            data_args,
            config,
            teacher=str(args.output_dir / "teacher"),
            student=str(kd_student),
            report_dir=report_dir,
        )
    print(
        f"[demo] knowledge report (what the teacher transferred to the KD student): {report_dir / 'report.md'}"
    )


if __name__ == "__main__":
    main()
