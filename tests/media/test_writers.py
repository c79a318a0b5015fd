"""Writing a video with the default settings and reading its metadata back: videos
round-trip through PyAV, names are never reused, temp files never stay."""

from __future__ import annotations

import errno
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import av
import msgspec
import numpy as np
import pytest

from wangend.errors import JobFailure
from wangend.media import atomic, persistence
from wangend.media.metadata import MetadataState, build_metadata
from wangend.media.writers import read_video_metadata
from wangend.protocol import ResolvedGenerate


def write_video(
    frames: np.ndarray, folder: Path, stem: str, fps: int, metadata: dict | None = None
) -> Path:
    """The default writer (libx264, crf 18, yuv420p, mp4) with `metadata` embedded."""
    state = MetadataState(mode="none" if metadata is None else "embedded", document=metadata or {})
    ctx = persistence.MediaPersistenceContext()
    return persistence.write_video(frames, Path(folder), stem, fps, ctx, state)[0]


def gradient(frames: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth moving colour ramps: content H.264 keeps close to the original."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = ((x * 4 + t * 8) % 256, (y * 5 + t * 4) % 256, (x + y) * 2 % 256)
    return np.stack(rgb, axis=-1).astype(np.uint8)


def decode(path: Path) -> tuple[np.ndarray, av.video.stream.VideoStream, dict]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        info = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "fps": stream.average_rate,
            "size": (stream.width, stream.height),
            "comment": container.metadata.get("comment"),
        }
    return frames, stream, info


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path: Path) -> None:
    frames = gradient()
    meta = {"prompt": "雪の中の狐 — ünïcode", "seed": 7}
    path = write_video(frames, tmp_path / "new" / "dir", "clip", 12, meta)
    assert path == (tmp_path / "new" / "dir" / "clip.mp4") and path.is_absolute()
    decoded, _, info = decode(path)
    assert decoded.shape == frames.shape
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["fps"] == 12 and info["size"] == (64, 48)
    assert np.abs(decoded.astype(int) - frames).mean() < 6
    assert read_video_metadata(path) == meta
    assert msgspec.json.decode(info["comment"]) == meta  # plain JSON in `comment`
    assert leftovers(path.parent) == []


def test_without_metadata_reads_back_none(tmp_path: Path) -> None:
    path = write_video(gradient(frames=1), tmp_path, "still", 8)
    assert read_video_metadata(path) is None


def test_odd_sizes_are_padded_to_even(tmp_path: Path) -> None:
    path = write_video(gradient(frames=5, height=33, width=31), tmp_path, "odd", 8)
    decoded, _, info = decode(path)
    assert info["size"] == (32, 34) and decoded.shape == (5, 34, 32, 3)


def test_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"precious")
    first = write_video(gradient(frames=1), tmp_path, "clip", 8)
    second = write_video(gradient(frames=1), tmp_path, "clip", 8)
    assert (first.name, second.name) == ("clip(2).mp4", "clip(3).mp4")
    assert (tmp_path / "clip.mp4").read_bytes() == b"precious"


def test_concurrent_writers_get_distinct_names(tmp_path: Path) -> None:
    results: list[Path] = []
    frames = gradient(frames=3)

    def write() -> None:
        results.append(write_video(frames, tmp_path, "same", 8))

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(p.name for p in results) == [
        "same(2).mp4",
        "same(3).mp4",
        "same(4).mp4",
        "same.mp4",
    ]
    assert leftovers(tmp_path) == []


def test_unwritable_directory_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(JobFailure) as info:
        write_video(gradient(frames=1), blocker / "out", "clip", 8)
    assert info.value.kind == "OutputWriteFailed"
    assert str(blocker / "out" / "clip.mp4") in info.value.message
    assert info.value.message.startswith("could not write ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(JobFailure, match=r"could not write .*ro/clip\.mp4"):
        write_video(gradient(frames=1), folder, "clip", 8)


def test_failure_after_encoding_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    def broken_link(src, dst) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.os, "link", broken_link)
    with pytest.raises(JobFailure, match="Read-only file system"):
        write_video(gradient(frames=2), tmp_path, "clip", 8)
    assert list(tmp_path.iterdir()) == []


def test_transient_errors_are_retried(tmp_path: Path, monkeypatch) -> None:
    real_link, calls = os.link, []

    def flaky_link(src, dst) -> None:
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_link(src, dst)

    monkeypatch.setattr(atomic.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(atomic.os, "link", flaky_link)
    path = write_video(gradient(frames=2), tmp_path, "clip", 8)
    assert path.name == "clip.mp4" and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_filesystem_without_hard_links(tmp_path: Path, monkeypatch) -> None:
    def no_link(src, dst) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_link)
    (tmp_path / "clip.mp4").write_bytes(b"old")
    path = write_video(gradient(frames=2), tmp_path, "clip", 8)
    assert path.name == "clip(2).mp4" and (tmp_path / "clip.mp4").read_bytes() == b"old"
    assert decode(path)[0].shape[0] == 2
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("stem", ["", "a/b", ".hidden", "..", "a\\b"])
def test_bad_stems_are_refused(tmp_path: Path, stem: str) -> None:
    with pytest.raises(JobFailure):
        write_video(gradient(frames=1), tmp_path, stem, 8)
    assert list(tmp_path.iterdir()) == []


def test_build_metadata() -> None:
    job = ResolvedGenerate(
        model="tiny",
        source="/m/tiny",
        prompt="雪",
        negative_prompt="",
        width=64,
        height=64,
        frames=9,
        steps=4,
        guidance_scale=5.0,
        seed=1,
        fps=8,
        flow_shift=3.0,
        output_name="{seed}",
    )
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    doc = build_metadata(9, job, {"load": 1.23456}, device="cpu", created_at=when)
    assert doc["job"] == 9 and doc["device"] == "cpu" and doc["wangend"]
    assert doc["format"] == "wangend.output/1" and doc["kind"] == "generate"
    assert doc["created_at"] == "2025-01-02T03:04:05+00:00"
    assert doc["timings"] == {"load": 1.2346}
    assert msgspec.convert(doc["settings"], ResolvedGenerate) == job
    msgspec.json.encode(doc)
