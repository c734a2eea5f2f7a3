"""Pushing to the Hugging Face Hub: a saved student (``push_student``) or any folder
(``upload_folder_to_repo``), and what a failed Hub request tells the user.

A failed push raises :class:`HubPushError`, whose one-line message says how to push again
(``scripts/push.py``). The model card pushed with a student is ``hf_kd.cards.model``'s.
``push_cache_to_hub`` uploads a verified teacher cache as a Hub dataset.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import HfHubHTTPError

from hf_kd.cards.dataset import write_dataset_card
from hf_kd.cards.model import retitle_card
from hf_kd.teachers.cache.load import load_teacher_cache

logger = logging.getLogger(__name__)

PUSH_IGNORE_PATTERNS = ("checkpoint-*", "teacher*")
"""Never uploaded by :func:`push_student`: Trainer checkpoints and any teacher file or folder."""

PUSH_SCRIPT = "scripts/push.py"
HTTP_ERROR = next((c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError"), HfHubHTTPError)
"""The base error of the HTTP client huggingface_hub speaks (``httpx`` in 1.x, ``httpx2`` in 2.x), read from
its own error class so that hf_kd imports neither: any HTTP status, refused or dropped connection, timeout."""
HUB_FAILURES = (HTTP_ERROR, ConnectionError)
"""What a failed Hub request raises: HTTP errors (4xx/5xx), refused or dropped connections, timeouts,
and ``HF_HUB_OFFLINE``."""


class HubPushError(RuntimeError):
    """A Hub request failed; the message is one line for the user (endpoint, failure, what to do)."""


def push_student(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload student distilled with hf_kd",
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload the saved student folder in one commit.

    Uploads everything ``save_pretrained`` wrote (safetensors weights, config, processor files,
    ``README.md``) except :data:`PUSH_IGNORE_PATTERNS`. An hf_kd card is first titled with ``repo_id``.
    A ``revision`` other than a pull-request ref is created as a branch first. ``token`` is passed to
    huggingface_hub and never logged. Returns the commit info (a ``str`` subclass: the commit URL).
    Raises :class:`HubPushError` (one line: endpoint, failure, the command that pushes again) when a
    Hub request fails; the repository is created first, without retries, so an unreachable Hub fails
    at once.
    """
    folder = Path(output_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the student with save_pretrained first")
    retitle_card(folder / "README.md", repo_id)
    try:
        return upload_folder_to_repo(
            folder,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(PUSH_IGNORE_PATTERNS),
        )
    except HUB_FAILURES as err:
        again = push_command(folder, repo_id, revision=revision, private=private)
        raise HubPushError(
            f"{hub_failure(err)}. The student is saved in {folder}; push it again with: {again}"
        ) from err


def push_cache_to_hub(
    cache_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload teacher cache made with hf_kd",
) -> CommitInfo:
    """Upload a verified cache directory (data, ``hf_kd_cache.json``) as a Hub dataset, with its dataset
    card written from the verified metadata."""
    cache = load_teacher_cache(cache_dir)
    write_dataset_card(cache.path, cache.metadata)
    return upload_folder_to_repo(
        cache.path,
        repo_id,
        repo_type="dataset",
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
    )


def prepare_repo(
    repo_id: str,
    *,
    repo_type: str = "model",
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` (of ``repo_type``) if needed and ``revision`` as a branch unless it is a
    pull-request ref; returns the full repo id. ``token`` is passed on, never logged."""
    api = HfApi()
    repo_url = api.create_repo(repo_id, repo_type=repo_type, token=token, private=private, exist_ok=True)
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_url.repo_id, branch=revision, repo_type=repo_type, token=token, exist_ok=True)
    return repo_url.repo_id


def hub_failure(err: BaseException) -> str:
    """What failed, in one line: the endpoint and the HTTP status or the connection error."""
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        request = err.response.request
        failure = f"HTTP {err.response.status_code} on {request.method} {request.url.path}"
    else:
        failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no answer'}"
    return f"Hub request to {HfApi().endpoint} failed ({failure})"


def push_command(
    folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool | None = None
) -> str:
    """The ``scripts/push.py`` command line that pushes ``folder`` to ``repo_id``."""
    argv = ["python", PUSH_SCRIPT, "--folder", str(folder), "--repo_id", repo_id]
    argv += ["--revision", revision] if revision else []
    argv += ["--private"] if private else []
    return shlex.join(argv)


def upload_folder_to_repo(
    folder: Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str,
    ignore_patterns: list[str] | None = None,
) -> CommitInfo:
    """Create the repository and branch (:func:`prepare_repo`) and upload ``folder`` in one commit.
    ``token`` is passed on, never logged."""
    full_id = prepare_repo(repo_id, repo_type=repo_type, token=token, private=private, revision=revision)
    logger.info("Pushing %s to %s %s (revision %s)", folder, repo_type, full_id, revision or "main")
    return HfApi().upload_folder(
        repo_id=full_id,
        folder_path=folder,
        repo_type=repo_type,
        commit_message=commit_message,
        token=token,
        revision=revision,
        ignore_patterns=ignore_patterns,
    )
