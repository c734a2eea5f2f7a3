"""Several teachers at once (``teacher_source: mixture``): each with its own source and weight, combined
into one distribution per item.

- **Mixture** (default): p = Σ_i w_i p_i / Σ_i w_i, in probability space, each p_i the member's
  distribution at τ = 1 (a top-k member's tail spread uniformly, its ``to_dense_log_probs``). The signal
  returns log p as dense logits; the loss applies the temperature to them like to any teacher's.
- **Routing** (``teacher_routing_column``): each example is taught by the one member the column names
  (its value is a member's ``name``), as TRL's multi-teacher routing; the other members' outputs for
  that row are not used.

Members are ``teachers:`` entries ``{name, source, weight, model, revision, cache, options}`` (``source``:
online, cached or served; ``model`` / ``cache`` / ``options`` are that source's
``teacher_model_name_or_path`` / ``teacher_cache`` / ``teacher_options``). Every member must read the
student's tokenizer (checked before training: an online member's saved tokenizer, a cache's recorded
processor, a server's tokenizer hash); teachers of other tokenizers are refused. At most one cached member
(a cache's columns have fixed names).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from hf_kd.losses import SparseLogits
from hf_kd.modeling import load_teacher
from hf_kd.tasks.base import Task, processor_fingerprint, split_batch
from hf_kd.teachers.contract import SignalDefaults, TeacherSignal
from hf_kd.teachers.signal import build_teacher_signal
from hf_kd.teachers.sources import teacher_source

ROUTE = "route"
"""The batch column (``kd_teacher_route``) holding each row's member index under routing."""
MEMBER_KEYS = ("name", "source", "weight", "model", "revision", "cache", "options")
MEMBER_SOURCES = ("online", "cached", "served")


def member_configs(config) -> list[tuple[dict[str, Any], Any]]:
    """The ``teachers:`` entries of ``config`` checked (keys, names, sources, weights, at most one cache),
    each with the run's config as that member's source reads it."""
    members = config.teachers
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise ValueError(f"teachers={members!r}: expected a list of {{name, source, weight, ...}} entries")
    names = [m.get("name") for m in members]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"teachers: every entry needs a distinct name; got names {names}")
    out = []
    for member in members:
        unknown = sorted(set(member) - set(MEMBER_KEYS))
        if unknown:
            raise ValueError(
                f"teachers[{member['name']!r}]: unknown keys {unknown}; expected some of {MEMBER_KEYS}"
            )
        source = member.get("source", "online")
        if source not in MEMBER_SOURCES:
            raise ValueError(
                f"teachers[{member['name']!r}].source={source!r}: expected one of {MEMBER_SOURCES}"
            )
        weight = member.get("weight", 1.0)
        if not (isinstance(weight, (int, float)) and weight > 0 and math.isfinite(weight)):
            raise ValueError(f"teachers[{member['name']!r}].weight={weight!r} must be a number > 0")
        sub = copy.copy(config)
        sub.teacher_source = source
        sub.teacher_model_name_or_path = member.get("model")
        sub.teacher_model_revision = member.get("revision", "main")
        sub.teacher_cache = member.get("cache")
        sub.teacher_options = member.get("options")
        teacher_source(source).check_config(sub)
        if source == "online" and not sub.teacher_model_name_or_path:
            raise ValueError(
                f"teachers[{member['name']!r}]: an online teacher needs model (a path or Hub id)"
            )
        out.append(({**member, "source": source, "weight": float(weight)}, sub))
    if sum(m["source"] == "cached" for m, _ in out) > 1:
        raise ValueError("teachers: at most one cached teacher (a cache's columns have fixed names)")
    return out


def open_mixture(config, task: Task, splits, split_names: list[str]):
    """Open every member (a cache joined, a server checked, an online member's weights and tokenizer
    loaded) and, with ``teacher_routing_column``, add each row's member index as ``kd_teacher_route``.
    Returns ([(member, its config, its resource, its processor or None)], the splits)."""
    opened = []
    for member, sub in member_configs(config):
        resource, processor = None, None
        source = teacher_source(member["source"])
        if source.open is not None:
            resource, splits = source.function("open")(sub, task, splits, split_names)
        if source.loads_model:
            processor = task.load_processor(
                sub.teacher_model_name_or_path, revision=sub.teacher_model_revision
            )
            resource = load_teacher(task, sub.teacher_model_name_or_path, revision=sub.teacher_model_revision)
        opened.append((member, sub, resource, processor))
    column = config.teacher_routing_column
    if column is not None:
        index = {member["name"]: i for i, (member, *_) in enumerate(opened)}
        for name in split_names:
            if column not in splits[name].column_names:
                raise ValueError(
                    f"teacher_routing_column={column!r} is not a column of split {name!r} ({splits[name].column_names})"
                )
            unknown = sorted(set(splits[name][column]) - set(index))
            if unknown:
                raise ValueError(
                    f"teacher_routing_column={column!r}: split {name!r} names teachers {unknown}; the teachers are "
                    f"{sorted(index)}"
                )
            routes = [index[value] for value in splits[name][column]]
            splits[name] = splits[name].add_column("kd_teacher_" + ROUTE, routes)
    return opened, splits


class MixtureTeacher(SignalDefaults):
    """The members' distributions mixed by ``weights`` (or one member per row when the batch carries
    ``kd_teacher_route``); returns the mixture's log-probabilities [..., K] (see the module's docstring)."""

    returns = ("dense",)

    def __init__(self, members: list[TeacherSignal], weights: list[float], names: list[str]):
        self.members, self.names = members, names
        total = sum(weights)
        self.log_weights = torch.log(torch.tensor([w / total for w in weights], dtype=torch.float32))

    def collator(self, collate):
        for member in self.members:
            collate = member.collator(collate)
        return collate

    def member_log_probs(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each member's log-probabilities [..., K] over the classes all of them cover."""
        outputs = []
        for member in self.members:
            model = getattr(member, "model", None)
            device = batch["input_ids" if "input_ids" in batch else "labels"].device
            if model is not None and next(model.parameters()).device != device:
                model.to(device)
            output = member(batch)
            outputs.append(
                output.to_dense_log_probs()
                if isinstance(output, SparseLogits)
                else torch.log_softmax(output.float(), dim=-1)
            )
        classes = min(o.shape[-1] for o in outputs)
        return [torch.log_softmax(o[..., :classes], dim=-1) if o.shape[-1] > classes else o for o in outputs]

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        outputs = torch.stack(self.member_log_probs(batch))  # [M, ..., K]
        route = split_batch(batch)[2].get(ROUTE)
        if route is not None:  # each row's own teacher
            route = route.to(outputs.device).long()
            if route.dim() > 1:
                route = route[:, 0]
            rows = torch.arange(outputs.shape[1], device=outputs.device)
            return outputs[route, rows]
        weights = self.log_weights.to(outputs.device).view(-1, *[1] * (outputs.dim() - 1))
        return torch.logsumexp(outputs + weights, dim=0)


def build_mixture_teacher(
    config, task: Task, student, *, resource=None, student_processor=None, **_: Any
) -> MixtureTeacher:
    """The ``mixture`` source's signal from what :func:`open_mixture` opened: each member built by the one
    factory; an online member's tokenizer checked to be the student's."""
    if resource is None:
        raise ValueError("teacher_source='mixture' needs its teachers opened first (open_teacher_source)")
    members, weights, names = [], [], []
    own = None if student_processor is None else processor_fingerprint(student_processor)
    for member, sub, opened, processor in resource:
        model = opened if processor is not None else None
        if processor is not None and own is not None and processor_fingerprint(processor) != own:
            raise ValueError(
                f"teachers[{member['name']!r}] reads another tokenizer than the student; a mixture needs teachers "
                "that share the student's tokenizer (a teacher of another tokenizer: teacher_source: online alone)"
            )
        signal = build_teacher_signal(
            sub,
            task,
            student,
            teacher_model=model,
            resource=None if model is not None else opened,
            student_processor=student_processor,
        )
        members.append(signal)
        weights.append(member["weight"])
        names.append(member["name"])
    return MixtureTeacher(members, weights, names)
