"""A student built from its teacher's own layers (DistilBERT's recipe; depth-pruned LLMs do the same).

``student_from_teacher(teacher, layers)`` copies the teacher whole (embeddings, head, final norm) and
keeps only the transformer blocks in ``layers``: a shallower model of the same width whose config says
its new depth, so that ``save_pretrained`` writes an ordinary checkpoint that reloads as itself. The
blocks are found generically: the one ``nn.ModuleList`` of ``config.num_hidden_layers`` modules
(BERT/RoBERTa ``encoder.layer``, ViT ``encoder.layer``, Llama/Qwen/Mistral ``model.layers``, GPT-2
``h``, ...); a model without exactly one such list is refused with the reason.
"""

from __future__ import annotations

import copy

from torch import nn

PER_LAYER_CONFIG_LISTS = ("layer_types",)
"""Config fields holding one entry per layer (sliding or full attention in Qwen/Mistral/Gemma configs):
subset with the layers kept."""


def choose_layers(depth: int, student_layers: list[int] | None, every_k: int | None) -> list[int]:
    """The teacher layers a student keeps: ``student_layers`` as given (distinct, increasing, in
    ``[0, depth)``), or every ``every_k``-th layer from 0 (``every_k=2`` on 6 layers: [0, 2, 4])."""
    if (student_layers is None) == (every_k is None):
        raise ValueError("student_init: teacher needs exactly one of student_layers and every_k")
    if every_k is not None:
        if every_k < 1:
            raise ValueError(f"every_k={every_k!r} must be ≥ 1")
        return list(range(0, depth, every_k))
    layers = list(student_layers)
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= depth:
        raise ValueError(
            f"student_layers={student_layers!r}: expected distinct increasing layer indices in [0, {depth}) "
            f"(the teacher has {depth} layers)"
        )
    return layers


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and module of ``model``'s transformer blocks: the one ``nn.ModuleList`` holding
    ``config.num_hidden_layers`` modules. ValueError naming what was found otherwise."""
    name = type(model).__name__
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"{name} has no config.num_hidden_layers: its layers cannot be chosen")
    found = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == depth
    ]
    if len(found) != 1:
        paths = [path for path, _ in found]
        raise ValueError(
            f"{name}: expected exactly one ModuleList of its {depth} layers, found {len(found)} {paths}; "
            "student_init: teacher supports models whose transformer blocks are one ModuleList"
        )
    return found[0]


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the blocks ``layers`` (indices into its layer list, increasing),
    every other weight (embeddings, head, norms) copied as is. The copy's config has the new
    ``num_hidden_layers`` (and per-layer lists subset), its blocks renumbered (``layer_idx``, used by
    key/value caches) so that it runs, saves and reloads as an ordinary model. The teacher is unchanged."""
    path, blocks = find_layer_list(teacher)
    layers = choose_layers(len(blocks), layers, None)
    student = copy.deepcopy(teacher)
    kept = nn.ModuleList(copy.deepcopy(blocks[i]) for i in layers)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    student.set_submodule(path, kept)
    config = student.config
    for field in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, field, None)
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(config, field, [values[i] for i in layers])
    config.num_hidden_layers = len(layers)
    student.train(teacher.training)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student


def describe_student_init(layers: list[int], teacher_depth: int, teacher: str) -> str:
    """One line for the card and the run record: which teacher layers the student started from."""
    return (
        f"teacher layers {layers} of {teacher_depth} copied from {teacher} (embeddings, head and norms too)"
    )
