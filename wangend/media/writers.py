"""The first writer API, kept while callers move to `persistence`.

`write_video(frames, directory, stem, fps, metadata)` encodes with the default settings
(libx264, crf 18, yuv420p, mp4), embeds `metadata` (any JSON-ready dict) in the `comment`
tag and returns the one Path written. It goes through the same atomic, no-overwrite,
retrying path as `persistence.write_video`; new code should call that one, which knows
the configured codec and container, metadata modes, audio and companions.

`read_video_metadata(path)` returns whatever JSON object an mp4/mkv carries in `comment`
(any dict, not only a wangend document); `metadata.read_metadata` is the superset that
also reads images and sidecars and accepts only wangend documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .metadata import MetadataState
from .persistence import MediaPersistenceContext
from .persistence import write_video as _write_video

__all__ = ["read_video_metadata", "write_video"]


def write_video(
    frames: np.ndarray,
    directory: Path,
    stem: str,
    fps: int,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Encode `frames` (F, H, W, 3) uint8 RGB to `directory/stem.mp4` (or the first free
    `stem(N).mp4`) and return the absolute path written."""
    state = MetadataState(mode="embedded" if metadata is not None else "none",
                          document=metadata or {})  # fmt: skip
    return _write_video(frames, Path(directory), stem, fps, MediaPersistenceContext(), state)[0]


def read_video_metadata(path: Path) -> dict[str, Any] | None:
    """The JSON object embedded in the container's comment, or None when there is none."""
    import av

    with av.open(str(path)) as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}
    comment = tags.get("comment")
    if not comment:
        return None
    try:
        data = json.loads(comment)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
