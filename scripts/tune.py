"""Sweep α, τ and the budget (and optionally teacher checkpoints) for a student recipe, each setting with
its no-KD twin at the same number of optimizer steps, over paired seeds, scored on a validation split
carved from the training data (never the test split), and write the recommended recipe.

    python scripts/tune.py --config recipes/demo/student_kd.yaml [--alphas 0.5,0.9] [--taus 1,2] \
        [--budgets 200,600] [--budget_field max_steps|num_train_epochs] [--teachers a,b] [--seeds 3]
        [--validation_fraction 0.2] [--output_dir outputs/tune/<recipe>] [--metric eval_accuracy] [--field value ...]

Every arm of a budget runs the same optimizer steps (a budget in epochs is converted with the KD arms'
training rows). Each (setting, seed) result is kept under ``<output_dir>/<setting>/seed<k>``: the same
command again trains only what is missing, and another grid in the same folder adds to the earlier ones.
Writes ``tune.md`` (table, best first, with steps), ``tune.json``, ``tune.png`` and ``recommended.yaml``
(run it with ``python scripts/distill.py --config <output_dir>/recommended.yaml``). Warns on one seed, a
gain inside the seed spread, and a winner at the largest budget tried.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_kd.runs.tune import DEFAULT_BUDGETS, table, tune


def numbers(text: str) -> list[float]:
    """``"0.5,0.9"`` → [0.5, 0.9]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the student's recipe (YAML)")
    parser.add_argument("--alphas", type=numbers, default=[0.5, 0.9], help="comma-separated α values (> 0)")
    parser.add_argument("--taus", type=numbers, default=[1.0, 2.0], help="comma-separated τ values")
    parser.add_argument(
        "--budget_field",
        default="max_steps",
        choices=["max_steps", "num_train_epochs"],
        help="unit of --budgets (epochs are converted to the same optimizer steps for every arm)",
    )
    parser.add_argument(
        "--budgets",
        type=numbers,
        default=list(DEFAULT_BUDGETS),
        help=f"comma-separated values of --budget_field (default: {','.join(map(str, DEFAULT_BUDGETS))} steps)",
    )
    parser.add_argument(
        "--teachers", default="", help="comma-separated teacher checkpoints (default: the recipe's)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of paired seeds: 0 .. N-1")
    parser.add_argument("--validation_fraction", type=float, default=0.2, help="share of train carved off")
    parser.add_argument("--output_dir", help="sweep folder (default: outputs/tune/<recipe name>)")
    parser.add_argument("--metric", default="eval_accuracy", help="final metric to choose by")
    own, overrides = parser.parse_known_args(argv)
    if own.seeds < 1:
        raise SystemExit(f"--seeds must be ≥ 1, got {own.seeds}")
    if any(a <= 0 or a > 1 for a in own.alphas):
        raise SystemExit(f"--alphas must be in (0, 1] (the no-KD twin is added per budget), got {own.alphas}")
    if own.budget_field == "max_steps":
        own.budgets = [int(b) for b in own.budgets]
    output_dir = Path(own.output_dir or Path("outputs/tune") / Path(own.config).stem)
    content = tune(
        own.config,
        output_dir,
        alphas=own.alphas,
        taus=own.taus,
        budgets=own.budgets,
        budget_field=own.budget_field,
        teachers=[t.strip() for t in own.teachers.split(",") if t.strip()] or [""],
        seeds=range(own.seeds),
        validation_fraction=own.validation_fraction,
        metric=own.metric,
        overrides=overrides,
        progress=lambda s: print(s, flush=True),
    )
    print(table(content["summary"], own.metric.removeprefix("eval_")))
    print(f"chosen: {content['best']} ({content['verdict']})")
    print(f"recommended recipe: {output_dir / 'recommended.yaml'}")
    return content


if __name__ == "__main__":
    main()
