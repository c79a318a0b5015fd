"""Default locations: the state dir, the output dir, the Unix socket and the token file.

The daemon (config.py) and the client (wangenctl/endpoint.py) must agree on these
without talking, so they live here as pure functions of the environment. It is a leaf
like protocol.py: nothing heavy is imported, so wangenctl can use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["default_output_dir", "default_socket_path", "default_state_dir", "default_token_file"]


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("WANGEN_STATE_DIR"):
        return Path(env["WANGEN_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "state")
    return Path(base).expanduser() / "wangend"


def default_output_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("WANGEN_OUTPUT_DIR"):
        return Path(env["WANGEN_OUTPUT_DIR"]).expanduser()
    base = env.get("XDG_VIDEOS_DIR") or str(Path(env.get("HOME", "~")) / "Videos")
    return Path(base).expanduser() / "wangend"


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """`$WANGEN_SOCKET`, else the state dir's `wangend.sock`.

    The state dir rather than `$XDG_RUNTIME_DIR` so a daemon under systemd and a client
    in a login shell agree whenever they agree on the state dir.
    """
    env = os.environ if env is None else env
    if env.get("WANGEN_SOCKET"):
        return Path(env["WANGEN_SOCKET"]).expanduser()
    return default_state_dir(env) / "wangend.sock"


def default_token_file(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("WANGEN_TOKEN_FILE"):
        return Path(env["WANGEN_TOKEN_FILE"]).expanduser()
    return default_state_dir(env) / "token"
