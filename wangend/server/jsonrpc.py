"""A sans-IO JSON-RPC 2.0 dispatcher: one line in, one reply line (or nothing) out.

jsonrpcserver 5 does the method-call plumbing, but it never sees raw text: it spells
errors its own way, answers a whole batch with one -32600, validates slowly and puts
`str(exc)` of a crashing method into -32603. So the envelope is decoded and checked here
with msgspec, per the specification:

* invalid JSON or UTF-8 -> -32700, id null; valid JSON that is not a request -> -32600;
* a batch is answered element by element; `[]` is one -32600; notifications (no `id`)
  are never answered, not even with an error; a batch of notifications gets nothing;
* params are decoded straight into the method's msgspec Struct, so -32602 names the
  field (`data: {"field": "$.params.steps"}`); params are by name, a JSON object;
* a method's WangenError keeps its code and message; anything else is a bare -32603
  "Internal error" and its traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from jsonrpcserver import Error, Success, async_dispatch_to_response
from jsonrpcserver.response import ErrorResponse
from jsonrpcserver.sentinels import NODATA
from oslash.either import Left

from ..errors import WangenError, invalid_params_from
from ..protocol import ErrorCode

__all__ = ["Dispatcher", "Method", "Session"]

log = logging.getLogger("wangend.rpc")

UNSET = msgspec.UNSET
MESSAGES = {
    ErrorCode.PARSE_ERROR: "Parse error",
    ErrorCode.INVALID_REQUEST: "Invalid Request",
    ErrorCode.METHOD_NOT_FOUND: "Method not found",
    ErrorCode.INVALID_PARAMS: "Invalid params",
    ErrorCode.INTERNAL_ERROR: "Internal error",
    ErrorCode.UNAUTHORIZED: "Unauthorized: send auth with the daemon's token first",
}


class Session(Protocol):
    """What the dispatcher needs to know about the connection a line came from."""

    authenticated: bool


Handler = Callable[[Any, Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    handler: Handler  # async (session, params) -> result
    params: type | None = None  # a msgspec Struct; None: the method takes no params
    requires_auth: bool = True


class _Envelope(msgspec.Struct):
    jsonrpc: Any = UNSET
    method: Any = UNSET
    params: msgspec.Raw = UNSET  # type: ignore[assignment]
    id: Any = UNSET


class _ErrorBody(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class _Reply(msgspec.Struct, omit_defaults=True):
    jsonrpc: str
    id: Any
    result: Any = UNSET
    error: _ErrorBody | msgspec.UnsetType = UNSET


class _Failure(Exception):
    def __init__(self, code: int, message: str | None = None, data: Any = None) -> None:
        self.code = code
        self.message = message or MESSAGES.get(code, "Error")
        self.data = data


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))


class Dispatcher:
    def __init__(self, methods: Iterable[Method]) -> None:
        self._methods = {m.name: m for m in methods}
        self._encode = msgspec.json.Encoder().encode
        self._decode_one = msgspec.json.Decoder(_Envelope).decode
        self._decode_batch = msgspec.json.Decoder(list[msgspec.Raw]).decode
        # jsonrpcserver's method table: one entry per method, taking the decoded params.
        self._table = {name: self._bridge(m) for name, m in self._methods.items()}

    # --- entry point ------------------------------------------------------------------

    async def handle_line(self, line: bytes, session: Session) -> bytes | None:
        """Answer one NDJSON line; None when nothing must be sent back."""
        body = line.lstrip()
        if body[:1] == b"[":
            try:
                elements = self._decode_batch(body)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                return self._error_line(None, _Failure(ErrorCode.PARSE_ERROR))
            if not elements:
                return self._error_line(None, _Failure(ErrorCode.INVALID_REQUEST))
            replies = [r for r in [await self._one(bytes(e), session) for e in elements] if r]
            return b"[" + b",".join(replies) + b"]" if replies else None
        return await self._one(body, session)

    # --- one request ---------------------------------------------------------------------

    async def _one(self, raw: bytes, session: Session) -> bytes | None:
        try:
            env = self._decode_one(raw)
        except msgspec.ValidationError:  # JSON, but not an object
            return self._error_line(None, _Failure(self._not_object_code(raw)))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return self._error_line(None, _Failure(ErrorCode.PARSE_ERROR))
        rid = env.id if env.id is not UNSET and _valid_id(env.id) else None
        try:
            method, params = self._check(env, session)
        except _Failure as exc:
            if env.id is UNSET and exc.code != ErrorCode.INVALID_REQUEST:
                return None  # a notification is never answered
            return self._error_line(rid, exc)
        response = await async_dispatch_to_response(
            "",
            self._table,
            context=session,
            deserializer=lambda _: {
                "jsonrpc": "2.0",
                "method": method.name,
                "params": {"params": params},
                "id": 0,
            },
            validator=lambda request: request,
        )
        if env.id is UNSET:
            return None
        if isinstance(response, Left):  # jsonrpcserver answers with oslash's Either
            error: ErrorResponse = response._error
            data = None if error.data is NODATA else error.data
            return self._error_line(rid, _Failure(error.code, error.message, data))
        return self._encode(_Reply(jsonrpc="2.0", id=rid, result=response._value.result))

    def _check(self, env: _Envelope, session: Session) -> tuple[Method, Any]:
        if env.jsonrpc != "2.0" or not isinstance(env.method, str):
            raise _Failure(ErrorCode.INVALID_REQUEST)
        if env.id is not UNSET and not _valid_id(env.id):
            raise _Failure(ErrorCode.INVALID_REQUEST, data={"field": "$.id"})
        method = self._methods.get(env.method)
        if method is None:
            raise _Failure(ErrorCode.METHOD_NOT_FOUND)
        if method.requires_auth and not session.authenticated:
            raise _Failure(ErrorCode.UNAUTHORIZED)
        return method, self._params(method, env.params)

    @staticmethod
    def _params(method: Method, raw: Any) -> Any:
        text = b"" if raw is UNSET else bytes(raw).strip()
        if text[:1] not in (b"", b"{", b"["):
            raise _Failure(ErrorCode.INVALID_REQUEST, data={"field": "$.params"})
        if method.params is None:
            if text in (b"", b"{}", b"[]") or text.replace(b" ", b"") in (b"{}", b"[]"):
                return None
            raise _Failure(
                ErrorCode.INVALID_PARAMS,
                f"{method.name} takes no params",
                {"field": "$.params", "message": f"{method.name} takes no params"},
            )
        if text[:1] == b"[":
            if text.replace(b" ", b"") == b"[]":
                text = b"{}"
            else:
                message = "params must be an object (by name)"
                raise _Failure(
                    ErrorCode.INVALID_PARAMS, message, {"field": "$.params", "message": message}
                )
        try:
            return msgspec.json.decode(text or b"{}", type=method.params)
        except msgspec.ValidationError as exc:
            err = invalid_params_from(exc)
            raise _Failure(ErrorCode.INVALID_PARAMS, err.message, err.data) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            raise _Failure(ErrorCode.PARSE_ERROR) from None

    def _bridge(self, method: Method) -> Callable[..., Awaitable[Any]]:
        """Wrap a handler in jsonrpcserver's Result type; map every exception here."""

        async def call(session: Any, params: Any) -> Any:
            try:
                return Success(await method.handler(session, params))
            except WangenError as exc:
                return Error(int(exc.code), exc.message, exc.data)
            except Exception:
                log.exception("method %s failed", method.name)
                return Error(ErrorCode.INTERNAL_ERROR, MESSAGES[ErrorCode.INTERNAL_ERROR])

        call.__name__ = method.name
        return call

    # --- encoding ---------------------------------------------------------------------------

    @staticmethod
    def _not_object_code(raw: bytes) -> int:
        try:
            msgspec.json.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return ErrorCode.PARSE_ERROR
        return ErrorCode.INVALID_REQUEST

    def _error_line(self, rid: Any, exc: _Failure) -> bytes:
        body = _ErrorBody(code=int(exc.code), message=exc.message, data=exc.data)
        return self._encode(_Reply(jsonrpc="2.0", id=rid, error=body))

    def error_line(self, code: int, message: str, data: Any = None) -> bytes:
        """An error reply with id null, for the transport (e.g. a line over the cap)."""
        return self._error_line(None, _Failure(code, message, data))
