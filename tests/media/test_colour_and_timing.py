"""What a player needs to show a video right: the colour description matching the
conversion really used, each frame at its time (also at a variable rate), and the size
the encoder was given when 4:2:0 forced padding."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from av.video.reformatter import ColorRange, Colorspace

from wangend.media.metadata import read_metadata
from wangend.media.persistence import write_video

from .support import audio_onset, fast_ctx, ffprobe, gradient, make_click_source, state_for

KEY_GREEN = (120, 255, 155)  # the matting greenscreen colour


def patches(width: int, height: int, frames: int = 2) -> np.ndarray:
    """Four flat patches: the key green, a red, a blue and a grey."""
    picture = np.empty((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    picture[:h, :w], picture[:h, w:] = KEY_GREEN, (220, 40, 40)
    picture[h:, :w], picture[h:, w:] = (40, 60, 220), (128, 128, 128)
    return np.repeat(picture[None], frames, axis=0)


def decoded_as(path: Path, matrix: Colorspace) -> np.ndarray:
    """The first picture converted to RGB with `matrix`, limited range (what a player
    does once it has chosen a matrix)."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        picture = frame.reformat(
            format="rgb24", src_colorspace=matrix, src_color_range=ColorRange.MPEG
        )
        return picture.to_ndarray()


@pytest.mark.parametrize(
    ("codec", "size"),
    [("libx264", (1280, 720)), ("libx264", (64, 48)), ("libx265", (64, 48))],
)
def test_colours_are_bt709_and_say_so(tmp_path: Path, codec: str, size: tuple[int, int]) -> None:
    """Untagged, players pick BT.601 for SD and BT.709 for HD: one matrix is wrong at
    one of the two. Now every size is converted with BT.709 and tagged as such."""
    width, height = size
    frames = patches(width, height)
    path = write_video(frames, tmp_path, "key", 8, fast_ctx(codec=codec), state_for())[0]
    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        tags = (context.color_range, context.colorspace, context.color_primaries,
                context.color_trc)  # fmt: skip
    assert tags == (1, 1, 1, 1)  # tv range; BT.709 matrix, primaries and transfer
    centres = [(height // 4, width // 4), (height // 4, 3 * width // 4),
               (3 * height // 4, width // 4), (3 * height // 4, 3 * width // 4)]  # fmt: skip

    def error(matrix: Colorspace) -> int:
        decoded = decoded_as(path, matrix).astype(int)
        return max(int(np.abs(decoded[c] - frames[0][c]).max()) for c in centres)

    assert error(Colorspace.ITU709) <= 3 < 15 <= error(Colorspace.ITU601)  # really BT.709
    probe = ffprobe(path)
    if probe is not None:
        video = probe["streams"][0]
        assert (video["color_range"], video["color_space"]) == ("tv", "bt709")
        assert (video["color_transfer"], video["color_primaries"]) == ("bt709", "bt709")


def test_a_round_trip_keeps_colours(tmp_path: Path) -> None:
    """Decoding as the tags say (PyAV does) gives back what was written."""
    frames = gradient(frames=3)
    path = write_video(frames, tmp_path, "g", 8, fast_ctx(), state_for())[0]
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert np.abs(decoded.astype(int) - frames).mean() < 3


def frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        return [float(f.pts * f.time_base) for f in container.decode(video=0)]


def test_variable_rate_frames_keep_their_times(tmp_path: Path) -> None:
    """10 fps for 2.5 s, then 50 fps: frame 25 plays at 2.5 s, and the sound (a click
    at 2.5 s) with it; the last frame lasts as long as the one before."""
    times = [i / 10 for i in range(25)] + [2.5 + i / 50 for i in range(25)]
    source = make_click_source(tmp_path / "src.mp4", click_at=2.5, frame_times=times)
    frames = gradient(frames=len(times))
    fps = len(times) / 3.0  # the average rate, as a matting job records it
    for container in ("mp4", "mkv"):
        path = write_video(
            frames, tmp_path, "vfr", fps, fast_ctx(container=container), state_for(),
            audio=source, timestamps=times,
        )[0]  # fmt: skip
        assert np.allclose(frame_times(path), times, atol=0.0015)
        assert abs(audio_onset(path) - 2.5) < 0.002
        assert read_metadata(path)["variable_frame_rate"] is True
        with av.open(str(path)) as handle:
            assert abs(handle.duration / 1e6 - 3.0) < 0.03


def test_timestamps_must_fit_the_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="increasing"):
        write_video(gradient(3), tmp_path, "x", 8, fast_ctx(), state_for(),
                    timestamps=[0.0, 0.2, 0.1])  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_odd_sizes_record_the_padded_size(tmp_path: Path) -> None:
    frames = gradient(frames=2, height=49, width=65)
    padded = write_video(frames, tmp_path, "odd", 8, fast_ctx(), state_for())[0]
    with av.open(str(padded)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (66, 50)
    assert read_metadata(padded)["encoded_size"] == [66, 50]
    kept = write_video(frames, tmp_path, "odd444", 8, fast_ctx(pix_fmt="yuv444p"), state_for())[0]
    with av.open(str(kept)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (65, 49)
    assert "encoded_size" not in read_metadata(kept)
