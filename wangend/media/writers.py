"""Reading back what a video carries.

`read_video_metadata(path)` returns whatever JSON object an mp4/mkv carries in `comment`
(any dict, not only a wangend document); `metadata.read_metadata` is the superset that
also reads images and sidecars and accepts only wangend documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_video_metadata"]


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
