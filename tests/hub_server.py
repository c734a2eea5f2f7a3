"""A local stand-in for the Hugging Face Hub API, enough for ``create_repo`` + ``upload_folder``.

The real ``huggingface_hub`` client talks HTTP to it: nothing in the client is mocked. The server
answers the routes that huggingface_hub 2.4 calls while creating a repo, creating a branch and
uploading a folder, and records what it received so tests can assert on it:

- ``GET  /api/agent-harnesses``                      registry read when request headers are built
- ``POST /api/repos/create``                         JSON ``{name, organization, visibility, type}``
- ``POST /api/validate-yaml``                        JSON ``{content, repoType}``, README metadata check
- ``POST /api/{type}s/{ns}/{name}/branch/{branch}``  create a branch from ``main``
- ``POST /api/{type}s/{ns}/{name}/preupload/{rev}``  answers ``uploadMode: "regular"`` for every file,
  so every file's content arrives base64-encoded inline in the commit (no LFS or Xet transfer)
- ``POST /api/{type}s/{ns}/{name}/commit/{rev}``     NDJSON: a header line, then one line per file

Any other request gets a 404 whose body names the unhandled route, and is listed in
``LocalHub.unknown_requests``.

Faults: :meth:`LocalHub.fail_after` makes every request after the first ``creates`` repo creations fail,
with an HTTP status (e.g. 500) or ``"close"`` (the connection is closed without an answer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

USER = "local-user"
_REPO_ROUTE = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo_id>[^/]+/[^/]+)/(?P<action>preupload|commit|branch)/(?P<rev>.+)$"
)


class HubError(Exception):
    """An error answered to the client: HTTP status, message, the Hub's ``X-Error-Code`` and any other
    fields of the JSON answer."""

    def __init__(self, status: int, message: str, error_code: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.fields = fields


@dataclass
class Repo:
    """A repository on the local Hub: its settings and, per branch, its files (path → bytes)."""

    repo_type: str
    visibility: str | None
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


@dataclass
class Commit:
    """One commit received by the local Hub."""

    repo_id: str
    revision: str
    summary: str
    description: str
    paths: list[str]
    oid: str


class LocalHub:
    """A threaded HTTP server on 127.0.0.1 (free port) that records repos, commits and requests.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str]] = []
        self.authorizations: list[str] = []
        self.validated_readmes: list[str] = []
        self.unknown_requests: list[str] = []
        self.fault: int | str | None = None
        self.fault_after_creates = 0
        self.creates = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)

    @property
    def url(self) -> str:
        """The endpoint to give huggingface_hub, e.g. ``http://127.0.0.1:54321``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at branch ``revision`` (path → bytes)."""
        return self.repos[repo_id].branches[revision]

    def fail_after(self, fault: int | str, creates: int = 0) -> None:
        """Answer every request after the first ``creates`` repo creations with the HTTP status ``fault``, or
        close its connection unanswered when ``fault`` is ``"close"``."""
        self.fault, self.fault_after_creates = fault, creates

    def _faulty(self) -> bool:
        return self.fault is not None and self.creates >= self.fault_after_creates

    def start(self) -> LocalHub:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- routes: each takes the JSON (or raw NDJSON) body and returns the JSON answer -------------

    def dispatch(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        """Route one request; raises :class:`HubError` for answers other than 200."""
        if method == "GET" and path == "/api/agent-harnesses":
            return {"standardEnvVars": [], "harnesses": {}}
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        match = _REPO_ROUTE.match(path)
        if method == "POST" and match:
            repo_type = match["type"][:-1]
            repo = self._repo(match["repo_id"], repo_type)
            revision = unquote(match["rev"])
            if match["action"] == "branch":
                return self._create_branch(repo, revision)
            if match["action"] == "preupload":
                return self._preupload(repo, revision, json.loads(body))
            return self._commit(repo, match["repo_id"], revision, body)
        self.unknown_requests.append(f"{method} {path}")
        raise HubError(404, f"hub_server: no route for {method} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> dict[str, Any]:
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        url = f"{self.url}/{repo_id}" if repo_type == "model" else f"{self.url}/{repo_type}s/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo", url=url)  # as the Hub answers
        self.repos[repo_id] = Repo(repo_type=repo_type, visibility=payload.get("visibility"))
        self.creates += 1
        return {"url": url, "name": repo_id}

    def _validate_yaml(self, payload: dict[str, Any]) -> dict[str, Any]:
        content = payload["content"]
        self.validated_readmes.append(content)
        if content.startswith("---\n"):
            try:
                yaml.safe_load(content[4:].split("\n---", 1)[0])
            except yaml.YAMLError as err:
                raise HubError(400, f"Invalid YAML in README.md: {err}") from err
        return {"errors": [], "warnings": []}

    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or repo.repo_type != repo_type:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _create_branch(self, repo: Repo, branch: str) -> dict[str, Any]:
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        repo.branches[branch] = dict(repo.branches["main"])
        return {}

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> dict[str, Any]:
        _branch_files(repo, revision)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]
        ]
        return {"files": files, "commitOid": None}

    def _commit(self, repo: Repo, repo_id: str, revision: str, body: bytes) -> dict[str, Any]:
        files = _branch_files(repo, revision)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "Commit body must start with a header line")
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                raise HubError(400, f"hub_server only takes inline base64 files, got {line['key']!r}")
            added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        files.update(added)
        oid = hashlib.sha1(f"{repo_id}@{revision}#{len(self.commits)}".encode()).hexdigest()
        header = lines[0]["value"]
        self.commits.append(
            Commit(repo_id, revision, header["summary"], header.get("description", ""), sorted(added), oid)
        )
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


def _branch_files(repo: Repo, revision: str) -> dict[str, bytes]:
    """The files of branch ``revision``, or the Hub's 404 ``RevisionNotFound``."""
    if revision not in repo.branches:
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    return repo.branches[revision]


def _handler_class(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to ``hub``: records each request, answers JSON."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def _answer(self, method: str) -> None:
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with hub._lock:
                hub.requests.append((method, path))
                hub.authorizations.append(self.headers.get("Authorization", ""))
                fault = hub.fault if hub._faulty() else None
                if fault == "close":
                    self.close_connection = True
                    return
                try:
                    if fault is not None:
                        raise HubError(fault, "hub_server: injected fault")
                    status, answer, error_code = 200, hub.dispatch(method, path, body), None
                except HubError as err:
                    status, answer, error_code = err.status, {"error": str(err), **err.fields}, err.error_code
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if error_code:
                self.send_header("X-Error-Code", error_code)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the default per-request line on stderr."""

    return Handler
