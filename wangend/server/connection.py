"""One client connection: its reader and writer tasks, its outbound queue, its limits.

This module exists because a connection's life (reading requests in order, writing
replies and events in order, backpressure, closing) is the part of the transport with
the most to get right, and it is easier to check when read apart from the listener
(transport.py) and from the framing (framing.py).

Why it is built this way:

* Each connection has one reader task (it dispatches lines in order) and one writer task
  that drains the connection's outbound queue. Replies and events share that queue, so
  the client sees them in the order they were produced. Nothing else writes to the socket.
* The EventBus hands events to `Connection.deliver`, which only appends to the queue.
  Past `subscriber_buffer` unsent events the bus drops the subscription and the client
  gets one final `subscription.dropped` notice. A client that stops reading blocks only
  its own writer; its reader stops taking requests while more than `read_pause_bytes` of
  output waits, and past `max_pending_bytes` the connection is closed. One reply (a
  whole batch's) may take at most half of that (`Limits.reply_limit`): the dispatcher
  answers a larger one with -32006 and the request's id, so a client that reads is
  never cut off by the size of what it asked for.
* A TCP connection that has not authenticated `auth_timeout` seconds after it opened
  gets one -32001 and is closed: the token is all that guards TCP, and a peer without
  it must not hold a connection (and its buffers) for as long as it likes.
* The end of the stream ends the last line: a request without its newline, followed by
  EOF or a half-close, is answered before the connection closes.
* Every failure of one client ends that connection quietly: an exception escaping a
  connection task would end the listener and every other connection with it.
* Closing is lingering: flush, send EOF, then read and discard until the client closes,
  bounded in time. Closing with unread input makes the kernel send RST, which can
  destroy the last reply (a -32006) before the client reads it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
import anyio.abc

from ..protocol import MAX_LINE_BYTES, ErrorCode, SubscribeResult
from .events import EventBus
from .framing import LineFramer, LineTooLong
from .jsonrpc import Dispatcher

__all__ = ["Connection", "Limits", "Session"]

log = logging.getLogger("wangend.transport")

READ_CHUNK = 65536
WRITE_BATCH_BYTES = 256 * 1024
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may buffer before it is throttled or closed."""

    max_line_bytes: int = MAX_LINE_BYTES
    subscriber_buffer: int = 4096  # unsent events before the subscription is dropped
    read_pause_bytes: int = 1024 * 1024  # stop reading requests while this much output waits
    max_pending_bytes: int = 64 * 1024 * 1024  # unsent output before the connection closes
    linger: float = 2.0  # seconds a closing connection may spend flushing
    auth_timeout: float | None = 10.0  # seconds a TCP client has to authenticate (None: any)

    @property
    def reply_limit(self) -> int:
        """The most one reply may take: half the output budget, so one reply that fits
        never closes the connection by itself."""
        return self.max_pending_bytes // 2


class Session:
    """What RPC methods know about the connection a request came from."""

    __slots__ = ("_conn", "authenticated", "kind", "peer")

    def __init__(self, conn: Connection, kind: str, peer: str) -> None:
        self._conn = conn
        self.kind = kind  # "tcp" | "unix"
        self.peer = peer
        self.authenticated = kind == "unix"  # the socket's 0600 mode is the check

    @property
    def subscribed(self) -> bool:
        return self._conn.bus.is_subscribed(self._conn)

    def subscribe(
        self, since: int | None = None, jobs: Iterable[int] | None = None
    ) -> SubscribeResult:
        """Subscribe this connection; the reply goes out first, then the replay, then
        live events, with no gap and no duplicate (all decided here, without awaiting)."""
        result, replay = self._conn.bus.subscribe(self._conn, since, jobs)
        self._conn.hold_events(replay)
        return result

    def unsubscribe(self) -> bool:
        return self._conn.bus.unsubscribe(self._conn)

    def after_reply(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the current request's reply has been queued."""
        self._conn.after_reply(callback)


class Connection:
    """One client: reader and writer tasks around one outbound queue; an EventBus
    subscriber."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        kind: str,
        peer: str,
        dispatcher: Dispatcher,
        bus: EventBus,
        limits: Limits,
    ) -> None:
        self.stream = stream
        self.bus = bus
        self.dispatcher = dispatcher
        self.limits = limits
        self.session = Session(self, kind, peer)
        self._out: deque[tuple[bytes, bool]] = deque()  # (line, counts as a live event)
        self._out_bytes = 0
        self._pending_events = 0
        self._last_seq = 0
        self._held: list[tuple[bytes, bool]] | None = None
        self._after: list[Callable[[], None]] = []
        self._wake = anyio.Event()
        self._drained = anyio.Event()
        self._writer_done = anyio.Event()
        self._busy = False
        self._reader_done = False
        self._closing = False
        self._finished = False
        self._linger = limits.linger
        self._scope: anyio.CancelScope | None = None
        self._read_scope: anyio.CancelScope | None = None

    # --- queueing (synchronous: called by the reader and by EventBus.publish) -----------

    def _enqueue(self, line: bytes, is_event: bool, *, hold: bool = True) -> None:
        if self._finished:
            return
        self._out_bytes += len(line)
        self._pending_events += is_event
        if hold and self._held is not None:
            self._held.append((line, is_event))
        else:
            self._out.append((line, is_event))
            self._wake.set()
        limit = self.limits.max_pending_bytes
        if self._out_bytes > limit:
            if len(line) > limit:  # not the client's doing; the dispatcher bounds replies
                log.warning(
                    "closing %s connection %s: one line of %d bytes is over its %d-byte "
                    "output limit",
                    *self._who(),
                    len(line),
                    limit,
                )
            else:
                log.warning(
                    "closing %s connection %s: %d bytes wait unsent (limit %d); it is not reading",
                    *self._who(),
                    self._out_bytes,
                    limit,
                )
            self.abort()

    def deliver(self, seq: int, line: bytes) -> bool:
        if self._finished or self._closing:
            return True  # going away; nothing to queue, nothing to report
        if self._pending_events >= self.limits.subscriber_buffer:
            return False
        self._last_seq = seq
        self._enqueue(line, True)
        return True

    def dropped(self, reason: str) -> None:
        data = {"reason": reason, "since": self._last_seq}
        self._enqueue(self.bus.notice("subscription.dropped", data), False)

    def hold_events(self, replay: list[bytes]) -> None:
        """Queue `replay` after the current reply; hold live events behind it until then."""
        if self._held is None:
            self._held = []
        for line in replay:
            self._out_bytes += len(line)
            self._held.append((line, False))  # asked for, so not charged to the budget

    def after_reply(self, callback: Callable[[], None]) -> None:
        self._after.append(callback)

    def _reply(self, line: bytes | None) -> None:
        if line is not None:
            self._enqueue(line + b"\n", False, hold=False)
        held, self._held = self._held, None
        if held:
            self._out.extend(held)
            self._wake.set()
        callbacks, self._after = self._after, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("an after-reply action failed")

    # --- closing ---------------------------------------------------------------------

    def close(self, notice: bytes | None = None, linger: float | None = None) -> None:
        """Stop reading; flush what is queued (plus `notice`), then close, within `linger`.

        A request being handled is finished and answered first.
        """
        if self._closing or self._finished:
            return
        if linger is not None:
            self._linger = linger
        self._closing = True
        self.bus.unsubscribe(self)
        if notice is not None:
            if self._busy:  # last: after the reply to the request being handled
                self._after.append(lambda: self._enqueue(notice, False))
            else:
                self._enqueue(notice, False)
        self._wake.set()
        self._drained.set()  # a reader paused for backpressure looks again
        if not self._busy:
            self._interrupt_reader()

    def abort(self) -> None:
        """Close now, discarding queued output.

        Shutting the socket down wakes both tasks with an error or EOF, so they end on
        their own; a deadline is the backstop.
        """
        self._closing = True
        self._finished = True  # nothing more is queued
        self.bus.unsubscribe(self)
        self._out.clear()
        self._wake.set()
        self._drained.set()
        self._shutdown_socket(socket.SHUT_RDWR)
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, anyio.current_time() + 1.0)

    def _interrupt_reader(self) -> None:
        # anyio's Unix streams (raw sockets) log an InvalidStateError when a receive is
        # cancelled just as data arrives; ending the read side gives the reader an EOF
        # instead. TCP streams are cancel-safe and keep their read side for the linger.
        if self.session.kind == "unix":
            self._shutdown_socket(socket.SHUT_RD)
        elif self._read_scope is not None:
            self._read_scope.cancel()

    def _shutdown_socket(self, how: int) -> None:
        with contextlib.suppress(Exception):
            self.stream.extra(anyio.abc.SocketAttribute.raw_socket).shutdown(how)

    def _who(self) -> tuple[str, str]:
        return self.session.kind, self.session.peer

    # --- tasks ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._write_loop)
                timeout = self.limits.auth_timeout
                if timeout and not self.session.authenticated:
                    tg.start_soon(self._auth_deadline, timeout)
                with anyio.CancelScope() as self._read_scope:
                    await self._read_loop()
                self._reader_done = True
                self.close()
                self._wake.set()
                deadline = anyio.current_time() + self._linger
                tg.cancel_scope.deadline = min(tg.cancel_scope.deadline, deadline)
                await self._writer_done.wait()
                await self._linger_close()
                tg.cancel_scope.cancel()
        except Exception as exc:  # one client's trouble must never reach the listener
            log.warning("%s connection %s failed: %r", *self._who(), exc)
        finally:
            self._finished = True
            self.bus.unsubscribe(self)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.stream.aclose()

    async def _read_loop(self) -> None:
        framer = LineFramer(self.limits.max_line_bytes)
        receive = self.stream.receive
        while not self._closing:
            if self._out_bytes > self.limits.read_pause_bytes:
                self._drained = anyio.Event()  # the client is not reading its replies
                await self._drained.wait()
                continue
            try:
                data = await receive(READ_CHUNK)
            except anyio.EndOfStream:
                # The client is done sending (EOF or half-close). Its last line may lack
                # the newline; it is a request all the same. An EOF that `close()` made
                # (Unix: the read side shut down) ends reading, nothing more.
                if not self._closing:
                    await self._dispatch(framer.finish())
                return
            except _GONE:
                return
            try:
                lines = framer.feed(data)
            except LineTooLong as exc:
                await self._dispatch(exc.lines)
                if not self._closing:
                    message = f"request line over the {exc.limit}-byte limit; closing"
                    error = ErrorCode.REQUEST_TOO_LARGE
                    self._reply(self.dispatcher.error_line(error, message, {"limit": exc.limit}))
                return
            await self._dispatch(lines)

    async def _dispatch(self, lines: list[bytes]) -> None:
        handle = self.dispatcher.handle_line
        limit = self.limits.reply_limit
        for line in lines:
            if self._closing:
                return
            self._busy = True
            try:
                reply = await handle(line, self.session, reply_limit=limit)
            finally:
                self._busy = False
            self._reply(reply)

    async def _auth_deadline(self, seconds: float) -> None:
        """Close a connection that has not authenticated `seconds` after it opened,
        saying why (one -32001 with id null). Cancelled with the connection."""
        await anyio.sleep(seconds)
        if self.session.authenticated or self._closing:
            return
        log.info("closing %s connection %s: no auth within %g s", *self._who(), seconds)
        message = f"no successful auth within {seconds:g} s of connecting; closing"
        line = self.dispatcher.error_line(ErrorCode.UNAUTHORIZED, message, {"timeout": seconds})
        self.close(line + b"\n")

    async def _write_loop(self) -> None:
        out = self._out
        try:
            while True:
                if not out:
                    if self._reader_done:  # nothing more can be queued but events
                        return
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                line, events = out.popleft()
                if out:
                    chunks = [line]
                    size = len(line)
                    while out and size < WRITE_BATCH_BYTES:
                        line, is_event = out.popleft()
                        chunks.append(line)
                        size += len(line)
                        events += is_event
                    line = b"".join(chunks)
                try:
                    await self.stream.send(line)
                except _GONE:
                    self.abort()
                    return
                self._out_bytes -= len(line)
                self._pending_events -= events
                if self._out_bytes <= self.limits.read_pause_bytes:
                    self._drained.set()
        finally:
            self._writer_done.set()

    async def _linger_close(self) -> None:
        with contextlib.suppress(*_GONE):
            await self.stream.send_eof()
            if self.session.kind == "unix":
                return  # unread input does not reset a Unix socket's peer
            while await self.stream.receive(READ_CHUNK):
                pass  # until the client closes too (or the deadline)
