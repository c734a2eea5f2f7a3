"""Before any training: measure a recipe's teacher (online or cached) and student on a slice of the data,
and write the setting to train with — α, τ, divergence, budget, cache width — each with its measurement,
and a plain warning when the teacher is unlikely to help.

    python scripts/preflight.py --config recipes/demo/student_kd.yaml [--report_dir outputs/preflight/<recipe>]
        [--max_samples 512] [--max_tokens 4096] [--split train] [--student_reference 0.74] [--field value ...]

Writes ``preflight.md``, ``preflight.json`` and ``recommended.yaml`` (run it with
``python scripts/distill.py --config <report_dir>/recommended.yaml``) into ``--report_dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_kd.config import parse_args
from hf_kd.runs.preflight import run_preflight


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the student's recipe (YAML)")
    parser.add_argument("--report_dir", help="report folder (default: outputs/preflight/<recipe name>)")
    parser.add_argument("--max_samples", type=int, default=512, help="rows of the slice measured")
    parser.add_argument(
        "--max_tokens",
        type=int,
        default=4096,
        help="token-level tasks: positions read (the labelled ones are measured)",
    )
    parser.add_argument("--split", help="the split measured (default: the recipe's training split)")
    parser.add_argument(
        "--student_reference", type=float, help="the student's score without KD, when known (e.g. 0.74)"
    )
    own, overrides = parser.parse_known_args(argv)
    if own.max_samples < 1 or own.max_tokens < 1:
        raise SystemExit(
            f"--max_samples and --max_tokens must be ≥ 1, got {own.max_samples}, {own.max_tokens}"
        )
    data_args, model_args, config = parse_args(["--config", own.config, *overrides])
    report_dir = Path(own.report_dir or Path("outputs/preflight") / Path(own.config).stem)
    content = run_preflight(
        data_args,
        model_args,
        config,
        report_dir=report_dir,
        recipe=own.config,
        max_samples=own.max_samples,
        max_tokens=own.max_tokens,
        split=own.split,
        student_reference=own.student_reference,
    )
    print((report_dir / "preflight.md").read_text())
    print(f"recommended recipe: {report_dir / 'recommended.yaml'}")
    return content


if __name__ == "__main__":
    main()
