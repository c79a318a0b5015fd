"""Where the daemon is and how to reach it: addresses, the TCP token, byte transports.

This module exists so the client (client.py) only speaks JSON-RPC over a byte stream:
finding the daemon (an explicit URL, `$WANGEN_URL`, the default socket, TCP), reading
the token TCP needs, and opening the stream are decided here. TCP and Unix sockets differ
only in their `Transport` (how the byte stream is opened and whether the daemon wants a
token); the client on top works on any byte stream.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

import anyio
import anyio.abc

from wangend.locations import default_socket_path, default_token_file
from wangend.protocol import DEFAULT_PORT

from .errors import AuthError

__all__ = [
    "Endpoint",
    "Resolved",
    "TcpTransport",
    "Transport",
    "UnixTransport",
    "parse_url",
    "read_token",
    "resolve_endpoint",
    "resolve_token_file",
    "transport_for",
]

# --- where the daemon is ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address: `tcp://host:port` or `unix:///path`."""

    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def url(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_url(url: str) -> Endpoint:
    """`tcp://host[:port]`, `unix:///path`, or a bare socket path; ValueError otherwise."""
    text = url.strip()
    if not text:
        raise ValueError("empty daemon URL")
    if "://" not in text:
        return Endpoint("unix", path=str(Path(text).expanduser()))
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme == "unix":
        if not rest:
            raise ValueError(f"no socket path in {url!r}: use unix:///path/to/wangend.sock")
        return Endpoint("unix", path=str(Path(rest).expanduser()))
    if scheme == "tcp":
        parts = urlsplit(text)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"unexpected path in {url!r}: use tcp://host:port")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in {url!r}: use tcp://host:port") from None
        return Endpoint("tcp", host=parts.hostname or "127.0.0.1", port=port or DEFAULT_PORT)
    raise ValueError(
        f"unsupported scheme {scheme!r} in {url!r}: use tcp://host:port or unix:///path"
    )


class Resolved(NamedTuple):
    endpoint: Endpoint
    where: str  # what the error message says the client looked at


def resolve_endpoint(url: str | None = None, env: Mapping[str, str] | None = None) -> Resolved:
    """The explicit URL, else `$WANGEN_URL`, else the default Unix socket when it exists,
    else TCP on 127.0.0.1 at the default port.

    The socket is preferred because it needs no token and is private to the user; the
    TCP fallback finds a daemon started with `--no-socket` or in another state dir.
    """
    env = os.environ if env is None else env
    url = url or env.get("WANGEN_URL") or None
    if url:
        endpoint = parse_url(url)
        return Resolved(endpoint, endpoint.url)
    unix = Endpoint("unix", path=str(default_socket_path(env)))
    if Path(unix.path).exists():
        return Resolved(unix, unix.url)
    tcp = Endpoint("tcp", host="127.0.0.1", port=DEFAULT_PORT)
    return Resolved(tcp, f"{unix.url} or {tcp.url}")


def resolve_token_file(
    token_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """The explicit file, else `$WANGEN_TOKEN_FILE`, else `<state dir>/token`."""
    if token_file:
        return Path(token_file).expanduser()
    return default_token_file(env)


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        reason = exc.strerror.lower() if exc.strerror else type(exc).__name__
        raise AuthError(
            f"cannot read the token file {path} ({reason}); pass --token-file, "
            "or use the Unix socket, which needs no token"
        ) from None
    if not token:
        raise AuthError(f"the token file {path} is empty")
    return token


# --- transports ---------------------------------------------------------------------------


class Transport(abc.ABC):
    """How the byte stream to the daemon is opened. Everything else is shared."""

    needs_auth: bool = False

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    @abc.abstractmethod
    async def open(self) -> anyio.abc.ByteStream: ...


class TcpTransport(Transport):
    needs_auth = True  # any local user can reach a TCP port; the token proves who calls

    async def open(self) -> anyio.abc.ByteStream:
        return await anyio.connect_tcp(self.endpoint.host, self.endpoint.port)


class UnixTransport(Transport):
    async def open(self) -> anyio.abc.ByteStream:
        return await anyio.connect_unix(self.endpoint.path)


def transport_for(endpoint: Endpoint) -> Transport:
    return TcpTransport(endpoint) if endpoint.scheme == "tcp" else UnixTransport(endpoint)
