"""The synthetic teachers: the target that keeps only some of the teacher's knowledge levels."""

from __future__ import annotations

from dataclasses import dataclass

from hf_kd.config.checks import Group, check_choice
from hf_kd.config.docs import documented
from hf_kd.teachers.synthetic import SYNTHETIC_KINDS


@documented()
@dataclass
class SyntheticArgs(Group):
    r"""Synthetic teachers (docs/knowledge.md#synthetic-teachers)

    Parameters:
        synthetic_teacher (`str`, *optional*, defaults to `"kd"`):
            The target distilled: `"kd"` (the teacher's own distribution), or a synthetic teacher that
            keeps only some knowledge levels: `"none"` (α = 0, labels only), `"ls"` (uniform: label
            smoothing), `"kd_pt"` (the teacher's p_t with a uniform tail), `"kd_sim"` (class-similarity
            targets) or `"kd_topk"` (the teacher's top-k with a uniform tail).
        synthetic_topk (`float` or `None`, *optional*, defaults to `None`):
            k of `synthetic_teacher="kd_topk"` (required there): a whole count ≥ 1, or a fraction of the
            classes in (0, 1).
        synthetic_sim_temperature (`float`, *optional*, defaults to `1.0`):
            β > 0 of `synthetic_teacher="kd_sim"`: the target is softmax(S[t] / β), S the teacher's class
            similarity.
    """

    synthetic_teacher: str = "kd"
    synthetic_topk: float | None = None
    synthetic_sim_temperature: float = 1.0

    def check(self) -> None:
        check_choice("synthetic_teacher", self.synthetic_teacher, SYNTHETIC_KINDS)
        if self.synthetic_teacher == "kd_topk" and (self.synthetic_topk is None or self.synthetic_topk <= 0):
            raise ValueError(
                f"synthetic_topk={self.synthetic_topk!r}: synthetic_teacher='kd_topk' needs a k > 0"
            )
        if not self.synthetic_sim_temperature > 0:
            raise ValueError(f"synthetic_sim_temperature={self.synthetic_sim_temperature!r} must be > 0")
