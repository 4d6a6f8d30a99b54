"""A local stand-in for the Hugging Face Hub's HTTP API, for offline round-trip tests.

It implements the endpoints ``huggingface_hub`` (2.x) calls for

- ``create_repo`` / ``repo_info`` / ``repo_exists`` (``POST /api/repos/create``,
  ``GET /api/models/{repo}[/revision/{rev}]``),
- ``upload_folder`` / ``upload_file`` / ``create_commit`` with *regular* uploads (``POST
  .../preupload/{rev}`` always answers ``uploadMode: regular``, so file contents travel
  base64-encoded inside the ``POST .../commit/{rev}`` NDJSON body; no LFS, no Xet),
- ``hf_hub_download`` / ``snapshot_download`` / ``get_hf_file_metadata`` / ``list_repo_files``
  (``HEAD``/``GET /{repo}/resolve/{rev}/{path}``, ``GET /api/models/{repo}/tree/{rev}[/{path}]``;
  no ``X-Xet-Hash`` header, so the plain HTTP download path runs),
- README metadata checks (``POST /api/validate-yaml``, always valid).

so that the real client code runs end to end. Repositories live in memory. The server binds
127.0.0.1 on a free port, serves from daemon threads, refuses bodies over ``max_body_bytes``
and shuts itself down after ``max_lifetime_s`` even if a test forgets to.

Usage (also a pytest fixture, ``hub_stub``, re-exported by test modules)::

    with local_hub() as hub:           # points huggingface_hub at the stub, online, temp cache
        upload_saes_to_huggingface({"sae": path}, hf_repo_id="org/repo")
        SAE.from_pretrained("org/repo", "sae")
        hub.files("org/repo")          # {path: bytes}
        hub.add_repo("org/other", {"cfg.json": b"{}"})  # publish files without the client
        hub.requests                   # [(method, path), ...] as received

Any endpoint it does not implement answers 501 and is recorded in ``hub.unhandled``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_TYPE = r"(?P<type>models|datasets|spaces)"


@dataclass
class _Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    private: bool = False

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class HubStub:
    """The in-memory Hub and its HTTP server (use :func:`local_hub` to run it)."""

    def __init__(self, max_body_bytes: int = 256 * 1024**2, max_lifetime_s: float = 300.0):
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.max_body_bytes = max_body_bytes
        self.max_lifetime_s = max_lifetime_s
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStub:
        hub = self

        class Handler(_Handler):
            stub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="hub-stub",
            daemon=True,
        )
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ inspection
    def files(self, repo_id: str) -> dict[str, bytes]:
        """A copy of ``repo_id``'s files at its head."""
        with self.lock:
            return dict(self.repos[repo_id].files)

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        """Publish ``files`` (``{path_in_repo: bytes}``) as ``repo_id`` in one commit, as if
        someone had uploaded them (for tests that only download)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, _Repo())
            self._commit(repo, dict(files), [], f"add {repo_id}")

    # ------------------------------------------------------------------ operations
    def _commit(self, repo: _Repo, adds: dict[str, bytes], deletes: list[str], summary: str) -> str:
        h = hashlib.sha1(repo.sha.encode() + summary.encode())
        for p in sorted(adds):
            h.update(p.encode() + hashlib.sha256(adds[p]).digest())
        for p in deletes:
            h.update(b"-" + p.encode())
        sha = h.hexdigest()
        for p in deletes:
            repo.files.pop(p, None)
            for q in [q for q in repo.files if q.startswith(p.rstrip("/") + "/")]:
                repo.files.pop(q)
        repo.files.update(adds)
        repo.commits.append(sha)
        return sha


class _Handler(BaseHTTPRequestHandler):
    stub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet)
        return

    # ------------------------------------------------------------------ helpers
    def _send(
        self,
        status: int,
        body: bytes | dict[str, Any] | list[Any] = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.send_response(status)
        if isinstance(body, (dict, list)):
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head and data:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n > self.stub.max_body_bytes:
            raise ValueError(f"request body of {n} bytes exceeds the stub's limit")
        return self.rfile.read(n) if n else b""

    def _repo(self, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.stub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        return repo

    def _info(self, repo_id: str, repo: _Repo) -> dict[str, Any]:
        return {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": repo.sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": None,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(repo.files.items())],
        }

    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.stub.lock:
            self.stub.requests.append((method, path))
        try:
            for pattern, name in _ROUTES:
                if pattern[0] != method:
                    continue
                m = re.fullmatch(pattern[1], path)
                if m:
                    with self.stub.lock:
                        getattr(self, name)(**m.groupdict())
                    return
            with self.stub.lock:
                self.stub.unhandled.append((method, path))
            self._error(
                501, None, f"hub stub: {method} {path} is not implemented", head=method == "HEAD"
            )
        except (BrokenPipeError, ConnectionResetError):  # client went away
            return
        except Exception as e:  # report as a server error rather than hanging the client
            self._error(500, None, f"hub stub error: {e!r}", head=method == "HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    # ------------------------------------------------------------------ endpoints
    def create_repo(self) -> None:
        payload = json.loads(self._body() or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        url = f"{self.stub.endpoint}/{repo_id}"
        if repo_id in self.stub.repos:
            self._send(409, {"error": "You already created this model repo", "url": url})
            return
        self.stub.repos[repo_id] = _Repo(private=bool(payload.get("private")))
        self._send(200, {"url": url, "name": repo_id})

    def repo_info(self, type: str, repo: str, rev: str | None = None) -> None:  # noqa: A002
        r = self._repo(repo)
        if r is not None:
            self._send(200, self._info(repo, r))

    def repo_info_rev(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        self.repo_info(type, repo, rev)

    def preupload(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        payload = json.loads(self._body() or b"{}")
        if self._repo(repo) is None:
            return
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in payload.get("files", [])
        ]
        self._send(200, {"files": files, "commitOid": self.stub.repos[repo].sha})

    def commit(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        body = self._body()
        r = self._repo(repo)
        if r is None:
            return
        adds: dict[str, bytes] = {}
        deletes: list[str] = []
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    self._error(
                        400, None, f"hub stub: unsupported file encoding {value.get('encoding')!r}"
                    )
                    return
                adds[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"])
            else:  # lfsFile / copies: the stub forces regular uploads
                self._error(
                    400,
                    None,
                    f"hub stub: commit operation {key!r} is not supported (regular uploads only)",
                )
                return
        sha = self.stub._commit(r, adds, deletes, summary)
        self._send(
            200,
            {
                "commitUrl": f"{self.stub.endpoint}/{repo}/commit/{sha}",
                "commitOid": sha,
                "commitMessage": summary,
                "pullRequestUrl": None,
                "success": True,
            },
        )

    def _resolve(self, repo: str, rev: str, path: str, head: bool) -> None:
        r = self._repo(repo, head=head)
        if r is None:
            return
        if rev not in ("main", r.sha) and rev not in r.commits:
            self._error(404, "RevisionNotFound", f"Revision {rev} not found", head=head)
            return
        data = r.files.get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} does not exist at {rev}", head=head)
            return
        etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        self._send(
            200,
            data,
            {
                "X-Repo-Commit": r.sha,
                "ETag": f'"{etag}"',
                "Content-Type": "application/octet-stream",
            },
            head=head,
        )

    def tree(self, type: str, repo: str, rev: str, path: str | None = None) -> None:  # noqa: A002
        r = self._repo(repo)
        if r is None:
            return
        query = urlsplit(self.path).query
        recursive = "recursive=true" in query or "recursive=True" in query
        prefix = (path.strip("/") + "/") if path else ""
        entries: dict[str, dict[str, Any]] = {}
        for p, data in sorted(r.files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :].split("/")
            for i in range(1, len(rel)):  # folders on the way
                d = prefix + "/".join(rel[:i])
                if recursive or i == 1:
                    entries.setdefault(
                        d,
                        {
                            "type": "directory",
                            "path": d,
                            "oid": hashlib.sha1(d.encode()).hexdigest(),
                            "size": 0,
                        },
                    )
            if recursive or len(rel) == 1:
                entries[p] = {
                    "type": "file",
                    "path": p,
                    "size": len(data),
                    "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                }
        if path and not entries:
            self._error(404, "EntryNotFound", f"{path} does not exist at {rev}")
            return
        self._send(200, list(entries.values()))

    def validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        if not isinstance(content, str):
            self._send(400, {"errors": [{"message": "content must be a string"}]})
            return
        self._send(200, {"errors": [], "warnings": []})

    def resolve_get(self, repo: str, rev: str, path: str) -> None:
        self._resolve(repo, rev, path, head=False)

    def resolve_head(self, repo: str, rev: str, path: str) -> None:
        self._resolve(repo, rev, path, head=True)


_ROUTES: list[tuple[tuple[str, str], str]] = [
    (("POST", r"/api/repos/create"), "create_repo"),
    (("POST", r"/api/validate-yaml"), "validate_yaml"),
    (("GET", rf"/api/{_TYPE}/{_REPO}/revision/(?P<rev>[^/]+)"), "repo_info_rev"),
    (("GET", rf"/api/{_TYPE}/{_REPO}"), "repo_info"),
    (("POST", rf"/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    (("POST", rf"/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    (("GET", rf"/api/{_TYPE}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), "tree"),
    (("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve_get"),
    (("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve_head"),
]


@contextlib.contextmanager
def local_hub(
    cache_dir: str | os.PathLike[str] | None = None, max_lifetime_s: float = 300.0
) -> Iterator[HubStub]:
    """Run a :class:`HubStub` and point ``huggingface_hub`` at it for the duration.

    Patches ``huggingface_hub.constants`` (endpoint, URL template, offline flag, cache dir) and
    the module-level ``HfApi`` that functions such as ``huggingface_hub.create_repo`` are bound
    to, plus ``HF_ENDPOINT``/``HF_HUB_OFFLINE``/``HF_HUB_DISABLE_XET`` in the environment; all
    restored on exit. Downloads go to ``cache_dir`` (default: a fresh temporary folder).
    """
    from huggingface_hub import constants, hf_api

    hub = HubStub(max_lifetime_s=max_lifetime_s).start()
    tmp = tempfile.TemporaryDirectory(prefix="hub-stub-cache-") if cache_dir is None else None
    cache = str(cache_dir) if cache_dir is not None else tmp.name  # type: ignore[union-attr]
    saved_consts = {
        k: getattr(constants, k)
        for k in (
            "ENDPOINT",
            "HUGGINGFACE_CO_URL_TEMPLATE",
            "HF_HUB_OFFLINE",
            "HF_HUB_CACHE",
            "HF_HUB_DISABLE_TELEMETRY",
        )
    }
    saved_env = {
        k: os.environ.get(k)
        for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_CACHE")
    }
    saved_api_endpoint = hf_api.api.endpoint
    try:
        constants.ENDPOINT = hub.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = (
            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        constants.HF_HUB_OFFLINE = False
        constants.HF_HUB_CACHE = cache
        constants.HF_HUB_DISABLE_TELEMETRY = True
        hf_api.api.endpoint = hub.endpoint
        os.environ.update(
            {
                "HF_ENDPOINT": hub.endpoint,
                "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_CACHE": cache,
            }
        )
        yield hub
    finally:
        for k, v in saved_consts.items():
            setattr(constants, k, v)
        hf_api.api.endpoint = saved_api_endpoint
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hub.stop()
        if tmp is not None:
            tmp.cleanup()


def _wait_port_closed(
    hub: HubStub, timeout: float = 5.0
) -> None:  # pragma: no cover - debugging aid
    t0 = time.time()
    while hub._server is not None and time.time() - t0 < timeout:
        time.sleep(0.05)


try:  # a pytest fixture when pytest is importable (test modules: `from tests.hub_stub import hub_stub`)
    import pytest

    @pytest.fixture
    def hub_stub(tmp_path: Any) -> Iterator[HubStub]:
        """A running :class:`HubStub` with ``huggingface_hub`` pointed at it (cache in tmp_path)."""
        with local_hub(cache_dir=tmp_path / "hf-cache") as hub:
            yield hub
except ImportError:  # pragma: no cover
    pass

__all__ = ["HubStub", "hub_stub", "local_hub"]
