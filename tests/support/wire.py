"""A deliberately plain NDJSON client for end-to-end tests.

It speaks the wire format with nothing but `socket` and `json`, so the tests check what
any script in any language would see, independent of wangenctl's own client.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class WireClient:
    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    @classmethod
    def unix(cls, path: str | Path, timeout: float = 30.0) -> WireClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return cls(sock, timeout)

    @classmethod
    def tcp(cls, host: str, port: int, token: str | None = None, timeout: float = 30.0):
        client = cls(socket.create_connection((host, port)), timeout)
        if token is not None:
            reply = client.call("auth", {"token": token})
            assert reply.get("result") == {"ok": True}, reply
        return client

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- raw lines ---------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def read_message(self) -> Any:
        return json.loads(self.read_line())

    # --- JSON-RPC ------------------------------------------------------------------

    def call(self, method: str, params: Any = None) -> dict[str, Any]:
        """Send one request and return its reply; events that arrive first are kept."""
        self._next_id += 1
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._next_id}
        if params is not None:
            request["params"] = params
        self.send_raw(json.dumps(request).encode() + b"\n")
        while True:
            message = self.read_message()
            if isinstance(message, dict) and message.get("method") == "event":
                self.events.append(message["params"])
                continue
            assert message.get("id") == self._next_id, message
            return message

    def result(self, method: str, params: Any = None) -> Any:
        reply = self.call(method, params)
        assert "error" not in reply, reply
        return reply["result"]

    def next_event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        message = self.read_message()
        assert message.get("method") == "event", message
        return message["params"]

    def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        """Read events until one matches; the ones before it are returned in `seen`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.next_event()
            self.seen.append(event)
            if predicate(event):
                return event
        raise TimeoutError("no matching event")

    @property
    def seen(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_seen"):
            self._seen: list[dict[str, Any]] = []
        return self._seen


def job_event(job: int, *types: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("job") == job and e.get("type") in types


def progressed(job: int, step: int = 1) -> Callable[[dict[str, Any]], bool]:
    """The job has finished at least `step` denoising steps."""
    return lambda e: (
        e.get("job") == job
        and e.get("type") == "job.progress"
        and e["data"].get("phase") == "denoising"
        and e["data"]["step"] >= step
    )
