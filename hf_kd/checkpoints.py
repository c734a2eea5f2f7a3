"""Training checkpoints: which one a run resumes from, reading its weights back whole, and what a failed
save says.

A checkpoint ``checkpoint-N`` is complete when its ``trainer_state.json`` exists: ``DistillationTrainer``
(through :class:`CompleteCheckpointsMixin`) writes every checkpoint inside :data:`STAGING_FOLDER` and renames it to ``checkpoint-N`` only once it is
whole, so an incomplete one is left only by an older version or by a process killed mid-rename.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, is_sagemaker_mp_enabled

from hf_kd.files import write_atomic
from hf_kd.modeling import load_pretrained

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint by transformers.Trainer
JIT_SENTINEL = "checkpoint-is-incomplete.txt"  # transformers' own mark of a checkpoint being saved
STAGING_FOLDER = "_partial_checkpoint"
MODEL_STAGING_FOLDER = "_partial_model"
"""Where :meth:`CompleteCheckpointsMixin.save_model` writes a model before moving its files into place."""
"""Where a checkpoint is written before it is renamed into place (its leading ``_`` also keeps it out of
Trainer's Hub uploads of ``output_dir``)."""
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LOW_SPACE = 16 * 2**20  # bytes: less free space than this after a failed write means the disk filled up


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-N`` with the highest N in ``folder`` (None when there is none); an
    incomplete one (no ``trainer_state.json``) is skipped with a log line."""
    folder = Path(folder)
    found = sorted(
        (int(match.group(1)), path)
        for path in (folder.iterdir() if folder.is_dir() else ())
        if path.is_dir() and (match := _CHECKPOINT.match(path.name))
    )
    for _, path in reversed(found):
        if is_complete(path):
            return path
        logger.warning("Skipping %s: an incomplete checkpoint (its save was interrupted)", path)
    return None


def is_complete(checkpoint: Path) -> bool:
    """A whole checkpoint: its trainer state written, no mark of a save in progress."""
    return (checkpoint / TRAINER_STATE).is_file() and not (checkpoint / JIT_SENTINEL).exists()


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from: ``True`` = the latest complete one in ``output_dir``, a path = that
    checkpoint, which must be complete; None/False = start afresh. Errors name the field and the folder."""
    if value is None or value is False:
        return None
    if value is True:
        found = latest_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint: true, but output_dir={str(output_dir)!r} holds no complete "
                "checkpoint-N to resume from (drop the flag to start afresh)"
            )
        logger.info("Resuming from the latest checkpoint, %s", found)
        return str(found)
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={value!r}: no such checkpoint directory")
    if not is_complete(path):
        raise ValueError(
            f"resume_from_checkpoint={value!r} is an incomplete checkpoint (no {TRAINER_STATE}: its save "
            "was interrupted); resume from an earlier one, or pass true for the latest complete one"
        )
    return str(path)


def load_checkpoint_weights(model: PreTrainedModel, folder: str | os.PathLike) -> None:
    """Copy the weights saved in ``folder`` into ``model``, read by ``from_pretrained`` (safetensors).

    ``transformers.Trainer`` reads a checkpoint with ``load_state_dict(strict=False)`` on the file's raw
    names, but ``save_pretrained`` writes some models (ViT, for one) under their original names that only
    ``from_pretrained`` maps back: the unmatched weights silently kept their fresh values, so a resumed
    run trained another model. Here every parameter and buffer must be found (strict)."""
    loaded = load_pretrained(type(model), str(folder), dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)


def is_disk_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a failed write into ``folder`` ran out of space: ENOSPC in the error chain (safetensors
    and torch report it in their own exception types), or almost no space left on that disk."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    try:
        return shutil.disk_usage(folder).free < _LOW_SPACE
    except OSError:
        return False


def disk_full_error(error: BaseException, folder: str | os.PathLike, name: str) -> OSError:
    """The error a checkpoint save that filled the disk ends with: what, where, and what is left."""
    left = latest_checkpoint(folder)
    return OSError(
        errno.ENOSPC,
        f"disk full: no space left on the device of {str(folder)!r} while saving {name} "
        f"({type(error).__name__}: {error}). Nothing of {name} was kept; "
        + (
            f"the latest complete checkpoint is {left.name}: free some space and rerun with "
            "--resume_from_checkpoint true"
            if left is not None
            else "no checkpoint was completed yet: free some space and rerun"
        ),
        str(folder),
    )


def save_extras(extras: dict[str, nn.Module], folder: Path) -> None:
    """Each module of ``extras`` with parameters or buffers as ``folder/<name>.safetensors``."""
    for name, module in extras.items():
        state = {key: value.detach().contiguous().cpu() for key, value in module.state_dict().items()}
        if state:
            write_atomic(folder / f"{name}.safetensors", lambda path, state=state: save_file(state, path))


def load_extras(extras: dict[str, nn.Module], folder: str | os.PathLike) -> None:
    """Read each module of ``extras`` back from ``folder/<name>.safetensors`` (strict); a module with
    state whose file is missing is refused, since resuming would restart it from fresh values."""
    for name, module in extras.items():
        if not module.state_dict():
            continue
        path = Path(folder) / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"resume_from_checkpoint={str(folder)!r} has no {path.name}: the checkpoint was saved by a "
                f"run without this {name} (other feature-loss options, or an older hf_kd); resume with the "
                "options it was saved with, or start afresh"
            )
        logger.info("Loading the %s from %s", name, path)
        module.load_state_dict(load_file(path, device=str(next(iter(module.state_dict().values())).device)))


class CompleteCheckpointsMixin:
    """``transformers.Trainer`` overrides (mixed in before ``Trainer``) that make checkpoints whole: each is written into
    :data:`STAGING_FOLDER` and renamed into place once complete, and resuming or ``load_best_model_at_end``
    reads every weight back the way ``from_pretrained`` does (:func:`load_checkpoint_weights`)."""

    _saving_checkpoint = False  # True while _save_checkpoint writes into the staging folder

    def checkpoint_extras(self) -> dict[str, nn.Module]:
        """Modules trained beside the model but not part of it (a feature projection): each is saved as
        ``<name>.safetensors`` in every checkpoint, inside its complete-or-absent save, and read back on
        resume. None by default."""
        return {}

    # ---- checkpoints: read back the way from_pretrained reads them ----------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume with the checkpoint's weights, every one of them (see :func:`load_checkpoint_weights`),
        and those of the :meth:`checkpoint_extras`."""
        target = self.model if model is None else model
        if not self._loads_plain_weights(target, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            logger.info("Loading the student's weights from %s", resume_from_checkpoint)
            load_checkpoint_weights(target, resume_from_checkpoint)
        load_extras(self.checkpoint_extras(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's weights, every one of them."""
        best = self.state.best_model_checkpoint
        if not self._loads_plain_weights(self.model, best):
            return super()._load_best_model()
        logger.info(
            "Loading the best student (%s: %s) from %s",
            self.args.metric_for_best_model,
            self.state.best_metric,
            best,
        )
        load_checkpoint_weights(self.model, best)

    def _loads_plain_weights(self, model, folder: str) -> bool:
        """Whether ``folder`` holds a whole ``save_pretrained`` model that hf_kd reads itself (not a
        DeepSpeed/FSDP/SageMaker state or a PEFT adapter: those stay with Transformers)."""
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled or is_sagemaker_mp_enabled()
        return (
            not sharded
            and isinstance(model, PreTrainedModel)
            and any((Path(folder) / name).is_file() for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
        )

    # ---- checkpoints: visible only when complete ------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        """While a checkpoint is being saved, the folder it is written into (see :meth:`_save_checkpoint`)."""
        run_dir = super()._get_output_dir(trial)
        return str(Path(run_dir) / STAGING_FOLDER) if self._saving_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer._save_checkpoint`` written into ``<output_dir>/_partial_checkpoint/checkpoint-N`` and
        renamed to ``<output_dir>/checkpoint-N`` once whole, so no run ever sees a partial checkpoint.
        A failed save removes what it wrote; one that filled the disk says so (:func:`disk_full_error`)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING_FOLDER
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a process killed mid-save
        self.accelerator.wait_for_everyone()
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                save_extras(self.checkpoint_extras(), staging / name)
            self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are written
            if self.args.should_save:
                self._put_checkpoint_in_place(staging / name, run_dir / name)
        except Exception as error:
            full = is_disk_full(error, run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise disk_full_error(error, run_dir, name) from error
            raise
        finally:
            self._saving_checkpoint = False
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (the final student, or any save outside a checkpoint) written into
        ``<output_dir>/_partial_model/`` and its files moved into ``output_dir`` only once all are written
        (renames, which need no space): a save that fails leaves none of them, and one that filled the disk
        says so (:func:`disk_full_error`). Checkpoints' own saves are staged by :meth:`_save_checkpoint`."""
        if _internal_call or self._saving_checkpoint:
            return super().save_model(output_dir, _internal_call)
        target = Path(output_dir or self.args.output_dir)
        staging = target / MODEL_STAGING_FOLDER
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a process killed mid-save
        self.accelerator.wait_for_everyone()
        try:
            super().save_model(str(staging), _internal_call)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                for path in sorted(staging.iterdir()):
                    if path.is_dir() and (target / path.name).exists():
                        shutil.rmtree(target / path.name)
                    os.replace(path, target / path.name)
                staging.rmdir()
        except Exception as error:
            full = is_disk_full(error, target)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise disk_full_error(error, target, "the final model") from error
            raise
        self.accelerator.wait_for_everyone()

    def _put_checkpoint_in_place(self, written: Path, final: Path) -> None:
        """Rename a complete checkpoint into place, the best-checkpoint path pointing at its final name,
        then delete the checkpoints ``save_total_limit`` drops (Trainer did so in the staging folder)."""
        if self.state.best_model_checkpoint == str(written):
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(written / TRAINER_STATE))
        if final.exists():  # a checkpoint of the same step from an earlier run, replaced only now
            shutil.rmtree(final)
        written.rename(final)
        written.parent.rmdir()
        rotate_checkpoints(
            output_dir=str(final.parent),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )
