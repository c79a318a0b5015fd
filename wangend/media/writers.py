"""Writing finished frames to disk so that a file under its final name is always whole.

A video is encoded (PyAV: H.264, yuv420p, mp4 with the run's settings as JSON in the
container's `comment` tag) into a hidden temp file in the destination folder, flushed to
disk, and then linked to its final name. The link fails if the name exists, so a name is
claimed atomically and an existing file is never overwritten, even by a second writer at
the same moment: `stem.mp4`, then `stem(2).mp4`, `stem(3).mp4`, ... The temp file is
removed whatever happens.

Transient errors (EAGAIN, EINTR, EBUSY, ...: a busy network share) are retried with a
short backoff; anything else becomes `JobFailure("OutputError", "cannot write <path>:
<reason>")`, one sentence the job record can show.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import JobFailure

__all__ = ["read_video_metadata", "write_video"]

TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT}
)
RETRY_DELAYS = (0.05, 0.2, 0.5)  # seconds before the 2nd, 3rd and 4th attempt
# errnos meaning "this filesystem cannot hard-link": fall back to an O_EXCL placeholder.
NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP})
MAX_NAME_TRIES = 10_000
CRF = 18  # visually near-lossless; outputs are meant to be kept


def write_video(
    frames: np.ndarray,
    directory: Path,
    stem: str,
    fps: int,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Encode `frames` (F, H, W, 3) uint8 RGB to `directory/stem.mp4` (or the first free
    `stem(N).mp4`) and return the absolute path written."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if not stem or Path(stem).name != stem or stem.startswith(".") or "\\" in stem:
        raise JobFailure("OutputError", f"invalid output name {stem!r}")
    directory = Path(directory).absolute()
    comment = json.dumps(metadata, ensure_ascii=False) if metadata is not None else None
    return _with_retries(
        directory / f"{stem}.mp4", lambda: _write_once(frames, directory, stem, fps, comment)
    )


def _with_retries(where: Path, attempt):
    for delay in (*RETRY_DELAYS, None):
        try:
            return attempt()
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS and delay is not None:
                time.sleep(delay)
                continue
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise JobFailure("OutputError", f"cannot write {where}: {reason}") from exc
    raise AssertionError("unreachable")


def _write_once(
    frames: np.ndarray, directory: Path, stem: str, fps: int, comment: str | None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / f".{stem}.{secrets.token_hex(4)}.tmp.mp4"
    try:
        _encode(frames, temp, fps, comment)
        with open(temp, "rb") as handle:  # the data is on disk before the name appears
            os.fsync(handle.fileno())
        return _claim_name(temp, directory, stem)
    finally:
        temp.unlink(missing_ok=True)


def _encode(frames: np.ndarray, path: Path, fps: int, comment: str | None) -> None:
    import av

    # yuv420p subsamples chroma 2x2, so both sides must be even: repeat the edge pixel.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        if comment is not None:
            out.metadata["comment"] = comment
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(CRF)}
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            out.mux(stream.encode(video_frame))
        out.mux(stream.encode(None))


def _claim_name(temp: Path, directory: Path, stem: str) -> Path:
    """Give `temp` the first free final name; never replaces an existing file."""
    for n in range(1, MAX_NAME_TRIES + 1):
        final = directory / (f"{stem}.mp4" if n == 1 else f"{stem}({n}).mp4")
        try:
            os.link(temp, final)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in NO_LINK_ERRNOS:
                raise
            # No hard links here: reserve the name with O_EXCL, then move the data over it.
            try:
                os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                continue
            os.replace(temp, final)
        _fsync_dir(directory)
        return final
    raise OSError(errno.EEXIST, f"no free name for {stem}.mp4 after {MAX_NAME_TRIES} tries")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename itself is done
    finally:
        os.close(fd)


def read_video_metadata(path: Path) -> dict[str, Any] | None:
    """The JSON document embedded by `write_video`, or None when the file has none."""
    import av

    with av.open(str(path)) as container:
        comment = container.metadata.get("comment")
    if not comment:
        return None
    try:
        data = json.loads(comment)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
