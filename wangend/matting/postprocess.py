"""Mask morphology, compositing and the files a matting run leaves behind.

Outputs (`mask_type`):
    alpha        the matte as a gray video (R = G = B = alpha)
    foreground   the subject with the background removed: source x alpha over black
                 (black, not a checkerboard, because video has no transparency; use
                 `rgba_zip` when real transparency is needed)
    greenscreen  source x alpha + green (120, 255, 155) x (1 - alpha), for keying later
The RGBA ZIP holds one PNG per frame (source colours, alpha channel = the matte).
"""

from __future__ import annotations

import io
import os
import secrets
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "GREEN",
    "composite",
    "dilate",
    "ellipse_kernel",
    "erode",
    "reattach_audio",
    "refine_mask",
    "write_output_video",
    "write_rgba_zip",
]

GREEN = (120, 255, 155)


def ellipse_kernel(radius: int) -> torch.Tensor:
    """A (2r+1)^2 elliptic (here circular) footprint of ones and zeros."""
    size = 2 * radius + 1
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = radius
    return (((yy - c) / (c + 0.5)) ** 2 + ((xx - c) / (c + 0.5)) ** 2 <= 1.0).float()


def _filter(mask: torch.Tensor, radius: int) -> torch.Tensor:
    k = ellipse_kernel(radius).to(mask)
    x = F.pad(mask[None, None], (radius,) * 4, mode="replicate")
    return F.conv2d(x, k[None, None])[0, 0], k.sum()


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a (H, W) mask (>= 0.5 is inside) with an elliptic kernel."""
    if radius <= 0:
        return mask
    hits, _ = _filter((mask >= 0.5).float(), radius)
    return (hits > 0.5).float()


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion; the image border does not erode (it is replicated outward)."""
    if radius <= 0:
        return mask
    hits, full = _filter((mask >= 0.5).float(), radius)
    return (hits >= full - 0.5).float()


def refine_mask(mask: torch.Tensor, dilate_r: int, erode_r: int) -> torch.Tensor:
    """Dilate then erode (closing when both are equal): fills small holes in the
    user's mask without growing it."""
    return erode(dilate(mask, dilate_r), erode_r)


def composite(frames: np.ndarray, alpha: np.ndarray, mask_type: str) -> np.ndarray:
    """frames (F, H, W, 3) uint8, alpha (F, H, W) float in [0, 1] -> (F, H, W, 3) uint8."""
    a = alpha[..., None].astype(np.float32)
    if mask_type == "alpha":
        out = np.repeat(a * 255.0, 3, axis=-1)
    elif mask_type == "foreground":
        out = frames.astype(np.float32) * a
    elif mask_type == "greenscreen":
        green = np.asarray(GREEN, dtype=np.float32)
        out = frames.astype(np.float32) * a + green * (1.0 - a)
    else:
        raise ValueError(f"unknown mask_type {mask_type!r}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_output_video(
    frames: np.ndarray, folder: Path, stem: str, fps: float, metadata: dict[str, Any]
) -> Path:
    """The one place the video is written (the media package owns encoding and naming)."""
    from ..media.writers import write_video

    return write_video(frames, folder, stem, fps, metadata)  # type: ignore[arg-type]


def _publish(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write `data` under a temp name, then link it to the first free `stem(N)suffix`:
    a hard link fails instead of overwriting, so a file that appeared meanwhile is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{stem}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        n = 1
        while True:
            target = folder / (f"{stem}{suffix}" if n == 1 else f"{stem}({n}){suffix}")
            n += 1
            if target.exists():
                continue
            try:
                os.link(temp, target)
            except FileExistsError:
                continue
            except OSError:  # no hard links here: the exists() check above must do
                os.replace(temp, target)
            return target.resolve()
    finally:
        temp.unlink(missing_ok=True)


def write_rgba_zip(frames: np.ndarray, alpha: np.ndarray, folder: Path, stem: str) -> Path:
    """A ZIP of frame_00000.png ... with the matte as the alpha channel."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        a8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
        for i in range(frames.shape[0]):
            rgba = np.concatenate([frames[i], a8[i][..., None]], axis=-1)
            png = io.BytesIO()
            Image.fromarray(rgba, mode="RGBA").save(png, format="PNG")
            archive.writestr(f"frame_{i:05d}.png", png.getvalue())
    return _publish(folder, stem, ".zip", buffer.getvalue())


def reattach_audio(video: Path, source: Path) -> bool:
    """Copy `source`'s first audio track into `video` (packets as they are, cut at the
    video's end), replacing the file atomically. False when the source has no audio."""
    import av

    with av.open(str(source)) as src:
        if not src.streams.audio:
            return False
    temp = video.with_name(f".{video.stem}.{secrets.token_hex(4)}.audio{video.suffix}")
    try:
        with av.open(str(video)) as vin, av.open(str(source)) as ain:
            out = av.open(str(temp), "w", format=vin.format.name.split(",")[0])
            with out:
                out.metadata.update(vin.metadata)
                v_in, a_in = vin.streams.video[0], ain.streams.audio[0]
                v_out = out.add_stream_from_template(v_in)
                a_out = out.add_stream_from_template(a_in)
                end = float(v_in.duration * v_in.time_base) if v_in.duration else None
                for packet in vin.demux(v_in):
                    if packet.dts is None:
                        continue
                    packet.stream = v_out
                    out.mux(packet)
                for packet in ain.demux(a_in):
                    if packet.dts is None:
                        continue
                    late = end is not None and packet.pts is not None
                    if late and float(packet.pts * packet.time_base) >= end:
                        break
                    packet.stream = a_out
                    out.mux(packet)
        os.replace(temp, video)
    finally:
        temp.unlink(missing_ok=True)
    return True
