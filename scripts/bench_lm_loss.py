"""Peak memory and time of the causal-LM distillation loss step: hf_kd chunked vs the obvious dense code.

    OMP_NUM_THREADS=1 python scripts/bench_lm_loss.py                       # default grid
    python scripts/bench_lm_loss.py --vocab 128256 --seq 512 --repeats 3    # one configuration

The loss step is forward + backward of ``(1 − α)·CE + α·τ²·D(p^τ, q^τ)`` averaged over the unmasked
tokens, on given student logits [T, V] (float32, requires grad) and teacher logits [T, V] (float32).
With ``--hidden H`` the student is given instead as last hidden states [T, H] and an output layer [V, H]
(the step then includes z = h Wᵀ and the gradients for h and W). Implementations compared on the
same seeded tensors:

- ``dense``:  the obvious code (log_softmax of both, ``F.kl_div`` / TRL-style mixture, masked mean);
- ``hf_kd``:  ``hf_kd.losses.distillation_loss(..., chunk_size=C)``, on ``HiddenStates`` with ``--hidden``;
- ``trl``:    ``GKDTrainer.generalized_jsd_loss`` + CE, only for ``jsd`` and only when TRL imports.

Each (implementation, configuration) runs in a fresh subprocess. Peak memory is the process's RSS
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once the inputs are allocated)
during the first step minus the RSS before it: what the step adds on top of the logits, including
the gradient it returns. The allocator is glibc's default, so memory it keeps after a
free counts too (what a user pays). Linux only. Time is the median of ``--repeats`` later steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import psutil
import torch
import torch.nn.functional as F

from hf_kd.losses import HiddenStates, distillation_loss

try:  # TRL keeps GKD in trl.experimental; it is optional here
    from trl.experimental.gkd import GKDTrainer
except ImportError:
    GKDTrainer = None

ALPHA, TEMPERATURE, BETA = 0.5, 2.0, 0.5


def dense_loss(student_logits, teacher_logits, labels, divergence_name):
    """The obvious implementation: every full-vocabulary tensor for all positions at once."""
    mask = labels != -100
    log_q = F.log_softmax(student_logits.float() / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1)
    if divergence_name == "forward_kl":
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif divergence_name == "jsd":
        beta = torch.tensor(BETA)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-beta), log_p + torch.log(beta)]), dim=0)
        per_token = (
            BETA * F.kl_div(log_m, log_p, reduction="none", log_target=True)
            + (1 - BETA) * F.kl_div(log_m, log_q, reduction="none", log_target=True)
        ).sum(-1)
    else:
        raise ValueError(f"dense baseline has no {divergence_name!r}")
    soft = (per_token * mask).sum() / mask.sum()
    hard = F.cross_entropy(student_logits.float(), labels)
    return (1 - ALPHA) * hard + ALPHA * TEMPERATURE**2 * soft


def trl_loss(student_logits, teacher_logits, labels, divergence_name):
    """TRL's generalized JSD (GKDTrainer) plus the same hard-label CE."""
    if divergence_name != "jsd":
        raise ValueError("TRL's loss is the generalized JSD")
    soft = GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, labels, beta=BETA, temperature=TEMPERATURE
    )
    hard = F.cross_entropy(student_logits.float(), labels)
    return (1 - ALPHA) * hard + ALPHA * TEMPERATURE**2 * soft


def hf_kd_loss(student_logits, teacher_logits, labels, divergence_name, chunk_size):
    terms = distillation_loss(
        student_logits,
        teacher_logits,
        labels,
        alpha=ALPHA,
        temperature=TEMPERATURE,
        divergence_name=divergence_name,
        chunk_size=chunk_size,
        beta=BETA,
    )
    return terms.loss


def peak_rss() -> int:
    """This process's RSS high-water mark in bytes (VmHWM of /proc/self/status)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def worker(
    impl: str, vocab: int, seq: int, divergence_name: str, chunk_size: int, repeats: int, hidden: int
) -> dict:
    """One configuration in this (fresh) process: RSS added by the first step, median time of the rest.
    With ``hidden`` > 0 the student is given by hidden states [T, hidden] and an output layer [V, hidden]
    (the dense code makes the logits first; hf_kd passes ``HiddenStates``)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    if hidden:
        leaves = [
            torch.randn(seq, hidden, generator=g),
            torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 2,
        ]
        leaves = [t.requires_grad_(True) for t in leaves]
        student = lambda: HiddenStates(*leaves) if impl == "hf_kd" else leaves[0] @ leaves[1].T  # noqa: E731
    else:
        leaves = [(torch.randn(seq, vocab, generator=g) * 2).requires_grad_(True)]
        student = lambda: leaves[0]  # noqa: E731
    teacher = torch.randn(seq, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (seq,), generator=g)
    labels[torch.rand(seq, generator=g) < 0.1] = -100  # prompt / padding tokens
    if impl == "trl" and GKDTrainer is None:
        raise RuntimeError("TRL is not importable")
    if impl == "hf_kd":
        step = lambda: hf_kd_loss(student(), teacher, labels, divergence_name, chunk_size)  # noqa: E731
    elif impl == "trl":
        step = lambda: trl_loss(student(), teacher, labels, divergence_name)  # noqa: E731
    else:
        step = lambda: dense_loss(student(), teacher, labels, divergence_name)  # noqa: E731
    reset_peak_rss()
    before = peak_rss()
    loss = step()
    loss.backward()
    peak = peak_rss() - before
    value, grad_norm = loss.item(), leaves[0].grad.norm().item()
    times = []
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - start)
    return {
        "peak_mb": peak / 2**20,
        "time_s": statistics.median(times),
        "loss": value,
        "grad_norm": grad_norm,
    }


def run_one(impl, vocab, seq, divergence_name, chunk_size, repeats, hidden) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--vocab", str(vocab), "--seq", str(seq)]
    cmd += [
        "--divergence",
        divergence_name,
        "--chunk-size",
        str(chunk_size),
        "--repeats",
        str(repeats),
        "--hidden",
        str(hidden),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} vocab={vocab} seq={seq} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument(
        "--seq",
        type=int,
        nargs="+",
        default=None,
        help="positions (default: 1024 2048 4096 at 32k, 256 512 1024 at 128k)",
    )
    parser.add_argument("--divergence", nargs="+", default=["forward_kl", "jsd"])
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="positions per chunk (default: 1 MiB of float32 logits, 16 MiB with --hidden)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--hidden",
        type=int,
        default=0,
        help="> 0: the student is hidden states of this width and an output layer (HiddenStates)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    def chunk_of(vocab: int) -> int:
        # CPU: about 1 MiB of float32 logits per chunk (cache-resident); with --hidden 16 MiB, so that the
        # output layer's gradient, updated once per chunk, is not rewritten every few rows.
        return args.chunk_size or max(1, (1 << (22 if args.hidden else 18)) // vocab)

    if args.worker:
        result = worker(
            args.worker,
            args.vocab[0],
            args.seq[0],
            args.divergence[0],
            chunk_of(args.vocab[0]),
            args.repeats,
            args.hidden,
        )
        print(json.dumps(result))
        return

    with_trl = GKDTrainer is not None
    print(
        f"# {platform.machine()}, {psutil.cpu_count()} cores, torch {torch.__version__}, threads 1, float32 logits, "
        f"TRL {'yes' if with_trl else 'not installed'}, {args.repeats} timed repeats (median), student given as "
        + (
            f"hidden states [T, {args.hidden}] + output layer [V, {args.hidden}]"
            if args.hidden
            else "logits [T, V]"
        )
    )
    print(
        "| divergence | vocab | tokens | chunk | logits MB | dense peak MB | hf_kd peak MB | peak ratio | dense s | hf_kd s | time ratio | TRL peak / time ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for divergence_name in args.divergence:
        for vocab in args.vocab:
            seqs = args.seq or ([1024, 2048, 4096] if vocab <= 32768 else [256, 512, 1024])
            for seq in seqs:
                dense = run_one(
                    "dense", vocab, seq, divergence_name, chunk_of(vocab), args.repeats, args.hidden
                )
                ours = run_one(
                    "hf_kd", vocab, seq, divergence_name, chunk_of(vocab), args.repeats, args.hidden
                )
                for key in ("loss", "grad_norm"):  # same computation: same value and gradient
                    if abs(ours[key] - dense[key]) > 1e-4 * max(1e-3, abs(dense[key])):
                        raise RuntimeError(f"hf_kd {key} {ours[key]} != dense {key} {dense[key]}")
                trl_cell = "n/a"
                if with_trl and divergence_name == "jsd":
                    trl = run_one(
                        "trl", vocab, seq, divergence_name, chunk_of(vocab), args.repeats, args.hidden
                    )
                    trl_cell = (
                        f"{ours['peak_mb'] / trl['peak_mb']:.2f} / {ours['time_s'] / trl['time_s']:.2f}"
                    )
                print(
                    f"| {divergence_name} | {vocab} | {seq} | {chunk_of(vocab)} | {seq * vocab * 4 / 2**20:.0f} | {dense['peak_mb']:.0f} | "
                    f"{ours['peak_mb']:.0f} | {ours['peak_mb'] / dense['peak_mb']:.2f} | {dense['time_s']:.3f} | "
                    f"{ours['time_s']:.3f} | {ours['time_s'] / dense['time_s']:.2f} | {trl_cell} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
