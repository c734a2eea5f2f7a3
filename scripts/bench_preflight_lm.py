"""The pre-flight on a held-out real-text LM: its recommendation vs the default recipe vs a small fixed sweep
vs ``temperature: auto``, each against the equal-step no-KD twin, held-out perplexity, paired over seeds.

The teacher, data, student (Llama 64 × 2, ~0.6M parameters, from scratch) and training path are
``bench_cache_students.py``'s: a small Llama trained here on Python's standard library, every student a
``run_distillation`` run with online KD, perplexity on held-out files. Before any student trains,
``run_preflight`` (as ``scripts/preflight.py``) reads the teacher and the untrained student twice: as
planned off-policy (the recipe's defaults: α 0.5, τ 2, lmbda 0), whose recommended α and τ become the
``preflight`` arm, and as fully on-policy (``lmbda: 1``, α 1, JSD), whose warnings show whether it warns
before a from-scratch on-policy run. The arms (``bench_cache_students`` names; every KD arm online):

    none                     α 0: the no-KD twin
    online                   the default recipe: α 0.5, τ 2
    online:a<α>:t<τ>         the sweep (``--sweep_alphas`` × ``--sweep_temperatures``)
    online:a<α>:tauto        ``temperature: auto`` at each sweep α
    preflight                the pre-flight's α and τ (at ``--steps``: the twin's budget)

``--arms`` runs a subset (say, the recommendation and the twin at the recommended budget).

    OMP_NUM_THREADS=1 python scripts/bench_preflight_lm.py [--seeds 0 1 2] [--steps 200] [--out runs.json]
    python scripts/bench_preflight_lm.py --report runs-a.json runs-b.json   # the table of saved runs

``--out`` keeps every finished run (perplexity and seconds) and skips the runs it already holds, so
seeds can run in separate processes and a stopped run resumes; ``--report`` prints the table of one or
more such files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_cache_students import setup_real_lm, train_student
from datasets import Dataset, DatasetDict

from hf_kd.config import DataArguments, DistillationConfig, ModelArguments
from hf_kd.runs.preflight import run_preflight


def preflight(root: Path, data_args: DataArguments, args, **fields) -> tuple[dict, float]:
    """``run_preflight`` of the saved teacher and the untrained student with the recipe ``fields``:
    (its report content, wall seconds)."""
    config = DistillationConfig(
        output_dir=str(root / "planned"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, teacher_model_name_or_path=str(root / "teacher"), use_cpu=True,
        report_to="none", **fields,
    )  # fmt: skip
    model_args = ModelArguments(student_config=args.student, student_processor=str(root / "teacher"))
    start = time.perf_counter()
    name = "on-policy" if fields.get("lmbda") else "off-policy"
    content = run_preflight(data_args, model_args, config, report_dir=root / f"preflight-{name}")
    seconds = time.perf_counter() - start
    recommendation = content["recommendation"]
    print(f"[preflight] planned {name} {fields or '(defaults)'}: {seconds:.1f} s")
    for field_name, choice in recommendation["fields"].items():
        print(f"  {field_name}: {choice['value']}  ({choice['because']})")
    for warning in recommendation["warnings"]:
        print(f"  WARNING: {warning}")
    if not recommendation["warnings"]:
        print("  (no warning)")
    return content, seconds


def load_runs(paths: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    """arm → seed (str) → {"perplexity", "seconds"}, merged over the files that exist."""
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for path in paths:
        if path.exists():
            for arm, by_seed in json.loads(path.read_text())["runs"].items():
                runs.setdefault(arm, {}).update(by_seed)
    return runs


def report(runs: dict[str, dict[str, dict[str, float]]], labels: dict[str, str]) -> None:
    """Per-seed held-out perplexity, mean ± std, paired Δ log-perplexity against no KD (nats, negative:
    better) and the seconds each arm took, on the no-KD twin's seeds (an arm without all of them yet is
    named and left out)."""
    seeds = sorted(runs.get("none", {}), key=int)
    if not seeds:
        print("[report] no no-KD run yet")
        return
    partial = [arm for arm, by_seed in runs.items() if not set(seeds) <= set(by_seed)]
    if partial:
        print(f"[report] left out, not run on seeds {', '.join(seeds)} yet: {', '.join(partial)}")
    runs = {arm: by_seed for arm, by_seed in runs.items() if arm not in partial}
    print(f"[report] held-out perplexity, seeds {', '.join(seeds)}; Δ = log(ppl / no-KD ppl), paired")
    print("| arm | perplexity per seed | mean ± std | Δ nats vs no KD, paired (per seed) | seconds |")
    print("|---|---|---|---|---|")
    for arm, by_seed in runs.items():
        values = [by_seed[s]["perplexity"] for s in seeds]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        deltas = [math.log(by_seed[s]["perplexity"] / runs["none"][s]["perplexity"]) for s in seeds]
        delta = "—"
        if arm != "none":
            d_spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            per_seed = " ".join(f"{d:+.3f}" for d in deltas)
            delta = f"{statistics.fmean(deltas):+.3f} ± {d_spread:.3f} ({per_seed})"
        seconds = sum(by_seed[s]["seconds"] for s in seeds)
        print(
            f"| {labels.get(arm, arm)} | {' / '.join(f'{v:.1f}' for v in values)} | "
            f"{statistics.fmean(values):.1f} ± {spread:.1f} | {delta} | {seconds:.0f} |"
        )
    kd = [arm for arm in runs if arm != "none"]
    best = min(kd, key=lambda arm: statistics.fmean(runs[arm][s]["perplexity"] for s in seeds))
    print(f"[report] lowest mean perplexity: {labels.get(best, best)}")
    for arm in kd:
        if arm != best:
            deltas = [math.log(runs[arm][s]["perplexity"] / runs[best][s]["perplexity"]) for s in seeds]
            spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            print(f"  {labels.get(arm, arm)} − best: {statistics.fmean(deltas):+.3f} ± {spread:.3f} nats")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="student optimizer steps, every arm")
    parser.add_argument(
        "--arms", nargs="+", help="run only these arms (names as above; `preflight`: the recommendation's)"
    )
    parser.add_argument("--sweep_alphas", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--sweep_temperatures", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train_rows", type=int, default=960, help="training rows of the students")
    parser.add_argument("--held_out_rows", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--lm_bpe", type=int, default=4096)
    parser.add_argument("--lm_steps", type=int, default=300, help="teacher training steps")
    parser.add_argument("--lm_hidden", type=int, default=128, help="teacher hidden size")
    parser.add_argument("--out", type=Path, help="JSON of the finished runs (resumed from when it exists)")
    parser.add_argument("--report", type=Path, nargs="+", help="print the table of these run files and stop")
    args = parser.parse_args()
    if args.report:
        saved = [json.loads(p.read_text()) for p in args.report]
        report(load_runs(args.report), {k: v for s in saved for k, v in s["labels"].items()})
        return
    teacher, tokenizer, train, test = setup_real_lm(args, "preflight")
    runs = load_runs([args.out] if args.out else [])
    with tempfile.TemporaryDirectory() as out:
        root = Path(out)
        teacher.save_pretrained(root / "teacher")
        tokenizer.save_pretrained(root / "teacher")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.train_rows]
        texts = [tokenizer.decode(row) for row in train[order]]
        DatasetDict(train=Dataset.from_dict({"text": texts})).save_to_disk(str(root / "data"))
        data_args = DataArguments(
            task="causal-lm", dataset_name=str(root / "data"), eval_split=None, max_length=args.seq_len
        )
        planned, seconds = preflight(root, data_args, args)
        preflight(root, data_args, args, lmbda=1.0, alpha=1.0, divergence="jsd", max_new_tokens=96)
        chosen = {n: c["value"] for n, c in planned["recommendation"]["fields"].items()}
        recommended = f"online:a{chosen['alpha']:g}:t{chosen['temperature']:g}"
        labels = {
            "none": "no KD (α 0)",
            "online": "default: α 0.5, τ 2",
            recommended: f"pre-flight: α {chosen['alpha']:g}, τ {chosen['temperature']:g}",
        }
        arms = ["none", "online", recommended]
        for alpha in args.sweep_alphas:
            for tau in [*args.sweep_temperatures, "auto"]:
                arm = f"online:a{alpha:g}:t{tau if tau == 'auto' else format(tau, 'g')}"
                if (alpha, tau) == (0.5, 2.0):
                    arm = "online"
                labels.setdefault(
                    arm, f"α {alpha:g}, " + ("`temperature: auto`" if tau == "auto" else f"τ {tau:g}")
                )
                if arm not in arms:
                    arms.append(arm)
        if args.arms:
            wanted = [recommended if arm == "preflight" else arm for arm in args.arms]
            unknown = sorted(set(wanted) - set(arms))
            if unknown:
                raise SystemExit(
                    f"--arms {unknown}: not arms of this run; expected some of {arms} or preflight"
                )
            arms = [arm for arm in arms if arm in wanted]
        print(
            f"[preflight] recommended budget {chosen['max_steps']} steps; every arm here runs {args.steps} "
            f"(the twin's); the recommendation's arm is {recommended}; pre-flight {seconds:.1f} s"
        )
        for seed in args.seeds:
            for arm in arms:
                if str(seed) in runs.get(arm, {}):
                    continue
                start = time.perf_counter()
                ppl = train_student(root, data_args, arm, seed, {}, args)
                elapsed = time.perf_counter() - start
                runs.setdefault(arm, {})[str(seed)] = {"perplexity": ppl, "seconds": elapsed}
                print(f"[run] seed {seed} {arm}: perplexity {ppl:.1f} ({elapsed:.0f} s)", flush=True)
                if args.out:
                    args.out.write_text(json.dumps({"runs": runs, "labels": labels}, indent=1))
    report({arm: runs[arm] for arm in arms if arm in runs}, labels)


if __name__ == "__main__":
    main()
