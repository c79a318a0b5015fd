"""Model folders as users hand them over, made from the tiny models: a stranger's copy,
a Hugging Face cache of symlinks, an edited model_index.json, a cut-short download."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

COMMIT = "5f0c2d1e9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"


def plain_copy(source: Path, target: Path) -> Path:
    """A tiny model folder as a stranger's folder: without wangend's tiny marker."""
    shutil.copytree(source, target)
    (target / "wangend-tiny.json").unlink()
    return target


def hub_cache(source: Path, cache: Path, repo: str) -> Path:
    """`source` stored the way huggingface_hub stores a download: every file a blob named
    by its sha256, the snapshot a tree of relative symlinks into blobs/, refs/main
    naming the snapshot. Returns the `models--Org--Name` folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def edit_index(folder: Path, **changes: object) -> None:
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(changes)
    index_path.write_text(json.dumps(index, indent=2))


def cut(path: Path, size: int) -> None:
    """What an interrupted download leaves: the first `size` bytes."""
    path.write_bytes(path.read_bytes()[:size])
