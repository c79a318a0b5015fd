"""wangenctl's error tree, and the one place socket errors become part of it.

    WangenctlError          base: every failure the client reports to a person
    ├── DaemonUnavailable   nothing answers at the address, or the daemon hung up
    ├── AuthError           the TCP token is missing, unreadable or refused
    ├── RpcError            the daemon answered a call with a JSON-RPC error
    └── ProtocolError       the daemon sent something the protocol does not allow

Callers never see `OSError`, `anyio.BrokenResourceError` and friends: the transport and
the connection's reader wrap their socket work in `translate_socket_errors`, so a CLI can
catch `WangenctlError` once and print one line.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from wangend.protocol import ErrorCode

__all__ = [
    "AuthError",
    "DaemonUnavailable",
    "ProtocolError",
    "RpcError",
    "WangenctlError",
    "invalid_params_text",
    "translate_socket_errors",
]

START_HINT = "start one with `wangend serve`"


class WangenctlError(Exception):
    """Base of every error the client raises; `str()` is one human line."""


class DaemonUnavailable(WangenctlError):
    """No daemon at `where`, or the connection to it was lost.

    `where` is the address (or addresses, for the default lookup) the client tried, so
    the message tells the user exactly where it looked.
    """

    def __init__(self, where: str, reason: str = "", *, lost: bool = False) -> None:
        self.where = where
        self.reason = reason
        self.lost = lost
        if lost:
            text = f"lost the connection to wangend at {where}"
            text += f" ({reason})" if reason else ""
        else:
            text = f"no wangend daemon at {where}"
            text += f" ({reason}; {START_HINT})" if reason else f" ({START_HINT})"
        super().__init__(text)


class AuthError(WangenctlError):
    """The daemon cannot be used over TCP without a valid token."""


class RpcError(WangenctlError):
    """An error reply. `code` is a JSON-RPC / wangend `ErrorCode` value when known."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        self.code = code
        self.message = message
        self.data = data
        super().__init__(message)

    @property
    def field(self) -> str | None:
        """For -32602: the path of the offending field (`$.params.steps`), if given."""
        if self.code == ErrorCode.INVALID_PARAMS and isinstance(self.data, dict):
            field = self.data.get("field")
            return str(field) if field else None
        return None

    def __str__(self) -> str:
        """The line a person reads: "steps: must be at most 500", not msgspec's "Expected
        `int` <= 500". `message` keeps the daemon's own words (--json prints those)."""
        return invalid_params_text(self.message, self.field) if self.field else self.message


# msgspec's validation messages (the daemon passes them on for -32602), as a person would
# put them. Anything else the daemon says is its own sentence already and is kept.
_NOUNS = {"str": "characters", "array": "items", "object": "entries"}
_KINDS = {
    "int": "a whole number",
    "float": "a number",
    "str": "text",
    "bool": "true or false",
    "array": "a list",
    "object": "an object",
    "null": "null",
}
_BOUNDS = {">=": "at least", "<=": "at most", ">": "more than", "<": "less than"}
_MSGSPEC: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"Expected `\w+` of length >= 1"), lambda m: "must not be empty"),
    (
        re.compile(r"Expected `(\w+)` of length (>=|<=) (\d+)"),
        lambda m: f"must have {_BOUNDS[m[2]]} {m[3]} {_NOUNS.get(m[1], 'items')}",
    ),
    (
        re.compile(r"Expected `(?:int|float)` (>=|<=|>|<) (\S+)"),
        lambda m: f"must be {_BOUNDS[m[1]]} {m[2]}",
    ),
    (
        re.compile(r"Expected `\w+` that's a multiple of (\S+)"),
        lambda m: f"must be a multiple of {m[1]}",
    ),
    (re.compile(r"Expected `\w+` matching regex (.+)"), lambda m: f"must match {m[1]}"),
    (
        re.compile(r"Expected `([\w |]+)`, got `(\w+)`"),
        lambda m: f"must be {_kinds(m[1])}, not {_kinds(m[2])}",
    ),
    (re.compile(r"Invalid (?:enum )?value (.+)"), lambda m: f"{m[1]} is not one of the choices"),
    (re.compile(r"Object missing required field `\w+`"), lambda m: "is required"),
    (re.compile(r"Object contains unknown field `\w+`"), lambda m: "is not a known field"),
]


def _kinds(spec: str) -> str:
    return " or ".join(_KINDS.get(name, name) for name in spec.split(" | "))


def invalid_params_text(message: str, field: str) -> str:
    """A -32602 error for a person: "prompt: must not be empty" from msgspec's "Expected
    `str` of length >= 1" at `$.params.prompt`.

    The field is shown as the client sent it, without `$.params.`; a message of the
    daemon's own that already names the field ("output_name must not be blank") is left
    as it is, and one that does not gets the field in front.
    """
    name = field.removeprefix("$.params").removeprefix(".").removeprefix("$.") or "params"
    for pattern, say in _MSGSPEC:
        if match := pattern.fullmatch(message):
            return f"{name}: {say(match)}"
    words = re.findall(r"[A-Za-z_]\w*", name)
    if not words or re.search(rf"\b{words[-1]}\b", message):
        return message
    return f"{name}: {message}"


class ProtocolError(WangenctlError):
    """A line from the daemon that is not JSON-RPC 2.0 as wangend speaks it."""


_REASONS = {
    errno.ENOENT: "no such socket",
    errno.ECONNREFUSED: "connection refused",
    errno.EACCES: "permission denied",
    errno.ENOTSOCK: "not a socket",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        if exc.errno in _REASONS:
            return _REASONS[exc.errno]
        if exc.strerror:
            return exc.strerror.lower()
        # anyio.connect_tcp raises a bare OSError chained to the last address's failure.
        if isinstance(exc.__cause__, OSError):
            return _reason(exc.__cause__)
        return str(exc) or type(exc).__name__
    return "the daemon closed the connection"


@contextmanager
def translate_socket_errors(where: str, *, connected: bool) -> Iterator[None]:
    """Turn what sockets raise into `DaemonUnavailable`.

    `connected` says which story to tell: before the connection exists a failure means
    "no daemon there"; after, it means the daemon went away (it stopped or crashed).
    """
    try:
        yield
    except (
        OSError,
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
        anyio.EndOfStream,
        anyio.IncompleteRead,
    ) as exc:
        raise DaemonUnavailable(where, _reason(exc), lost=connected) from None
