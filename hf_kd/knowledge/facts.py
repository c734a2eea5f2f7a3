"""What the outcome of a run is judged from: a finished run's facts (:class:`RunFacts`, read from its
folder by ``hf_kd.runs.run_record``) and the rules of thumb that draw the outcome's lines
(:data:`OUTCOME_THRESHOLDS`). Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_kd.knowledge.budget import BUDGET_TOLERANCE

OUTCOME_THRESHOLDS = {
    "confidence": 0.9,
    "budget_tolerance": BUDGET_TOLERANCE,
    "still_improving": 0.02,
    "still_falling": 0.1,
    "soft_not_learnt": 0.5,
    "low_agreement": 0.8,
    "size_ratio": 5.0,
    "term_dominance": 10.0,
    "class_deficit": 0.1,
    "class_min_items": 5,
}
"""Where the outcome's diagnoses draw their lines (rules of thumb from the digits runs of BENCHMARKS.md,
"When KD does not help"; read the numbers next to them):

- ``confidence``: the verdict's t interval of the mean gain (paired by seed: mean ± t·s/√n over the n
  per-seed gains, t the Student quantile at (1 + confidence)/2 with n − 1 degrees of freedom; unpaired:
  Welch's). "Helped" when the whole interval is above 0, "hurt" when below: each a one-sided test at
  (1 − confidence)/2 = 5 %. At 3 seeds the mean gain must exceed 1.69× the per-seed gains' std, at 5
  seeds 0.95×, at 10 seeds 0.55×; one seed decides nothing.
- ``budget_tolerance``: the KD run and its twin differ by more than this share in optimizer steps, rows
  per step, labelled rows, or labelled rows seen (except the KD run's own unlabelled rows at equal
  steps, see :func:`hf_kd.knowledge.budget.compare_budgets`) → unequal budgets: the comparison measures
  the budget, not the teacher, and the verdict is "cannot judge".
- ``still_improving``: with ≥ 4 evaluations logged during training (``eval_strategy: steps``), the
  compared metric's mean over the last quarter of the learning-rate time (``Σ η`` up to each step,
  :mod:`hf_kd.knowledge.progress`) exceeds the quarter before by at least this → the student was still
  getting better when it stopped: under-trained. The held-out metric is the direct signal; a training
  loss keeps falling while a student memorises a few labels. On digits (evaluated every 10 % of 720
  cosine steps) converged runs rose at most 0.013 (7 of 539 images).
- ``still_falling``: without such evaluations, the soft loss (the training loss when there is no soft
  term) made at least this share of its whole fall (first quarter's mean → last quarter's) over the
  last quarter of the learning-rate time → still falling: under-trained. A straight line scores 1/3, a
  flattened curve near 0 (a relative drop would flag a loss that is tiny and still halving). On the
  learning-rate clock a decaying schedule does not flatten the curve: on the standard-library text
  runs of BENCHMARKS.md, "When KD does not help", an 800-step linear-decay KD run scores 0.22 there
  (0.075 on the step axis: "flat") and gained 7.4 points at twice the steps; at 1,600 steps, on a
  plateau, it scores 0.07.
- ``soft_not_learnt``: the soft loss at the end is at least this share of its first logged value → the
  student has not come close to the teacher on the transfer rows.
- ``low_agreement``: student–teacher agreement on the evaluation split below it, with the soft loss no
  longer falling and the teacher at least ``size_ratio`` times larger → a capacity gap.
- ``term_dominance``: over the first quarter of training, the mean gradient norm of one weighted term
  on the student's logits (``grad_norm_hard`` = ‖∂(1 − α)·CE/∂z‖, ``grad_norm_soft`` = ‖∂α·s·D/∂z‖,
  logged by the trainer once per logging window) is this many times the other's → the other term
  hardly steers the update (the parameters' gradient is the same Jacobian applied to their sum).
- ``class_deficit`` / ``class_min_items``: the teacher is less accurate than the student by at least this
  much on a class with at least this many evaluation items → it teaches that class wrongly.
"""


@dataclass(frozen=True)
class RunFacts:
    """What one finished run's folder records: its settings, budget, final scores and training log."""

    name: str
    """The run's folder (for the sentences)."""
    seed: int
    alpha: float
    temperature: float
    temperature_squared: bool = True
    metric: float | None = None
    """The compared final evaluation metric of the student (e.g. ``eval_accuracy``)."""
    teacher_metric: float | None = None
    """The same metric of the teacher on the same split, when the run evaluated it."""
    optimizer_steps: int = 0
    epochs: float = 0.0
    labelled_rows: int = 0
    """Training rows with a label (after ``num_labeled_examples`` and any drop)."""
    unlabelled_rows: int = 0
    """Training rows without a label the run kept (soft term only)."""
    inert_rows_dropped: int = 0
    """Unlabelled rows dropped because nothing learns from them at this setting (α = 0 or no soft term)."""
    batch_size: int = 0
    """Rows per optimizer step (all processes, gradient accumulation included)."""
    student_parameters: int | None = None
    teacher_parameters: int | None = None
    agreement: float | None = None
    """Share of evaluation rows where student and teacher predict the same class."""
    losses: tuple[dict[str, float], ...] = field(default_factory=tuple)
    """The logged training entries in order: ``step``, ``loss`` and, when logged, ``learning_rate``,
    ``loss_hard``, ``loss_soft``, ``grad_norm_hard``, ``grad_norm_soft`` (the weighted terms' gradient
    norms)."""
    evals: tuple[dict[str, float], ...] = field(default_factory=tuple)
    """The evaluations logged during training in order: ``step`` and the compared ``metric``."""

    @property
    def uses_soft_term(self) -> bool:
        return self.alpha > 0

    @property
    def labelled_rows_seen(self) -> float:
        """Labelled rows fed to the loss: every epoch passes each labelled row once."""
        return self.epochs * self.labelled_rows

    @property
    def rows_seen(self) -> int:
        return self.optimizer_steps * self.batch_size
