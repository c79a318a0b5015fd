"""What each file a job wrote is: from the job and the order the writers keep, never
from words in a file name (a generation named `fox_alpha` is still a video).

A job's record lists its outputs as paths, always in this order:

    generate   the video, then its companions: the `.json` sidecar (metadata mode
               json) and `<stem>.source-N.png` (embed_source_images)
    matanyone  the composite video, its companions as above, the RGBA ZIP (`rgba_zip`),
               then the saved first-frame mask `<stem>_mask.png` and its sidecar
               (`save_masks`)

Roles: `video` (a generation, or a matting job's foreground or greenscreen composite),
`matte` (a matting job's alpha video), `image` (a still output), `metadata` (a `.json`
sidecar), `source_image`, `frames_zip`, `mask` (the saved mask), `other`.

    output_roles(job_record_spec, paths)   # -> ["matte", "metadata", "frames_zip"]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

__all__ = ["ROLES", "output_roles"]

ROLES = frozenset(
    {"video", "matte", "image", "metadata", "source_image", "frames_zip", "mask", "other"}
)
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".webm", ".m4v"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
_TAKEN = r"(\(\d+\))?$"  # the `(N)` a name gets when it is taken


def output_roles(spec: Mapping[str, Any] | None, paths: Sequence[str]) -> list[str]:
    """The role of each of `paths`, the outputs a job with `spec` (its stored resolved
    job: `kind`, `mask_type`) wrote, in the order its record lists them."""
    spec = spec if isinstance(spec, Mapping) else {}
    kind = spec.get("kind", "generate")
    parts = [PurePath(p) for p in paths]
    media = [i for i, p in enumerate(parts) if p.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES]
    main = media[0] if media else None
    main_stem = parts[main].stem if main is not None else None
    source = re.compile(re.escape(f"{main_stem}.source-") + r"\d+" + _TAKEN)
    mask = re.compile(re.escape(f"{main_stem}_mask") + _TAKEN)
    roles = []
    for i, path in enumerate(parts):
        suffix = path.suffix.lower()
        if suffix == ".json":
            role = "metadata"
        elif suffix == ".zip":
            role = "frames_zip"
        elif i == main:
            matte = kind == "matanyone" and spec.get("mask_type", "alpha") == "alpha"
            role = "matte" if matte else ("video" if suffix in VIDEO_SUFFIXES else "image")
        elif suffix in IMAGE_SUFFIXES and source.match(path.stem):
            role = "source_image"
        elif suffix in IMAGE_SUFFIXES and kind == "matanyone" and mask.match(path.stem):
            role = "mask"
        elif suffix in VIDEO_SUFFIXES:
            role = "video"
        elif suffix in IMAGE_SUFFIXES:
            role = "image"
        else:
            role = "other"
        roles.append(role)
    return roles
