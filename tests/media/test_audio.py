"""Audio from a source video or audio file: copied when the codec fits the container,
else encoded as AAC, cut to the video's length; a finished file gets it in place."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from wangend.media.audio import attach_audio, plan_audio
from wangend.media.metadata import read_metadata
from wangend.media.persistence import write_video

from .support import decode, fast_ctx, ffprobe, gradient, make_audio_source, state_for


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
