"""The project's scripts run in subprocesses, one process or several under ``torchrun``: one launcher for
every test that needs them.

Each ``torchrun`` gets a port of its own (:func:`free_port`), whatever else runs on the machine. A run
still going after its timeout is not just killed: each of its workers (in sessions of their own under
``torchrun``), or the process itself when it has none, gets SIGABRT with Python's fault handler armed, so
the failure shows where each one was stuck.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(ROOT),
    "PYTHONFAULTHANDLER": "1",  # SIGABRT prints every thread's Python stack
}


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The ``torchrun`` command line for ``nproc`` processes on this machine, on a port of its own."""
    port = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), *port]


def python() -> list[str]:
    return [str(BIN / "python")]


def _descendants(pid: int) -> list[int]:
    """Every process started (directly or not) by ``pid``, from ``/proc``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def launch(
    command: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root; fail the test with the end of its output when it exits
    non-zero, and with every process's stack when it runs past ``timeout`` seconds."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        hung = True
        workers = _descendants(process.pid)
        if workers:  # held, or a torchrun would stop the other workers once the first one aborts
            _signal([process.pid], signal.SIGSTOP)
        for pid in workers or [process.pid]:  # the workers, or else the launcher itself
            _signal([pid], signal.SIGABRT)
            time.sleep(1)  # one stack at a time
        _signal([process.pid, *workers], signal.SIGKILL)
        stdout, stderr = process.communicate()
    if hung:
        pytest.fail(
            f"{shlex.join(command)} still running after {timeout} s; the stacks of its stuck processes:\n"
            f"{stdout[-3000:]}\n{stderr[-20000:]}",
            pytrace=False,
        )
    assert process.returncode == 0, (
        f"{shlex.join(command)} failed (rc={process.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def cache_teacher(recipe: Path, output_dir: Path, nproc: int) -> subprocess.CompletedProcess:
    """``scripts/cache_teacher.py --config recipe`` into ``output_dir`` under torchrun on ``nproc`` processes."""
    script = ["scripts/cache_teacher.py", "--config", str(recipe), "--output_dir", str(output_dir)]
    return launch([*torchrun(nproc), *script], timeout=180)


class TeacherServer:
    """``scripts/serve_teacher.py`` for ``model_dir`` on a free port of 127.0.0.1, started now and waited
    for (its ``/v1/models`` answers); ``stop()`` ends it (SIGTERM, then SIGKILL), ``start()`` again on the
    same port. A context manager that stops it on exit."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        self.port, self.args, self.env, self.timeout = free_port(), [str(model_dir), *args], env, timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        model, *rest = self.args
        command = [*python(), "scripts/serve_teacher.py", "--model", model, "--port", str(self.port), *rest]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **ENV, **(self.env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"the teacher server exited (rc={self.process.returncode}):\n{self.process.stdout.read()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"the teacher server did not listen on port {self.port} within {self.timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> TeacherServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
