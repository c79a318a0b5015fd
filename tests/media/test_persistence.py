"""Outputs written the configured way read back whole, with their settings, in every
metadata mode, container, codec and image format; failures are retried or reported with
the path, and never leave a temp file."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image

from wangend.config import MediaConfig
from wangend.errors import JobFailure
from wangend.media import atomic
from wangend.media.metadata import read_metadata
from wangend.media.persistence import (
    MediaPersistenceContext,
    codec_problem,
    write_image,
    write_metadata_bundle,
    write_video,
)
from wangend.protocol import ResolvedGenerate, ResolvedJob

from .support import decode, fast_ctx, ffprobe, gradient, make_job, make_matting, state_for


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic.time, "sleep", lambda seconds: None)


@pytest.mark.parametrize("container", ["mp4", "mkv"])
@pytest.mark.parametrize("mode", ["embedded", "json", "none"])
def test_video_modes_and_containers(tmp_path: Path, container: str, mode: str) -> None:
    frames = gradient()
    state = state_for(mode=mode, frames=frames)
    paths = write_video(frames, tmp_path, "clip", 8, fast_ctx(container=container), state)
    video = tmp_path / f"clip.{container}"
    assert paths[0] == video
    decoded, info = decode(video)
    assert decoded.shape == frames.shape and info["codec"] == "h264"
    assert np.abs(decoded.astype(int) - frames).mean() < 6
    sidecar = tmp_path / "clip.json"
    document = read_metadata(video)
    if mode == "none":
        assert paths == [video] and document is None and "comment" not in info["tags"]
        assert names(tmp_path) == [video.name]
        return
    assert document == state.document
    assert document["frames_sha256"] == hashlib.sha256(frames.tobytes()).hexdigest()
    assert msgspec.convert(document["settings"], ResolvedJob) == make_job()
    if mode == "json":
        assert paths == [video, sidecar] and "comment" not in info["tags"]
        assert msgspec.json.decode(sidecar.read_bytes()) == state.document
    else:
        assert paths == [video] and not sidecar.exists()
        assert msgspec.json.decode(info["tags"]["comment"]) == state.document
        probe = ffprobe(video)
        if probe is not None:
            tags = {k.lower(): v for k, v in probe["format"].get("tags", {}).items()}
            assert msgspec.json.decode(tags["comment"]) == state.document
    assert not [n for n in names(tmp_path) if n.startswith(".")]


def test_libx265_and_yuv444(tmp_path: Path) -> None:
    frames = gradient(frames=5)
    hevc = write_video(frames, tmp_path, "h", 8, fast_ctx(codec="libx265"), state_for())[0]
    decoded, info = decode(hevc)
    assert info["codec"] == "hevc" and decoded.shape == frames.shape
    assert read_metadata(hevc) is not None
    probe = ffprobe(hevc)
    if probe is not None:
        assert probe["streams"][0]["codec_tag_string"] == "hvc1"
    full = write_video(frames, tmp_path, "f", 8, fast_ctx(pix_fmt="yuv444p"), state_for())[0]
    assert decode(full)[1]["pix_fmt"] == "yuv444p"


def test_odd_size_and_fractional_fps(tmp_path: Path) -> None:
    path = write_video(gradient(5, 33, 31), tmp_path, "o", 23.976, fast_ctx(), state_for())[0]
    decoded, info = decode(path)
    assert info["size"] == (32, 34) and decoded.shape[0] == 5
    assert abs(float(info["fps"]) - 23.976) < 0.01


def test_unicode_and_long_prompts(tmp_path: Path) -> None:
    prompt = "雪の中の狐 — ünïcode 🦊 " + "長い" * 17000  # 68 KB as UTF-16
    job = make_job(prompt=prompt, original_prompt="狐")
    state = state_for(job)
    video = write_video(gradient(frames=2), tmp_path, "u", 8, fast_ctx(), state)[0]
    assert read_metadata(video)["settings"]["prompt"] == prompt
    png = write_image(gradient(1)[0], tmp_path, "u", fast_ctx(), state)[0]
    assert read_metadata(png)["settings"]["prompt"] == prompt
    # JPEG's EXIF holds 64 KB: the document goes to a sidecar, the image is still written
    jpeg_paths = write_image(gradient(1)[0], tmp_path, "u", fast_ctx(image_format="jpeg"), state)
    assert [p.name for p in jpeg_paths] == ["u.jpg", "u.json"]
    assert read_metadata(jpeg_paths[0])["settings"]["prompt"] == prompt


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("mode", ["embedded", "json"])
def test_images(tmp_path: Path, fmt: str, mode: str) -> None:
    state = state_for(mode=mode)
    image = gradient(frames=1, height=40, width=30)[0]
    paths = write_image(image, tmp_path, "still", fast_ctx(image_format=fmt), state)
    suffix = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}[fmt]
    assert paths[0] == tmp_path / f"still{suffix}"
    assert (len(paths) == 2) == (mode == "json")
    with Image.open(paths[0]) as back:
        assert back.format == fmt.upper() and back.size == (30, 40)
        pixels = np.asarray(back.convert("RGB")).astype(int)
    assert np.abs(pixels - image).mean() < (1 if fmt == "png" else 8)
    assert read_metadata(paths[0]) == state.document


def test_rgba_matte_as_png_and_jpeg(tmp_path: Path) -> None:
    rgba = np.dstack([gradient(1)[0], np.full((48, 64), 128, np.uint8)])
    png = write_image(rgba, tmp_path, "m_alpha", fast_ctx(), state_for())[0]
    with Image.open(png) as back:
        assert back.mode == "RGBA" and np.asarray(back)[0, 0, 3] == 128
    jpg = write_image(rgba, tmp_path, "m", fast_ctx(), state_for(), image_format="jpeg")[0]
    with Image.open(jpg) as back:
        assert back.mode == "RGB"


def test_collisions_keep_companions_paired(tmp_path: Path) -> None:
    (tmp_path / "clip.json").write_text("someone else's notes")
    first = write_video(gradient(2), tmp_path, "clip", 8, fast_ctx(), state_for(mode="json"))
    second = write_video(gradient(2), tmp_path, "clip", 8, fast_ctx(), state_for(mode="json"))
    assert [p.name for p in first] == ["clip(2).mp4", "clip(2).json"]
    assert [p.name for p in second] == ["clip(3).mp4", "clip(3).json"]
    assert (tmp_path / "clip.json").read_text() == "someone else's notes"
    assert read_metadata(second[0])["job"] == 3


@pytest.mark.parametrize("stem", ["", "a/b", ".hidden", "..", "../up", "a\\b"])
def test_traversal_stems_are_refused(tmp_path: Path, stem: str) -> None:
    folder = tmp_path / "out"
    with pytest.raises(JobFailure) as info:
        write_video(gradient(1), folder, stem, 8, fast_ctx(), state_for())
    assert info.value.kind == "OutputWriteFailed"
    assert names(tmp_path) == [] or names(folder) == []


def test_transient_errors_are_retried_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_link, calls = os.link, []

    def full_disk_twice(src, dst) -> None:
        calls.append(dst)
        if len(calls) <= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst)

    monkeypatch.setattr(atomic.os, "link", full_disk_twice)
    with caplog.at_level(logging.WARNING, logger="wangend.media"):
        paths = write_video(gradient(2), tmp_path, "clip", 8, fast_ctx(), state_for())
    assert [p.name for p in paths] == ["clip.mp4"] and len(calls) == 3
    assert names(tmp_path) == ["clip.mp4"]
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "No space left on device" in retries[0]


def test_lasting_failure_names_the_path_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def always_full(src, dst) -> None:
        calls.append(dst)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "link", always_full)
    with pytest.raises(JobFailure) as info:
        write_video(gradient(2), tmp_path, "clip", 8, fast_ctx(write_retries=2), state_for())
    assert info.value.kind == "OutputWriteFailed" and len(calls) == 3
    assert info.value.message == (
        f"could not write {tmp_path / 'clip.mp4'}: No space left on device after 3 attempts"
    )
    assert names(tmp_path) == []


def test_replace_failures_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real_replace, calls = os.replace, []

    def no_link(src, dst) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    def flaky_replace(src, dst) -> None:
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "link", no_link)
    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    path = write_image(gradient(1)[0], tmp_path, "img", fast_ctx(), state_for())[0]
    assert path.name == "img.png" and len(calls) == 2  # the placeholder did not stay
    assert names(tmp_path) == ["img.png"] and read_metadata(path) is not None


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(JobFailure) as info:
        write_video(gradient(1), blocker / "out", "clip", 8, fast_ctx(), state_for())
    assert str(blocker / "out" / "clip.mp4") in info.value.message
    assert "attempts" not in info.value.message  # ENOTDIR/EEXIST fail at once


def test_source_images_are_stored_next_to_the_output(tmp_path: Path) -> None:
    start = tmp_path / "in" / "start.jpg"
    start.parent.mkdir()
    Image.fromarray(gradient(1)[0]).save(start)
    ref = tmp_path / "in" / "ref.png"
    Image.fromarray(gradient(1, 16, 16)[0]).save(ref)
    job = make_job(image=str(start), reference_images=[str(ref), str(tmp_path / "gone.png")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "clip.mp4").write_bytes(b"taken")
    ctx = fast_ctx(embed_source_images=True)
    paths = write_video(gradient(2), tmp_path / "out", "clip", 8, ctx, state_for(job))
    assert [p.name for p in paths] == [
        "clip(2).mp4", "clip(2).source-1.png", "clip(2).source-2.png",
    ]  # fmt: skip
    listed = read_metadata(paths[0])["source_images"]
    assert [(e["input"], e["file_suffix"]) for e in listed] == [
        ("image", ".source-1.png"), ("reference_images[0]", ".source-2.png"),
    ]  # fmt: skip
    with Image.open(paths[1]) as back:
        assert back.size == (64, 48)


def test_bundle_for_another_output(tmp_path: Path) -> None:
    archive = tmp_path / "frames.zip"
    archive.write_bytes(b"PK")
    written = write_metadata_bundle(archive, fast_ctx(), state_for(make_matting(), mode="json"))
    assert written == [tmp_path / "frames.json"]
    assert read_metadata(written[0])["kind"] == "matanyone"


def test_document_of_a_matting_run(tmp_path: Path) -> None:
    job = make_matting()
    path = write_video(gradient(2), tmp_path, "m", 8, fast_ctx(), state_for(job))[0]
    document = read_metadata(path)
    assert document["kind"] == "matanyone" and document["device"] == "cpu"
    assert msgspec.convert(document["settings"], ResolvedJob) == job


def test_document_keeps_everything_needed_to_reproduce() -> None:
    document = state_for().document
    settings = document["settings"]
    assert settings["prompt"].startswith("a fox") and settings["original_prompt"] == "fox in snow"
    assert settings["loras"] == [
        {"name": "style", "path": "/l/style.safetensors", "multiplier": "1,0.5",
         "sha256": "ab" * 32},
    ]  # fmt: skip
    assert document["timings"] == {"denoise": 1.5} and document["wangend"]
    assert msgspec.convert(settings, ResolvedGenerate) == make_job()


def test_context_from_config_falls_back_from_unusable_codec(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = MediaConfig(codec="h264_nvenc", crf=20, container="mkv", write_retries=5)
    with caplog.at_level(logging.WARNING, logger="wangend.media"):
        ctx = MediaPersistenceContext.from_config(config)
    assert (ctx.crf, ctx.container, ctx.write_retries) == (20, "mkv", 5)
    if codec_problem("h264_nvenc") is None:  # a machine with an NVIDIA GPU
        assert ctx.codec == "h264_nvenc"
    else:
        assert ctx.codec == "libx264"
        assert "h264_nvenc cannot be used here" in caplog.text
    assert MediaPersistenceContext.from_config(MediaConfig(codec="libx265")).codec == "libx265"
