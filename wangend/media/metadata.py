"""The settings document every output carries, how it is stored, and how it is read back.

An output carries everything needed to make it again: the resolved job (every field of
ResolvedGenerate or ResolvedMatAnyOne: model, source, prompt and the user's original
prompt when it was enhanced, seed, sizes, steps, LoRAs with multipliers and sha256,
input hashes), which wangend made it, on what device, when, how long each phase took,
and the sha256 of the raw frames (H.264 encoders may make different bitstreams from the
same frames, so that hash is the proof that two runs agree). The full format is in
docs/outputs.md.

Where the document goes is the run's `MetadataState.mode`:

    embedded  mp4/mkv: the container's `comment` tag; png: an iTXt chunk `wangend`;
              jpeg/webp: EXIF UserComment ("UNICODE\\0" + UTF-16 in the EXIF byte order)
    json      a sidecar `<stem>.json` next to the output, written atomically
    none      nothing

Use:

    state = MetadataState.for_run(job_id, job, timings=t, device="cuda:0", frames=frames)
    write_video(frames, folder, stem, fps, ctx, state)        # persistence.py
    read_metadata(path)  # -> the document, or None (embedded first, then the sidecar)
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from .. import __version__
from ..exif import decode_user_comment
from ..protocol import ResolvedJob

__all__ = [
    "DOCUMENT_FORMAT",
    "EXIF_USER_COMMENT",
    "PNG_KEY",
    "MetadataState",
    "build_metadata",
    "read_metadata",
    "sidecar_path",
]

DOCUMENT_FORMAT = "wangend.output/1"
PNG_KEY = "wangend"
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".m4v", ".webm"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})

MetadataMode = Literal["embedded", "json", "none"]


def build_metadata(
    job_id: int,
    job: ResolvedJob,
    timings: dict[str, float] | None = None,
    *,
    device: str | None = None,
    created_at: datetime | None = None,
    frames_sha256: str | None = None,
) -> dict[str, Any]:
    """A JSON-ready dict: {"format", "wangend", "job", "kind", "settings", "created_at",
    "timings", "device"?, "frames_sha256"?}. `settings` decodes back into the job with
    `msgspec.convert(doc["settings"], ResolvedJob)`."""
    settings = msgspec.to_builtins(job)
    document: dict[str, Any] = {
        "format": DOCUMENT_FORMAT,
        "wangend": __version__,
        "job": job_id,
        "kind": settings.get("kind", "generate"),
        "settings": settings,
        "created_at": (created_at or datetime.now(UTC)).isoformat(timespec="seconds"),
        "timings": {k: round(v, 4) for k, v in (timings or {}).items()},
    }
    if device is not None:
        document["device"] = device
    if frames_sha256 is not None:
        document["frames_sha256"] = frames_sha256
    return document


class MetadataState(msgspec.Struct, frozen=True, kw_only=True):
    """One run's document and where it goes. Built once per run (the runtime knows the
    timings and frames only at the end) and handed to every writer of that run."""

    mode: MetadataMode
    document: dict[str, Any]

    @classmethod
    def for_run(
        cls,
        job_id: int,
        job: ResolvedJob,
        *,
        timings: dict[str, float] | None = None,
        device: str | None = None,
        frames: np.ndarray | None = None,
        frames_sha256: str | None = None,
        mode: MetadataMode | None = None,
        created_at: datetime | None = None,
    ) -> MetadataState:
        """`mode` defaults to the job's own (`job.metadata`, resolved at enqueue)."""
        if frames_sha256 is None and frames is not None:
            frames_sha256 = hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()
        document = build_metadata(
            job_id, job, timings, device=device, created_at=created_at,
            frames_sha256=frames_sha256,
        )  # fmt: skip
        chosen = mode or job.metadata
        if chosen not in ("embedded", "json", "none"):
            chosen = "embedded"
        return cls(mode=chosen, document=document)

    def with_fields(self, **fields: Any) -> MetadataState:
        """A copy whose document also holds `fields` (e.g. the audio plan, source images)."""
        return MetadataState(mode=self.mode, document={**self.document, **fields})

    def text(self) -> str:
        """The document as one JSON text (UTF-8, not ASCII-escaped: prompts stay readable)."""
        return json.dumps(self.document, ensure_ascii=False, separators=(",", ":"))

    @property
    def embedded(self) -> bool:
        return self.mode == "embedded"


def sidecar_path(output: Path) -> Path:
    """`clip(2).mp4` -> `clip(2).json`: the sidecar of an output."""
    return output.with_suffix(".json")


def _parse(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "settings" in data else None


def _embedded_video(path: Path) -> str | None:
    import av

    with av.open(str(path)) as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}
    return tags.get("comment")


def _embedded_image(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "PNG":
            image.load()  # text chunks after the image data are read only now
            return getattr(image, "text", {}).get(PNG_KEY)
        exif = image.getexif()
        raw = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
        little = getattr(exif, "endian", None)
        return None if raw is None else decode_user_comment(raw, little != ">")


def read_metadata(path: Path | str) -> dict[str, Any] | None:
    """The document written with an output: embedded (mp4, mkv, png, jpeg, webp), else
    from its sidecar `<stem>.json`; `path` may also be the sidecar itself. None when
    there is none. Raises OSError when `path` cannot be read at all."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _parse(path.read_text(encoding="utf-8"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    text = None
    try:
        if suffix in VIDEO_SUFFIXES:
            text = _embedded_video(path)
        elif suffix in IMAGE_SUFFIXES:
            text = _embedded_image(path)
    except (OSError, ValueError):
        text = None  # not decodable as that format: the sidecar may still say
    document = _parse(text)
    if document is not None:
        return document
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        return _parse(sidecar.read_text(encoding="utf-8"))
    return None
