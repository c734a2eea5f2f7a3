"""A cache capture, as ``scripts/cache_teacher.py`` runs it: load the data and the teacher, capture
the teacher's outputs (:func:`hf_kd.teachers.cache.capture.capture`), optionally push
the cache to the Hub."""

from __future__ import annotations

from dataclasses import dataclass, field

from accelerate import PartialState
from datasets import DatasetDict

from hf_kd.cards.dataset import write_dataset_card
from hf_kd.data.loading import check_columns, dataset_inputs, load_splits
from hf_kd.hub import push_cache_to_hub
from hf_kd.modeling import check_model_source, load_teacher
from hf_kd.paths import refuse_overlap
from hf_kd.run_lock import output_dir_lock
from hf_kd.tasks import build_task
from hf_kd.teachers.cache.capture import capture
from hf_kd.teachers.cache.format import LOGIT_DTYPES, CacheMetadata
from hf_kd.teachers.cache.spec import CaptureSpec, compression_top_k
from hf_kd.teachers.codec import CODECS, COMPRESSIONS, TopkCodec
from hf_kd.teachers.sketch import SKETCH_BITS, check_setting


@dataclass
class CacheArguments:
    """Arguments of ``scripts/cache_teacher.py`` (with a ``hf_kd.config.DataArguments`` for the data)."""

    teacher_model_name_or_path: str = field(
        metadata={"help": "Teacher: a Hub model id or a local directory."}
    )
    output_dir: str = field(
        metadata={"help": "Cache directory to write (a run reads it with teacher_cache: <this path>)."}
    )
    teacher_model_revision: str = field(
        default="main", metadata={"help": "Teacher revision (branch, tag or commit)."}
    )
    teacher_processor: str | None = field(
        default=None, metadata={"help": "Teacher tokenizer/image processor (default: the teacher's own)."}
    )
    splits: list[str] | None = field(
        default=None, metadata={"help": "Splits to capture (default: train_split and eval_split)."}
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "Keep the top-k log-probabilities and the tail mass (default: full logits)."},
    )
    logits_dtype: str = field(
        default="float32",
        metadata={"help": f"Storage dtype of logits / log-probabilities, one of {LOGIT_DTYPES}."},
    )
    compression: str = field(
        default="none",
        metadata={
            "help": f"Per-token top-k storage, one of {COMPRESSIONS}: both keep up to top_k tokens per position "
            "until compression_mass, quantised and bit-packed (hf_kd.teachers.codec); topk-golomb codes the "
            "token ids in fewer bits (recommended), topk-packed is the first format."
        },
    )
    compression_mass: float = field(
        default=TopkCodec.mass,
        metadata={"help": "topk-packed, topk-golomb: keep tokens until this cumulative probability."},
    )
    compression_bits: int = field(
        default=TopkCodec.bits,
        metadata={"help": "topk-packed, topk-golomb: bits per quantised log-probability."},
    )
    compression_step: float = field(
        default=TopkCodec.step,
        metadata={"help": "topk-packed, topk-golomb: nats per quantisation step below the top-1."},
    )
    sketch_rank: int = field(
        default=0,
        metadata={
            "help": "Per-token top-k: also store a low-rank sketch of the logits of this rank (0: none), so "
            "that sparse_tail: sketch spreads the tail like each position's teacher (hf_kd.teachers.sketch)."
        },
    )
    sketch_bits: int = field(
        default=4, metadata={"help": f"Bits per sketch coefficient, one of {SKETCH_BITS}."}
    )
    batch_size: int = field(default=64, metadata={"help": "Rows per teacher forward pass."})
    shard_size: int = field(
        default=4096, metadata={"help": "Rows per shard (the unit of resuming and of work per process)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing cache at output_dir."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the cache as a Hub dataset (hub_dataset_id)."}
    )
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repository of push_to_hub."}
    )
    hub_private: bool | None = field(default=None, metadata={"help": "Create the Hub repository private."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the Hub. Off unless you trust the repository."},
    )
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when an accelerator is present."})

    def __post_init__(self) -> None:
        if self.logits_dtype not in LOGIT_DTYPES:
            raise ValueError(f"logits_dtype={self.logits_dtype!r} is not one of {LOGIT_DTYPES}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(
                f"top_k={self.top_k} must be a positive number of classes (or unset for full logits)"
            )
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression={self.compression!r} is not one of {COMPRESSIONS}")
        if self.compression != "none" and self.top_k is None:
            raise ValueError(
                f"compression={self.compression!r} needs top_k (the most tokens kept per position)"
            )
        self.codec()  # checks the parameters
        if self.sketch_rank:
            if self.top_k is None:
                raise ValueError(
                    f"sketch_rank={self.sketch_rank} sketches the tail of a top-k: it needs top_k"
                )
            check_setting(self.sketch_rank, self.sketch_bits)
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError(
                "push_to_hub needs hub_dataset_id (the Hub dataset repository to create or update)"
            )

    def codec(self) -> TopkCodec | None:
        """The codec of ``compression`` with its parameters, or None."""
        if self.compression == "none":
            return None
        codec = CODECS[self.compression]
        return codec(self.top_k, self.compression_mass, self.compression_bits, self.compression_step)


def run_capture(data_args, cache_args: CacheArguments) -> CacheMetadata:
    """What ``scripts/cache_teacher.py`` does: load the data and the teacher, capture, optionally push;
    holding ``output_dir``'s lock throughout (:func:`hf_kd.run_lock.output_dir_lock`: one capture per folder)."""
    main = PartialState(cpu=cache_args.use_cpu).is_main_process
    with output_dir_lock(cache_args.output_dir, main=main):
        return _capture(data_args, cache_args)


def _capture(data_args, cache_args: CacheArguments) -> CacheMetadata:
    """:func:`run_capture`'s work, under the lock."""
    refuse_overlap(
        "output_dir",
        cache_args.output_dir,
        {
            "teacher_model_name_or_path": cache_args.teacher_model_name_or_path,
            "teacher_processor": cache_args.teacher_processor,
            **dataset_inputs(data_args),
        },
    )
    check_model_source("teacher_model_name_or_path", cache_args.teacher_model_name_or_path)
    state = PartialState(cpu=cache_args.use_cpu)
    task = build_task(data_args)
    raw = load_splits(data_args)
    names = cache_args.splits or [name for name in (data_args.train_split, data_args.eval_split) if name]
    unknown = [name for name in names if name not in raw]
    if unknown:
        raise ValueError(
            f"splits {unknown} are not in dataset {data_args.dataset_name!r}; it has {sorted(raw)}"
        )
    check_columns(raw, data_args, names)
    compression_top_k(task, cache_args.codec(), cache_args.top_k)  # before the teacher loads
    teacher_id, revision = cache_args.teacher_model_name_or_path, cache_args.teacher_model_revision
    teacher = load_teacher(
        task, teacher_id, revision=revision, trust_remote_code=cache_args.trust_remote_code
    )
    processor = None
    if task.needs_processor:
        source = cache_args.teacher_processor or teacher_id
        processor = task.load_processor(source, revision="main" if cache_args.teacher_processor else revision)
    spec = CaptureSpec(
        teacher.to(state.device),
        processor,
        task,
        DatasetDict({name: raw[name] for name in names}),
        cache_args.output_dir,
        teacher_id=teacher_id,
        teacher_revision=revision,
        top_k=cache_args.top_k,
        dtype=cache_args.logits_dtype,
        batch_size=cache_args.batch_size,
        shard_size=cache_args.shard_size,
        dataset_name=data_args.dataset_name,
        dataset_config=data_args.dataset_config,
        overwrite=cache_args.overwrite,
        progress=state.is_local_main_process,
        compression=cache_args.codec(),
        sketch_rank=cache_args.sketch_rank,
        sketch_bits=cache_args.sketch_bits,
    )
    metadata = capture(spec)
    if state.is_main_process:
        write_dataset_card(cache_args.output_dir, metadata)
    if cache_args.push_to_hub and state.is_main_process:
        push_cache_to_hub(cache_args.output_dir, cache_args.hub_dataset_id, private=cache_args.hub_private)
    state.wait_for_everyone()
    return metadata
