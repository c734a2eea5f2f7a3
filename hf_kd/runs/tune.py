"""The sweep that finds a setting where distillation pays: the same student over a grid of α, τ, budget
(and optionally teacher checkpoints), each with its no-KD twin at the same budget, over paired seeds,
scored on a validation split carved from the training data — never the test split.

Runs go through :func:`hf_kd.runs.ablation.run_grid`: each (candidate, seed) keeps its result in
``<output_dir>/<candidate>/seed<k>/result.json``, so the same command again trains only what is missing.
Writes ``tune.md`` (table), ``tune.json``, ``tune.png`` and ``recommended.yaml`` (the recipe with the
chosen setting, ready for ``scripts/distill.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from datasets import DatasetDict

from hf_kd.config import load_recipe, parse_args
from hf_kd.data.loading import load_splits
from hf_kd.files import write_atomic, write_atomic_dir
from hf_kd.knowledge.outcome import mean_std
from hf_kd.runs.ablation import run_grid

VALIDATION_SPLIT = "tune_validation"
"""The name of the split carved from the training rows."""


def carve_validation(data_args, fraction: float, seed: int, folder: Path) -> Path:
    """Split ``fraction`` of the training split off as :data:`VALIDATION_SPLIT` and save both parts to
    ``folder`` (written aside, then renamed; kept when there with the same fraction and seed)."""
    marker = {
        "dataset": data_args.dataset_name,
        "train_split": data_args.train_split,
        "fraction": fraction,
        "seed": seed,
    }
    done = folder / "carve.json"
    if done.is_file():
        if json.loads(done.read_text()) != marker:
            raise ValueError(
                f"{folder} was carved with {done.read_text()}, not {marker}: use another --output_dir"
            )
        return folder
    train = load_splits(data_args)[data_args.train_split]
    parts = train.train_test_split(test_size=fraction, seed=seed)
    carved = DatasetDict({data_args.train_split: parts["train"], VALIDATION_SPLIT: parts["test"]})

    def write(tmp: Path) -> None:
        carved.save_to_disk(str(tmp))
        (tmp / "carve.json").write_text(json.dumps(marker))

    return write_atomic_dir(folder, write)


def candidates(
    alphas: Sequence[float],
    taus: Sequence[float],
    budgets: Sequence[float],
    budget_field: str,
    teachers: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Every setting of the grid by name → its fields; per budget one no-KD twin (α = 0) named ``none_...``."""
    grid = {}
    for budget in budgets:
        b = f"{budget_field}={budget:g}"
        grid[f"none_{b}"] = {"alpha": 0.0, budget_field: budget}
        for i, teacher in enumerate(teachers):
            for alpha in alphas:
                for tau in taus:
                    name = f"a{alpha:g}_t{tau:g}_{b}" + (f"_teacher{i}" if len(teachers) > 1 else "")
                    grid[name] = {"alpha": alpha, "temperature": tau, budget_field: budget} | (
                        {"teacher_model_name_or_path": teacher} if teacher else {}
                    )
    return grid


def _argv(fields: dict[str, Any], budget_field: str) -> list[str]:
    argv = [
        arg
        for key, value in fields.items()
        for arg in (f"--{key}", f"{value:g}" if isinstance(value, float) else str(value))
    ]
    return argv + (["--max_steps", "-1"] if budget_field == "num_train_epochs" else [])


def summarize_grid(
    results: list[dict[str, Any]], grid: dict[str, dict[str, Any]], budget_field: str, metric: str
) -> dict[str, dict[str, Any]]:
    """Per candidate: mean and std over seeds of ``metric`` and the paired gain over the no-KD twin at the
    same budget (mean ± std over the seeds both ran)."""
    values: dict[str, dict[int, float]] = {}
    for r in results:
        values.setdefault(r["arm"], {})[r["seed"]] = float(r["metrics"][metric])
    summary = {}
    for name, by_seed in values.items():
        mean, std = mean_std(list(by_seed.values()))
        twin = values.get(f"none_{budget_field}={grid[name][budget_field]:g}", {})
        gains = [v - twin[s] for s, v in by_seed.items() if s in twin]
        gain, gain_std = mean_std(gains) if gains else (math.nan, math.nan)
        summary[name] = {"mean": mean, "std": std, "n": len(by_seed), "gain": gain, "gain_std": gain_std}
    return summary


def _f(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.4f}"


def table(summary: dict[str, dict[str, Any]], metric: str) -> str:
    """Markdown, best first: candidate | metric mean ± std | paired gain over no KD at the same budget | seeds."""
    lines = [f"| setting | validation {metric} | gain over no KD, paired | seeds |", "|---|---|---|---|"]
    for name, s in sorted(summary.items(), key=lambda item: -item[1]["mean"]):
        lines.append(
            f"| {name} | {_f(s['mean'])} ± {_f(s['std'])} | {_f(s['gain'])} ± {_f(s['gain_std'])} | {s['n']} |"
        )
    return "\n".join(lines)


def recommended_recipe(recipe: str, fields: dict[str, Any], budget_field: str, comment: str) -> str:
    """The recipe's YAML with the chosen fields set and ``output_dir`` suffixed ``_tuned``."""
    content = load_recipe(recipe) | fields
    if budget_field == "num_train_epochs":
        content["max_steps"] = -1
    content["output_dir"] = str(content.get("output_dir", "outputs/student")).rstrip("/") + "_tuned"
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(content, sort_keys=False, allow_unicode=True)


def _plot(summary: dict[str, dict[str, Any]], best: str, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = sorted(summary, key=lambda n: -summary[n]["mean"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 4))
    errors = [0.0 if math.isnan(summary[n]["std"]) else summary[n]["std"] for n in names]
    colours = [
        "tab:green" if n == best else "tab:grey" if n.startswith("none_") else "tab:blue" for n in names
    ]
    ax.bar(range(len(names)), [summary[n]["mean"] for n in names], yerr=errors, capsize=3, color=colours)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("sweep (green: chosen, grey: no KD)", fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)


def tune(
    recipe: str,
    output_dir: str | Path,
    *,
    alphas: Sequence[float],
    taus: Sequence[float],
    budgets: Sequence[float],
    budget_field: str,
    teachers: Sequence[str] = ("",),
    seeds: Sequence[int] = (0, 1, 2),
    validation_fraction: float = 0.2,
    metric: str = "eval_accuracy",
    overrides: Sequence[str] = (),
    train: Callable[[list[str]], dict[str, float]] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the sweep and write its files; return ``tune.json``'s content (``best``: the chosen setting)."""
    if budget_field not in ("max_steps", "num_train_epochs"):
        raise ValueError(f"budget_field={budget_field!r} must be max_steps or num_train_epochs")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
    data_args, _, config = parse_args(["--config", recipe, *overrides])
    if config.teacher_source == "cached":
        raise ValueError(
            "teacher_source=cached: a cache holds the uncarved training rows; tune with the online teacher"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    grid = candidates(alphas, taus, budgets, budget_field, teachers)
    data = output_dir / "data"
    plan = [
        (
            name,
            seed,
            [
                "--config",
                recipe,
                *overrides,
                *_argv(fields, budget_field),
                "--seed",
                str(seed),
                "--dataset_name",
                str(data),
                "--eval_split",
                VALIDATION_SPLIT,
                "--output_dir",
                str(output_dir / name / f"seed{seed}"),
                "--disable_tqdm",
                "true",
                "--report_to",
                "none",
            ],
        )
        for name, fields in grid.items()
        for seed in seeds
    ]
    for _, _, argv in plan:  # every run's arguments are checked before the data is carved
        parse_args([a if a != str(data) else str(data_args.dataset_name) for a in argv])
    carve_validation(data_args, validation_fraction, config.seed, data)
    results = run_grid(plan, output_dir, train=train, progress=progress)
    summary = summarize_grid(results, grid, budget_field, metric)
    best = max(summary, key=lambda n: summary[n]["mean"])
    s = summary[best]
    verdict = (
        "no KD setting beat no KD on validation: KD does not pay here at these settings"
        if best.startswith("none_")
        else f"gain over no KD at the same budget {_f(s['gain'])} ± {_f(s['gain_std'])}"
    )
    comment = (
        f"Chosen by scripts/tune.py: {best}, validation {metric} {_f(s['mean'])} ± {_f(s['std'])} over {s['n']} seeds;\n"
        f"{verdict}. Validation: {validation_fraction:.0%} of {data_args.train_split!r}, carved with seed {config.seed}."
    )
    text = recommended_recipe(recipe, grid[best], budget_field, comment)
    write_atomic(output_dir / "recommended.yaml", lambda p: p.write_text(text))
    content = {
        "metric": metric,
        "best": best,
        "fields": grid[best],
        "verdict": verdict,
        "summary": summary,
        "results": results,
    }
    write_atomic(output_dir / "tune.json", lambda p: p.write_text(json.dumps(content, indent=2, default=str)))
    md = f"# Sweep of {recipe}\n\n{table(summary, metric.removeprefix('eval_'))}\n\nChosen: **{best}** ({verdict}). Recipe: recommended.yaml\n"
    write_atomic(output_dir / "tune.md", lambda p: p.write_text(md))
    _plot(summary, best, metric.removeprefix("eval_"), output_dir / "tune.png")
    return content
