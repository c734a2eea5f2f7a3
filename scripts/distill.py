"""Distil a teacher into a student from a recipe.

    accelerate launch scripts/distill.py --config recipes/<family>/<recipe>.yaml [--field value ...]
    python scripts/distill.py --config recipes/demo/student_kd.yaml --num_train_epochs 5

Command-line flags override the recipe; the recipe overrides the defaults (see README "Configuration").
"""

from hf_kd import parse_args, run_distillation
from hf_kd.pipeline import format_metrics


def main(argv: list[str] | None = None) -> None:
    result = run_distillation(*parse_args(argv))
    if result.trainer.is_world_process_zero():
        print(format_metrics(result.metrics))


if __name__ == "__main__":
    main()
