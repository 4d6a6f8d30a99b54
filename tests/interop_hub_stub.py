"""A minimal stand-in for the Hugging Face Hub HTTP API, on 127.0.0.1, for tests only.

Serves what ``huggingface_hub.hf_hub_download`` needs:

- ``HEAD/GET {endpoint}/{owner}/{name}/resolve/{revision}/{path}``: the file, with the
  ``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers; a missing file answers 404 with
  ``X-Error-Code: EntryNotFound`` (an unknown repo: ``RepoNotFound``);
- ``GET {endpoint}/api/models/{owner}/{name}/revision/{revision}``: repo info (sha, files).

Bound to 127.0.0.1 on a free port, threaded, and it shuts itself down after ``lifetime_s``
even if a test forgets to stop it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStub:
    """Repos are ``{repo_id: {path_in_repo: bytes}}``; ``requests`` logs ``(method, path)``."""

    def __init__(self, repos: dict[str, dict[str, bytes]], lifetime_s: float = 120.0) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                stub._serve(self, body=False)

            def do_GET(self) -> None:
                stub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.timer = threading.Timer(lifetime_s, self.stop)
        self.timer.daemon = True

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStub:
        self.thread.start()
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def _send(self, h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str],
              body: bool) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data)), "X-Repo-Commit": COMMIT}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path))
        parts = path.strip("/").split("/")
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._send(h, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
            info = {"id": repo, "modelId": repo, "sha": COMMIT,
                    "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return self._send(h, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
            data = self.repos[repo].get(filename)
            if data is None:
                return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            return self._send(h, 200, data, {"ETag": etag, "Content-Type": "application/octet-stream"}, body)
        return self._send(h, 404, b"", {}, body)


@contextmanager
def hub_stub(repos: dict[str, dict[str, bytes]], lifetime_s: float = 120.0) -> Iterator[HubStub]:
    """Run a :class:`HubStub` for the duration of a ``with`` block."""
    stub = HubStub(repos, lifetime_s).start()
    try:
        yield stub
    finally:
        stub.stop()
