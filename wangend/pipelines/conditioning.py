"""Conditioning media: check it at enqueue, load it at run time.

A job's `image`, `last_image`, `video`, `mask` and `reference_images` are paths on the
daemon's machine. At enqueue `probe` opens each one far enough to know it decodes and to
read its size (and a video's frame count), so a job never waits in the queue only to fail
on an unreadable file; `sha256_file` records what exactly was used. When the job runs,
`load_image` / `load_video` give what the diffusers pipelines take (PIL images), already
sized for the job:

* images and frames are scaled to cover the job's width x height, then centre-cropped,
  so the aspect ratio is kept and nothing is stretched;
* a video is sampled to exactly `frames` frames, evenly over its whole length (frames
  repeat when the source is shorter), so conditioning always matches the output length;
* a mask may be a video or one image (used for every frame); white means "generate".

Images are read with Pillow, videos with PyAV. Everything is RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from msgspec import Struct
from PIL import Image, ImageOps

from ..media.access import sha256_file

__all__ = [
    "MediaError",
    "MediaInfo",
    "load_image",
    "load_mask",
    "load_video",
    "probe",
    "sample_indices",
    "sha256_file",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class MediaError(Exception):
    """A media file is missing or cannot be decoded; the message names the path."""


class MediaInfo(Struct, frozen=True, kw_only=True):
    kind: str  # "image" | "video"
    width: int
    height: int
    frames: int  # 1 for an image
    fps: float = 0.0


def _probe_image(path: Path) -> MediaInfo:
    try:
        with Image.open(path) as image:
            image.load()  # decodes the pixels: a truncated file fails here
            return MediaInfo(kind="image", width=image.width, height=image.height, frames=1)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{path} is not a readable image ({exc})") from None


def _probe_video(path: Path) -> MediaInfo:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise MediaError(f"{path} has no decodable video frame")
            width, height = first.width, first.height
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            container.seek(0)
            count = sum(1 for packet in container.demux(stream) if packet.size)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, StopIteration) as exc:
        raise MediaError(f"{path} is not a readable video ({exc})") from None
    return MediaInfo(kind="video", width=width, height=height, frames=max(count, 1), fps=fps)


def probe(path: Path, *, allow: tuple[str, ...] = ("image", "video")) -> MediaInfo:
    """Open `path` far enough to know it decodes; raise MediaError saying why not.
    Files with an image suffix are images; anything else is tried as a video (and, when
    images are allowed, as an image if it is not one)."""
    if not path.is_file():
        raise MediaError(f"{path} does not exist or is not a file")
    as_image = path.suffix.lower() in IMAGE_SUFFIXES
    if as_image and "image" not in allow:
        raise MediaError(f"{path} is an image; a video is needed here")
    if as_image:
        return _probe_image(path)
    try:
        info = _probe_video(path)
    except MediaError:
        if "image" not in allow:
            raise
        return _probe_image(path)
    if info.kind not in allow:
        raise MediaError(f"{path} is a video; an image is needed here")
    return info


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height and centre-crop: no stretching, no borders."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC)


def load_image(path: str | Path, width: int, height: int) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return _fit(image, width, height)


def sample_indices(available: int, frames: int) -> list[int]:
    """`frames` indices spread evenly over `available` frames, first and last included."""
    if available <= 0:
        raise ValueError("no frames to sample from")
    return [int(i) for i in np.rint(np.linspace(0, available - 1, frames))]


def load_video(path: str | Path, width: int, height: int, frames: int) -> list[Image.Image]:
    """Exactly `frames` RGB frames sized width x height (an image gives one frame, repeated)."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [load_image(path, width, height)] * frames
    import av

    with av.open(str(path)) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    if not decoded:
        raise MediaError(f"{path} has no decodable video frame")
    return [_fit(decoded[i], width, height) for i in sample_indices(len(decoded), frames)]


def load_mask(path: str | Path, width: int, height: int, frames: int) -> list[Image.Image]:
    """A VACE mask as `frames` RGB images (grey levels kept; white = generate)."""
    return [m.convert("L").convert("RGB") for m in load_video(path, width, height, frames)]
