"""Capture a teacher's logits once into a teacher cache (a ``datasets`` dataset with metadata).

    accelerate launch scripts/cache_teacher.py --config recipes/demo/cache_teacher.yaml [--field value ...]
    torchrun --nproc_per_node 2 scripts/cache_teacher.py --config recipes/demo/cache_teacher.yaml
    python scripts/cache_teacher.py --config recipes/demo/cache_teacher.yaml --top_k 4

Train from it with ``teacher_source: cached`` and ``teacher_cache: <output_dir>`` in a distill recipe.
An interrupted capture resumes when run again with the same settings and teacher weights.
"""

import logging

import torch

from hf_kd.config import DataArguments, parse_args
from hf_kd.redact import redact_logs_and_errors
from hf_kd.runs.capture import CacheArguments, run_capture
from hf_kd.runs.processes import end_processes
from hf_kd.teachers.cache.advice import recommended_sparse_tail


def main(argv: list[str] | None = None) -> None:
    redact_logs_and_errors()  # no secret in a log line or an error's traceback
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_kd").setLevel(logging.INFO)  # the capture's report of the probability mass kept
    data_args, cache_args = parse_args(argv, classes=(DataArguments, CacheArguments))
    metadata = run_capture(data_args, cache_args)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        rows = ", ".join(f"{name}: {record['num_rows']} rows" for name, record in metadata.splits.items())
        stored = "full logits" if metadata.top_k is None else f"top-{metadata.top_k}"
        stored += (
            f" ({metadata.dtype})" if metadata.compression is None else f" ({metadata.compression['codec']})"
        )
        if metadata.sketch is not None:
            tail = recommended_sparse_tail(has_sketch=True, flat=True)[0]
            stored += f" with a rank-{metadata.sketch['rank']} logit sketch (train with sparse_tail: {tail})"
        print(f"teacher cache {cache_args.output_dir}: {stored} of {metadata.teacher_id}; {rows}")
    end_processes()


if __name__ == "__main__":
    main()
