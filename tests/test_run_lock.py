"""One run per output_dir at a time: a second run into a folder another live run holds is refused by
name before anything is written; a lock left by a dead run is taken over; only the main process locks."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from distill_run import write_tiny_run

from hf_kd import parse_args, run_distillation
from hf_kd.run_lock import OutputDirInUseError, lock_path, output_dir_lock


def hold_lock(output_dir) -> subprocess.Popen:
    """Another process holding ``output_dir``'s lock until it is killed."""
    code = textwrap.dedent(
        f"""
        import time
        from hf_kd.run_lock import output_dir_lock
        with output_dir_lock({str(output_dir)!r}):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_held_output_dir_is_refused_then_a_dead_holder_is_taken_over(tmp_path):
    recipe = write_tiny_run(tmp_path)
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        with pytest.raises(
            OutputDirInUseError, match=rf"output_dir '{out}' is in use by another run \(pid {holder.pid} on"
        ):
            run_distillation(*parse_args(["--config", str(recipe)]))
        assert not out.exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
        holder.wait()
    assert lock_path(out).exists()  # left behind by the dead run, unlocked by the kernel
    run_distillation(*parse_args(["--config", str(recipe)]))
    assert (out / "model.safetensors").is_file()
    assert not lock_path(out).exists()  # released and removed at the end


def lock_elsewhere(output_dir) -> subprocess.CompletedProcess:
    """Take and release ``output_dir``'s lock from another process."""
    code = f"from hf_kd.run_lock import output_dir_lock\nwith output_dir_lock({str(output_dir)!r}): pass"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_lock_is_reentrant_and_other_processes_of_a_run_take_none(tmp_path):
    out = tmp_path / "out"
    with output_dir_lock(out):
        with output_dir_lock(out):  # run_distillation, then the trainer's train(): the same run
            pass
        refused = lock_elsewhere(out)  # still held after the inner block
        assert refused.returncode != 0 and "OutputDirInUseError" in refused.stderr
    assert not lock_path(out).exists() and lock_elsewhere(out).returncode == 0
    holder = hold_lock(out)
    try:
        with output_dir_lock(out, main=False):  # a non-main process of a run: no lock, no wait
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_capture_into_a_held_folder_is_refused_before_loading(tmp_path):
    from datasets import DatasetDict
    from tiny import sentiment_dataset

    from hf_kd.config import DataArguments
    from hf_kd.runs.capture import CacheArguments, run_capture

    DatasetDict(train=sentiment_dataset(8)).save_to_disk(str(tmp_path / "data"))
    data_args = DataArguments(
        task="text-classification", dataset_name=str(tmp_path / "data"), eval_split=None
    )
    cache = tmp_path / "cache"
    cache_args = CacheArguments(
        teacher_model_name_or_path="hub-user/tiny-teacher", output_dir=str(cache), use_cpu=True
    )
    holder = hold_lock(cache)
    try:
        with pytest.raises(
            OutputDirInUseError, match=rf"output_dir '{cache}' is in use by another run \(pid {holder.pid}"
        ):
            run_capture(data_args, cache_args)
    finally:
        holder.kill()
        holder.wait()
