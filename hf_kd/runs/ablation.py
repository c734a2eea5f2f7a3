"""The paper's ablation: the same student trained under each synthetic teacher (``none``, ``ls``,
``kd_pt``, ``kd_sim``, ``kd``, ``kd_topk``) with the same α, τ and budget, over several seeds.

Each (arm, seed) run keeps its result in ``<output_dir>/<arm>/seed<seed>/result.json``; a repeated
command reads the finished ones instead of training again. The summary is a table of the task metric
(mean ± sample std over seeds) and a bar plot.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hf_kd.config import SYNTHETIC_KINDS, parse_args
from hf_kd.files import write_atomic
from hf_kd.runs.distill import run_distillation

PAPER_ORDERING = (("kd_pt", "kd_sim"), ("kd_sim", "ls"))
"""The paper's reported benefit ordering: kd_pt > kd_sim > ls (and kd_topk ≥ kd, checked separately)."""


def parse_arms(text: str) -> list[str]:
    """``"none,ls,kd"`` → ["none", "ls", "kd"], each checked against the synthetic kinds."""
    arms = [a.strip() for a in text.split(",") if a.strip()]
    for arm in arms:
        if arm not in SYNTHETIC_KINDS:
            raise ValueError(f"arm {arm!r} is not one of {SYNTHETIC_KINDS}")
    if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"--arms needs distinct arms, got {text!r}")
    return arms


def run_argv(recipe: str, arm: str, seed: int, run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """The ``scripts/distill.py`` arguments of one run: the recipe, the user's overrides, then the arm
    (``none`` sets α = 0), the seed and the run folder."""
    argv = ["--config", recipe, *overrides, "--synthetic_teacher", arm, "--seed", str(seed)]
    if arm == "none":
        argv += ["--alpha", "0.0"]
    return argv + ["--output_dir", str(run_dir), "--disable_tqdm", "true", "--report_to", "none"]


def run_ablation(
    recipe: str,
    arms: Sequence[str],
    seeds: Sequence[int],
    output_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    train: Callable[[list[str]], dict[str, float]] | None = None,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every (arm, seed) not finished yet and return all results, arm-major.

    ``train(argv) -> final metrics`` defaults to an in-process ``run_distillation``. Every run's
    arguments are parsed before the first one trains, so a bad recipe or override fails at once.
    """
    output_dir = Path(output_dir)
    plan = [
        (arm, seed, run_argv(recipe, arm, seed, output_dir / arm / f"seed{seed}", overrides))
        for arm in arms
        for seed in seeds
    ]
    return run_grid(plan, output_dir, train=train, progress=progress)


def run_grid(
    plan: Sequence[tuple[str, int, list[str]]],
    output_dir: str | Path,
    *,
    train: Callable[[list[str]], dict[str, float]] | None = None,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every ``(arm, seed, argv)`` of ``plan`` whose ``<output_dir>/<arm>/seed<seed>/result.json`` is
    not there yet, keep each result there (written aside, then renamed), and return all results in plan
    order. Every argv is parsed first, so a bad recipe or override fails before any training."""
    output_dir = Path(output_dir)
    for _, _, argv in plan:
        parse_args(argv)
    train = train or (lambda argv: run_distillation(*parse_args(argv)).metrics)
    results = []
    for i, (arm, seed, argv) in enumerate(plan, 1):
        run_dir = output_dir / arm / f"seed{seed}"
        path = run_dir / "result.json"
        tag = f"[{i}/{len(plan)}] arm={arm} seed={seed}"
        if path.is_file():
            results.append(json.loads(path.read_text()))
            progress(f"{tag}: finished earlier, kept ({path})")
            continue
        progress(f"{tag}: training")
        start = time.perf_counter()
        metrics = train(argv)
        result = {"arm": arm, "seed": seed, "metrics": metrics, "seconds": time.perf_counter() - start}
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda p, r=result: p.write_text(json.dumps(r, indent=2)))
        results.append(result)
        progress(
            f"{tag}: {', '.join(f'{k}={v:.4f}' for k, v in sorted(metrics.items()) if k.endswith('accuracy'))}"
        )
    return results


def summarize(results: list[dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """Per arm, in first-seen order: mean, sample std (ddof = 1; NaN for one seed) and n of ``metric``;
    with a ``none`` arm also the paired difference to it over the seeds both ran (``delta_mean``,
    ``delta_std``): a seed fixes the initialisation and the labelled subset, so the paired difference
    removes what the seed changes for every arm alike."""
    values: dict[str, dict[int, float]] = {}
    for result in results:
        if metric not in result["metrics"]:
            raise KeyError(
                f"metric {metric!r} is not in the results of arm {result['arm']!r}: {sorted(result['metrics'])}"
            )
        values.setdefault(result["arm"], {})[result["seed"]] = float(result["metrics"][metric])
    summary = {}
    for arm, by_seed in values.items():
        v = list(by_seed.values())
        summary[arm] = {"mean": statistics.fmean(v), "std": _stdev(v), "n": len(v)}
        if "none" in values:
            deltas = [x - values["none"][seed] for seed, x in by_seed.items() if seed in values["none"]]
            if deltas:
                summary[arm].update(delta_mean=statistics.fmean(deltas), delta_std=_stdev(deltas))
    return summary


def _stdev(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def paper_ordering(summary: dict[str, dict[str, float]]) -> list[str]:
    """Whether the measured means follow the paper's ordering, one line per comparison available."""
    lines = []
    for better, worse in PAPER_ORDERING:
        if better in summary and worse in summary:
            holds = summary[better]["mean"] > summary[worse]["mean"]
            lines.append(f"{better} > {worse}: {'holds' if holds else 'does not hold'}")
    if "kd_topk" in summary and "kd" in summary:
        holds = summary["kd_topk"]["mean"] >= summary["kd"]["mean"]
        lines.append(f"kd_topk ≥ kd: {'holds' if holds else 'does not hold'}")
    return lines


def table(summary: dict[str, dict[str, float]], metric: str) -> str:
    """A markdown table: arm | metric mean ± std | paired difference to ``none`` | seeds."""
    lines = [f"| arm | {metric} (mean ± std) | Δ vs none, paired (mean ± std) | seeds |", "|---|---|---|---|"]
    for arm, s in summary.items():
        delta = f"{s['delta_mean']:+.4f} ± {s['delta_std']:.4f}" if "delta_mean" in s else "—"
        lines.append(f"| {arm} | {s['mean']:.4f} ± {s['std']:.4f} | {delta} | {s['n']} |")
    return "\n".join(lines)


def write_summary(
    results: list[dict[str, Any]], metric: str, output_dir: str | Path, title: str
) -> dict[str, Any]:
    """``ablation.json`` (results + summary), ``ablation.md`` (table + paper ordering), ``ablation.png``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, metric)
    ordering = paper_ordering(summary)
    content = {"metric": metric, "summary": summary, "paper_ordering": ordering, "results": results}
    write_atomic(output_dir / "ablation.json", lambda p: p.write_text(json.dumps(content, indent=2)))
    text = f"# {title}\n\n{table(summary, metric)}\n\nThe paper's ordering (on the means):\n\n" + "".join(
        f"- {s}\n" for s in ordering
    )
    write_atomic(output_dir / "ablation.md", lambda p: p.write_text(text))
    fig, ax = plt.subplots(figsize=(1.2 * len(summary) + 2, 3.5))
    arms = list(summary)
    means = [summary[a]["mean"] for a in arms]
    errors = [0.0 if math.isnan(summary[a]["std"]) else summary[a]["std"] for a in arms]
    ax.bar(arms, means, yerr=errors, capsize=4, color="tab:blue")
    low = min(m - e for m, e in zip(means, errors, strict=True))
    high = max(m + e for m, e in zip(means, errors, strict=True))
    ax.set_ylim(max(0.0, low - 0.5 * (high - low + 1e-3)), high + 0.2 * (high - low + 1e-3))
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    write_atomic(output_dir / "ablation.png", lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)
    return content
