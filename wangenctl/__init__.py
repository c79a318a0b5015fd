"""wangenctl: the client for the wangend daemon, as a library and as a command.

The library is `wangenctl.client` (async, anyio): `connect()` yields a `Client` whose
`call()` and typed methods speak JSON-RPC 2.0 to the daemon while `events()` streams what
it pushes; `wangenctl.endpoint` finds the daemon and opens the byte stream, and
`wangenctl.follower.EventFollower` follows events across reconnects. The command line is
`wangenctl.cli`. This package imports nothing at load time, so `import wangenctl.cli`
stays fast; the names below load the client on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "Client",
    "DaemonUnavailable",
    "EventFollower",
    "ProtocolError",
    "RpcError",
    "WangenctlError",
    "connect",
]


def __getattr__(name: str) -> Any:
    if name == "EventFollower":
        from . import follower

        return follower.EventFollower
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'wangenctl' has no attribute {name!r}")
