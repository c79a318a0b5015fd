"""TCP and Unix listeners, NDJSON framing, one writer queue per connection.

Replies and events for a connection go through one outbound queue drained by one writer
task, so they reach the client in the order they were produced. Events are offered to
that queue without waiting (EventBus.publish never blocks); past `subscriber_buffer`
unsent events the subscription is dropped with a final notice, and past a hard byte cap
the connection is closed. A slow or vanished client costs only its own tasks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections import deque
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ..protocol import ErrorCode
from .events import EventBus
from .jsonrpc import Dispatcher

__all__ = ["Connection", "LineFramer", "LineTooLong", "Server"]

log = logging.getLogger("wangend.transport")

MAX_PENDING_BYTES = 64 * 1024 * 1024
READ_CHUNK = 65536


class LineTooLong(Exception):
    pass


class LineFramer:
    """Splits a byte stream into lines (sans-IO). Blank lines are skipped; CRLF is fine.

    The cap is checked on the bytes buffered so far, so an endless line without a
    newline is refused as soon as it passes the cap, not when it ends.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line:
                raise LineTooLong()
            line = bytes(self._buf[start:end]).rstrip(b"\r")
            if line.strip():
                lines.append(line)
            start = end + 1
        del self._buf[:start]
        if len(self._buf) > self.max_line:
            raise LineTooLong()
        return lines


class Connection:
    """One client: a reader that dispatches lines, a writer that drains the queue.

    Also the EventBus subscriber for its client (`deliver`, `dropped`).
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        kind: str,
        dispatcher: Dispatcher,
        bus: EventBus,
        *,
        max_line: int,
        subscriber_buffer: int,
    ) -> None:
        self.stream = stream
        self.kind = kind
        self.authenticated = kind == "unix"  # the socket's 0600 mode is the check
        self.dispatcher = dispatcher
        self.bus = bus
        self.max_line = max_line
        self.subscriber_buffer = subscriber_buffer
        self._out: deque[tuple[bytes, bool]] = deque()
        self._out_bytes = 0
        self._pending_events = 0
        self._ready = anyio.Event()
        self._closing = False
        self._held: list[bytes] | None = None  # events held while a subscribe reply is due
        self._after_reply: list[bytes] = []
        self._scope: anyio.CancelScope | None = None

    # --- outbound ------------------------------------------------------------------------

    def _push(self, line: bytes, is_event: bool) -> None:
        self._out.append((line, is_event))
        self._out_bytes += len(line)
        if is_event:
            self._pending_events += 1
        if self._out_bytes > MAX_PENDING_BYTES:
            log.warning("closing a %s connection that stopped reading", self.kind)
            self.close()
        self._ready.set()

    def send_reply(self, line: bytes) -> None:
        self._push(line + b"\n", False)
        if self._after_reply or self._held is not None:
            for queued in self._after_reply:
                self._push(queued, True)
            for queued in self._held or ():
                self._push(queued, True)
            self._after_reply = []
            self._held = None

    def hold_events_until_reply(self, replay: list[bytes]) -> None:
        """For `subscribe`: the reply goes first, then `replay`, then live events."""
        self._after_reply = replay
        self._held = []

    def deliver(self, seq: int, line: bytes) -> bool:
        if self._closing:
            return True
        if self._pending_events >= self.subscriber_buffer:
            return False
        if self._held is not None:
            self._held.append(line)
            self._pending_events += 1
        else:
            self._push(line, True)
        return True

    def dropped(self, reason: str) -> None:
        self._push(self.bus.notice("subscription.dropped", {"reason": reason}), False)

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self._closing = True
        self._ready.set()

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._writer)
                await self._reader()
                self.close()
        except Exception as exc:  # one client's trouble never reaches the listener
            log.debug("%s connection ended: %r", self.kind, exc)
        finally:
            self.bus.unsubscribe(self)
            with contextlib.suppress(Exception):
                await self.stream.aclose()

    async def _reader(self) -> None:
        framer = LineFramer(self.max_line)
        while not self._closing:
            try:
                data = await self.stream.receive(READ_CHUNK)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                ConnectionError,
            ):
                return
            try:
                lines = framer.feed(data)
            except LineTooLong:
                self.send_reply(
                    self.dispatcher.error_line(
                        ErrorCode.REQUEST_TOO_LARGE,
                        f"request line longer than {self.max_line} bytes; closing",
                        {"limit": self.max_line},
                    )
                )
                return
            for line in lines:
                reply = await self.dispatcher.handle_line(line, self)
                if reply is not None:
                    self.send_reply(reply)
                elif self._held is not None:  # a subscribe sent as a notification
                    self.send_reply_free()
                if self._closing:
                    return

    def send_reply_free(self) -> None:
        """Release held events when no reply will be sent."""
        for queued in (*self._after_reply, *(self._held or ())):
            self._push(queued, True)
        self._after_reply, self._held = [], None

    async def _writer(self) -> None:
        while True:
            if not self._out:
                if self._closing:
                    break
                self._ready = anyio.Event()
                await self._ready.wait()
                continue
            batch = []
            events = 0
            while self._out and len(batch) < 256:
                line, is_event = self._out.popleft()
                batch.append(line)
                events += is_event
            data = b"".join(batch)
            self._out_bytes -= len(data)
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                break
            self._pending_events -= events
        if self._scope is not None:
            self._scope.cancel()  # stop the reader too


class Server:
    """Accepts connections on TCP and/or a Unix socket; runs each in the task group."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        bus: EventBus,
        *,
        max_line_bytes: int,
        subscriber_buffer: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.bus = bus
        self.max_line_bytes = max_line_bytes
        self.subscriber_buffer = subscriber_buffer
        self.connections: set[Connection] = set()
        self._listeners: list[anyio.abc.Listener[Any]] = []
        self._unix_path: Path | None = None

    async def serve(
        self,
        *,
        tcp: tuple[str, int] | None = None,
        unix: Path | None = None,
        sockets: list[socket.socket] | None = None,
        task_status: anyio.abc.TaskStatus[dict[str, Any]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        endpoint: dict[str, Any] = {"tcp": None, "unix": None}
        try:
            for sock in sockets or []:
                kind = "unix" if sock.family == socket.AF_UNIX else "tcp"
                self._listeners.append(anyio.abc.SocketListener.from_socket(sock))
                endpoint[kind] = sock.getsockname()
            if tcp is not None:
                host, port = tcp
                multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
                self._listeners.extend(multi.listeners)  # one per address family
                bound = multi.listeners[0].extra(anyio.abc.SocketAttribute.local_address)
                endpoint["tcp"] = [bound[0], bound[1]]
            if unix is not None:
                self._listeners.append(await self._unix_listener(unix))
                endpoint["unix"] = str(unix)
        except OSError as exc:
            await self._close_listeners()
            raise OSError(exc.errno, f"cannot listen: {exc.strerror}") from None
        async with anyio.create_task_group() as tg:
            for listener in self._listeners:
                kind = "unix" if self._is_unix(listener) else "tcp"
                tg.start_soon(self._accept_loop, listener, kind)
            task_status.started(endpoint)

    @staticmethod
    def _is_unix(listener: Any) -> bool:
        with contextlib.suppress(Exception):
            return listener.extra(anyio.abc.SocketAttribute.family) == socket.AF_UNIX
        return False

    async def _unix_listener(self, path: Path) -> anyio.abc.Listener[Any]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale, left by a daemon that died
            else:
                raise OSError(errno.EADDRINUSE, f"another daemon answers on {path}")
            finally:
                probe.close()
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            listener = await anyio.create_unix_listener(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._unix_path = path
        return listener

    async def _accept_loop(self, listener: anyio.abc.Listener[Any], kind: str) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()  # type: ignore[attr-defined]
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                except OSError as exc:  # e.g. EMFILE: keep serving the clients we have
                    log.warning("accept failed: %s", exc)
                    await anyio.sleep(0.05)
                    continue
                if kind == "tcp":
                    with contextlib.suppress(Exception):
                        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = Connection(
                    stream,
                    kind,
                    self.dispatcher,
                    self.bus,
                    max_line=self.max_line_bytes,
                    subscriber_buffer=self.subscriber_buffer,
                )
                tg.start_soon(self._run_connection, conn)

    async def _run_connection(self, conn: Connection) -> None:
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    async def _close_listeners(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await listener.aclose()
        self._listeners.clear()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting, let each connection flush what it has queued, then close."""
        await self._close_listeners()
        for conn in list(self.connections):
            conn.close()
        with anyio.move_on_after(grace):
            while self.connections:
                await anyio.sleep(0.01)
