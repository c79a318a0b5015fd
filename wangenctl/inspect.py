"""Reading the settings a wangend output carries, and turning them into a new job.

    document = read_settings("clip.mp4")            # the whole metadata document
    params = spec_from_settings(document, {"seed": 5, "steps": 30})
    await client.call("enqueue", params)            # the same job again, or a variation

Where the document is (docs/outputs.md has the full format):

    mp4 / mkv    the container's `comment` tag (mkv may spell it COMMENT)
    png          an iTXt (or tEXt) chunk named `wangend`
    jpeg / webp  EXIF UserComment, "UNICODE\\0" + UTF-16 or "ASCII\\0\\0\\0" + text
    any          a sidecar `<stem>.json` next to the file (mode "json"), or that file itself

This reader is the client's own: wangenctl runs where the daemon's package may be
installed without its media stack in mind, and imports only wangend.protocol and
wangend.exif (the UserComment byte format), so the formats are read here with PyAV and
Pillow directly (both are imported on use).

`spec_from_settings` gives enqueue params that reproduce the output: the seed is kept; the
prompt is the one the model was given (the enhanced one, when it was enhanced) with
`enhance_prompt` false, so no enhancer runs again and changes it; fields the daemon
derives (source, family, inputs_sha256, dtype, sizes of a matting input, ...) are left
out; LoRAs keep name and multiplier. `overrides` are applied last (None removes a field)
and the result is checked against the protocol's job specs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from wangend.exif import decode_user_comment
from wangend.protocol import GenerateSpec, MatAnyOneSpec, decode_job_spec

from .errors import WangenctlError

__all__ = ["NoSettings", "read_settings", "spec_from_settings"]

PNG_KEY = "wangend"
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".m4v", ".webm"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
# Never sent back: the daemon derives them, or they describe one run, not the request.
# The preset is left out because its effect (LoRAs, values) is already in the settings.
DERIVED_FIELDS = frozenset(
    {"kind", "source", "family", "inputs_sha256", "dtype", "original_prompt", "enhancer",
     "preset", "files"}
)  # fmt: skip


class NoSettings(WangenctlError):
    """The file has no wangend settings (or cannot be read)."""


def _video_comment(path: Path) -> str | None:
    import av

    with av.open(str(path)) as container:
        return {k.lower(): v for k, v in container.metadata.items()}.get("comment")


def _image_text(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "PNG":
            image.load()
            return getattr(image, "text", {}).get(PNG_KEY)
        exif = image.getexif()
        raw = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
        little = getattr(exif, "endian", "<") != ">"
        return None if raw is None else decode_user_comment(raw, little)


def _document(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        return data
    return None


def _reason(exc: Exception) -> str:
    """Why a file could not be read, in words: "Invalid data found when processing
    input", not PyAV's "[Errno 1094995529] ...: 'clip.mp4'" (the path is said already)."""
    strerror = getattr(exc, "strerror", None)  # OSError's and av.FFmpegError's
    return strerror if isinstance(strerror, str) and strerror else str(exc)


def read_settings(path: Path | str) -> dict[str, Any]:
    """The metadata document of a wangend output (its `settings` key holds the resolved
    job). Raises NoSettings, naming the file, when there is none or it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise NoSettings(f"{path}: no such file")
    suffix = path.suffix.lower()
    text: str | None = None
    sidecar = path.with_suffix(".json")
    reading = path
    try:
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
        elif suffix in VIDEO_SUFFIXES:
            text = _video_comment(path)
        elif suffix in IMAGE_SUFFIXES:
            text = _image_text(path)
        document = _document(text)
        if document is None and suffix != ".json" and sidecar.is_file():
            reading = sidecar
            document = _document(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NoSettings(f"{reading}: cannot be read ({_reason(exc)})") from None
    if document is None:
        raise NoSettings(
            f"{path} carries no wangend settings (none embedded and no {sidecar.name} "
            'next to it; was it written with metadata "none"?)'
        )
    return document


def _spec_fields(kind: str) -> frozenset[str]:
    spec = MatAnyOneSpec if kind == "matanyone" else GenerateSpec
    return frozenset(f.name for f in msgspec.structs.fields(spec))


def spec_from_settings(settings: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Enqueue params (`kind` plus GenerateSpec or MatAnyOneSpec fields) that make the
    output again; `settings` is a document from read_settings or its `settings` part.
    Raises NoSettings when it is not a job's settings, or ValueError naming the field
    when `overrides` make an invalid spec."""
    job = settings.get("settings", settings)
    if not isinstance(job, dict):
        raise NoSettings("the settings document has no job in it")
    kind = job.get("kind", "generate")
    if kind not in ("generate", "matanyone"):
        raise NoSettings(f"unknown job kind {kind!r} in the settings")
    allowed = _spec_fields(kind) - {"kind"}
    params: dict[str, Any] = {"kind": kind}
    for name, value in job.items():
        if name in DERIVED_FIELDS or name not in allowed or value is None:
            continue
        if value == [] or value == {}:
            continue
        params[name] = value
    if kind == "generate":
        params["enhance_prompt"] = False
        if job.get("loras"):
            params["loras"] = [
                {"name": lora["name"], "multiplier": str(lora.get("multiplier", "1"))}
                for lora in job["loras"]
            ]
    for name, value in overrides.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
    try:
        decode_job_spec(msgspec.json.encode(params))
    except msgspec.ValidationError as exc:
        raise ValueError(f"the settings do not make a valid job: {exc}") from None
    return params
