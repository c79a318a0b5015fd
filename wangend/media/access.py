"""InputAccess: which files a job may make the daemon read.

A job names its inputs by path (start images, videos, masks, audio, matting inputs), and
the daemon reads them with its own rights, which under systemd are not the client's. By
default (`input_folders = []`) any file the daemon can read is accepted, as befits a
workstation tool used by its owner. With `input_folders` set, an input must lie inside
one of them once every symlink and `..` is resolved, so a client (over TCP, with the
token) cannot make the daemon read, hash or probe anything else; the refusal names the
field and says which folders are allowed, never whether the file exists.

Only regular files (or links to them) are inputs. What is read here and by the adapter
libraries is opened with `open_regular`: stat first, so a named pipe or a device is
never opened (opening a FIFO blocks until a writer comes, and held every client's
`loras`, `validate` and `enqueue` once), then a non-blocking open checked with fstat, so
one swapped in between cannot block either.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from ..errors import InvalidParams

__all__ = [
    "InputAccess",
    "describe_mode",
    "is_regular",
    "open_regular",
    "readable_message",
    "sha256_file",
]

_ERRNO = re.compile(r"\[Errno -?\d+\] ")  # what PyAV puts in front of FFmpeg's words


def readable_message(message: str, path: Path) -> str:
    """A media error as people read it: without the `[Errno 1094995529]` PyAV puts in
    front of FFmpeg's words, and without the path said a second time."""
    return _ERRNO.sub("", message).replace(f": '{path}'", "")


def describe_mode(mode: int) -> str:
    """What a file that is not a regular one is, in words ("a named pipe (FIFO)")."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def is_regular(path: Path) -> bool:
    """A regular file, or a link to one: what a folder listing may offer. Stat only,
    never opened; False for what cannot be stat'ed (a dangling link)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _require_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, f"{path.name} is {describe_mode(mode)}, not a regular file")


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading in binary, if it is a regular file (a link to one
    included); see the module docstring. Raises OSError: ENOENT, EACCES, ..., or EINVAL
    whose `strerror` says what the file is instead."""
    _require_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks: what job records keep of each input
    (media, LoRA files) so an output says exactly what it was made from."""
    digest = hashlib.sha256()
    with open_regular(Path(path)) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class InputAccess:
    def __init__(self, folders: Iterable[str | Path] = ()) -> None:
        self.folders = [Path(f).expanduser().resolve() for f in folders]

    @property
    def restricted(self) -> bool:
        return bool(self.folders)

    def check(self, raw: str, field: str, what: str = "input") -> Path:
        """The absolute path for `raw`, refused (InvalidParams naming `field`) when it is
        outside the allowed folders, missing, or not a regular file (it says which)."""
        path = Path(raw).expanduser().absolute()
        if self.folders:
            real = path.resolve()
            if not any(real.is_relative_to(folder) for folder in self.folders):
                allowed = ", ".join(str(f) for f in self.folders)
                raise InvalidParams(
                    f"{what} {raw} is outside the folders this daemon reads inputs from "
                    f"({allowed})",
                    field=field,
                )
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise InvalidParams(f"{what}: {path} does not exist", field=field) from None
        except OSError as exc:
            message = f"{what}: {path} cannot be read ({exc.strerror or exc})"
            raise InvalidParams(message, field=field) from None
        if not stat.S_ISREG(mode):
            message = f"{what}: {path} is {describe_mode(mode)}, not a regular file"
            raise InvalidParams(message, field=field)
        return path
