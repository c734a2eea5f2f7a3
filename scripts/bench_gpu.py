"""GPU figures of the causal-LM distillation loss and step, measured side by side in one run.

    python scripts/bench_gpu.py                      # every section, one CUDA device, under 5 minutes
    python scripts/bench_gpu.py --only loss step     # some sections
    python scripts/bench_gpu.py --smoke              # tiny sizes, on the CPU too: checks that it runs

Needs torch (with CUDA for the real figures), transformers and accelerate, and this repository on the
path (run from its root); models are built from configs (nothing downloads) and the data is random token
ids. Optional: ``liger-kernel`` (the Liger column of the loss table) and ``trl`` (the TRL section); a
section whose library does not import prints why and is skipped. It imports nothing of hf_kd's Hub or
data-loading code, so it runs with older transformers / huggingface_hub releases too.

Sections (each figure is a median of ``--repeats`` timed repeats after warm-ups; peak memory is
``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it, in MiB):

1. ``loss``: forward + backward of the soft loss Σ D(p, q) / N (α = 1, τ = 1: Liger's loss, which has no
   hard-label term) from the student's last hidden states [N, 4096] and output layer [128,256, 4096] in
   bf16, at N = 8,192 (JSD β = 0.5, forward KL) and N = 4,096 (JSD): the dense code (full logits,
   autograd through ``hf_kd.losses.divergence``), hf_kd given the teacher's logits (its default chunk for the
   device), hf_kd given the teacher's hidden states and output layer too (``+ teacher head``: neither
   [N, V] logits ever exist), and Liger's ``LigerFusedLinearJSD`` (β = 0 is its forward KL). The loss
   values are printed beside each other: they must agree.
2. ``step``: ``DistillationTrainer.training_step`` with a Llama teacher 2,048 × 16 layers (bf16) and a
   student 1,024 × 8 (float32 weights, bf16 autocast), vocabulary 128,256, batch 8 × 1,024 tokens:
   (a) the plain student step (α = 0), (b) the teacher's forward alone, (c) the online KD step (α = 0.5,
   τ = 2, JSD) with the recommended settings for a large vocabulary (``student_logits_from_hidden_states``
   and ``teacher_logits_from_hidden_states``) and (c′) with the full logits; c / (a + b) and the peaks
   (targets: c / (a + b) ≤ 1.03, peak(c) ≤ 1.1 × (peak(a) + the teacher's weights)).
3. ``cached``: the KD step from a cached top-32 teacher (``CachedTeacher``, uniform tail) against the
   plain step of the same student on the same batches (target ≤ 1.03).
4. ``trl``: tokens per second and peak memory of hf_kd's online KD step against TRL's ``GKDTrainer``
   (off-policy, λ = 0, ``use_fused_linear_loss`` when its config has it) on the same models and batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository, run as a script

from hf_kd import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_kd.losses import HiddenStates, distillation_loss, divergence  # noqa: E402
from hf_kd.losses.output_layer import default_chunk_size  # noqa: E402
from hf_kd.tasks import CausalLMTask  # noqa: E402
from hf_kd.teachers.cached import CachedTeacher  # noqa: E402

FULL = {
    "vocab": 128_256,
    "hidden": 4096,
    "loss_rows": [(8192, "jsd"), (8192, "forward_kl"), (4096, "jsd")],
    "teacher": (2048, 16, 8192, 32, 8),  # hidden, layers, intermediate, heads, kv heads (Llama 3.2 1B)
    "student": (1024, 8, 4096, 16, 4),
    "batch": (8, 1024),
    "top_k": 32,
}
SMOKE = {
    "vocab": 512,
    "hidden": 32,
    "loss_rows": [(64, "jsd"), (64, "forward_kl")],
    "teacher": (64, 2, 128, 4, 2),
    "student": (32, 1, 64, 4, 2),
    "batch": (2, 16),
    "top_k": 8,
}


# ---- measuring ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2
) -> tuple[float, float]:
    """(median milliseconds of ``repeats`` calls after ``warmup`` ones, peak MiB above the memory
    allocated before the first call; NaN on the CPU)."""
    peak = float("nan")
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        fn()
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), peak


def cell(result: tuple[float, float] | None) -> str:
    if result is None:
        return "n/a"
    ms, mib = result
    return f"{ms:.1f} ms" if mib != mib else f"{mib:,.0f} MiB / {ms:.1f} ms"


# ---- 1. the loss ---------------------------------------------------------------------------------------


def loss_section(sizes: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as error:
        LigerFusedLinearJSD = None
        print(f"(Liger column skipped: {error})")
    vocab, hidden = sizes["vocab"], sizes["hidden"]
    chunk = default_chunk_size(vocab, device)
    print(
        f"\n## 1. LM loss: vocabulary {vocab:,}, hidden {hidden}, {dtype}, α = 1, τ = 1; hf_kd chunk {chunk}"
    )
    print("| N | divergence | dense | hf_kd (teacher logits) | hf_kd + teacher head | Liger | losses |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for rows, name in sizes["loss_rows"]:
        scale = hidden**-0.5 * 2
        tensors = [torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * scale]
        tensors += [torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * scale]
        labels = torch.randint(0, vocab, (rows,), generator=g)
        labels[torch.rand(rows, generator=g) < 0.1] = -100
        tensors = [t.to(device, dtype) for t in tensors]
        liger = None
        if LigerFusedLinearJSD is not None and device.type == "cuda":
            liger = LigerFusedLinearJSD(jsd_beta=0.5 if name == "jsd" else 0.0, temperature=1.0)
        loss_row(name, *tensors, labels.to(device), chunk, liger, device, repeats)
        del tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()


def loss_row(name, h, w, teacher_h, teacher_w, labels, chunk, liger, device, repeats) -> None:
    """One row of the loss table: the four implementations on the same tensors."""
    h.requires_grad_(True), w.requires_grad_(True)
    values = {}

    def step_of(student: Callable, teacher, chunk_size: int | None, key: str) -> Callable[[], None]:
        def step() -> None:
            h.grad = w.grad = None
            terms = distillation_loss(
                student(),
                teacher,
                labels,
                alpha=1.0,
                temperature=1.0,
                divergence_name=name,
                temperature_squared=False,
                chunk_size=chunk_size,
                beta=0.5,
            )
            terms.loss.backward()
            values[key] = terms.loss.item()

        return step

    with torch.no_grad():
        held = [teacher_h @ teacher_w.T]  # the teacher's full logits, freed before the fused runs
    kept = labels != -100

    def dense_step() -> None:  # the obvious code: autograd through the divergence on the full logits
        h.grad = w.grad = None
        loss = divergence(name, h @ w.T, held[0], beta=0.5)[kept].sum() / kept.sum()
        loss.backward()
        values["dense"] = loss.item()

    dense = measure(dense_step, device, repeats)
    chunked = measure(step_of(lambda: HiddenStates(h, w), held[0], chunk, "hf_kd"), device, repeats)
    held.clear()
    head = HiddenStates(teacher_h, teacher_w)
    fused = measure(step_of(lambda: HiddenStates(h, w), head, chunk, "head"), device, repeats)
    liger_result = None
    if liger is not None:

        def liger_step() -> None:
            h.grad = w.grad = None
            loss = liger(h, w, teacher_h, teacher_w, labels)
            loss.backward()
            values["liger"] = loss.item()

        try:
            liger_result = measure(liger_step, device, repeats)
        except (AssertionError, RuntimeError, ValueError) as error:  # e.g. an older Liger refusing β = 0
            print(f"(Liger failed on {name}: {type(error).__name__}: {error})")
    agreement = ", ".join(f"{k} {v:.6f}" for k, v in values.items())
    cells = " | ".join(cell(r) for r in (dense, chunked, fused, liger_result))
    print(f"| {len(labels):,} | {name} | {cells} | {agreement} |")


# ---- 2. and 3. the training step ----------------------------------------------------------------------


def llama(shape: tuple, vocab: int, seed: int, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    hidden, layers, intermediate, heads, kv_heads = shape
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return LlamaForCausalLM(config).to(device, dtype)


def kd_trainer(student, teacher, out: str, device: torch.device, **fields) -> DistillationTrainer:
    settings = {"alpha": 0.5, "temperature": 2.0, "divergence": "jsd", **fields}
    signal = settings.pop("teacher_signal", None)
    args = DistillationConfig(
        output_dir=out,
        report_to="none",
        learning_rate=1e-5,
        use_cpu=device.type != "cuda",
        bf16=device.type == "cuda",
        save_strategy="no",
        disable_tqdm=True,
        **settings,
    )
    task = CausalLMTask()
    if signal is not None:
        return DistillationTrainer(model=student, args=args, task=task, teacher_signal=signal)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, task=task)


def batches(sizes: dict, count: int = 3, cached: bool = False) -> list[dict]:
    (rows, length), vocab, k = sizes["batch"], sizes["vocab"], sizes["top_k"]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if cached:
            top = torch.log_softmax(
                torch.randn(rows, length, k, generator=g).sort(-1, descending=True)[0], -1
            )
            batch["kd_teacher_log_probs"] = top - 0.1  # 10 % of the mass (e^-0.1) left to the tail
            batch["kd_teacher_indices"] = torch.randint(0, vocab, (rows, length, k), generator=g)
            batch["kd_teacher_tail_log_mass"] = torch.full((rows, length), -2.3)
        out.append(batch)
    return out


def step_section(sizes: dict, device: torch.device, repeats: int, sections: list[str]) -> None:
    vocab = sizes["vocab"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = llama(sizes["teacher"], vocab, 0, dtype, device).eval()
    teacher_mib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
    chunk = default_chunk_size(vocab, device)
    rows, length = sizes["batch"]
    with tempfile.TemporaryDirectory() as out:

        def student():
            return llama(sizes["student"], vocab, 1, torch.float32, device)

        def run(trainer, data):
            def step():
                for p in trainer.model.parameters():
                    p.grad = None
                trainer.training_step(trainer.model, dict(data[step.i % len(data)]))
                step.i += 1

            step.i = 0
            return measure(step, device, repeats)

        data = batches(sizes)
        plain = run(kd_trainer(student(), None, out, device, alpha=0.0), data)
        if "step" in sections:
            inputs = [{k: v.to(device) for k, v in b.items() if k != "labels"} for b in data]

            def teacher_forward():
                with (
                    torch.no_grad(),
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
                ):
                    teacher(**inputs[0])

            forward = measure(teacher_forward, device, repeats)
            recommended = dict(
                student_logits_from_hidden_states=True,
                teacher_logits_from_hidden_states=True,
                loss_chunk_size=chunk,
            )
            kd = run(kd_trainer(student(), teacher, out, device, **recommended), data)
            kd_dense = run(kd_trainer(student(), teacher, out, device), data)
            print(
                f"\n## 2. online KD step: teacher Llama {sizes['teacher'][0]} × {sizes['teacher'][1]} ({teacher_mib:,.0f} "
                f"MiB of weights), student {sizes['student'][0]} × {sizes['student'][1]}, vocabulary {vocab:,}, "
                f"batch {rows} × {length}, chunk {chunk}"
            )
            print(f"(a) plain student step           {cell(plain)}")
            print(f"(b) teacher forward              {cell(forward)}")
            print(f"(c) KD step, recommended         {cell(kd)}")
            print(f"(c') KD step, full logits        {cell(kd_dense)}")
            for label, c in (("c", kd), ("c'", kd_dense)):
                line = f"{label} / (a + b) = {c[0] / (plain[0] + forward[0]):.3f} (target ≤ 1.03)"
                if device.type == "cuda":
                    line += f"; peak {label} / (peak a + teacher) = {c[1] / (plain[1] + teacher_mib):.3f} (target ≤ 1.1)"
                print(line)
        if "cached" in sections:
            signal = CachedTeacher(vocab)
            cached = run(
                kd_trainer(student(), None, out, device, teacher_signal=signal), batches(sizes, cached=True)
            )
            print(
                f"\n## 3. cached KD step (top-{sizes['top_k']}, uniform tail) vs plain step, batch {rows} × {length}"
            )
            print(
                f"plain {cell(plain)}; cached {cell(cached)}; cached / plain = {cached[0] / plain[0]:.3f} (target ≤ 1.03)"
            )
        if "trl" in sections:
            trl_section(sizes, device, teacher, student, data, out, run, chunk)


# ---- 4. TRL ---------------------------------------------------------------------------------------------


def trl_section(sizes, device, teacher, student, data, out, run, chunk) -> None:
    rows, length = sizes["batch"]
    print(f"\n## 4. against TRL: tokens / s and peak of one KD step, batch {rows} × {length}")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as error:
        print(f"(skipped: TRL's GKDTrainer does not import: {error})")
        return
    fields = {f.name for f in dataclasses.fields(GKDConfig)}
    extra = {"use_fused_linear_loss": True} if "use_fused_linear_loss" in fields else {}
    try:
        args = GKDConfig(
            output_dir=out,
            report_to="none",
            lmbda=0.0,
            beta=0.5,
            temperature=2.0,
            bf16=device.type == "cuda",
            use_cpu=device.type != "cuda",
            **extra,
        )
        from datasets import Dataset

        rows_data = Dataset.from_dict({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]})
        trl = GKDTrainer(model=student(), teacher_model=teacher, args=args, train_dataset=rows_data)
        trl_result = run(trl, data)
    except Exception as error:  # TRL's API moves between releases: report, do not fail the other sections
        print(f"(skipped: TRL's GKDTrainer could not run here: {type(error).__name__}: {error})")
        return
    recommended = dict(
        student_logits_from_hidden_states=True, teacher_logits_from_hidden_states=True, loss_chunk_size=chunk
    )
    ours = run(kd_trainer(student(), teacher, out, device, **recommended), data)
    tokens = rows * length
    print(
        f"TRL GKD {'(fused linear loss) ' if extra else ''}{cell(trl_result)}, {tokens / trl_result[0] * 1e3:,.0f} tokens/s"
    )
    print(f"hf_kd (recommended)  {cell(ours)}, {tokens / ours[0] * 1e3:,.0f} tokens/s")
    print(f"throughput hf_kd / TRL = {trl_result[0] / ours[0]:.3f} (target ≥ 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=["loss", "step", "cached", "trl"],
        choices=["loss", "step", "cached", "trl"],
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes (runs on the CPU): checks the script"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_gpu.py needs a CUDA device (use --smoke for a CPU check of the script)")
    sizes = SMOKE if args.smoke else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import accelerate
    import transformers

    print(
        f"# {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, {args.repeats} timed repeats (median){', smoke sizes' if args.smoke else ''}"
    )
    if "loss" in args.only:
        loss_section(sizes, device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.repeats)
    if any(s in args.only for s in ("step", "cached", "trl")):
        step_section(sizes, device, args.repeats, args.only)


if __name__ == "__main__":
    main()
