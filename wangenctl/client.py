"""The async client for wangend: one connection, calls by id, events alongside.

    async with connect() as client:            # WANGEN_URL, else the socket, else TCP
        status = await client.status()
        await client.subscribe(since=status.last_seq)
        async for event in client.events():
            ...

A connection carries replies and pushed events interleaved on one stream. One reader
task owns the receiving side and routes each line: a reply wakes the call waiting on its
id, an event goes into an unbounded stream that `events()` reads. So a caller can await a
call while events pile up, and none is lost or mistaken for a reply.

Finding the daemon, reading the TCP token and opening the byte stream are endpoint.py's
(TCP and Unix sockets differ only in their `Transport`); everything here works on any
byte stream. Following a subscription across reconnects is follower.py's `EventFollower`.

Errors (wangenctl.errors, re-exported here):

    WangenctlError
    ├── DaemonUnavailable   nothing answers at the address, or the daemon hung up
    ├── AuthError           the TCP token is missing, unreadable or refused
    ├── RpcError            the daemon answered with a JSON-RPC error (code, message, data)
    └── ProtocolError       the daemon sent something the protocol does not allow
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from wangend.protocol import (
    ClearResult,
    EnqueueResult,
    ErrorCode,
    Event,
    JobRecord,
    JobsResult,
    LorasResult,
    ModelsResult,
    MoveResult,
    OkResult,
    PresetsResult,
    QueueStateResult,
    StatusResult,
    SubscribeResult,
    ValidateResult,
)

from .endpoint import (
    Endpoint,
    Transport,
    read_token,
    resolve_endpoint,
    resolve_token_file,
    transport_for,
)
from .errors import (
    AuthError,
    DaemonUnavailable,
    ProtocolError,
    RpcError,
    WangenctlError,
    translate_socket_errors,
)

__all__ = [
    "AuthError",
    "Client",
    "DaemonUnavailable",
    "ProtocolError",
    "RpcError",
    "WangenctlError",
    "connect",
]

T = TypeVar("T")

# Replies can be much longer than a request (a `jobs` listing of 10,000 records), so the
# client's cap is generous; it exists so a broken peer cannot make us buffer forever.
MAX_INCOMING_LINE = 256 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
# How long a call waits for its reply by default. A stopped (SIGSTOP) or wedged daemon
# still accepts connections (the kernel's backlog does), so without this a script would
# hang until it wakes up. Generous: enqueue hashes input media before it answers.
CALL_TIMEOUT = 60.0

# --- wire envelopes ------------------------------------------------------------------------


class _Request(msgspec.Struct, omit_defaults=True):
    jsonrpc: str
    id: int
    method: str
    params: Any = None


class _ErrorObject(msgspec.Struct):
    code: int
    message: str
    data: Any = None


class _Incoming(msgspec.Struct):
    """Any line from the daemon: a reply (id + result|error) or a notification."""

    jsonrpc: str = ""
    id: int | str | None = None
    method: str | None = None
    params: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b""))
    result: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b""))
    error: _ErrorObject | None = None


@dataclass(eq=False, slots=True)
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    reply: _Incoming | None = None
    failure: WangenctlError | None = None


_encode = msgspec.json.Encoder().encode
_decode_incoming = msgspec.json.Decoder(_Incoming).decode
_decode_event = msgspec.json.Decoder(Event).decode


# --- the client ------------------------------------------------------------------------------


class Client:
    """One open connection. Build it with `connect()`, which also runs its reader."""

    def __init__(
        self, stream: anyio.abc.ByteStream, where: str, call_timeout: float | None = None
    ) -> None:
        """`call_timeout`: how long a call waits for its reply unless it says otherwise
        (None: for ever)."""
        self.where = where
        self.call_timeout = call_timeout
        self._stream = stream
        self._receive = BufferedByteReceiveStream(stream)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = anyio.Lock()
        self._events_in, self._events_out = anyio.create_memory_object_stream[Event](math.inf)
        self._failure: WangenctlError | None = None

    @property
    def closed(self) -> bool:
        """True once the connection has ended (the daemon went away or broke protocol)."""
        return self._failure is not None

    # --- calls ---------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        params: msgspec.Struct | Mapping[str, Any] | None = None,
        result_type: type[T] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send one request and wait for its reply; events keep flowing meanwhile.

        Returns the result decoded into `result_type` (a protocol Struct), or as plain
        JSON values without one. Raises RpcError for an error reply, DaemonUnavailable
        when no reply comes within `timeout` (default: the client's `call_timeout`).
        """
        if self._failure is not None:
            raise self._failure
        if timeout is None:
            timeout = self.call_timeout
        request_id = next(self._ids)
        line = _encode(_Request("2.0", request_id, method, params)) + b"\n"
        pending = self._pending[request_id] = _Pending()
        try:
            async with self._send_lock:
                with translate_socket_errors(self.where, connected=True):
                    await self._stream.send(line)
            with anyio.fail_after(timeout):
                await pending.done.wait()
        except DaemonUnavailable:
            raise self._failure or DaemonUnavailable(self.where, lost=True) from None
        except TimeoutError:
            reason = f"no reply to {method} within {timeout:g}s: is it stopped or stuck?"
            raise DaemonUnavailable(self.where, reason, lost=True) from None
        finally:
            self._pending.pop(request_id, None)
        if pending.failure is not None:
            raise pending.failure
        assert pending.reply is not None
        if pending.reply.error is not None:
            err = pending.reply.error
            raise RpcError(err.code, err.message, err.data)
        raw = pending.reply.result
        if not raw:
            raise ProtocolError(f"the reply to {method} has neither result nor error")
        try:
            if result_type is None:
                return msgspec.json.decode(raw)
            return msgspec.json.decode(raw, type=result_type)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"unexpected reply to {method}: {exc}") from None

    # --- events ----------------------------------------------------------------------------

    async def subscribe(
        self, since: int | None = None, jobs: list[int] | None = None
    ) -> SubscribeResult:
        """Start (or re-filter) this connection's event stream.

        With `since`, the daemon first replays what it still holds after that seq; the
        replayed events arrive after this reply and before any live one.
        """
        params: dict[str, Any] = {}
        if since is not None:
            params["since"] = since
        if jobs is not None:
            params["jobs"] = jobs
        return await self.call("subscribe", params, SubscribeResult)

    async def unsubscribe(self) -> None:
        await self.call("unsubscribe", None, OkResult)

    async def events(self) -> AsyncIterator[Event]:
        """Events in arrival order; raises DaemonUnavailable when the connection is lost.

        There is one stream per connection: two consumers would split it between them.
        """
        async for event in self._events_out:
            yield event
        if self._failure is not None:
            raise self._failure

    # --- typed methods, one per daemon method ----------------------------------------------

    async def enqueue(self, spec: msgspec.Struct | Mapping[str, Any]) -> EnqueueResult:
        return await self.call("enqueue", spec, EnqueueResult)

    async def status(self) -> StatusResult:
        return await self.call("status", None, StatusResult)

    async def job(self, job: int) -> JobRecord:
        return await self.call("status", {"job": job}, JobRecord)

    async def jobs(self, states: list[str] | None = None, limit: int = 100) -> JobsResult:
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = states
        return await self.call("jobs", params, JobsResult)

    async def pause(self, mode: str = "now") -> QueueStateResult:
        return await self.call("pause", {"mode": mode}, QueueStateResult)

    async def resume(self) -> QueueStateResult:
        return await self.call("resume", None, QueueStateResult)

    async def abort(self, job: int | None = None) -> JobRecord:
        return await self.call("abort", {} if job is None else {"job": job}, JobRecord)

    async def clear(self) -> ClearResult:
        return await self.call("clear", None, ClearResult)

    async def retry(self, job: int, enhance: bool = False) -> EnqueueResult:
        params: dict[str, Any] = {"job": job}
        if enhance:
            params["enhance"] = True
        return await self.call("retry", params, EnqueueResult)

    async def move(self, job: int, position: int) -> MoveResult:
        return await self.call("move", {"job": job, "position": position}, MoveResult)

    async def models(self) -> ModelsResult:
        return await self.call("models", None, ModelsResult)

    async def shutdown(self, mode: str = "graceful") -> OkResult:
        return await self.call("shutdown", {"mode": mode}, OkResult)

    async def validate(self, spec: msgspec.Struct | Mapping[str, Any]) -> ValidateResult:
        return await self.call("validate", spec, ValidateResult)

    async def loras(self, model: str | None = None, state: bool = False) -> LorasResult:
        params: dict[str, Any] = {"state": state}
        if model:
            params["model"] = model
        return await self.call("loras", params, LorasResult)

    async def presets(self) -> PresetsResult:
        return await self.call("presets", None, PresetsResult)

    # --- the reader ----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Route every incoming line until the connection ends; never raises."""
        try:
            while True:
                with translate_socket_errors(self.where, connected=True):
                    try:
                        line = await self._receive.receive_until(b"\n", MAX_INCOMING_LINE)
                    except anyio.DelimiterNotFound:
                        raise ProtocolError("the daemon sent an over-long line") from None
                self._route(line)
        except WangenctlError as exc:
            self._fail(exc)

    def _route(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = _decode_incoming(line)
            if message.method == "event":
                self._events_in.send_nowait(_decode_event(message.params))
                return
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"the daemon sent a line that is not JSON-RPC ({exc})") from None
        if message.method is not None:
            return  # a notification this client does not know: ignore, as JSON-RPC allows
        if message.id is None:
            # The daemon could not read one of our requests at all (a parse error).
            text = message.error.message if message.error else "no id in reply"
            raise ProtocolError(f"the daemon could not read a request: {text}")
        pending = self._pending.get(message.id) if isinstance(message.id, int) else None
        if pending is not None:  # None: the caller gave up waiting (timeout, cancel)
            pending.reply = message
            pending.done.set()

    def _fail(self, failure: WangenctlError) -> None:
        self._failure = failure
        for pending in self._pending.values():
            pending.failure = failure
            pending.done.set()
        self._events_in.close()

    async def _authenticate(self, token_file: Path) -> None:
        token = read_token(token_file)
        try:
            await self.call("auth", {"token": token}, OkResult)
        except RpcError as exc:
            if exc.code == ErrorCode.UNAUTHORIZED:
                raise AuthError(
                    f"the daemon at {self.where} refused the token in {token_file}"
                ) from None
            raise


@asynccontextmanager
async def connect(
    url: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    call_timeout: float | None = CALL_TIMEOUT,
    transport_factory: Callable[[Endpoint], Transport] = transport_for,
) -> AsyncIterator[Client]:
    """Open a connection (and authenticate on TCP) for the body of an `async with`.

    Raises DaemonUnavailable naming where it looked, AuthError, or ValueError for a URL
    that cannot be parsed. Exceptions from the body come out unwrapped.
    """
    resolved = resolve_endpoint(url, env)
    transport = transport_factory(resolved.endpoint)
    with translate_socket_errors(resolved.where, connected=False):
        with anyio.fail_after(connect_timeout):
            stream = await transport.open()
    client = Client(stream, resolved.endpoint.url, call_timeout)
    body_error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client._read_loop)
            try:
                if transport.needs_auth:
                    await client._authenticate(resolve_token_file(token_file, env))
                yield client
            except Exception as exc:
                # Re-raised below, outside the task group, so callers never see it
                # wrapped in an ExceptionGroup.
                body_error = exc
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
    if body_error is not None:
        raise body_error
