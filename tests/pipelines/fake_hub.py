"""A tiny Hugging Face hub on 127.0.0.1 serving one model repo from a local folder.

It answers what `huggingface_hub` asks for in `hf_hub_download` and `snapshot_download`:
the repo info (`/api/models/{repo}[/revision/{rev}]`), the recursive tree listing
(`/api/models/{repo}/tree/{rev}`) and the files (`HEAD|GET /{repo}/resolve/{rev}/{path}`,
with ETag, X-Repo-Commit and Content-Length). Every request is recorded in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves `folder` as the model repo `repo_id` (revision "main" = `COMMIT`)."""

    def __init__(
        self,
        repo_id: str,
        folder: Path,
        extra: dict[str, bytes] | None = None,
        delay: float = 0.0,  # seconds each file download takes at least
    ) -> None:
        self.repo_id = repo_id
        self.delay = delay
        self.files: dict[str, bytes] = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        self.files.update(extra or {})
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def fetched(self) -> list[str]:
        """Paths of the files whose content was requested (GET on resolve)."""
        marker = f"/{self.repo_id}/resolve/"
        with self._lock:
            return [
                path.split(marker, 1)[1].split("/", 1)[1]
                for method, path in self.requests
                if method == "GET" and path.startswith(marker)
            ]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append((self.command, path))
                api = f"/api/models/{hub.repo_id}"
                resolve = f"/{hub.repo_id}/resolve/"
                if path in (api, f"{api}/revision/main", f"{api}/revision/{COMMIT}"):
                    self._json(hub._info(), head)
                elif path in (f"{api}/tree/main", f"{api}/tree/{COMMIT}"):
                    self._json(hub._tree(), head)
                elif path.startswith(resolve):
                    rev, _, name = path[len(resolve) :].partition("/")
                    body = hub.files.get(name)
                    if rev not in ("main", COMMIT) or body is None:
                        self._missing(head)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.end_headers()
                    if not head:
                        time.sleep(hub.delay)
                        self.wfile.write(body)
                else:
                    self._missing(head)

            def _json(self, value: object, head: bool) -> None:
                body = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _missing(self, head: bool) -> None:
                body = b'{"error": "Entry not found"}'
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        return Handler

    def _info(self) -> dict:
        return {
            "id": self.repo_id,
            "modelId": self.repo_id,
            "sha": COMMIT,
            "private": False,
            "siblings": [{"rfilename": name} for name in self.files],
        }

    def _tree(self) -> list[dict]:
        return [
            {
                "type": "file",
                "path": name,
                "size": len(body),
                "oid": hashlib.sha1(body).hexdigest(),
            }
            for name, body in self.files.items()
        ]
