"""One run per ``output_dir`` at a time: a lock beside the folder (``<parent>/.<name>.hf_kd.lock``, an
``flock`` the kernel drops when its process ends, however it ends), held by the main process only."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

_HELD: dict[Path, int] = {}
"""Locks this process holds, and how many times it took each (a run inside a run reuses the lock)."""


class OutputDirInUseError(RuntimeError):
    """Another run, alive, writes into the same ``output_dir``."""


def lock_path(output_dir: str | os.PathLike) -> Path:
    """Where the lock of ``output_dir`` lives: beside it, so the folder itself holds nothing of it."""
    folder = Path(output_dir).expanduser().absolute()
    return folder.parent / f".{folder.name}.hf_kd.lock"


def _acquire(path: Path, output_dir: str | os.PathLike) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, the file being the one at ``path``
    (a lock file unlinked by its previous holder between our open and our lock is opened again)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirInUseError(
                f"output_dir {str(output_dir)!r} is in use by another run "
                f"({holder}): two runs in one folder would mix their checkpoints. Wait for it to end, or pick "
                "another output_dir"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, *, main: bool = True) -> Iterator[None]:
    """Hold ``output_dir``'s lock for the block, or raise :class:`OutputDirInUseError` naming the live run
    that holds it (its pid, host and start time). Released when the block ends (the lock file removed)
    and, should the process die, by the kernel: a lock left by a dead run is taken over. Processes other
    than the ``main`` one take no lock (and so never wait on it); taking it again inside the block is free."""
    path = lock_path(output_dir)
    if not main:
        yield
        return
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, output_dir)
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode())
    _HELD[path] = 1
    try:
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the unlock: whoever opens it next makes a new one
        os.close(fd)
