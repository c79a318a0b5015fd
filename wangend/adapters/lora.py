"""The LoRA library: which LoRA files exist for a model family, read without loading them.

Layout (the one Wan2GP users already have): each root holds a folder per model family,
and LoRAs may sit in subfolders of it. A family plus a model-size hint picks the folders,
searched in order (the first folder holding a name wins):

    family          size hint      folders
    wan2.1-t2v      1.3B           wan_1.3B
    wan2.1-t2v      14B or none    wan
    wan2.1-vace     1.3B           wan_1.3B
    wan2.1-vace     14B or none    wan
    wan2.1-i2v      any            wan_i2v
    wan2.2-t2v      any            wan2_2, wan       (Wan 2.2 A14B takes 2.1 14B LoRAs)
    wan2.2-i2v      any            wan2_2_i2v, wan_i2v
    wan2.2-ti2v     any            wan_5B
    any family      tiny           wan_tiny          (the built-in test model)
    anything else   any            <family>

`size_hint(model_name)` reads the hint from names such as "wan2.1-t2v-1.3b".

A LoRA's name is its path below the family folder without the extension ("style/anime"
for `loras/wan/style/anime.safetensors`); the extension may be given too. Only
`.safetensors` and `.sft` files are LoRAs; only their JSON header is read (8-byte length,
then JSON), never a pickle, never the tensors.

Only regular files (or links to them) are LoRAs: every candidate is stat'ed, never opened,
before it is listed, and a header is read through a non-blocking open checked again with
fstat. A named pipe in the folder once hung `loras` forever inside `open()`, holding
the libraries' lock, and with it `validate`, `enqueue` and `presets` for every client.

Caching: a family's listing is kept per (family, folder) with the mtime of every
directory in it; `list`/`find` stat those directories (a handful of syscalls) and walk a
folder again only when one changed. A directory modified within the last RACY_SECONDS is
walked again next time too, because a file added in the same clock tick as the walk
leaves the mtime unchanged (git handles its index the same way). Headers are cached by
(path, size, mtime_ns), and so is `sha256`.

How to call it (the daemon builds one library and owns it):

    library = LoRALibrary([Path("~/loras").expanduser()])
    library.list("wan2.1-t2v", size="1.3B") -> list[LoraInfo]
    library.find("style/anime", "wan2.1-t2v", size="1.3B") -> Path   # raises LoraLookupError
    library.info(path) -> LoraInfo
    library.sha256(path) -> str
    build_lora_payload(...) lives in adapters/payload.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import time
from pathlib import Path, PurePosixPath
from typing import Literal

from msgspec import Struct

from ..media.access import describe_mode, is_regular, open_regular, sha256_file

__all__ = [
    "LORA_SUFFIXES",
    "LoRALibrary",
    "LoraFormat",
    "LoraHeaderError",
    "LoraInfo",
    "LoraLookupError",
    "family_folders",
    "read_header",
    "size_hint",
]

LORA_SUFFIXES = (".safetensors", ".sft")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap
RACY_SECONDS = 2.0
LoraFormat = Literal["diffusers", "wan", "kohya", "unknown"]

_FAMILY_FOLDERS: dict[str, tuple[str, ...]] = {
    "wan2.1-i2v": ("wan_i2v",),
    "wan2.2-t2v": ("wan2_2", "wan"),
    "wan2.2-i2v": ("wan2_2_i2v", "wan_i2v"),
    "wan2.2-ti2v": ("wan_5B",),
}
_SIZE_PATTERN = re.compile(r"(?:^|[-_/])(a14b|14b|1\.3b|5b|tiny)(?:$|[-_/])", re.IGNORECASE)


class LoraLookupError(Exception):
    """A LoRA name that cannot be used: missing, or pointing outside its folder."""


class LoraHeaderError(Exception):
    """A file that is not a readable safetensors file (bad or truncated header)."""


class LoraInfo(Struct, frozen=True, kw_only=True):
    name: str  # what jobs write in `loras[].name`
    path: str
    size: int
    format: LoraFormat = "unknown"  # diffusers/peft, original Wan, musubi/kohya
    rank: int | None = None  # from the first down/A matrix
    tensors: int = 0
    error: str | None = None  # set when the header cannot be read; listed, never loaded


def size_hint(model_name: str) -> str | None:
    """ "wan2.1-t2v-1.3b" -> "1.3B", "tiny" -> "tiny", "Wan2.2-T2V-A14B" -> "14B"."""
    if model_name.strip().lower() == "tiny":
        return "tiny"
    match = _SIZE_PATTERN.search(model_name)
    if not match:
        return None
    token = match.group(1).lower()
    return {"a14b": "14B", "14b": "14B", "1.3b": "1.3B", "5b": "5B", "tiny": "tiny"}[token]


def family_folders(family: str, size: str | None = None) -> tuple[str, ...]:
    """The per-family folder names below a root, in search order (see the table above)."""
    if size == "tiny":
        return ("wan_tiny",)
    if family in ("wan2.1-t2v", "wan2.1-vace"):
        return ("wan_1.3B",) if size == "1.3B" else ("wan",)
    if family in _FAMILY_FOLDERS:
        return _FAMILY_FOLDERS[family]
    if not family or "/" in family or "\\" in family or family.startswith("."):
        raise LoraLookupError(f"model family {family!r} has no LoRA folder")
    return (family,)


def read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's JSON header, checked against the file
    size so a truncated download is caught here and not halfway through a load."""
    try:
        size = path.stat().st_size
        with open_regular(path) as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise LoraHeaderError(f"{path.name} is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise LoraHeaderError(f"{path.name} has no valid safetensors header")
            raw = handle.read(length)
    except OSError as exc:
        raise LoraHeaderError(f"{path.name} cannot be read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise LoraHeaderError(f"{path.name} has a safetensors header that is not JSON") from None
    if not isinstance(header, dict):
        raise LoraHeaderError(f"{path.name} has a safetensors header that is not an object")
    data_size = size - 8 - length
    tensors: dict[str, dict] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(v, int) for v in offsets)
            or not isinstance(shape, list)
            or not isinstance(entry.get("dtype"), str)
        ):
            raise LoraHeaderError(f"{path.name} has a malformed entry for tensor {key!r}")
        if not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise LoraHeaderError(f"{path.name} is truncated (tensor {key!r} lies past its end)")
        tensors[key] = entry
    return tensors


def _describe(tensors: dict[str, dict]) -> tuple[LoraFormat, int | None]:
    keys = list(tensors)
    if any(k.startswith("diffusion_model.") for k in keys):
        fmt: LoraFormat = "wan"
    elif any(k.startswith("lora_unet_") for k in keys):
        fmt = "kohya"
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        fmt = "diffusers"
    else:
        fmt = "unknown"
    rank = None
    for key in sorted(keys):
        if key.endswith((".lora_A.weight", ".lora_down.weight")):
            shape = tensors[key]["shape"]
            if shape:
                rank = int(shape[0])
            break
    return fmt, rank


def _check_name(name: str) -> PurePosixPath:
    """A LoRA name is a relative path inside its folder; '..', absolute paths and drive
    letters are refused so a job can never read an arbitrary file."""
    text = name.replace("\\", "/").strip()
    relative = PurePosixPath(text)
    if (
        not text
        or relative.is_absolute()
        or ".." in relative.parts
        or re.match(r"^[A-Za-z]:", text)
        or "\x00" in text
    ):
        raise LoraLookupError(f"LoRA name {name!r} must be a path inside the LoRA folder")
    return relative


class _FolderListing(Struct):
    dir_mtimes: dict[str, int]  # every directory walked -> mtime_ns
    files: dict[str, str]  # name (relative, no suffix) -> absolute path
    racy: bool


class LoRALibrary:
    """Finds LoRA files per family. Owned by the daemon; not thread-safe (the enqueue path
    and the worker each call it from one thread at a time)."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [Path(root).expanduser() for root in roots]
        self._listings: dict[tuple[str, str], _FolderListing] = {}
        self._infos: dict[str, tuple[tuple[int, int], LoraInfo]] = {}
        self._hashes: dict[str, tuple[tuple[int, int], str]] = {}
        self.stats = {"walks": 0, "header_reads": 0, "hashes": 0}  # for tests and diagnostics

    # --- listing -------------------------------------------------------------------------

    def folders(self, family: str, size: str | None = None) -> list[Path]:
        return [root / sub for sub in family_folders(family, size) for root in self.roots]

    def list(self, family: str, size: str | None = None) -> list[LoraInfo]:
        """Every LoRA for the family, sorted by name (earlier folders shadow later ones)."""
        found: dict[str, str] = {}
        for folder in self.folders(family, size):
            for name, path in self._listing(family, folder).files.items():
                found.setdefault(name, path)
        return [self.info(Path(found[name]), name) for name in sorted(found)]

    def find(self, name: str, family: str, size: str | None = None) -> Path:
        """The file for `name`; LoraLookupError says why when there is none."""
        relative = _check_name(name)
        key = str(relative)
        for suffix in LORA_SUFFIXES:
            if key.lower().endswith(suffix):
                key = key[: -len(suffix)]
                break
        folders = self.folders(family, size)
        for folder in folders:
            path = self._listing(family, folder).files.get(key)
            if path is not None:
                resolved = Path(path).resolve()
                if not resolved.is_relative_to(folder.resolve()):
                    raise LoraLookupError(f"LoRA {name!r} links outside {folder}")
                if not resolved.is_file():
                    raise LoraLookupError(f"LoRA {name!r} was removed from {folder}")
                return Path(path)
        where = ", ".join(str(f) for f in folders) or "(no LoRA folders configured)"
        raise LoraLookupError(f"no LoRA named {name!r} for {family} in {where}")

    def _listing(self, family: str, folder: Path) -> _FolderListing:
        key = (family, str(folder))
        cached = self._listings.get(key)
        if cached is not None and not cached.racy and self._unchanged(cached):
            return cached
        listing = self._walk(folder)
        self._listings[key] = listing
        return listing

    @staticmethod
    def _unchanged(listing: _FolderListing) -> bool:
        for directory, mtime in listing.dir_mtimes.items():
            try:
                if os.stat(directory).st_mtime_ns != mtime:
                    return False
            except OSError:
                return False
        return True

    def _walk(self, folder: Path) -> _FolderListing:
        self.stats["walks"] += 1
        dir_mtimes: dict[str, int] = {}
        files: dict[str, str] = {}
        now_ns = time.time_ns()
        racy = False
        try:
            dir_mtimes[str(folder)] = folder.stat().st_mtime_ns
        except OSError:
            # A missing folder is remembered as such: its parent root is watched instead,
            # so creating it later is noticed.
            parent = folder.parent
            try:
                dir_mtimes[str(parent)] = parent.stat().st_mtime_ns
            except OSError:
                dir_mtimes[str(parent)] = -1
            racy = (now_ns - dir_mtimes[str(parent)]) < RACY_SECONDS * 1e9
            return _FolderListing(dir_mtimes, files, racy)
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            try:
                mtime = os.stat(dirpath).st_mtime_ns
            except OSError:
                continue
            dir_mtimes[dirpath] = mtime
            racy = racy or (now_ns - mtime) < RACY_SECONDS * 1e9
            for filename in sorted(filenames):
                if filename.startswith(".") or not filename.lower().endswith(LORA_SUFFIXES):
                    continue
                full = Path(dirpath) / filename
                if not is_regular(full):  # a FIFO, a device, a dangling link: not a LoRA
                    continue
                relative = full.relative_to(folder).as_posix()
                stem = relative.rsplit(".", 1)[0]
                files.setdefault(stem, str(full))
        return _FolderListing(dir_mtimes, files, racy)

    # --- per-file facts --------------------------------------------------------------------

    def info(self, path: Path, name: str | None = None) -> LoraInfo:
        """Header facts for one file, cached by (size, mtime). Unreadable files come back
        with `error` set rather than raising, so a listing shows them; so does what is
        not a regular file (it is never opened)."""
        facts = path.stat()
        stamp = (facts.st_size, facts.st_mtime_ns)
        cached = self._infos.get(str(path))
        if cached is not None and cached[0] == stamp and (name is None or cached[1].name == name):
            return cached[1]
        label = name if name is not None else path.stem
        if not stat.S_ISREG(facts.st_mode):
            error = f"{path.name} is {describe_mode(facts.st_mode)}, not a regular file"
            return LoraInfo(name=label, path=str(path), size=0, error=error)
        self.stats["header_reads"] += 1
        try:
            tensors = read_header(path)
        except LoraHeaderError as exc:
            info = LoraInfo(name=label, path=str(path), size=facts.st_size, error=str(exc))
        else:
            fmt, rank = _describe(tensors)
            info = LoraInfo(
                name=label,
                path=str(path),
                size=facts.st_size,
                format=fmt,
                rank=rank,
                tensors=len(tensors),
            )
        self._infos[str(path)] = (stamp, info)
        return info

    def sha256(self, path: Path) -> str:
        """The file's SHA-256, cached by (path, size, mtime): hashing a 600 MB LoRA takes
        seconds, and the same files come back job after job."""
        facts = path.stat()
        stamp = (facts.st_size, facts.st_mtime_ns)
        cached = self._hashes.get(str(path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        self.stats["hashes"] += 1
        value = sha256_file(path)
        self._hashes[str(path)] = (stamp, value)
        return value
