"""InputAccess: which files a job may make the daemon read.

A job names its inputs by path (start images, videos, masks, audio, matting inputs), and
the daemon reads them with its own rights, which under systemd are not the client's. By
default (`input_folders = []`) any file the daemon can read is accepted, as befits a
workstation tool used by its owner. With `input_folders` set, an input must lie inside
one of them once every symlink and `..` is resolved, so a client (over TCP, with the
token) cannot make the daemon read, hash or probe anything else; the refusal names the
field and says which folders are allowed, never whether the file exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from ..errors import InvalidParams

__all__ = ["InputAccess", "sha256_file"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks: what job records keep of each input
    (media, LoRA files) so an output says exactly what it was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
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
        outside the allowed folders or is not a file."""
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
        if not path.is_file():
            raise InvalidParams(f"{what}: {path} does not exist or is not a file", field=field)
        return path
