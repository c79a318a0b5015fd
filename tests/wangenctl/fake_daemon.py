"""A scripted stand-in for wangend that speaks the wire format and nothing else.

Client and CLI tests need replies in a chosen order, events between them, error replies
and dropped connections on cue; the real daemon cannot be told to do those things. Each
method is a handler `async def (conn, params) -> result`; a handler may push events with
`conn.event(...)` before it returns, raise `Reply(code, message, data)` for an error
reply, or raise `Hangup` to drop the connection.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
from anyio.streams.buffered import BufferedByteReceiveStream

# The `status` result of an idle daemon whose last event was seq 7.
IDLE_STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "pid": 1,
    "uptime": 2.0,
    "device": "cpu",
    "paused": False,
    "pause_mode": None,
    "model": None,
    "queue": {},
    "running": None,
    "last_seq": 7,
}

Handler = Callable[["FakeConnection", dict[str, Any]], Awaitable[Any]]


class Reply(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class Hangup(Exception):
    """Close the connection without replying."""


@dataclass
class FakeConnection:
    stream: anyio.abc.ByteStream
    daemon: FakeDaemon
    number: int
    authed: bool = False
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    tasks: anyio.abc.TaskGroup | None = None

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` beside the handler, e.g. events pushed after the reply went out."""
        assert self.tasks is not None
        self.tasks.start_soon(fn)

    async def send(self, message: dict[str, Any]) -> None:
        async with self.lock:
            await self.stream.send(json.dumps(message).encode() + b"\n")

    async def event(self, seq: int, type: str, job: int | None = None, **data: Any) -> None:
        params = {"seq": seq, "ts": 1000.0 + seq, "type": type, "job": job, "data": data}
        await self.send({"jsonrpc": "2.0", "method": "event", "params": params})

    async def raw(self, line: bytes) -> None:
        async with self.lock:
            await self.stream.send(line)


class FakeDaemon:
    def __init__(self, handlers: dict[str, Handler], token: str | None = None) -> None:
        self.handlers = handlers
        self.token = token
        self.calls: list[tuple[int, str, Any]] = []  # (connection number, method, params)
        self.connections = 0

    async def serve_connection(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        conn = FakeConnection(stream, self, self.connections)
        reader = BufferedByteReceiveStream(stream)
        async with stream, anyio.create_task_group() as tg:
            conn.tasks = tg
            try:
                while True:
                    line = await reader.receive_until(b"\n", 1 << 20)
                    request = json.loads(line)
                    tg.start_soon(self._answer, conn, request, tg.cancel_scope)
            except (
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
            ):
                tg.cancel_scope.cancel()

    async def _answer(
        self, conn: FakeConnection, request: dict[str, Any], scope: anyio.CancelScope
    ) -> None:
        method, params = request["method"], request.get("params") or {}
        self.calls.append((conn.number, method, params))
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        try:
            if self.token is not None and method == "auth":
                if params.get("token") != self.token:
                    raise Reply(-32001, "wrong token")
                conn.authed = True
                result: Any = {"ok": True}
            elif self.token is not None and not conn.authed:
                raise Reply(-32001, "authenticate first")
            elif method not in self.handlers:
                raise Reply(-32601, f"method not found: {method}")
            else:
                result = await self.handlers[method](conn, params)
            reply["result"] = result
        except Reply as exc:
            reply["error"] = {"code": exc.code, "message": exc.message}
            if exc.data is not None:
                reply["error"]["data"] = exc.data
        except Hangup:
            await conn.stream.aclose()
            scope.cancel()
            return
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await conn.send(reply)


@contextmanager
def running(daemon: FakeDaemon, *, unix: Path | None = None) -> Iterator[str]:
    """Serve `daemon` on `unix` (else a free TCP port) from a background thread; yields
    the URL to connect to.

    A thread, so the code under test can call `anyio.run` itself, as the CLI does.
    """

    async def open_listener() -> anyio.abc.Listener[Any]:
        if unix is not None:
            return await anyio.create_unix_listener(unix)
        return await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    with anyio.from_thread.start_blocking_portal() as portal:
        listener = portal.call(open_listener)
        if unix is not None:
            url = f"unix://{unix}"
        else:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            url = f"tcp://127.0.0.1:{port}"
        future = portal.start_task_soon(listener.serve, daemon.serve_connection)
        try:
            yield url
        finally:
            future.cancel()
            portal.call(listener.aclose)
