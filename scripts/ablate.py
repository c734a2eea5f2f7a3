"""Train the same student under each of the paper's synthetic teachers, over several seeds.

    python scripts/ablate.py --config recipes/paper/student_kd.yaml --arms none,ls,kd_pt,kd_sim,kd,kd_topk --seeds 3
        [--output_dir outputs/ablation/student_kd] [--metric eval_accuracy] [--field value ...]

Arms share the recipe's α, τ and budget (``none`` sets α = 0); any other ``--field value`` overrides
the recipe for every run. Each (arm, seed) result is kept under ``<output_dir>/<arm>/seed<seed>``, so
repeating the command only trains what is missing. Writes ``ablation.md`` (mean ± std per arm and the
paper's ordering), ``ablation.json`` and ``ablation.png`` into the output folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_kd.runs.ablation import parse_arms, run_ablation, table, write_summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the student's recipe (YAML)")
    parser.add_argument("--arms", default="none,ls,kd_pt,kd_sim,kd,kd_topk", help="comma-separated arms")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds: 0 .. N-1")
    parser.add_argument("--output_dir", help="ablation folder (default: outputs/ablation/<recipe name>)")
    parser.add_argument("--metric", default="eval_accuracy", help="final metric to compare")
    own, overrides = parser.parse_known_args(argv)
    if own.seeds < 1:
        raise SystemExit(f"--seeds must be ≥ 1, got {own.seeds}")
    arms = parse_arms(own.arms)
    output_dir = Path(own.output_dir or Path("outputs/ablation") / Path(own.config).stem)
    results = run_ablation(
        own.config,
        arms,
        range(own.seeds),
        output_dir,
        overrides=overrides,
        progress=lambda s: print(s, flush=True),
    )
    content = write_summary(results, own.metric, output_dir, f"Ablation of {own.config}")
    print(table(content["summary"], own.metric))
    for line in content["paper_ordering"]:
        print("paper ordering:", line)
    print(f"ablation table: {output_dir / 'ablation.md'}")
    return content


if __name__ == "__main__":
    main()
