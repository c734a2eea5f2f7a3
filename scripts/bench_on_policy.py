"""On-policy vs off-policy distillation on a task where a student's own early mistakes compound.

    OMP_NUM_THREADS=1 python scripts/bench_on_policy.py --seeds 0 1 2 --out outputs/bench_on_policy.json
    OMP_NUM_THREADS=1 python scripts/bench_on_policy.py --warm_steps 600 --steps 900  # warm-started
    OMP_NUM_THREADS=1 python scripts/bench_on_policy.py --task permute --seeds 0 1 2  # several right answers
    PYTHONPATH=.:/path/to/trl OMP_NUM_THREADS=1 python scripts/bench_on_policy.py --compare_trl --steps 100

The tasks, built here (nothing downloaded; ``--task``), on a list of 6–10 digits as a chat turn:

- ``reverse`` (default): "reverse 3 1 4 1 5 9" → "9 5 1 4 1 3"; one right answer, each token depends on
  the ones before it being right;
- ``permute``: "shuffle 3 1 4 1 5 9" → the same digits in any order (the data's order is random, so the
  teacher is multi-modal at every step: it spreads over the digits not written yet); right = each digit
  used exactly as often as in the request.

``--compare_trl``: the same teacher, initial students, prompts, GKD settings (λ 1, JSD β 0.5, sampling
temperature 1, 12 new tokens), batch, schedule and seeds through TRL's ``GKDTrainer`` and through hf_kd:
time per step split into generation / teacher / student (one instrument for both), and the final metric.

A 2-layer Llama teacher (width 64) is trained on the data (SFT); a 2-layer student of width 32 is then trained by each regime
with the same data order, optimizer steps and batch size:

- ``sft``:     labels only (alpha 0);
- ``kd``:      off-policy token-level KD on the data's replies (forward KL, lmbda 0);
- ``on_rkl``:  fully on-policy, reverse KL (lmbda 1);
- ``on_jsd``:  fully on-policy, generalised JSD β = 0.5 (lmbda 1, GKD);
- ``mixed``:   lmbda 0.5, JSD β = 0.5;
- ``seq_kd``:  sequence-level KD: SFT on the teacher's sampled replies (seq_kd, alpha 0).

Measures on held-out prompts: the student's greedy exact match (with any right answer), and the
teacher's mean per-token NLL of the student's greedy replies (how plausible the teacher finds what the
student writes). Paired differences are against ``kd`` with the same seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.data.toy_chat import toy_tokenizer
from hf_kd.on_policy import left_padded_prompts, prompt_lengths
from hf_kd.tasks import CausalLMTask

REGIMES = {
    "sft": dict(alpha=0.0),
    "kd": dict(alpha=1.0, divergence="forward_kl"),
    "on_rkl": dict(alpha=1.0, divergence="reverse_kl", lmbda=1.0),
    "on_jsd": dict(alpha=1.0, divergence="jsd", beta=0.5, lmbda=1.0),
    "mixed": dict(alpha=1.0, divergence="jsd", beta=0.5, lmbda=0.5),
    "seq_kd": dict(alpha=0.0, seq_kd=True),
}
WARM_REGIMES = {
    "kd": dict(alpha=1.0, divergence="forward_kl"),
    "mixed_rkl": dict(alpha=1.0, divergence="reverse_kl", lmbda=0.5),
    "on_rkl": dict(alpha=1.0, divergence="reverse_kl", lmbda=1.0),
    "on_jsd": dict(alpha=1.0, divergence="jsd", beta=0.5, lmbda=1.0),
}
"""With ``--warm_steps N``: every student is first trained by off-policy KD (forward KL) for N steps,
then continued by each of these for the rest of the budget (``kd`` = lmbda 0 continued)."""
ALL_REGIMES = {**REGIMES, **WARM_REGIMES}
"""``--regimes`` may name any of these in either setup."""
DIGITS = [str(d) for d in range(10)]
EOS = 5  # the toy tokenizer's <|end|>
MAX_NEW_TOKENS = 12  # 10 digits, <|end|>, one spare


@dataclass(frozen=True)
class DigitTask:
    """A chat task on a list of digits: ``verb`` then the digits as the request; ``reply`` samples one
    right answer (the data's), ``is_right(request, reply)`` says whether a reply is one (both lists of
    digits, as strings or as token ids)."""

    verb: str
    reply: Callable[[list[str], random.Random], list[str]]
    is_right: Callable[[list, list], bool]
    lengths: tuple[int, int] = (6, 10)


TASKS = {
    "reverse": DigitTask(
        "reverse", lambda items, rng: items[::-1], lambda items, reply: reply == items[::-1]
    ),
    "permute": DigitTask(
        "shuffle",
        lambda items, rng: rng.sample(items, len(items)),
        lambda items, reply: sorted(reply) == sorted(items),
    ),
}
"""``reverse``: one right answer; each token depends on the ones before it being right. ``permute``: any
order of the digits is right and the data's is random, so the teacher spreads its mass over the digits
not written yet (multi-modal at every step); a reply is right when it uses each digit exactly as often
as the request does."""


def conversations(
    task: DigitTask, n: int, rng: random.Random, exclude: set[str] = frozenset()
) -> list[list[dict]]:
    """``n`` distinct requests of ``task`` (none of ``exclude``), each with one right answer."""
    seen, rows = set(exclude), []
    while len(rows) < n:
        items = [rng.choice(DIGITS) for _ in range(rng.randint(*task.lengths))]
        question = f"{task.verb} " + " ".join(items)
        if question in seen:
            continue
        seen.add(question)
        rows.append(
            [
                {"role": "user", "content": question},
                {"role": "assistant", "content": " ".join(task.reply(items, rng))},
            ]
        )
    return rows


def llama(vocab: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config)


SCHEDULE = dict(
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    per_device_train_batch_size=32,
    learning_rate=3e-3,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
)
"""The training arguments every student (and the teacher) shares, whichever trainer runs it."""
MAX_NEW_TOKENS = 12


def train(
    model, teacher, train_set, task, tokenizer, out: Path, steps: int, seed: int, callbacks=(), **fields
):
    args = DistillationConfig(
        output_dir=str(out),
        seed=seed,
        max_steps=steps,
        temperature=1.0,
        max_new_tokens=MAX_NEW_TOKENS,
        logging_steps=steps,
        **SCHEDULE,
        **fields,
    )
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=args,
        task=task,
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started, trainer.state.log_history


@torch.no_grad()
def evaluate(student, teacher, test_set, task, digit_task, requests) -> dict[str, float]:
    """The share of the student's greedy replies that are right answers to ``requests`` (the token ids
    of the digits of ``test_set``'s rows; a reply is right when it ends with EOS and
    ``digit_task.is_right``), and the teacher's per-token NLL of those replies."""
    student.eval()
    batch = task.collate([test_set[i] for i in range(len(test_set))])
    lengths = prompt_lengths(batch["labels"])
    prompt_ids, prompt_mask = left_padded_prompts(batch["input_ids"], lengths, task.pad_token_id)
    replies = student.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=EOS,
        pad_token_id=0,
    )[:, prompt_ids.shape[1] :]
    correct, nll, tokens = 0, 0.0, 0
    for row, reply in enumerate(replies.tolist()):
        reply = reply[: reply.index(EOS) + 1] if EOS in reply else reply
        prompt = batch["input_ids"][row, : lengths[row]].tolist()
        correct += reply[-1:] == [EOS] and digit_task.is_right(requests[row], reply[:-1])
        ids = torch.tensor([prompt + reply])
        log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        nll -= log_p.gather(-1, torch.tensor(reply)[:, None]).sum().item()
        tokens += len(reply)
    return {"exact_match": correct / len(replies), "teacher_nll": nll / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="reverse")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per student")
    parser.add_argument("--teacher_steps", type=int, default=600)
    parser.add_argument(
        "--regimes",
        nargs="+",
        choices=list(ALL_REGIMES),
        default=None,
        help="default: every regime of the setup",
    )
    parser.add_argument(
        "--warm_steps", type=int, default=0, help="off-policy KD steps before each regime (of --steps)"
    )
    parser.add_argument(
        "--compare_trl", action="store_true", help="hf_kd beside TRL's GKDTrainer (GKD settings), per seed"
    )
    parser.add_argument("--out", default="outputs/bench_on_policy.json")
    parser.add_argument("--work", default="outputs/bench_on_policy")
    options = parser.parse_args()
    rng = random.Random(1234)
    digit_task = TASKS[options.task]
    train_rows = conversations(digit_task, 4000, rng)
    test_rows = conversations(digit_task, 300, rng, exclude={c[0]["content"] for c in train_rows})
    tokenizer = toy_tokenizer([c[0]["content"] + " " + c[1]["content"] for c in train_rows[:200]])
    task = CausalLMTask(max_length=64)
    train_set = task.prepare(Dataset.from_dict({"messages": train_rows}), student_processor=tokenizer)
    test_set = task.prepare(Dataset.from_dict({"messages": test_rows}), student_processor=tokenizer)
    vocab = len(tokenizer)
    requests = [tokenizer.convert_tokens_to_ids(c[0]["content"].split()[1:]) for c in test_rows]
    work = Path(options.work)
    teacher = llama(vocab, 64, 2, seed=100)
    teacher_time, _ = train(
        teacher, None, train_set, task, tokenizer, work / "teacher", options.teacher_steps, 100, alpha=0.0
    )
    teacher.eval()
    results = {
        "teacher": {
            **evaluate(teacher, teacher, test_set, task, digit_task, requests),
            "seconds": teacher_time,
        },
        "runs": [],
    }
    print(json.dumps(results["teacher"]), flush=True)
    if options.compare_trl:
        results["compare_trl"] = compare_trl(
            options, teacher, train_rows, train_set, test_set, task, tokenizer, work, (digit_task, requests)
        )
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(results, indent=1))
        print(trl_table(results["compare_trl"]["summary"]))
        return
    regimes = WARM_REGIMES if options.warm_steps else REGIMES
    for seed in options.seeds:
        warm, warm_seconds = llama(vocab, 32, 2, seed=seed), 0.0
        if options.warm_steps:
            warm_seconds, _ = train(
                warm, teacher, train_set, task, tokenizer, work / f"warm-{seed}", options.warm_steps, seed,
                **WARM_REGIMES["kd"],
            )  # fmt: skip
            results.setdefault("warm", []).append(
                {"seed": seed, **evaluate(warm, teacher, test_set, task, digit_task, requests)}
            )
            print(json.dumps(results["warm"][-1]), flush=True)
        for regime in options.regimes or list(regimes):
            student = llama(vocab, 32, 2, seed=seed)
            student.load_state_dict(warm.state_dict())
            seconds, logs = train(
                student,
                teacher,
                train_set,
                task,
                tokenizer,
                work / f"{regime}-{seed}",
                options.steps - options.warm_steps,
                seed,
                **ALL_REGIMES[regime],
            )
            seconds += warm_seconds
            row = {
                "regime": regime,
                "seed": seed,
                "seconds": seconds,
                **evaluate(student, teacher, test_set, task, digit_task, requests),
            }
            for key in ("generation_time_share", "completion_length"):  # the run's means (one log window)
                values = [entry[key] for entry in logs if key in entry]
                row[key] = values[-1] if values else 0.0
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    results["summary"] = summarise(results["runs"])
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(results, indent=1))
    print(table(results))


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per regime: mean and spread (population std) over seeds, and the mean paired difference vs kd."""
    by = {}
    for row in runs:
        by.setdefault(row["regime"], {})[row["seed"]] = row
    summary = {}
    for regime, seeds in by.items():
        entry = {}
        for key in ("exact_match", "teacher_nll", "seconds"):
            values = [seeds[s][key] for s in sorted(seeds)]
            entry[key] = statistics.mean(values)
            entry[key + "_std"] = statistics.pstdev(values)
            if "kd" in by and key != "seconds":
                diffs = [seeds[s][key] - by["kd"][s][key] for s in sorted(seeds) if s in by["kd"]]
                entry[key + "_vs_kd"] = statistics.mean(diffs)
                entry[key + "_vs_kd_std"] = statistics.pstdev(diffs)
        summary[regime] = entry
    return summary


def table(results: dict) -> str:
    lines = [
        "| regime | exact match | Δ vs kd (paired) | teacher NLL of student replies | Δ vs kd | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for regime, s in results["summary"].items():
        lines.append(
            f"| {regime} | {s['exact_match']:.3f} ± {s['exact_match_std']:.3f} "
            f"| {s.get('exact_match_vs_kd', 0):+.3f} ± {s.get('exact_match_vs_kd_std', 0):.3f} "
            f"| {s['teacher_nll']:.3f} ± {s['teacher_nll_std']:.3f} "
            f"| {s.get('teacher_nll_vs_kd', 0):+.3f} ± {s.get('teacher_nll_vs_kd_std', 0):.3f} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines)


# ---- beside TRL's GKD ---------------------------------------------------------------------------

GKD = dict(lmbda=1.0, beta=0.5, generation_temperature=1.0)
"""The GKD run both trainers make with ``--compare_trl``: fully on-policy, generalised JSD β = 0.5 at loss
temperature 1 (TRL's GKD divides by no temperature), sampling at temperature 1 over the whole vocabulary."""
TIMES = ("step", "generation", "teacher", "student", "generation_per_decode_step")
QUALITY = ("exact_match", "teacher_nll")
TRL_MISSING = (
    "--compare_trl runs TRL's GKDTrainer, which hf_kd does not depend on: pip install 'trl>=1.16' "
    "(or put an installed copy on PYTHONPATH)"
)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (from one step's end to the next), and how much of it was spent in
    the student's ``generate`` and in the teacher's forward passes; the rest (the student's forward and
    backward, the loss, the optimizer, batching) is the student's. Both trainers are measured by this same
    instrument: ``generate`` is wrapped on the student object and the teacher is timed by forward hooks."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module):
        self.steps: list[dict[str, float]] = []
        self._generation = self._teacher = 0.0
        self._last = self._started = 0.0
        self._decode_steps = 0
        generate = student.generate

        def timed_generate(*args, **kwargs):
            started = self._now()
            output = generate(*args, **kwargs)
            self._generation += self._now() - started
            sequences = getattr(output, "sequences", output)
            self._decode_steps += sequences.shape[1] - kwargs["input_ids"].shape[1]
            return output

        student.generate = timed_generate
        self._hooks = [
            teacher.register_forward_pre_hook(lambda *_: setattr(self, "_started", self._now())),
            teacher.register_forward_hook(
                lambda *_: setattr(self, "_teacher", self._teacher + self._now() - self._started)
            ),
        ]

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last, self._generation, self._teacher, self._decode_steps = self._now(), 0.0, 0.0, 0

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        total = now - self._last
        self.steps.append(
            {
                "step": total,
                "generation": self._generation,
                "teacher": self._teacher,
                "student": total - self._generation - self._teacher,
                "decode_steps": self._decode_steps,
                "generation_per_decode_step": self._generation / max(self._decode_steps, 1),
            }
        )
        self._last, self._generation, self._teacher, self._decode_steps = now, 0.0, 0.0, 0

    def summary(self) -> dict[str, float]:
        """Per step, the median seconds of each part and of generation per decoding step (a batch's
        generation runs until its longest completion ends: its time follows what the student writes), and
        the median decoding steps; the first step (warm-up) left out."""
        steps = self.steps[1:] or self.steps
        return {key: statistics.median(step[key] for step in steps) for key in steps[0]}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def train_trl(
    model, teacher, rows: list[list[dict]], tokenizer, out: Path, steps: int, seed: int, callbacks=()
):
    """TRL's GKDTrainer on the raw conversations (its ChatML collator builds prompts and labels), with the
    schedule of :func:`train` and the settings of :data:`GKD`; gradient checkpointing and bf16 off (TRL's
    SFT defaults turn them on; hf_kd uses neither here)."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as error:
        raise SystemExit(TRL_MISSING) from error
    args = GKDConfig(
        output_dir=str(out),
        seed=seed,
        max_steps=steps,
        logging_steps=steps,
        lmbda=GKD["lmbda"],
        beta=GKD["beta"],
        temperature=GKD["generation_temperature"],
        max_new_tokens=MAX_NEW_TOKENS,
        max_length=64,
        gradient_checkpointing=False,
        bf16=False,
        **SCHEDULE,
    )
    trainer = GKDTrainer(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"messages": rows}),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.train()


def compare_trl(options, teacher, rows, train_set, test_set, task, tokenizer, work: Path, scoring) -> dict:
    """Per seed, the same initial student (with ``--warm_steps``: first trained by off-policy KD) trained on
    by TRL's GKD and by hf_kd (GKD settings, same schedule, steps, batch and seed; which runs first
    alternates with the seed); per run the median time per step split into generation / teacher / student,
    and the greedy exact match and teacher NLL on held-out prompts (``scoring``: the digit task and the
    held-out requests, as :func:`evaluate` takes them)."""
    fields = dict(alpha=1.0, divergence="jsd", beta=GKD["beta"], lmbda=GKD["lmbda"])
    fields["generation_temperature"] = GKD["generation_temperature"]
    steps, runs = options.steps - options.warm_steps, []
    for seed in options.seeds:
        warm = llama(len(tokenizer), 32, 2, seed=seed)
        if options.warm_steps:  # off-policy KD first (by hf_kd), then both trainers continue from it
            warm_out = work / f"compare-warm-{seed}"
            kd = WARM_REGIMES["kd"]
            train(warm, teacher, train_set, task, tokenizer, warm_out, options.warm_steps, seed, **kd)
        order = ("trl", "hf_kd") if seed % 2 == 0 else ("hf_kd", "trl")
        for trainer in order:
            student = copy.deepcopy(warm)
            timer = StepTimer(student, teacher)
            out = work / f"compare-{trainer}-{seed}"
            if trainer == "trl":
                train_trl(student, teacher, rows, tokenizer, out, steps, seed, callbacks=[timer])
            else:
                train(student, teacher, train_set, task, tokenizer, out, steps, seed, [timer], **fields)
            timer.remove()
            del student.generate  # the class's own again
            row = {
                "trainer": trainer,
                "seed": seed,
                **timer.summary(),
                **evaluate(student, teacher, test_set, task, *scoring),
            }
            runs.append(row)
            print(json.dumps(row), flush=True)
    settings = {**GKD, "steps": steps, "warm_steps": options.warm_steps, **SCHEDULE}
    return {"settings": settings, "runs": runs, "summary": summarise_trl(runs)}


def summarise_trl(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per measure, the mean over seeds of each trainer and of the paired per-seed comparison (times and
    decoding steps: the hf_kd / TRL ratio; quality: the hf_kd − TRL difference), with its population std."""
    by = {(row["trainer"], row["seed"]): row for row in runs}
    seeds = sorted({row["seed"] for row in runs})
    summary = {}
    for key in (*TIMES, "decode_steps", *QUALITY):
        ours, theirs = [by["hf_kd", s][key] for s in seeds], [by["trl", s][key] for s in seeds]
        pairs = zip(ours, theirs, strict=True)
        paired = [a - b for a, b in pairs] if key in QUALITY else [a / b for a, b in pairs]
        summary[key] = {
            "hf_kd": statistics.mean(ours),
            "trl": statistics.mean(theirs),
            "paired": statistics.mean(paired),
            "paired_std": statistics.pstdev(paired),
        }
    return summary


def trl_table(summary: dict) -> str:
    lines = ["| per step | hf_kd | TRL GKD | hf_kd vs TRL (paired, per seed) |", "|---|---|---|---|"]
    for key, s in summary.items():
        if key in QUALITY:
            paired = f"{s['paired']:+.3f} ± {s['paired_std']:.3f} (difference)"
            lines.append(f"| {key} | {s['hf_kd']:.3f} | {s['trl']:.3f} | {paired} |")
            continue
        paired = f"{s['paired']:.2f}× ± {s['paired_std']:.2f} (ratio)"
        unit, scale = ("", 1) if key == "decode_steps" else (" ms", 1e3)
        ours, theirs = s["hf_kd"] * scale, s["trl"] * scale
        lines.append(f"| {key} | {ours:.2f}{unit} | {theirs:.2f}{unit} | {paired} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
