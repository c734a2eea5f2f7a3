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
``teacher_model_name_or_path`` / ``teacher_cache`` / ``teacher_options``). A cached or served member must
read the student's tokenizer (a cache's recorded processor, a server's tokenizer hash). At most one cached
member (a cache's columns have fixed names).

**Teachers of other tokenizers.** An online member whose tokenizer differs from the student's (a causal
LM) is distilled across tokenizers as a single such teacher is (``hf_kd.losses.cross_tokenizer``): the
rows carry its own inputs and alignment under its column prefix (``kd_member<i>_``), and it reads them as
a single teacher reads its own. Distributions over different vocabularies cannot be averaged, so the
signal then returns :class:`hf_kd.losses.WeightedTeachers`: the members of the student's tokenizer mixed
into one part as above, and each member of another tokenizer as its own part, each with its share of the
weights; the loss sums their soft terms, Σ_i w_i · S_i (why this is the mixture's objective for the
forward KL at τ = 1, and where it differs: ``hf_kd.losses.several_teachers``). With routing, each row is
taught by its own member, whatever its tokenizer: every part has weight 1 and teaches only the rows routed
to it (``WeightedTeachers.rows``; the members of the student's tokenizer as one routed part). The
student's agreement with each teacher (:attr:`MixtureTeacher.teachers`) is measured, for a member of
another tokenizer, at the matched span starts only (:meth:`AlignedLogits.matched_agreement`: there both
predict the same next token over tokens they share); its part of the soft term is logged too
(``loss_soft_teacher_<name>``).
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any

import torch
from transformers import AutoConfig

from hf_kd.losses import AlignedLogits, SparseLogits, WeightedTeachers
from hf_kd.modeling import load_teacher
from hf_kd.tasks.base import MEMBER_PREFIX, Task, member_prefix, processor_fingerprint, split_batch
from hf_kd.teachers.contract import SignalDefaults, TeacherSignal
from hf_kd.teachers.online import check_cross_tokenizer, cross_tokenizer_teacher
from hf_kd.teachers.signal import build_teacher_signal
from hf_kd.teachers.sources import teacher_source
from hf_kd.vocab import check_output_layer

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
    """Open every member (a cache joined, a server checked, an online member's tokenizer loaded: its
    weights load when the signal is built, once every member's tokenizer is checked) and, with
    ``teacher_routing_column``, add each row's member index as ``kd_teacher_route``. Returns ([(member,
    its config, its resource or None, its processor or None)], the splits)."""
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
        opened.append((member, sub, resource, processor))
    column = config.teacher_routing_column
    if column is not None:
        splits = copy.copy(splits)  # the caller's splits are left as they were
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
    ``kd_teacher_route``); returns the mixture's log-probabilities [..., K] (see the module's docstring).
    With members of other tokenizers (``prefixes[i]``: member i's column prefix, None for a member of
    the student's tokenizer), :class:`WeightedTeachers`: the mixture of the others as one part, and each
    of them as its own part."""

    def __init__(
        self,
        members: list[TeacherSignal],
        weights: list[float],
        names: list[str],
        prefixes: list[str | None] | None = None,
    ):
        self.members, self.names = members, names
        self.prefixes = prefixes or [None] * len(members)
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.same = [i for i, prefix in enumerate(self.prefixes) if prefix is None]
        """The members of the student's tokenizer, mixed into one distribution."""
        share = sum(self.weights[i] for i in self.same)
        self.log_weights = torch.log(torch.tensor([self.weights[i] / share for i in self.same]))
        self.returns = ("dense",) if len(self.same) == len(members) else ("several",)
        self.teachers = {name: partial(self.member_output, i) for i, name in enumerate(names)}

    def member_output(self, index: int, batch: dict[str, Any]) -> torch.Tensor | AlignedLogits:
        """Member ``index``'s part as it enters the signal: a member of the student's tokenizer, its
        log-probabilities [..., K] as they enter the mixture (every member of the student's tokenizer
        runs: the classes kept are those all of them cover); one of another tokenizer, its
        :class:`AlignedLogits` over its own columns."""
        if self.prefixes[index] is not None:
            return self._on_device(self.members[index], batch)(member_batch(batch, self.prefixes[index]))
        return self.member_log_probs(batch)[self.same.index(index)]

    def collator(self, collate):
        for member in self.members:
            collate = member.collator(collate)
        return collate

    def member_log_probs(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each member of the student's tokenizer's log-probabilities [..., K] over the classes all of them
        cover."""
        outputs = []
        for member in (self.members[i] for i in self.same):
            output = self._on_device(member, batch)(batch)
            outputs.append(
                output.to_dense_log_probs()
                if isinstance(output, SparseLogits)
                else torch.log_softmax(output.float(), dim=-1)
            )
        classes = min(o.shape[-1] for o in outputs)
        return [torch.log_softmax(o[..., :classes], dim=-1) if o.shape[-1] > classes else o for o in outputs]

    @staticmethod
    def _on_device(member: TeacherSignal, batch: dict[str, Any]) -> TeacherSignal:
        """``member``, its model (when it runs one here) moved to the batch's device."""
        model = getattr(member, "model", None)
        device = batch["input_ids" if "input_ids" in batch else "labels"].device
        if model is not None and next(model.parameters()).device != device:
            model.to(device)
        return member

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor | WeightedTeachers:
        route = split_batch(batch)[2].get(ROUTE)
        if route is not None:  # each row's own teacher: its member index [B]
            route = route.long() if route.dim() == 1 else route[:, 0].long()
        mixed = self._mixed(batch, route) if self.same else None
        if len(self.same) == len(self.members):
            return mixed
        outputs, weights, names, rows = [], [], [], []
        if self.same:
            outputs.append(mixed)
            weights.append(sum(self.weights[i] for i in self.same))
            names.append("+".join(self.names[i] for i in self.same))
            rows.append(
                None if route is None else torch.isin(route, torch.tensor(self.same, device=route.device))
            )
        for i, prefix in enumerate(self.prefixes):
            if prefix is not None:
                outputs.append(self.member_output(i, batch))
                weights.append(self.weights[i])
                names.append(self.names[i])
                rows.append(None if route is None else route == i)
        if route is not None:  # each row taught by one teacher, whole
            return WeightedTeachers(outputs, [1.0] * len(outputs), names, rows)
        return WeightedTeachers(outputs, weights, names)

    def _mixed(self, batch: dict[str, Any], route: torch.Tensor | None) -> torch.Tensor:
        """The members of the student's tokenizer mixed into one distribution [..., K], or each row's own
        member's (``route``: member indices [B]; a row routed to a member of another tokenizer gets the
        first one's, which no loss reads)."""
        outputs = torch.stack(self.member_log_probs(batch))  # [M, ..., K]
        if route is not None:
            position = torch.zeros(len(self.members), dtype=torch.long, device=outputs.device)
            position[self.same] = torch.arange(len(self.same), device=outputs.device)
            rows = torch.arange(outputs.shape[1], device=outputs.device)
            return outputs[position[route.to(outputs.device)], rows]
        weights = self.log_weights.to(outputs.device).view(-1, *[1] * (outputs.dim() - 1))
        return torch.logsumexp(outputs + weights, dim=0)


def member_batch(batch: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``batch`` as the member whose columns carry ``prefix`` reads it: the student's columns and its own
    without the prefix, as a single teacher of another tokenizer reads its own."""
    shared = {key: value for key, value in batch.items() if not key.startswith(MEMBER_PREFIX)}
    return shared | {key[len(prefix) :]: value for key, value in batch.items() if key.startswith(prefix)}


def build_mixture_teacher(
    config, task: Task, student, *, resource=None, student_processor=None, **_: Any
) -> MixtureTeacher:
    """The ``mixture`` source's signal from what :func:`open_mixture` opened: each member built by the one
    factory; an online member of another tokenizer than the student's made a cross-tokenizer teacher over
    its own columns (:meth:`hf_kd.tasks.CausalLMTask.use_member_tokenizer`: rows prepared from now on carry
    them), what such a teacher does not support refused naming the member."""
    if resource is None:
        raise ValueError("teacher_source='mixture' needs its teachers opened first (open_teacher_source)")
    own = None if student_processor is None else processor_fingerprint(student_processor)
    prefixes = [
        _other_tokenizer(task, index, member, sub, processor, student, student_processor)
        if processor is not None and own is not None and processor_fingerprint(processor) != own
        else None
        for index, (member, sub, _, processor) in enumerate(resource)
    ]  # every member's tokenizer checked before any member's weights load
    names = [member["name"] for member, *_ in resource]
    members = []
    for (_, sub, opened, processor), prefix in zip(resource, prefixes, strict=True):
        model = None
        if processor is not None:  # an online member
            model = load_teacher(task, sub.teacher_model_name_or_path, revision=sub.teacher_model_revision)
        if prefix is not None:
            members.append(cross_tokenizer_teacher(sub, model, task.members[prefix].vocabulary))
            continue
        members.append(
            build_teacher_signal(
                sub,
                task,
                student,
                teacher_model=model,
                resource=opened,
                student_processor=student_processor,
            )
        )
    weights = [member["weight"] for member, *_ in resource]
    return MixtureTeacher(members, weights, names, prefixes)


def _other_tokenizer(task, index, member, sub, processor, student, student_processor) -> str | None:
    """Member ``index`` (an online teacher whose tokenizer differs from the student's) set up on ``task``
    for cross-tokenizer distillation: its column prefix, or None when its tokenizer has the student's
    vocabulary after all. Raises naming the member when the task cannot align tokenizers, or when its
    config asks for what a teacher of another tokenizer does not support."""
    who = f"teachers[{member['name']!r}]"
    if not task.aligns_tokenizers:
        raise ValueError(
            f"{who} reads another tokenizer than the student; the {task.name} task distils only teachers that "
            "share the student's tokenizer (teachers of other tokenizers: a causal LM)"
        )
    task.use_processor(student_processor)
    prefix = member_prefix(index)
    if task.use_member_tokenizer(prefix, processor, who) is None:
        return None
    try:
        check_cross_tokenizer(sub)
        teacher_config = AutoConfig.from_pretrained(
            sub.teacher_model_name_or_path, revision=sub.teacher_model_revision
        )
        check_output_layer("teacher", teacher_config, processor)
        check_output_layer("student", student.config, student_processor)
    except ValueError as error:
        raise ValueError(f"{who} (model {sub.teacher_model_name_or_path!r}): {error}") from None
    return prefix
