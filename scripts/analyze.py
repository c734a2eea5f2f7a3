"""Write the knowledge report of a teacher (and optionally its student) on a recipe's dataset.

    python scripts/analyze.py --config recipes/demo/student_kd.yaml [--student outputs/demo/student_kd]
        [--teacher outputs/demo/teacher] [--report_dir outputs/demo/report] [--split test] [--max_samples N]
    python scripts/analyze.py --run outputs/kd/seed0 [--run outputs/kd/seed1 ...] \
        --twin outputs/none/seed0 [--twin outputs/none/seed1 ...] [--card]

``--run``: a finished run's ``output_dir`` (repeat it for seeds); the recipe, teacher and budget are read
from its ``run_record.json``, no recipe file needed; the first run is the analysed student. ``--twin``:
the output_dir of the no-KD twin (α = 0, same recipe otherwise; repeat for seeds, paired by seed): the
report then leads with the outcome — the gain and its seed spread, the share of the no-KD → teacher gap
closed, both budgets (a verdict only when they are equal: else "cannot judge", naming the difference),
budget differences and under-training whatever the verdict, and when KD did not help, each other cause
found with what to try. ``--card`` renders
the first run's model card again with that outcome as its first section.

The recipe gives the dataset, the task, α and τ; the teacher defaults to its
``teacher_model_name_or_path``, the student to its ``output_dir`` when a model is saved there
(``--student none``: teacher only), the report folder to ``<output_dir>/report``. A recipe of
``teacher_source: mixture``: every one of its ``teachers:`` opened as the run opened it (the student
needed), and the report names each teacher with its weight (or share of routed rows), its accuracy and
the student's top-1 agreement and KL with it. Writes ``report.json``, ``report.md`` and PNG plots (see
README, "Reading the report").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_kd import parse_args
from hf_kd.knowledge.outcome import outcome_markdown
from hf_kd.knowledge.report import teachers_markdown
from hf_kd.runs.report import build_report
from hf_kd.runs.run_record import read_run, recipe_arguments, write_outcome_card


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
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        help="a finished run's output_dir (repeat for seeds); no recipe needed",
    )
    parser.add_argument(
        "--twin",
        action="append",
        default=[],
        help="the no-KD twin's output_dir (repeat for seeds): outcome first",
    )
    parser.add_argument("--metric", default="eval_accuracy", help="final metric of the outcome")
    parser.add_argument(
        "--card", action="store_true", help="render the run's model card again, outcome first"
    )
    own, rest = parser.parse_known_args(argv)
    if own.run and rest:
        raise SystemExit(
            f"with --run the recipe is the run's own (run_record.json); unexpected arguments: {rest}"
        )
    if own.twin and not own.run:
        raise SystemExit("--twin needs the KD run it is compared with: --run <output_dir> (repeat for seeds)")
    if own.card and not own.twin:
        raise SystemExit("--card writes the outcome into the run's card: it needs --twin")
    kd_runs = [read_run(d, own.metric) for d in own.run]  # checked before any model loads
    twin_runs = [read_run(d, own.metric) for d in own.twin]
    if own.run:
        data_args, _, config = recipe_arguments(own.run[0])
        own.student = own.student or own.run[0]
    else:
        data_args, _, config = parse_args(rest)
    teacher = own.teacher or config.teacher_model_name_or_path
    if not teacher and config.teacher_source != "mixture":
        raise SystemExit(
            "no teacher: pass --teacher or use a recipe with teacher_model_name_or_path (or teachers:)"
        )
    student = own.student
    if student is None:
        student = config.output_dir if (Path(config.output_dir) / "config.json").is_file() else None
    elif student.lower() == "none":
        student = None
    report_dir = Path(own.report_dir or Path(config.output_dir) / "report")
    content = build_report(
        data_args,
        config,
        teacher=teacher or None,  # None: the recipe's several teachers
        student=student,
        report_dir=report_dir,
        split=own.split,
        max_samples=own.max_samples,
        kd_runs=kd_runs,
        twin_runs=twin_runs,
        metric=own.metric.removeprefix("eval_"),
    )
    if "outcome" in content:
        print(outcome_markdown(content["outcome"]))
        if own.card:
            print(f"model card: {write_outcome_card(own.run[0], outcome_markdown(content['outcome']))}")
    if "teachers" in content:
        print(teachers_markdown(content["teachers"]))
    for sentence in content["diagnosis"]["levels"] + content["diagnosis"]["failures"]:
        print("-", sentence)
    print(f"knowledge report: {report_dir / 'report.md'}")
    return report_dir


if __name__ == "__main__":
    main()
