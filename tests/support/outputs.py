"""Read outputs back the way a user would: decode the mp4, list the folder."""

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
