"""The listeners: TCP and Unix sockets accepted, each connection run in one task group.

This module holds `Server`, which opens the listening sockets, starts a `Connection`
(connection.py) for every client and says goodbye to them all on `close()`, plus the
Unix socket binding it needs. The per-connection work and the framing live in their own
modules so each can be read in one sitting.

Why it is built this way:

* One task group owns the accept loops and every connection; an accept error (out of
  file descriptors) is logged and retried, so the clients already connected keep going.
* The Unix socket is bound inside a fresh 0700 directory, made 0600 and renamed into
  place, so it is never reachable with a wider mode, without touching the process-wide
  umask that worker threads also use. On close it is removed only if it is still the
  file this server bound (never another daemon's socket).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ..protocol import MAX_LINE_BYTES
from .connection import Connection, Limits
from .events import EventBus
from .jsonrpc import Dispatcher

__all__ = ["ListenError", "Server"]

log = logging.getLogger("wangend.transport")


class ListenError(OSError):
    """A listener could not be opened; the message says which and why."""


class Server:
    """Accepts connections on TCP and/or a Unix socket and runs each one.

    `serve()` runs in the caller's task group and reports the bound addresses through
    `task_status.started({"tcp": [host, port] | None, "unix": path | None})`, so tests
    can listen on port 0. `close()` stops accepting and says goodbye to every client.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        bus: EventBus,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        subscriber_buffer: int = 4096,
        auth_timeout: float | None = 10.0,
        limits: Limits | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.bus = bus
        self.limits = limits or Limits(
            max_line_bytes=max_line_bytes,
            subscriber_buffer=subscriber_buffer,
            auth_timeout=auth_timeout or None,
        )
        self._connections: set[Connection] = set()
        self._listeners: list[tuple[anyio.abc.SocketListener, str]] = []
        self._unix: tuple[Path, int] | None = None  # the file we bound, and its inode
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._idle = anyio.Event()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def serve(
        self,
        *,
        tcp: tuple[str, int] | None = None,
        unix: str | os.PathLike[str] | None = None,
        sockets: Iterable[socket.socket] = (),
        task_status: anyio.abc.TaskStatus[dict[str, Any]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `tcp` (host, port), `unix` (a path) and already-bound `sockets`
        (socket activation), until `close()` or cancellation."""
        endpoint: dict[str, Any] = {"tcp": None, "unix": None}
        try:
            for sock in sockets:
                kind = "unix" if sock.family == socket.AF_UNIX else "tcp"
                self._listeners.append((await anyio.abc.SocketListener.from_socket(sock), kind))
                name = sock.getsockname()
                endpoint[kind] = endpoint[kind] or (name if kind == "unix" else list(name[:2]))
            if tcp is not None:
                endpoint["tcp"] = await self._open_tcp(*tcp)
            if unix is not None:
                endpoint["unix"] = await self._open_unix(Path(unix))
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for listener, kind in self._listeners:
                    tg.start_soon(self._accept_loop, listener, kind)
                task_status.started(endpoint)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_listeners()

    async def _open_tcp(self, host: str, port: int) -> list[Any]:
        try:
            multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ListenError(
                exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        for listener in multi.listeners:  # one per address family
            self._listeners.append((listener, "tcp"))  # type: ignore[arg-type]
        bound = multi.listeners[0].extra(anyio.abc.SocketAttribute.local_address)
        return [bound[0], bound[1]]

    async def _open_unix(self, path: Path) -> str:
        sock = _bind_unix(path)
        self._unix = (path, os.stat(path).st_ino)
        self._listeners.append((await anyio.abc.SocketListener.from_socket(sock), "unix"))
        return str(path)

    async def _accept_loop(self, listener: anyio.abc.SocketListener, kind: str) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError as exc:  # e.g. out of file descriptors: keep the clients we have
                log.warning("accepting a %s connection failed: %s", kind, exc)
                await anyio.sleep(0.1)
                continue
            peer = stream.extra(anyio.abc.SocketAttribute.remote_address, "")
            conn = Connection(
                stream,
                kind,
                f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local"),
                self.dispatcher,
                self.bus,
                self.limits,
            )
            assert self._tg is not None
            self._tg.start_soon(self._run_connection, conn)

    async def _run_connection(self, conn: Connection) -> None:
        self._connections.add(conn)
        try:
            if self._closing:
                conn.close(linger=0)
            await conn.run()
        finally:
            self._connections.discard(conn)
            if self._closing and not self._connections:
                self._idle.set()

    async def _close_listeners(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener, _kind in listeners:
            with contextlib.suppress(Exception):
                await listener.aclose()
        if self._unix is not None:
            path, inode = self._unix
            self._unix = None
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:  # never another daemon's socket
                    path.unlink()

    async def close(self, grace: float = 2.0, goodbye: bytes | None = None) -> None:
        """Stop accepting, flush, close every connection within `grace`.

        `goodbye` is the last line for every client that is not subscribed: the daemon
        hands in its `daemon.stopping` event, so those clients get the very event (same
        seq, same data) that subscribers had through the bus: one shape for everyone.
        """
        self._closing = True
        await self._close_listeners()
        for conn in list(self._connections):
            conn.close(None if conn.session.subscribed else goodbye, linger=grace)
        if self._connections:
            with anyio.move_on_after(grace + 0.5):
                await self._idle.wait()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()


def _bind_unix(path: Path, backlog: int = 1024) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 from the moment it is reachable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _remove_stale_socket(path)
        private = Path(tempfile.mkdtemp(prefix=".w", dir=path.parent))  # mode 0700
    except ListenError:
        raise
    except OSError as exc:
        raise ListenError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
    temporary = private / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, 0o600)
        os.rename(temporary, path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()
    return sock


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file that nothing answers on; refuse if a daemon is live on it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left behind by a daemon that died
        return
    except OSError as exc:
        raise ListenError(
            errno.EADDRINUSE, f"{path} is busy ({exc}); is a daemon running?"
        ) from None
    finally:
        probe.close()
    raise ListenError(errno.EADDRINUSE, f"another daemon is already listening on {path}")
