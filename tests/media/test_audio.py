"""Audio from a source video or audio file: copied when the codec fits the container and
the copy can keep its timing, else encoded (AAC in mp4, FLAC in mkv), cut to the video's
length and in sync with it; a finished file gets it in place."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from wangend.media.audio import attach_audio, plan_audio
from wangend.media.metadata import read_metadata
from wangend.media.persistence import write_video

from .support import (
    AUDIO_FRAME,
    FFMPEG,
    audio_onset,
    audio_stream_info,
    decode,
    fast_ctx,
    ffmpeg_onset,
    ffprobe,
    gradient,
    make_audio_source,
    make_click_source,
    state_for,
)


def audio_seconds(path: Path) -> float:
    """Duration of the first audio stream, from its packets."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        end = 0.0
        for packet in container.demux(stream):
            if packet.pts is not None and packet.duration:
                end = max(end, float((packet.pts + packet.duration) * packet.time_base))
    return end


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    return {
        "aac_video": make_audio_source(folder / "talk.mp4", 3.0),
        "wav": make_audio_source(folder / "tone.wav", 3.0, codec="pcm_s16le", with_video=False),
        "opus": make_audio_source(
            folder / "tone.mkv", 3.0, codec="libopus", with_video=False, rate=48000
        ),
        "silent": write_video(gradient(4), folder, "silent", 8, fast_ctx(), state_for())[0],
    }


@pytest.mark.parametrize(
    ("source", "container", "mode", "codec"),
    [
        ("aac_video", "mp4", "copy", "aac"),
        ("wav", "mp4", "aac", "aac"),
        ("opus", "mp4", "aac", "aac"),
        ("opus", "mkv", "copy", "opus"),
        ("wav", "mkv", "copy", "pcm_s16le"),
    ],
)
def test_audio_with_the_video(
    tmp_path: Path, sources: dict[str, Path], source: str, container: str, mode: str, codec: str
) -> None:
    frames = gradient(frames=16)  # 2 s at 8 fps; the sources last 3 s
    ctx = fast_ctx(container=container)
    path = write_video(frames, tmp_path, "v", 8, ctx, state_for(), audio=sources[source])[0]
    decoded, info = decode(path)
    assert decoded.shape == frames.shape and info["audio"] == [codec]
    seconds = audio_seconds(path)
    # a copied track ends within one packet after the video, a transcoded one on the sample
    assert 1.9 < seconds <= 2.0 + (0.1 if mode == "copy" else 0.001)
    assert read_metadata(path)["audio"]["mode"] == mode
    probe = ffprobe(path)
    if probe is not None:
        kinds = sorted(s["codec_type"] for s in probe["streams"])
        assert kinds == ["audio", "video"]


def test_silent_or_missing_sources_keep_the_frames(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    assert plan_audio(sources["silent"], "mp4") is None
    for source in (sources["silent"], tmp_path / "missing.wav"):
        path = write_video(gradient(4), tmp_path, "v", 8, fast_ctx(), state_for(), audio=source)[0]
        assert decode(path)[1]["audio"] == []
        assert read_metadata(path)["audio"]["error"]


def test_sound_that_ends_before_the_start_is_left_out(
    tmp_path: Path, clicks: dict[str, Path]
) -> None:
    """An empty track helps nobody: the video is silent and the document says why."""
    path = write_video(gradient(4), tmp_path, "v", 8, fast_ctx(), state_for(),
                       audio=clicks["clip"], audio_start=9.0)[0]  # fmt: skip
    assert decode(path)[1]["audio"] == []
    assert "ends at 4.0" in read_metadata(path)["audio"]["error"]


def test_attach_audio_in_place(tmp_path: Path, sources: dict[str, Path]) -> None:
    frames = gradient(frames=8)
    state = state_for()
    path = write_video(frames, tmp_path, "v", 8, fast_ctx(), state)[0]
    before, _ = decode(path)
    plan = attach_audio(path, sources["aac_video"])
    assert plan is not None and plan.mode == "copy"
    after, info = decode(path)
    assert info["audio"] == ["aac"] and (after == before).all()  # pictures copied, not re-encoded
    assert read_metadata(path) == state.document
    assert 0.9 < audio_seconds(path) < 1.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
    assert attach_audio(path, sources["silent"]) is None


# --- timing: the sound plays with the pictures it played with in the source ------------


@pytest.fixture(scope="module")
def clicks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sources whose audio clicks at a known time (see each comment)."""
    folder = tmp_path_factory.mktemp("clicks")
    return {
        # AAC in mp4: the encoder's 1024 priming samples lie before 0, marked to be skipped
        "m4a": make_click_source(folder / "click.m4a", click_at=0.5),
        # MP3: the encoder delay is skipped by the decoder; the file starts at ~0.025 s
        "mp3": make_click_source(folder / "click.mp3", click_at=0.5, codec="libmp3lame"),
        # pictures from 0, the audio track starting 0.5 s after them: click at 1.0 s
        "late": make_click_source(folder / "late.mp4", click_at=0.5, fps=25, audio_delay=0.5),
        # pictures and sound from 0, click at 2.0 s
        "clip": make_click_source(folder / "clip.mp4", click_at=2.0, fps=25, seconds=4.0),
        "surround": make_click_source(
            folder / "surround.flac", click_at=0.5, codec="flac", layout="5.1"
        ),
    }


def onset_in(path: Path) -> float:
    onset = audio_onset(path)
    assert onset is not None, f"no click in {path.name}"
    return onset


@pytest.mark.parametrize(
    ("source", "container", "mode", "expected"),
    [
        ("m4a", "mp4", "copy", 0.5),  # the priming stays skipped (was 21 ms late)
        ("m4a", "mkv", "copy", 0.5),
        ("mp3", "mp4", "copy", 0.5),  # mp3 is copied into mp4 (was re-encoded), in sync
        ("mp3", "mkv", "flac", 0.5),  # Matroska cannot start inside its first packet
        ("late", "mp4", "copy", 1.0),  # the late start is kept (was 0.5 s early)
        ("late", "mkv", "copy", 1.0),
    ],
)
def test_copied_audio_keeps_its_timing(
    tmp_path: Path, clicks: dict[str, Path], source: str, container: str, mode: str,
    expected: float,
) -> None:  # fmt: skip
    assert abs(onset_in(clicks[source]) - expected) < 0.002  # the source itself
    frames = gradient(frames=16)  # 2 s at 8 fps
    ctx = fast_ctx(container=container)
    path = write_video(frames, tmp_path, "v", 8, ctx, state_for(), audio=clicks[source])[0]
    document = read_metadata(path)["audio"]
    assert document["mode"] == mode
    assert abs(onset_in(path) - expected) < 0.002
    if FFMPEG is not None and source != "late":  # ffmpeg decodes from the track's start
        assert abs(ffmpeg_onset(path) - expected) < 0.002
    seconds = audio_seconds(path)
    assert 1.9 < seconds <= 2.0 + (0.1 if mode == "copy" else 0.001)


def test_mp3_is_recorded_as_mp3(tmp_path: Path, clicks: dict[str, Path]) -> None:
    """PyAV names the decoder (mp3float); the document and the copy use the codec."""
    plan = plan_audio(clicks["mp3"], "mp4")
    assert plan is not None and (plan.codec, plan.mode) == ("mp3", "copy")
    path = write_video(gradient(8), tmp_path, "v", 8, fast_ctx(), state_for(), clicks["mp3"])[0]
    assert audio_stream_info(path)["codec"] == "mp3"
    assert read_metadata(path)["audio"]["codec"] == "mp3"


@pytest.mark.parametrize(("container", "mode"), [("mp4", "copy"), ("mkv", "flac")])
def test_audio_from_a_later_start(
    tmp_path: Path, clicks: dict[str, Path], container: str, mode: str
) -> None:
    """`audio_start`: the source time that plays with the first picture (a matting job's
    first frame). The click at 2.0 s plays at 0.5 s; the track ends with the video."""
    frames = gradient(frames=12)  # 1.5 s at 8 fps
    path = write_video(
        frames, tmp_path, "v", 8, fast_ctx(container=container), state_for(),
        audio=clicks["clip"], audio_start=1.5,
    )[0]  # fmt: skip
    document = read_metadata(path)["audio"]
    assert (document["mode"], document["start"]) == (mode, 1.5)
    assert abs(onset_in(path) - 0.5) < 0.002
    if FFMPEG is not None:
        assert abs(ffmpeg_onset(path) - 0.5) < 0.002
    assert 1.45 < audio_seconds(path) <= 1.5 + (AUDIO_FRAME if mode == "copy" else 0.001)


@pytest.mark.parametrize(("container", "mode"), [("mp4", "aac"), ("mkv", "copy")])
def test_surround_keeps_its_channels(
    tmp_path: Path, clicks: dict[str, Path], container: str, mode: str
) -> None:
    path = write_video(
        gradient(8), tmp_path, "v", 8, fast_ctx(container=container), state_for(),
        audio=clicks["surround"],
    )[0]  # fmt: skip
    document = read_metadata(path)["audio"]
    assert (document["mode"], document["channels"], document["layout"]) == (mode, 6, "5.1")
    assert "source_layout" not in document  # nothing was downmixed
    info = audio_stream_info(path)
    assert (info["channels"], info["layout"]) == (6, "5.1")
    assert abs(onset_in(path) - 0.5) < 0.002
    probe = ffprobe(path)
    if probe is not None:
        (audio,) = [s for s in probe["streams"] if s["codec_type"] == "audio"]
        assert audio["channels"] == 6 and audio["channel_layout"].startswith("5.1")


def test_attach_audio_keeps_timing(tmp_path: Path, clicks: dict[str, Path]) -> None:
    path = write_video(gradient(16), tmp_path, "v", 8, fast_ctx(), state_for())[0]
    plan = attach_audio(path, clicks["late"])
    assert plan is not None and plan.mode == "copy"
    assert abs(onset_in(path) - 1.0) < 0.002


def test_a_layout_or_rate_aac_refuses_is_converted(tmp_path: Path) -> None:
    """24 channels at 11 kHz: AAC takes neither, so it gets stereo at 48 kHz, still in
    sync, and the document says what the source had."""
    source = make_click_source(tmp_path / "big.wav", click_at=0.5, codec="pcm_s16le",
                               layout="22.2", rate=11_000)  # fmt: skip
    path = write_video(gradient(8), tmp_path, "v", 8, fast_ctx(), state_for(), source)[0]
    document = read_metadata(path)["audio"]
    assert document["mode"] == "aac" and document["sample_rate"] == 48000
    assert (document["channels"], document["layout"]) == (2, "stereo")
    assert document["source_layout"] == "24 channels"  # WAV keeps the count, not the order
    info = audio_stream_info(path)
    assert (info["channels"], info["rate"]) == (2, 48000)
    assert abs(onset_in(path) - 0.5) < 0.002
