"""Media for tests: read outputs back the way a user would (decode the mp4, list the
folder), and write the small input clips the tests feed in."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def decode_frames(path: str | Path) -> tuple[np.ndarray, dict]:
    """All frames as (F, H, W, 3) uint8, plus what the container says about itself."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "fps": float(stream.average_rate),
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "comment": container.metadata.get("comment"),
        }
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return frames, info


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_clip(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """(F, H, W, 3) uint8 frames as an H.264 mp4: an input video made in the test."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
