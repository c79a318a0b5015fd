"""The state directory: one daemon per directory, the token file, permissions, the
queue database's startup errors, and what counts as a loopback address.

Kept apart from daemon.py because these checks run before anything else is built and
each has its own failure message and exit code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import ipaddress
import os
import secrets
import socket
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import StoreUnavailable


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def prepare_state_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(f"cannot create state dir {path}: {exc.strerror}", 2) from None
    if not os.access(path, os.W_OK):
        raise StartupError(f"state dir {path} is not writable", 2)


class StateLock:
    """An exclusive flock on `<state dir>/lock`, held for the daemon's life.

    Two daemons sharing one queue database would run every job twice; the kernel drops
    the lock when the process dies, kill -9 included, so a crash never leaves it stale.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StartupError(
                f"another wangend (pid {holder}) already uses {self.path.parent}; "
                "stop it first or pick another --state-dir",
                3,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


def load_or_create_token(path: Path) -> str:
    """Read the token, creating it (0600, 256 random bits) on first start.

    Refuses a token file that group or others can read: anyone who can read it can drive
    the daemon over TCP.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StartupError(
            f"token file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`",
            2,
        )
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise StartupError(f"token file {path} is empty; delete it to get a new one", 2)
    return token


def tokens_match(expected: str, given: str) -> bool:
    """Constant-time; surrounding whitespace is not part of a token, so a client that
    sends the token file's contents as read (its trailing newline too) is let in."""
    return hmac.compare_digest(expected.strip().encode(), given.strip().encode())


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost"; "" and "0.0.0.0" mean every interface."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def socket_host(sock: socket.socket) -> str | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None  # a Unix socket: the file's mode guards it
    return str(sock.getsockname()[0])


@contextlib.contextmanager
def database_errors(path: Path) -> Iterator[None]:
    """sqlite3 errors while opening the queue become one clear StartupError."""
    try:
        yield
    except (sqlite3.OperationalError, StoreUnavailable) as error:
        # The store says StoreUnavailable for a write SQLite refused; the reason is its cause.
        exc = error.__cause__ if isinstance(error, StoreUnavailable) else error
        if "locked" in str(exc) or "busy" in str(exc):
            raise StartupError(
                f"the queue database {path} is locked by another process ({exc}); stop "
                "whatever holds it (another wangend, a sqlite3 shell) and start again",
                3,
            ) from None
        raise StartupError(f"cannot open the queue database {path}: {exc}", 1) from None
    except sqlite3.DatabaseError as exc:
        raise StartupError(
            f"the queue database {path} cannot be used: {exc}; restore it from a backup, "
            "or move it aside to start with an empty queue",
            2,
        ) from None
