"""Writing files and folders so that nothing is ever half-written: to a temporary name in the same
folder, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write through ``write(tmp_path)`` to a temporary file in ``path``'s folder, then rename it to
    ``path`` (readable by everyone, 0o644); on any error the temporary file is removed and ``path`` is
    left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates the file readable by its owner only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic_dir(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a folder through ``write(tmp_dir)`` into a new, empty temporary folder beside ``path``
    (its parents are created), then rename it to ``path`` (readable by everyone, 0o755). A folder
    already at ``path`` is replaced only once the new one is complete; on any error the temporary
    folder is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates the folder for its owner only
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _replace_dir(new: Path, path: Path) -> None:
    """Rename the folder ``new`` to ``path``; a folder already there is first renamed aside (and put
    back if the rename fails), then removed."""
    if not path.exists():
        os.replace(new, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    os.replace(path, old)  # onto the empty folder just made
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old)
