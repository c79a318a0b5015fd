"""The settings document embedded in every output.

An output carries everything needed to make it again: the resolved job (model, source,
prompt, seed, sizes, steps, scheduler shift, dtype), which wangend made it, when, and
how long each phase took. `read_video_metadata` (writers.py) reads it back, so a user or
a later `retry --from file.mp4` needs no job database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from .. import __version__
from ..protocol import ResolvedGenerate

__all__ = ["build_metadata"]


def build_metadata(
    job_id: int,
    job: ResolvedGenerate,
    timings: dict[str, float] | None = None,
    *,
    device: str | None = None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """A JSON-ready dict: {"wangend", "job", "settings", "created_at", "timings", ...}."""
    document: dict[str, Any] = {
        "wangend": __version__,
        "job": job_id,
        "settings": msgspec.to_builtins(job),
        "created_at": (created_at or datetime.now(UTC)).isoformat(timespec="seconds"),
        "timings": {k: round(v, 4) for k, v in (timings or {}).items()},
    }
    if device is not None:
        document["device"] = device
    return document
