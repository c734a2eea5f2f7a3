"""Write the knowledge report of a teacher (and optionally its student) on a recipe's dataset.

    python scripts/analyze.py --config recipes/demo/student_kd.yaml [--student outputs/demo/student_kd]
        [--teacher outputs/demo/teacher] [--report_dir outputs/demo/report] [--split test] [--max_samples N]

The recipe gives the dataset, the task, α and τ; the teacher defaults to its
``teacher_model_name_or_path``, the student to its ``output_dir`` when a model is saved there
(``--student none``: teacher only), the report folder to ``<output_dir>/report``. Writes
``report.json``, ``report.md`` and PNG plots (see README, "Reading the report").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_kd import parse_args
from hf_kd.data.loading import dataset_inputs
from hf_kd.paths import refuse_overlap
from hf_kd.runs.report import build_report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher", help="teacher model directory (default: the recipe's teacher_model_name_or_path)"
    )
    parser.add_argument(
        "--student",
        help="student model directory, or 'none' (default: the recipe's output_dir if it holds a model)",
    )
    parser.add_argument("--report_dir", help="report folder (default: <output_dir>/report)")
    parser.add_argument("--split", help="dataset split to analyse (default: the recipe's eval_split)")
    parser.add_argument("--max_samples", type=int, help="analyse only the first N rows of the split")
    own, rest = parser.parse_known_args(argv)
    data_args, _, config = parse_args(rest)
    teacher = own.teacher or config.teacher_model_name_or_path
    if not teacher:
        raise SystemExit("no teacher: pass --teacher or use a recipe with teacher_model_name_or_path")
    student = own.student
    if student is None:
        student = config.output_dir if (Path(config.output_dir) / "config.json").is_file() else None
    elif student.lower() == "none":
        student = None
    report_dir = Path(own.report_dir or Path(config.output_dir) / "report")
    refuse_overlap(
        "report_dir",
        report_dir,
        {"teacher": teacher, "student": student, **dataset_inputs(data_args)},
        may_lie_inside=("student",),  # the default: <output_dir>/report, next to the student it describes
    )
    content = build_report(
        data_args,
        config,
        teacher=teacher,
        student=student,
        report_dir=report_dir,
        split=own.split,
        max_samples=own.max_samples,
    )
    for sentence in content["diagnosis"]["levels"] + content["diagnosis"]["failures"]:
        print("-", sentence)
    print(f"knowledge report: {report_dir / 'report.md'}")
    return report_dir


if __name__ == "__main__":
    main()
