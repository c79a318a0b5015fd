"""Putting one file into the output folder so that a file under its final name is whole.

Every output (video, image, sidecar, source image) goes the same way:

1. `write(temp)` fills a hidden temp file in the destination folder
   (`.stem.<random>.tmp.ext`: same filesystem, so the last step is a rename, not a copy);
2. the data is fsynced before any name points at it;
3. the temp file is hard-linked to the first free name, `stem.ext`, `stem(2).ext`, ...
   A link fails when the name exists, so claiming is atomic even against a second writer
   in the same instant and an existing file is never replaced. Filesystems without hard
   links (some FUSE and SMB mounts) reserve the name with O_EXCL and move the data over it;
4. the directory is fsynced and the temp file removed, whatever happened.

Transient errors are retried from step 1 with exponential backoff, each retry logged:
EAGAIN/EWOULDBLOCK, EINTR, EBUSY, ETIMEDOUT, ESTALE (busy or flaky network shares), EIO
(an NFS soft mount that timed out) and ENOSPC/EDQUOT (space is often freed within seconds
when other jobs' temp files go away; waiting costs little next to losing a finished
render). Permission, read-only filesystem, not-a-directory and name-too-long errors never
heal by waiting and fail at once. The final failure is
`JobFailure("OutputWriteFailed", "could not write <path>: <reason> ...")`.

Use: `publish(folder, stem, ".mp4", encode_into, policy)` returns the final Path.
`folder_problem(folder)` says, before a job starts, why nothing could be written there
now (read-only, no permission, nearly full), so the queue holds instead of running job
after job to the end only to fail each one at its last step.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import msgspec

from ..errors import JobFailure

__all__ = [
    "MIN_FREE_BYTES",
    "RETRYABLE_ERRNOS",
    "RetryPolicy",
    "folder_problem",
    "fsync_dir",
    "publish",
    "replace_durably",
    "with_retries",
]

log = logging.getLogger("wangend.media")

# Less free space than this in the output folder holds the queue: a 720p video is a few
# MB, and a disk this full is one a finished render would fail on. A file system smaller
# than ten times this (a small tmpfs, a quota'd share) needs a tenth of its size free.
MIN_FREE_BYTES = 64 << 20

T = TypeVar("T")

RETRYABLE_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EWOULDBLOCK,
        errno.EINTR,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EIO,
        errno.ENOSPC,
        errno.EDQUOT,
    }
)
# errnos meaning "this filesystem cannot hard-link": fall back to an O_EXCL placeholder.
NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP})
MAX_NAME_TRIES = 10_000


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """`retries` extra attempts after the first; the n-th retry waits
    backoff * 3**(n-1) seconds, at most `max_delay`."""

    retries: int = 3
    backoff: float = 0.2
    max_delay: float = 5.0

    def delay(self, retry: int) -> float:
        return min(self.max_delay, self.backoff * 3 ** (retry - 1))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def with_retries(target: Path, attempt: Callable[[], T], policy: RetryPolicy) -> T:
    """Run `attempt` until it succeeds, retrying transient OSErrors; `target` names the
    file in the log and in the JobFailure."""
    tries = policy.retries + 1
    for n in range(1, tries + 1):
        try:
            return attempt()
        except OSError as exc:
            transient = exc.errno in RETRYABLE_ERRNOS
            if transient and n < tries:
                wait = policy.delay(n)
                log.warning(
                    "writing %s failed (%s); retry %d of %d in %.2f s",
                    target, _reason(exc), n, policy.retries, wait,
                )  # fmt: skip
                time.sleep(wait)
                continue
            after = f" after {n} attempts" if n > 1 else ""
            raise JobFailure(
                "OutputWriteFailed", f"could not write {target}: {_reason(exc)}{after}"
            ) from exc
    raise AssertionError("unreachable")


def publish(
    folder: Path,
    stem: str,
    suffix: str,
    write: Callable[[Path], None],
    policy: RetryPolicy,
    *,
    reserve: Sequence[str] = (),
    on_claim: Callable[[Path], None] | None = None,
) -> Path:
    """Write a new file `folder/stem<suffix>` (or the first free `stem(N)<suffix>`) with
    `write(temp_path)` and return its absolute path. `reserve`: other suffixes that must be
    free under the same `stem(N)` too, so companions (`stem(N).json`) pair with it.
    `on_claim(temp)`: called with the temp path before anything is written to it, and
    again with the whole, fsynced file just before it is given its name (claims.py
    notes both, so a kill at any moment leaves nothing a later attempt cannot find)."""
    if not stem or Path(stem).name != stem or stem.startswith(".") or "\\" in stem:
        raise JobFailure("OutputWriteFailed", f"could not write {stem!r}: not a file name")
    folder = Path(folder).absolute()
    return with_retries(
        folder / f"{stem}{suffix}",
        lambda: _publish_once(folder, stem, suffix, write, reserve, on_claim),
        policy,
    )


def _publish_once(
    folder: Path,
    stem: str,
    suffix: str,
    write: Callable[[Path], None],
    reserve: Sequence[str],
    on_claim: Callable[[Path], None] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{stem}.{secrets.token_hex(4)}.tmp{suffix}"
    if on_claim is not None:
        on_claim(temp)  # not there yet: noted by name
    try:
        write(temp)
        with open(temp, "rb") as handle:  # the data is on disk before the name appears
            os.fsync(handle.fileno())
        if on_claim is not None:
            on_claim(temp)
        return _claim(temp, folder, stem, suffix, reserve)
    finally:
        temp.unlink(missing_ok=True)


def _claim(temp: Path, folder: Path, stem: str, suffix: str, reserve: Sequence[str]) -> Path:
    """Give `temp` the first free final name; never replaces an existing file."""
    for n in range(1, MAX_NAME_TRIES + 1):
        name = stem if n == 1 else f"{stem}({n})"
        final = folder / f"{name}{suffix}"
        if any((folder / f"{name}{other}").exists() for other in reserve):
            continue
        try:
            os.link(temp, final)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in NO_LINK_ERRNOS:
                raise
            # No hard links here: reserve the name with O_EXCL, then move the data over it.
            try:
                os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                continue
            try:
                os.replace(temp, final)
            except OSError:
                final.unlink(missing_ok=True)  # never leave the empty placeholder
                raise
        fsync_dir(folder)
        return final
    raise OSError(errno.EEXIST, f"no free name for {stem}{suffix} after {MAX_NAME_TRIES} tries")


def replace_durably(final: Path, data: bytes) -> None:
    """Put `data` in `final` (a small state file) so that, whatever happens, the name
    holds the old content or the new one, whole and on disk: a temp file beside it,
    fsynced, renamed over it, the folder fsynced. OSError goes to the caller."""
    final = Path(final)
    temp = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
    try:
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
        fsync_dir(final.parent)
    finally:
        temp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where directories cannot be synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def folder_problem(folder: Path | str, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why outputs cannot be written into `folder` now, in words, or None: it cannot be
    made, a file cannot be created in it (read-only, no permission), or less than
    `min_free` bytes (or a tenth of a smaller file system) are free. A probe file is
    created and removed; nothing else."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stats = os.statvfs(folder)
        probe = folder / f".wangend-probe.{secrets.token_hex(4)}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        return f"the output folder {folder} cannot be written: {_reason(exc)}"
    free = stats.f_bavail * stats.f_frsize
    needed = min(min_free, stats.f_blocks * stats.f_frsize // 10)
    if free < needed:
        return (
            f"the output folder {folder} is nearly full: {free >> 10} KB free, "
            f"{needed >> 10} KB needed to start a job"
        )
    return None
