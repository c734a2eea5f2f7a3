"""Where a frozen teacher lives under each Accelerate strategy.

The student is wrapped by the Trainer (DDP, FSDP or DeepSpeed); the teacher never trains, so it must
not be wrapped for training, yet it must not be copied whole onto every rank when the strategy is
there precisely because models do not fit. :func:`place_teacher` is the one place that decides:

============  ================================================================================
strategy      teacher
============  ================================================================================
single / DDP  a full replica per process on the process's device, in the teacher's own dtype
              (Accelerate's evaluation-mode preparation: device + mixed-precision autocast only)
FSDP (v2)     sharded with ``fully_shard`` like the student (one group per transformer block,
              then the root), resharded after every forward since it never runs backward
ZeRO-3        a DeepSpeed engine built from the run's DeepSpeed config in inference use
              (TRL's ``prepare_deepspeed``): parameters partitioned across ranks and gathered
              layer by layer in forward; ZeRO-1/2 runs get a stage-0 replica
============  ================================================================================

``cpu_offload=True`` keeps the teacher's weights in CPU memory: FSDP's ``CPUOffloadPolicy``,
ZeRO-3's ``offload_param``, or (single / DDP) Accelerate's ``cpu_offload`` hooks that move each
layer to the device for its forward only.

Under FSDP and ZeRO-3 the teacher's forward is a collective: every rank must run it at every step,
which the trainer does (the teacher runs inside ``compute_loss`` on each rank's micro-batch).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, align_module_device


def placement_strategy(accelerator: Accelerator) -> str:
    """``replica`` (no distribution, DDP, multi-CPU), ``fsdp`` or ``deepspeed``."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "replica"


def place_teacher(
    model: torch.nn.Module, accelerator: Accelerator, *, cpu_offload: bool = False
) -> torch.nn.Module:
    """Place a frozen teacher (eval mode, ``requires_grad=False``) for the run's strategy (see module doc).

    Returns the module to call: the model itself, or the DeepSpeed engine wrapping it.
    """
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("place_teacher expects a frozen teacher: call hf_kd.modeling.freeze(model) first")
    strategy = placement_strategy(accelerator)
    if strategy == "deepspeed":
        return _deepspeed_inference_engine(model, accelerator, cpu_offload)
    if strategy == "fsdp":
        return _fsdp2_shard(model, accelerator, cpu_offload)
    if cpu_offload:
        from accelerate import cpu_offload as offload_hooks

        model = offload_hooks(model, execution_device=accelerator.device)
        return accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
    return accelerator.prepare_model(model, evaluation_mode=True)


def _fsdp2_shard(model: torch.nn.Module, accelerator: Accelerator, cpu_offload: bool) -> torch.nn.Module:
    """FSDP2 sharding with the run's plugin settings (read, never modified: Accelerate's own
    ``fsdp2_prepare_model`` stores the model's block classes in the shared plugin, so the student,
    prepared later, would be wrapped by the teacher's classes)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"fsdp_version={plugin.fsdp_version}: hf_kd shards the teacher with FSDP2 only; "
            "set fsdp_version: 2 in the Accelerate config (see recipes/accelerate_configs/fsdp.yaml)"
        )
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None and accelerator.parallelism_config is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return shard_teacher(
        model,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        offload_policy=CPUOffloadPolicy() if cpu_offload else (plugin.cpu_offload or OffloadPolicy()),
        block_names=plugin.transformer_cls_names_to_wrap,
        mesh=mesh,
    )


def shard_teacher(
    model: torch.nn.Module, *, mp_policy=None, offload_policy=None, block_names=None, mesh=None
) -> torch.nn.Module:
    """Shard a frozen model over the default process group with FSDP2's ``fully_shard``: one group per
    block (``block_names``, default the model's ``_no_split_modules``), then the root; every group is
    resharded after its forward, since a teacher never runs backward. Returns the model (sharded in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = {
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
        "reshard_after_forward": True,
        "mesh": mesh,
    }
    names = set(block_names or getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules())[1:]:
        if type(module).__name__ in names:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _deepspeed_inference_engine(model: torch.nn.Module, accelerator: Accelerator, cpu_offload: bool):
    """A DeepSpeed engine for the teacher, built from the run's DeepSpeed config as TRL's
    ``prepare_deepspeed`` does: ZeRO-3 partitions the teacher like the student, any lower stage gets a
    stage-0 replica. Optimizer and scheduler sections are dropped (the teacher has neither)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            "the Accelerate config uses DeepSpeed but deepspeed is not installed: pip install deepspeed"
        )
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden_size = _hidden_size(model)
        if hidden_size is not None:
            zero.update(
                reduce_bucket_size=hidden_size * hidden_size,
                stage3_param_persistence_threshold=10 * hidden_size,
                stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
            )
        if cpu_offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    else:
        if cpu_offload:
            raise ValueError(
                f"teacher CPU offload under DeepSpeed needs ZeRO stage 3, the config has stage {zero.get('stage')}"
            )
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _hidden_size(model: torch.nn.Module) -> int | None:
    """The model's (largest) hidden size from its config, or None."""
    config = getattr(model, "config", None)
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if sizes else getattr(config, "hidden_size", None)


@contextmanager
def full_teacher(teacher: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The placed teacher with all its weights whole and materialised inside the block, to read them
    (e.g. the logit layer's class templates): ZeRO-3 parameters gathered, FSDP2 groups unsharded,
    CPU-offloaded weights loaded. Collective under ZeRO-3 and FSDP: every rank must enter it."""
    model = getattr(teacher, "module", teacher)  # a DeepSpeed engine wraps the model
    with ExitStack() as stack:
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(list(model.parameters())))
        else:
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.unshard()
                    stack.callback(module.reshard)
                else:
                    stack.enter_context(align_module_device(module))
        yield model


def teacher_bytes_per_process(model: torch.nn.Module) -> int:
    """Bytes of teacher parameters and buffers held by this process: the local shard of each sharded
    (DTensor or ZeRO-3) tensor, the full tensor otherwise. Shared (tied) tensors count once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        local = tensor.to_local() if hasattr(tensor, "to_local") else getattr(tensor, "ds_tensor", tensor)
        total += local.numel() * local.element_size()
    return total
