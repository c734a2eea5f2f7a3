"""The sweep that finds a setting where distillation pays: the same student over a grid of α, τ, budget
(and optionally teacher checkpoints), each with its no-KD twin at the same number of optimizer steps,
over paired seeds, scored on a validation split carved from the training data — never the test split.

Every budget is a number of optimizer steps, the same for every arm: a budget in epochs is converted with
the rows a KD arm iterates (the twin drops the unlabelled rows it cannot learn from, so "the same epochs"
would give it fewer steps). Runs go through :func:`hf_kd.runs.ablation.run_grid`: each (candidate, seed)
keeps its result in ``<output_dir>/<candidate>/seed<k>/result.json``, so the same command again trains
only what is missing. Results are merged across calls in ``tune.json`` (keyed by setting and seed), and
``tune.md`` (table), ``tune.png`` and ``recommended.yaml`` (the recipe with the chosen setting, ready for
``scripts/distill.py``) cover every setting tried so far, each written aside then renamed.
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
from hf_kd.knowledge.outcome import gain_interval, mean_std
from hf_kd.runs.ablation import run_grid

VALIDATION_SPLIT = "tune_validation"
"""The name of the split carved from the training rows."""

DEFAULT_BUDGETS = (200, 600)
"""Optimizer steps tried when none are given: with the default 2 α × 2 τ and 3 seeds, 30 runs and
12,000 steps in all — about a quarter of an hour on one CPU core for the small students of the demos
(a 1-layer BERT of hidden 64 with a 4-layer teacher runs about 14 steps of batch 32 a second there)."""

CONFIDENCE = 0.9
"""The paired t interval of a setting's gain over its twin (as the outcome of ``scripts/analyze.py``)."""


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
    budgets: Sequence[int],
    teachers: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Every setting of the grid by name → its fields; per budget (optimizer steps) one no-KD twin (α = 0)
    named ``none_...``, at the same steps as the KD settings."""
    grid = {}
    for budget in budgets:
        b = f"max_steps={budget}"
        grid[f"none_{b}"] = {"alpha": 0.0, "max_steps": budget}
        for i, teacher in enumerate(teachers):
            for alpha in alphas:
                for tau in taus:
                    name = f"a{alpha:g}_t{tau:g}_{b}" + (f"_teacher{i}" if len(teachers) > 1 else "")
                    grid[name] = {"alpha": alpha, "temperature": tau, "max_steps": budget} | (
                        {"teacher_model_name_or_path": teacher} if teacher else {}
                    )
    return grid


def rows_per_epoch(data_args, train_rows: int) -> int:
    """The training rows a KD arm iterates per epoch: ``max_train_samples`` first, then — without
    ``use_unlabeled`` — only the ``num_labeled_examples`` labelled ones."""
    rows = min(train_rows, data_args.max_train_samples or train_rows)
    if data_args.num_labeled_examples is not None and not data_args.use_unlabeled:
        rows = min(rows, data_args.num_labeled_examples)
    return rows


def epochs_to_steps(epochs: Sequence[float], rows: int, batch: int) -> list[int]:
    """Each epoch budget as optimizer steps of ``batch`` rows over ``rows`` rows (at least 1)."""
    return [max(1, math.ceil(e * rows / batch)) for e in epochs]


def _argv(fields: dict[str, Any]) -> list[str]:
    return [
        arg
        for key, value in fields.items()
        for arg in (f"--{key}", f"{value:g}" if isinstance(value, float) else str(value))
    ]


def summarize_grid(
    results: list[dict[str, Any]], grid: dict[str, dict[str, Any]], metric: str
) -> dict[str, dict[str, Any]]:
    """Per candidate: optimizer steps, mean and std over seeds of ``metric``, the paired gain over the
    no-KD twin at the same steps (mean ± std over the seeds both ran) and its :data:`CONFIDENCE` t
    interval (NaN with one seed), and ``score`` = mean − std/√n, the mean less one standard error (the
    mean alone with one seed)."""
    values: dict[str, dict[int, float]] = {}
    for r in results:
        if r["arm"] in grid:
            values.setdefault(r["arm"], {})[r["seed"]] = float(r["metrics"][metric])
    summary = {}
    for name, by_seed in values.items():
        mean, std = mean_std(list(by_seed.values()))
        twin = values.get(f"none_max_steps={grid[name]['max_steps']}", {})
        gains = [v - twin[s] for s, v in by_seed.items() if s in twin]
        gain, gain_std = mean_std(gains) if gains else (math.nan, math.nan)
        low, high = gain_interval(gains, CONFIDENCE) if not name.startswith("none_") else (math.nan, math.nan)
        score = mean if math.isnan(std) else mean - std / math.sqrt(len(by_seed))
        summary[name] = {
            "steps": grid[name]["max_steps"],
            "mean": mean,
            "std": std,
            "n": len(by_seed),
            "gain": gain,
            "gain_std": gain_std,
            "gain_interval": [low, high],
            "score": score,
        }
    return summary


def _f(x: float, sign: bool = False) -> str:
    return "—" if math.isnan(x) else f"{x:+.4f}" if sign else f"{x:.4f}"


def _spread(mean: float, std: float, n: int, sign: bool = False) -> str:
    head = _f(mean, sign)
    return f"{head} (1 seed: no spread)" if n < 2 or math.isnan(std) else f"{head} ± {_f(std)}"


def table(summary: dict[str, dict[str, Any]], metric: str) -> str:
    """Markdown, best score first: setting | optimizer steps | metric mean ± std | paired gain over no KD at
    the same steps, with its interval | seeds."""
    lines = [
        f"| setting | optimizer steps | validation {metric} | gain over no KD, paired ({CONFIDENCE:.0%} interval) | seeds |",
        "|---|---|---|---|---|",
    ]
    for name, s in sorted(summary.items(), key=lambda item: -item[1]["score"]):
        low, high = s["gain_interval"]
        gain = "" if name.startswith("none_") else _spread(s["gain"], s["gain_std"], s["n"], sign=True)
        if not math.isnan(low):
            gain += f" ({low:+.4f} … {high:+.4f})"
        lines.append(
            f"| {name} | {s['steps']:,} | {_spread(s['mean'], s['std'], s['n'])} | {gain} | {s['n']} |"
        )
    return "\n".join(lines)


def choose(summary: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """The chosen setting — the highest ``score`` (mean less one standard error over seeds, so a lucky
    seed of a noisy setting does not win) — and the warnings that go with it: one seed, a gain whose
    interval holds 0, a winner at the largest budget tried."""
    best = max(summary, key=lambda n: summary[n]["score"])
    s, warnings = summary[best], []
    if min(x["n"] for x in summary.values()) < 2:
        warnings.append(
            "one seed for some settings: no spread, the choice may be one lucky run — run --seeds 3 (or more)"
        )
    low, _ = s["gain_interval"]
    if not best.startswith("none_") and not math.isnan(low) and low <= 0:
        warnings.append(
            f"the chosen setting's gain over no KD is inside the seed spread ({CONFIDENCE:.0%} interval "
            f"{s['gain_interval'][0]:+.4f} … {s['gain_interval'][1]:+.4f}): more seeds, or KD may not pay here"
        )
    largest = max(x["steps"] for x in summary.values())
    if s["steps"] == largest:
        warnings.append(
            f"the chosen setting is at the largest budget tried ({largest:,} optimizer steps): try longer "
            f"(e.g. --budget_field max_steps --budgets {2 * largest})"
        )
    return best, warnings


def recommended_recipe(recipe: str, fields: dict[str, Any], comment: str) -> str:
    """The recipe's YAML with the chosen fields set (the budget as ``max_steps`` alone: any
    ``num_train_epochs`` is removed) and ``output_dir`` suffixed ``_tuned``."""
    content = {k: v for k, v in load_recipe(recipe).items() if k != "num_train_epochs"} | fields
    content["output_dir"] = str(content.get("output_dir", "outputs/student")).rstrip("/") + "_tuned"
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(content, sort_keys=False, allow_unicode=True)


def _plot(summary: dict[str, dict[str, Any]], best: str, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = sorted(summary, key=lambda n: -summary[n]["score"])
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


def _earlier(path: Path, identity: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The grid and results of earlier calls in ``tune.json`` (none when absent); refused when they swept
    another recipe, overrides, metric or validation split."""
    if not path.is_file():
        return {}, []
    earlier = json.loads(path.read_text())
    if earlier.get("identity") != identity:
        raise ValueError(
            f"{path} holds a sweep of {earlier.get('identity')}, not {identity}: use another --output_dir"
        )
    return earlier["grid"], earlier["results"]


def tune(
    recipe: str,
    output_dir: str | Path,
    *,
    alphas: Sequence[float],
    taus: Sequence[float],
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    budget_field: str = "max_steps",
    teachers: Sequence[str] = ("",),
    seeds: Sequence[int] = (0, 1, 2),
    validation_fraction: float = 0.2,
    metric: str = "eval_accuracy",
    overrides: Sequence[str] = (),
    train: Callable[[list[str]], dict[str, float]] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the sweep, merge it with the earlier calls' results in ``output_dir`` and write its files;
    return ``tune.json``'s content (``best``: the chosen setting, ``warnings``)."""
    if budget_field not in ("max_steps", "num_train_epochs"):
        raise ValueError(f"budget_field={budget_field!r} must be max_steps or num_train_epochs")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
    if not budgets or any(b <= 0 for b in budgets):
        raise ValueError(f"budgets={list(budgets)} must be positive numbers of {budget_field}")
    data_args, _, config = parse_args(["--config", recipe, *overrides])
    if config.uses_teacher and not config.source.scores_samples:  # e.g. a cache: the uncarved rows only
        raise ValueError(
            f"teacher_source={config.teacher_source}: its outputs exist only for the uncarved training rows; "
            "tune with a teacher that scores any rows (online)"
        )
    output_dir = Path(output_dir)
    identity = {
        "recipe": str(recipe),
        "overrides": list(overrides),
        "metric": metric,
        "validation_fraction": validation_fraction,
    }
    earlier_grid, earlier_results = _earlier(output_dir / "tune.json", identity)
    data = output_dir / "data"

    def plan_of(grid: dict[str, dict[str, Any]]) -> list[tuple[str, int, list[str]]]:
        return [
            (
                name,
                seed,
                [
                    "--config",
                    recipe,
                    *overrides,
                    *_argv(fields),
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

    check = candidates(alphas, taus, [1], teachers)
    for _, _, argv in plan_of(check):  # every run's arguments are checked before the data is carved
        parse_args([a if a != str(data) else str(data_args.dataset_name) for a in argv])
    output_dir.mkdir(parents=True, exist_ok=True)
    carve_validation(data_args, validation_fraction, config.seed, data)
    if budget_field == "num_train_epochs":
        from datasets import load_from_disk

        rows = rows_per_epoch(data_args, len(load_from_disk(str(data))[data_args.train_split]))
        batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
        steps = epochs_to_steps(budgets, rows, batch)
        progress(
            f"budgets in epochs of the KD arms' {rows:,} training rows, as optimizer steps of batch {batch} "
            "for every arm: " + ", ".join(f"{e:g} → {s:,}" for e, s in zip(budgets, steps, strict=True))
        )
    else:
        steps = [int(b) for b in budgets]
    grid = candidates(alphas, taus, steps, teachers)
    plan = plan_of(grid)
    progress(f"{len(plan)} runs, {sum(grid[n]['max_steps'] for n, _, _ in plan):,} optimizer steps in all")
    results = run_grid(plan, output_dir, train=train, progress=progress)
    done = {(r["arm"], r["seed"]) for r in results}
    results = [r for r in earlier_results if (r["arm"], r["seed"]) not in done] + results
    grid = earlier_grid | grid
    summary = summarize_grid(results, grid, metric)
    best, warnings = choose(summary)
    for warning in warnings:
        progress(f"warning: {warning}")
    s = summary[best]
    verdict = (
        "no KD setting beat no KD on validation: KD does not pay here at these settings"
        if best.startswith("none_")
        else f"gain over no KD at the same {s['steps']:,} optimizer steps {_spread(s['gain'], s['gain_std'], s['n'], sign=True)}"
    )
    comment = (
        f"Chosen by scripts/tune.py: {best}, validation {metric} {_spread(s['mean'], s['std'], s['n'])} over "
        f"{s['n']} seed{'s' if s['n'] > 1 else ''};\n{verdict}. Validation: {validation_fraction:.0%} of "
        f"{data_args.train_split!r}, carved with seed {config.seed}."
        + "".join(f"\nWarning: {w}." for w in warnings)
    )
    text = recommended_recipe(recipe, grid[best], comment)
    write_atomic(output_dir / "recommended.yaml", lambda p: p.write_text(text))
    content = {
        "identity": identity,
        "metric": metric,
        "best": best,
        "fields": grid[best],
        "verdict": verdict,
        "warnings": warnings,
        "summary": summary,
        "grid": grid,
        "results": results,
    }
    write_atomic(output_dir / "tune.json", lambda p: p.write_text(json.dumps(content, indent=2, default=str)))
    md = (
        f"# Sweep of {recipe}\n\n{table(summary, metric.removeprefix('eval_'))}\n\n"
        f"Chosen: **{best}** ({verdict}). Recipe: recommended.yaml\n"
        + "".join(f"\n**Warning:** {w}.\n" for w in warnings)
    )
    write_atomic(output_dir / "tune.md", lambda p: p.write_text(md))
    _plot(summary, best, metric.removeprefix("eval_"), output_dir / "tune.png")
    return content
