"""A sans-IO JSON-RPC 2.0 dispatcher: one line in, one reply line (or nothing) out.

No sockets here, so every rule of the specification is tested without a network. The
rules, and why they are enforced here rather than by jsonrpcserver 5 (which spells
errors its own way, answers a whole batch with one -32600, validates slowly and puts
`str(exc)` of a crashing method into -32603):

* Invalid JSON or invalid UTF-8 -> -32700 with id null. Valid JSON that is not a
  request object -> -32600 with the request's id when it could be read, else null.
* `jsonrpc` must be exactly "2.0", `method` a string, `params` an object or array when
  present, `id` a string, number or null when present.
* A request without `id` is a notification and is never answered, not even with an
  error (an *invalid* request object is not a notification and gets its -32600).
* A batch is answered element by element, in request order: `[]` is one -32600,
  `[1,2,3]` three; notifications add nothing; a batch of notifications gets no reply.
  If any element is not decodable JSON the whole line is -32700 and nothing runs.
* A batch holds at most `max_batch` (1000) elements; a longer one is one -32600 naming
  the limit and nothing in it runs. Without the cap a 1 MiB line of `[1,1,...]` made
  half a million replies (40 MB) on the event loop, before any auth, for anyone.
* A caller may bound the size of one reply (`reply_limit`, the connection's share of
  its output budget): a result that does not fit becomes -32006 with the request's id,
  so the client hears why instead of losing the connection. In a batch the bound is
  for all the replies together; every element still runs and is answered, the ones
  that no longer fit with that small error.
* Without auth (`ctx.authenticated` False) every method but the open ones (`auth`)
  answers -32001, unknown names included, so a peer without the token cannot learn
  which methods exist.
* Params are decoded straight into the method's msgspec Struct, so -32602 names the
  field: `data: {"field": "$.params.steps", "message": ...}`. Params are by name (an
  object). A method declared `positional=True` also takes an array, mapped onto the
  Struct's fields in declaration order; for the others an array is -32602, except `[]`,
  which like `{}` or no params at all means "no arguments".
* A method's WangenError keeps its code, message and data. Any other exception is a bare
  -32603 "Internal error" without `data`; its traceback goes to the log only.

Requests are decoded and checked here with msgspec; then the handler is called. Two
engines do that call, with identical results (the spec tests run on both):

* "direct" (the default) awaits the handler in the connection's reader task.
* "jsonrpcserver" hands the already-decoded request to jsonrpcserver 5's
  `async_dispatch_to_response` (a no-op deserializer and validator; the handler wrapped
  to return Success/Error). It costs ~32 us more per call in-process (2.5 vs 34 us: a
  task per call via asyncio.gather, signature binding). On the 2-core reference machine
  (bench/control_plane.py, 20 clients over TCP) it gave 8-10.7k req/s and a round-trip
  p50 of 0.17-0.25 ms against 13-17k req/s and 0.06 ms for "direct": too close to the
  8k target to be the default.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec

from ..errors import WangenError, invalid_params_from
from ..protocol import ErrorCode

__all__ = ["MAX_BATCH", "Context", "Dispatcher", "Handler", "Method"]

log = logging.getLogger("wangend.rpc")

_UNSET = msgspec.UNSET
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError)
_MESSAGES = {
    ErrorCode.PARSE_ERROR: "Parse error",
    ErrorCode.INVALID_REQUEST: "Invalid Request",
    ErrorCode.METHOD_NOT_FOUND: "Method not found",
    ErrorCode.INVALID_PARAMS: "Invalid params",
    ErrorCode.INTERNAL_ERROR: "Internal error",
    ErrorCode.UNAUTHORIZED: "Unauthorized: call auth with the daemon's token first",
}
_HEAD = b'{"jsonrpc":"2.0","id":'
_NULL_ID = b"null"
# Elements one batch may hold. 1000 replies of the largest ordinary kind stay far below a
# connection's output budget, and no batch can keep the event loop for long.
MAX_BATCH = 1000

Handler = Callable[[Any, Any], Awaitable[Any]]


class Context(Protocol):
    """What the dispatcher reads from the per-connection object handed to handlers."""

    authenticated: bool


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC method: `await handler(ctx, params)` returns a msgspec Struct or builtins.

    `params` is the msgspec Struct the params decode into (any other msgspec type, such
    as `list[int]`, is decoded as it stands), or None for a method that takes none (the
    handler then gets None). `requires_auth` methods answer -32001 while
    `ctx.authenticated` is False. `positional` also accepts by-position arrays.
    """

    name: str
    handler: Handler
    params: type | None = None
    requires_auth: bool = True
    positional: bool = False
    decoder: Callable[[Any], Any] | None = None  # replaces msgspec's Decoder(params)


class _Envelope(msgspec.Struct):
    jsonrpc: Any = _UNSET
    method: Any = _UNSET
    params: msgspec.Raw = _UNSET  # type: ignore[assignment]  # decoded once the method is known
    id: Any = _UNSET


class _ErrorBody(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class _Failure(Exception):
    """An error reply decided before or around the call; never leaves this module."""

    def __init__(self, code: int, message: str | None = None, data: Any = None) -> None:
        super().__init__(code)
        self.code = int(code)
        self.message = message or _MESSAGES.get(code, "Error")
        self.data = data


class _Bound:
    """A method with what decoding its params needs, prepared once."""

    __slots__ = ("decode", "fields", "method", "struct")

    def __init__(self, method: Method) -> None:
        self.method = method
        self.decode = method.decoder or (
            msgspec.json.Decoder(method.params).decode if method.params else None
        )
        self.struct = isinstance(method.params, type) and issubclass(method.params, msgspec.Struct)
        self.fields: tuple[bytes, ...] = ()
        if method.positional and self.struct:
            names = (f.encode_name for f in msgspec.structs.fields(method.params))
            self.fields = tuple(msgspec.json.encode(name) for name in names)


def _failure_from(method: Method, exc: Exception) -> _Failure:
    if isinstance(exc, WangenError):
        return _Failure(exc.code, exc.message, exc.data)
    log.error("method %s failed", method.name, exc_info=exc)
    return _Failure(ErrorCode.INTERNAL_ERROR)


def _valid_id(value: Any) -> bool:
    return value is None or (type(value) in (str, int, float))


def _log_over(names: list[str], limit: int | None) -> None:
    if names:
        log.warning(
            "%d replies (%s) were over the %s-byte reply limit; each was sent as -32006",
            len(names),
            ", ".join(sorted(set(names))),
            limit,
        )


def _invalid_params(exc: msgspec.ValidationError) -> _Failure:
    """-32602 whose data names the field (`$.params.steps`, `$.params.prompt`)."""
    error = invalid_params_from(exc)
    return _Failure(ErrorCode.INVALID_PARAMS, error.message, error.data)


def _params_error(message: str, field: str = "$.params") -> _Failure:
    return _Failure(ErrorCode.INVALID_PARAMS, message, {"field": field, "message": message})


class Dispatcher:
    """Answers JSON-RPC 2.0 lines for a method table. Holds no per-connection state."""

    def __init__(
        self,
        methods: Mapping[str, Method] | Iterable[Method],
        *,
        engine: Literal["direct", "jsonrpcserver"] = "direct",
        max_batch: int = MAX_BATCH,
    ) -> None:
        listed = list(methods.values()) if isinstance(methods, Mapping) else list(methods)
        self._methods = {m.name: _Bound(m) for m in listed}
        if len(self._methods) != len(listed):
            raise ValueError("two methods share a name")
        if engine not in ("jsonrpcserver", "direct"):
            raise ValueError(f"unknown engine {engine!r}")
        self.engine = engine
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self._encode = msgspec.json.Encoder().encode
        self._decode_envelope = msgspec.json.Decoder(_Envelope).decode
        self._decode_batch = msgspec.json.Decoder(list[msgspec.Raw]).decode
        self._decode_any = msgspec.json.Decoder().decode
        self._library = _LibraryCall(listed) if engine == "jsonrpcserver" else None

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._methods)

    # --- entry point -----------------------------------------------------------------

    async def handle_line(
        self, line: bytes, ctx: Context, *, reply_limit: int | None = None
    ) -> bytes | None:
        """Answer one line (without its newline); None when nothing must be sent.

        `reply_limit`: the most bytes the reply may take (None: no bound); see the
        module docstring.
        """
        if not line.isascii():  # cheap for the usual ASCII line; msgspec skips Raw's UTF-8
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return self._error_line(None, _Failure(ErrorCode.PARSE_ERROR))
        i = 0
        while i < len(line) and line[i] in b" \t\r\n":
            i += 1
        if line[i : i + 1] == b"[":
            return await self._handle_batch(line, ctx, reply_limit)
        try:
            env = self._decode_envelope(line)
        except msgspec.ValidationError:  # JSON, but not an object (or unreadable numbers)
            return self._error_line(None, _Failure(self._not_a_request(line)))
        except _DECODE_ERRORS:
            return self._error_line(None, _Failure(ErrorCode.PARSE_ERROR))
        over: list[str] = []
        reply = await self._answer(env, ctx, reply_limit, over)
        _log_over(over, reply_limit)
        return reply

    def error_line(self, code: int, message: str, data: Any = None) -> bytes:
        """An error reply with id null, for errors found outside a request (the transport's
        line cap)."""
        return self._error_line(None, _Failure(code, message, data))

    # --- batches -----------------------------------------------------------------------

    async def _handle_batch(
        self, line: bytes, ctx: Context, reply_limit: int | None
    ) -> bytes | None:
        try:
            elements = self._decode_batch(line)
        except _DECODE_ERRORS:
            return self._error_line(None, _Failure(ErrorCode.PARSE_ERROR))
        if not elements:
            return self._error_line(None, _Failure(ErrorCode.INVALID_REQUEST))
        if len(elements) > self.max_batch:
            # Refused as a whole, like `[]`: the specification's single Response for a
            # batch that cannot be processed as one. Nothing in it has run.
            message = (
                f"a batch may hold at most {self.max_batch} requests; this one holds "
                f"{len(elements)} (nothing was run)"
            )
            failure = _Failure(ErrorCode.INVALID_REQUEST, message, {"limit": self.max_batch})
            return self._error_line(None, failure)
        # Decode every element before running any, so an undecodable one fails the line.
        decoded: list[_Envelope | None] = []
        for raw in elements:
            try:
                decoded.append(self._decode_envelope(raw))
            except msgspec.ValidationError:
                if self._not_a_request(raw) == ErrorCode.PARSE_ERROR:
                    return self._error_line(None, _Failure(ErrorCode.PARSE_ERROR))
                decoded.append(None)
            except _DECODE_ERRORS:
                return self._error_line(None, _Failure(ErrorCode.PARSE_ERROR))
        replies = []
        left = reply_limit  # what the replies still may take, all together
        over: list[str] = []
        for env in decoded:
            if env is None:
                reply = self._error_line(None, _Failure(ErrorCode.INVALID_REQUEST))
            else:
                reply = await self._answer(env, ctx, left, over)
            if reply is not None:
                replies.append(reply)
                if left is not None:
                    left = max(left - len(reply) - 1, 0)
        _log_over(over, reply_limit)
        return b"[" + b",".join(replies) + b"]" if replies else None

    def _not_a_request(self, raw: Any) -> int:
        """-32600 for valid JSON that is no request object, -32700 for what is not JSON."""
        try:
            self._decode_any(raw)
        except (*_DECODE_ERRORS, msgspec.ValidationError):
            return ErrorCode.PARSE_ERROR
        return ErrorCode.INVALID_REQUEST

    # --- one request ---------------------------------------------------------------------

    async def _answer(
        self, env: _Envelope, ctx: Context, limit: int | None, over: list[str]
    ) -> bytes | None:
        """The reply to one request, fitted into `limit` bytes; the names of methods
        whose reply did not fit are added to `over` (for one log line per request line)."""
        notification = env.id is _UNSET
        rid = env.id if not notification and _valid_id(env.id) else None
        name = env.method if type(env.method) is str else "?"
        try:
            bound = self._lookup(env, ctx)
            params = self._decode_params(bound, env.params)
        except _Failure as failure:
            if notification and failure.code != ErrorCode.INVALID_REQUEST:
                return None
            return self._fitted(rid, self._error_line(rid, failure), limit, name, over)
        try:
            result = await self._call(bound.method, ctx, params)
        except _Failure as failure:
            if notification:
                return None
            return self._fitted(rid, self._error_line(rid, failure), limit, name, over)
        if notification:
            return None
        try:
            body = self._encode(result)
        except _ENCODE_ERRORS:
            log.exception("the result of %s cannot be encoded", bound.method.name)
            return self._error_line(rid, _Failure(ErrorCode.INTERNAL_ERROR))
        reply = _HEAD + self._encode(rid) + b',"result":' + body + b"}"
        return self._fitted(rid, reply, limit, name, over)

    def _fitted(
        self, rid: Any, reply: bytes, limit: int | None, name: str, over: list[str]
    ) -> bytes:
        """`reply`, or when it is over `limit` bytes a -32006 saying so, with its id.
        A reply no larger than that error is sent as it is: replacing it saves nothing."""
        if limit is None or len(reply) <= limit:
            return reply
        message = (
            f"the reply would take {len(reply)} bytes, more than the {limit} this connection "
            "may still be sent at once; the call ran, ask for less (e.g. a smaller `limit`)"
        )
        data = {"limit": limit, "size": len(reply)}
        error = self._error_line(rid, _Failure(ErrorCode.REQUEST_TOO_LARGE, message, data))
        if len(error) >= len(reply):
            return reply
        over.append(name)
        return error

    def _lookup(self, env: _Envelope, ctx: Context) -> _Bound:
        if env.jsonrpc != "2.0" or type(env.method) is not str:
            raise _Failure(ErrorCode.INVALID_REQUEST)
        if env.id is not _UNSET and not _valid_id(env.id):
            raise _Failure(ErrorCode.INVALID_REQUEST)
        if env.params is not _UNSET and memoryview(env.params)[0] not in b"{[":
            raise _Failure(ErrorCode.INVALID_REQUEST)  # params must be structured
        bound = self._methods.get(env.method)
        if not ctx.authenticated and (bound is None or bound.method.requires_auth):
            raise _Failure(ErrorCode.UNAUTHORIZED)  # unknown names too: nothing to learn
        if bound is None:
            raise _Failure(ErrorCode.METHOD_NOT_FOUND)
        return bound

    def _decode_params(self, bound: _Bound, raw: Any) -> Any:
        method = bound.method
        if bound.decode is None:
            given = self._decode_structured(raw) if raw is not _UNSET else None
            if given:
                # Name what was given, as every other -32602 names its field.
                first = next(iter(given))
                field = f"$.params.{first}" if isinstance(given, dict) else "$.params[0]"
                raise _params_error(f"{method.name} takes no params", field)
            return None
        if raw is _UNSET:
            if not bound.struct:
                raise _params_error(f"{method.name} needs params")
            raw = b"{}"
        elif bound.struct and memoryview(raw)[0] == 0x5B:  # "["
            raw = self._positional(bound, raw)
        try:
            return bound.decode(raw)
        except msgspec.ValidationError as exc:
            raise _invalid_params(exc) from None
        except _DECODE_ERRORS:
            raise _Failure(ErrorCode.PARSE_ERROR) from None

    def _decode_structured(self, raw: Any) -> Any:
        """The params as builtins (only for no-params methods, where they are tiny)."""
        try:
            return self._decode_any(raw)
        except (*_DECODE_ERRORS, msgspec.ValidationError):
            raise _Failure(ErrorCode.PARSE_ERROR) from None

    def _positional(self, bound: _Bound, raw: Any) -> bytes:
        """Rewrite `[a, b]` as `{"first": a, "second": b}` so errors name the field."""
        try:
            values = self._decode_batch(raw)
        except _DECODE_ERRORS:
            raise _Failure(ErrorCode.PARSE_ERROR) from None
        if not values:
            return b"{}"
        if not bound.fields:
            raise _params_error("params must be an object (by name)")
        if len(values) > len(bound.fields):
            message = f"{bound.method.name} takes at most {len(bound.fields)} params"
            raise _params_error(message, f"$.params[{len(bound.fields)}]")
        pairs = (
            name + b":" + bytes(value) for name, value in zip(bound.fields, values, strict=False)
        )
        return b"{" + b",".join(pairs) + b"}"

    # --- the call --------------------------------------------------------------------------

    async def _call(self, method: Method, ctx: Context, params: Any) -> Any:
        if self._library is not None:
            return await self._library.call(method, ctx, params)
        try:
            return await method.handler(ctx, params)
        except Exception as exc:
            raise _failure_from(method, exc) from None

    # --- encoding ----------------------------------------------------------------------------

    def _error_line(self, rid: Any, failure: _Failure) -> bytes:
        body = _ErrorBody(code=failure.code, message=failure.message, data=failure.data)
        try:
            encoded = self._encode(body)
        except _ENCODE_ERRORS:  # a WangenError whose data is not JSON: keep the message
            log.exception("error data for code %s cannot be encoded", failure.code)
            encoded = self._encode(_ErrorBody(code=failure.code, message=failure.message))
        rid_bytes = _NULL_ID if rid is None else self._encode(rid)
        return _HEAD + rid_bytes + b',"error":' + encoded + b"}"


class _LibraryCall:
    """The "jsonrpcserver" engine: jsonrpcserver 5 looks the method up, binds and calls it.

    It gets the request already decoded (a no-op deserializer and validator), so it never
    sees raw text. Imported only when chosen: the default engine does not need it.
    """

    def __init__(self, methods: list[Method]) -> None:
        with warnings.catch_warnings():  # it reads its schema with a deprecated API
            warnings.simplefilter("ignore", DeprecationWarning)
            from jsonrpcserver import Error, Success, async_dispatch_to_response
        from oslash.either import Left

        self._dispatch = async_dispatch_to_response
        self._left = Left
        self._success, self._error = Success, Error
        self._table = {m.name: self._wrap(m) for m in methods}

    async def call(self, method: Method, ctx: Context, params: Any) -> Any:
        request = {"jsonrpc": "2.0", "method": method.name, "params": [params], "id": 0}
        response = await self._dispatch(
            "",
            self._table,
            context=ctx,
            deserializer=lambda _text: request,
            validator=lambda _request: None,
        )
        if isinstance(response, self._left):
            error = response._error
            if isinstance(error.data, _Failure):  # our wrapper's Error(...)
                raise error.data
            # the library's own trouble (its message may hold internals): log, hide
            log.error("jsonrpcserver failed on %s: %s %s", method.name, error.message, error.data)
            raise _Failure(ErrorCode.INTERNAL_ERROR)
        return response._value.result

    def _wrap(self, method: Method) -> Callable[[Any, Any], Awaitable[Any]]:
        """The method as jsonrpcserver calls it: (context, params) -> Success | Error.

        The Error carries our own failure as its data, so a Left without one is known to
        come from the library itself.
        """

        async def call(ctx: Any, params: Any) -> Any:
            try:
                return self._success(await method.handler(ctx, params))
            except Exception as exc:
                failure = _failure_from(method, exc)
                return self._error(failure.code, failure.message, failure)

        call.__name__ = method.name
        return call
