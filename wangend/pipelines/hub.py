"""Fetching a diffusers model from the Hugging Face hub, with progress and abort.

`download_snapshot` fetches only what a diffusers load reads (model_index.json and the
component folders, safetensors only: pickled weights and other frameworks' files are never
requested) into the ordinary Hugging Face cache, so a later start, or any other tool,
finds it there. huggingface_hub reports progress through a tqdm class; ours shows
nothing and counts files and bytes, which the calling (worker) thread turns into
`model.loading` events with phase "downloading", at most ~4 a second. The same counter
carries the abort: once set, every download thread stops at its next chunk, and the
partial files stay in the cache for the next attempt to resume.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from .control import RunHooks

__all__ = ["HUB_IGNORE", "DownloadCancelled", "download_snapshot"]

# Never fetched: pickled weights (never loaded here) and other frameworks' formats.
HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5", "*.onnx", "*.pb"]
DOWNLOAD_EVENT_SECONDS = 0.25  # at most ~4 "downloading" events a second


class DownloadCancelled(Exception):
    """Raised inside huggingface_hub's download threads once the job was aborted."""


class _DownloadCounts:
    """Files and bytes done so far, fed from huggingface_hub's download threads, and
    the flag that stops them (`cancelled`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.files_done = 0
        self.files_total: int | None = None
        self.bytes_done = 0
        self.bytes_total = 0

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            counts = {"files_done": self.files_done, "bytes_done": self.bytes_done}
            if self.files_total is not None:
                counts["files_total"] = self.files_total
            if self.bytes_total:
                counts["bytes_total"] = self.bytes_total
            return counts


def _progress_class(counts: _DownloadCounts) -> type:
    """A tqdm class for snapshot_download that shows nothing and counts into `counts`:
    the bar without a byte unit counts files, the byte bar other than the network
    transfer one counts bytes written (its total grows as each file starts)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Progress(hf_tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            name, desc = kwargs.get("name") or "", kwargs.get("desc") or ""
            if kwargs.get("unit", "it") != "B":
                self._kind = "files"
            elif name.endswith(".transfer") or desc.startswith("Downloading"):
                self._kind = "transfer"
            else:
                self._kind = "bytes"
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if self._kind == "files" and kwargs.get("total") is not None:
                with counts.lock:
                    counts.files_total = int(kwargs["total"])

        def update(self, n: float | None = 1) -> bool | None:
            if counts.cancelled:  # unwinds this file's download at its next chunk
                raise DownloadCancelled("the job was aborted")
            with counts.lock:
                if self._kind == "files":
                    counts.files_done += int(n or 0)
                elif self._kind == "bytes":
                    counts.bytes_done += int(n or 0)
                    counts.bytes_total = max(int(self.total or 0), counts.bytes_done)
            return None

        def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
            pass

    return _Progress


def download_snapshot(
    repo_id: str,
    name: str,
    hooks: RunHooks,
    data: dict[str, Any],
    checkpoint: Callable[[], None],
    skip_weights: Collection[str] = (),
) -> Path:
    """Download what a diffusers load of `repo_id` reads (model_index.json and every
    component folder, safetensors only) into the HF cache, reporting `model.loading`
    events with phase "downloading" from this thread, at most ~4 a second. The
    `skip_weights` components get their config only (a local single file replaces their
    weights: 28 GB a Wan 14B transformer does not download again). When
    `checkpoint` raises (an abort), the download threads stop at their next chunk and
    the exception goes up at once; what was fetched stays in the cache."""
    from huggingface_hub import hf_hub_download, snapshot_download

    index_path = hf_hub_download(repo_id, "model_index.json")
    index = json.loads(Path(index_path).read_text(encoding="utf-8"))
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    allow = ["model_index.json", *(f"{part}/*" for part in parts)]
    counts = _DownloadCounts()
    outcome: dict[str, Any] = {}

    def fetch() -> None:
        try:
            outcome["folder"] = snapshot_download(
                repo_id,
                allow_patterns=allow,
                ignore_patterns=[
                    *HUB_IGNORE,
                    *(f"{part}/*.safetensors*" for part in skip_weights),
                ],
                tqdm_class=_progress_class(counts),
            )
        except BaseException as exc:  # re-raised on the calling thread
            outcome["error"] = exc

    def emit(progress: dict[str, int]) -> None:
        hooks.model_loading(name, {**data, "phase": "downloading", **progress})

    emit({"files_done": 0})
    worker = threading.Thread(target=fetch, name=f"download {repo_id}", daemon=True)
    worker.start()
    last: dict[str, int] = {"files_done": 0}
    while worker.is_alive():
        worker.join(DOWNLOAD_EVENT_SECONDS)
        try:
            checkpoint()
        except BaseException:
            counts.cancelled = True
            raise
        progress = counts.snapshot()
        if worker.is_alive() and progress != last:
            emit(progress)
            last = progress
    if "error" in outcome:
        raise outcome["error"]
    emit(counts.snapshot())
    return Path(outcome["folder"])
