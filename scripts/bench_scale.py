"""Teacher memory per process: a full replica (DDP placement) vs FSDP2 sharding (hf_kd's FSDP placement).

    python scripts/bench_scale.py [--nproc 2] [--hidden 256] [--layers 4]

Starts ``--nproc`` CPU processes (torchrun, gloo). Each builds the same BERT teacher, measures the bytes
of teacher weights it holds as a replica, then shards it with ``hf_kd.teachers.placement.shard_teacher``
(FSDP2 ``fully_shard``), measures again, and times forwards of both side by side (interleaved).
Accelerate's FSDP and DeepSpeed modes need GPUs; on CPU the sharding itself is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from transformers import BertConfig, BertForSequenceClassification

    from hf_kd.modeling import freeze
    from hf_kd.teachers.placement import shard_teacher, teacher_bytes_per_process

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8000,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=4 * args.hidden,
        num_labels=10,
    )
    replica = freeze(BertForSequenceClassification(config))
    sharded = shard_teacher(freeze(copy.deepcopy(replica)))
    ids = torch.randint(0, 8000, (8, 64), generator=torch.Generator().manual_seed(rank))
    times = {"replica": [], "sharded": []}
    with torch.no_grad():
        diff = (replica(input_ids=ids).logits - sharded(input_ids=ids).logits).abs().max().item()
        for _ in range(args.repeats):
            for name, model in (("replica", replica), ("sharded", sharded)):
                start = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - start)
    report = {
        "rank": rank,
        "parameters": sum(p.numel() for p in replica.parameters()),
        "replica_bytes": teacher_bytes_per_process(replica),
        "sharded_bytes": teacher_bytes_per_process(sharded),
        "max_abs_diff_logits": diff,
        "replica_forward_s": sorted(times["replica"])[len(times["replica"]) // 2],
        "sharded_forward_s": sorted(times["sharded"])[len(times["sharded"]) // 2],
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as out:
        torchrun = Path(sys.executable).parent / "torchrun"
        command = [
            str(torchrun),
            "--nproc_per_node",
            str(args.nproc),
            __file__,
            "--worker",
            "--out",
            out,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--repeats",
            str(args.repeats),
        ]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        reports = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.nproc)]
    mib = 2**20
    print(
        f"teacher: BERT hidden {args.hidden} x {args.layers} layers, {reports[0]['parameters']:,} parameters (float32); "
        f"{args.nproc} CPU processes (gloo)"
    )
    print(
        "| rank | replica (DDP) MiB | FSDP2 sharded MiB | ratio | max |Δlogits| | forward replica ms | forward sharded ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in reports:
        print(
            f"| {r['rank']} | {r['replica_bytes'] / mib:.2f} | {r['sharded_bytes'] / mib:.2f} | "
            f"{r['sharded_bytes'] / r['replica_bytes']:.3f} | {r['max_abs_diff_logits']:.1e} | "
            f"{1e3 * r['replica_forward_s']:.1f} | {1e3 * r['sharded_forward_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
