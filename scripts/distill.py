"""Distil a teacher into a student from a recipe.

    python scripts/distill.py --config recipes/demo/student_kd.yaml --num_train_epochs 5
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml scripts/distill.py --config <recipe>.yaml
    torchrun --nproc_per_node 2 scripts/distill.py --config <recipe>.yaml --use_cpu true   # 2 processes on CPU

Command-line flags override the recipe; the recipe overrides the defaults (see README "Configuration").
"""

import shlex
import sys
from pathlib import Path

from hf_kd import parse_args, run_distillation
from hf_kd.hub import HubPushError
from hf_kd.redact import redact, redact_logs_and_errors
from hf_kd.runs.distill import format_metrics
from hf_kd.runs.processes import end_processes


def main(argv: list[str] | None = None) -> None:
    redact_logs_and_errors()  # no secret in a log line or an error's traceback
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    failure = None
    try:
        result = run_distillation(
            *parse_args(argv),
            command=shlex.join(["python", "scripts/distill.py", *argv]),
            recipe_yaml=Path(recipe).read_text() if recipe else None,
        )
        if result.trainer.is_world_process_zero():
            print(format_metrics(result.metrics))
    except HubPushError as err:  # one line: the endpoint, the failure and how to push again
        failure = redact(f"error: {err}")
    end_processes(failure)


if __name__ == "__main__":
    main()
