"""Helpers for the media (and inspect) tests: frames H.264 keeps close, resolved jobs, ffprobe, and
sources with a real audio track made with PyAV."""

from __future__ import annotations

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from wangend.media.metadata import MetadataState
from wangend.media.persistence import MediaPersistenceContext
from wangend.protocol import ResolvedGenerate, ResolvedLora, ResolvedMatAnyOne

FFPROBE = shutil.which("ffprobe")


def gradient(frames: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth moving colour ramps: content H.264 keeps close to the original."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = ((x * 4 + t * 8) % 256, (y * 5 + t * 4) % 256, (x + y) * 2 % 256)
    return np.stack(rgb, axis=-1).astype(np.uint8)


def make_job(**changes: Any) -> ResolvedGenerate:
    values: dict[str, Any] = dict(
        model="tiny",
        source="/models/tiny",
        prompt="a fox in the snow, enhanced with detail",
        original_prompt="fox in snow",
        negative_prompt="blurry",
        width=64,
        height=48,
        frames=9,
        steps=4,
        guidance_scale=5.0,
        seed=42,
        fps=8,
        flow_shift=3.0,
        output_name="{date}_{model}_{seed}",
        family="tiny",
        dtype="float32",
        loras=[ResolvedLora(name="style", path="/l/style.safetensors", multiplier="1,0.5",
                            sha256="ab" * 32)],
        inputs_sha256={"image": "cd" * 32},
        enhancer={"provider": "local", "outcome": "ok"},
    )  # fmt: skip
    values.update(changes)
    return ResolvedGenerate(**values)


def make_matting(**changes: Any) -> ResolvedMatAnyOne:
    values: dict[str, Any] = dict(
        input="/in/dancer take 2.mp4", mask="/in/mask.png", model="tiny", start_frame=0,
        end_frame=9, frames=9, width=64, height=48, fps=8.0, erode=0, dilate=0, warmup=10,
        max_size=None, mask_type="alpha", rgba_zip=False, reattach_audio=True,
        output_name="{prompt}_{job}",
    )  # fmt: skip
    values.update(changes)
    return ResolvedMatAnyOne(**values)


def state_for(job: Any = None, mode: str = "embedded", frames: np.ndarray | None = None):
    return MetadataState.for_run(
        3, job or make_job(), timings={"denoise": 1.5}, device="cpu", frames=frames, mode=mode
    )


def fast_ctx(**changes: Any) -> MediaPersistenceContext:
    """No real waiting between retries in tests."""
    return MediaPersistenceContext(retry_backoff=0.0, **changes)


def decode(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        info = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "fps": stream.average_rate,
            "size": (stream.width, stream.height),
            "audio": [s.codec_context.name for s in container.streams.audio],
            "tags": {k.lower(): v for k, v in container.metadata.items()},
        }
    return frames, info


def ffprobe(path: Path) -> dict[str, Any] | None:
    """ffprobe's view of a file, or None where ffprobe is not installed."""
    if FFPROBE is None:
        return None
    result = subprocess.run(
        [FFPROBE, "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
         str(path)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return json.loads(result.stdout)


def make_audio_source(
    path: Path, seconds: float, *, codec: str = "aac", with_video: bool = True, rate: int = 44100
) -> Path:
    """A file with a sine tone (and a few pictures when `with_video`)."""
    fmt = {"wav": "wav", "mp3": "mp3"}.get(path.suffix.lstrip("."))
    with av.open(str(path), mode="w", format=fmt) as out:
        video = None
        if with_video:
            video = out.add_stream("libx264", rate=8)
            video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = out.add_stream(codec, rate=rate)
        audio.layout = "stereo"
        fmt_name = audio.codec_context.codec.audio_formats[0].name
        total = int(seconds * rate)
        size = audio.codec_context.frame_size or 1024
        for start in range(0, total, size):
            n = min(size, total - start)
            t = (np.arange(start, start + n) / rate).astype(np.float32)
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            planar = fmt_name.endswith("p")
            if fmt_name.startswith("s16"):
                tone = (tone * 32767).astype(np.int16)
            data = np.stack([tone, tone]) if planar else np.stack([tone, tone], 1).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(data, format=fmt_name, layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
        if video is not None:
            for i in range(int(seconds * 8)):
                img = np.full((32, 32, 3), i * 10 % 256, np.uint8)
                out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            out.mux(video.encode(None))
    return path


# --- sources with a click at a known time, and where the click lands in an output ------

CLICK_RATE = 48_000
AUDIO_FRAME = 1024 / CLICK_RATE  # one AAC frame: the tolerance the audit asked for
FFMPEG = shutil.which("ffmpeg")


def click_samples(
    seconds: float, click_at: float, channels: int = 2, rate: int = CLICK_RATE
) -> np.ndarray:
    """(channels, n) float32: silence, then a 100 ms 1 kHz burst at `click_at`."""
    t = np.arange(round(seconds * rate)) / rate
    burst = np.where((t >= click_at) & (t < click_at + 0.1), 0.5 * np.sin(2 * np.pi * 1000 * t), 0)
    return np.repeat(burst.astype(np.float32)[None], channels, axis=0)


def make_click_source(
    path: Path,
    *,
    click_at: float,
    seconds: float = 3.0,
    codec: str = "aac",
    layout: str = "stereo",
    fps: int | None = None,
    frame_times: list[float] | None = None,
    audio_delay: float = 0.0,
    rate: int = CLICK_RATE,
) -> Path:
    """A file whose first audio track clicks at `click_at` seconds of its own audio.
    `fps` (or `frame_times`, a variable rate) adds 32x32 pictures from t = 0, each a
    different grey; `audio_delay` starts the audio track that much after them."""
    samples = click_samples(seconds, click_at, av.AudioLayout(layout).nb_channels, rate)
    with av.open(str(path), mode="w") as out:
        video = None
        if fps or frame_times:
            video = out.add_stream("libx264", rate=fps or 25)
            video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
            if frame_times:
                video.codec_context.time_base = video.time_base = Fraction(1, 1000)
        audio = out.add_stream(codec, rate=rate)
        audio.layout = layout
        audio.codec_context.open()
        fmt = audio.codec_context.format.name
        size = audio.codec_context.frame_size or 1024
        delay = round(audio_delay * rate)

        def mux(packets: list[Any]) -> None:
            for packet in packets:
                if delay:
                    packet.pts += delay
                    packet.dts += delay
                out.mux(packet)

        for start in range(0, samples.shape[1], size):
            chunk = samples[:, start : start + size]
            if fmt.startswith(("s16", "s32")):
                kind = np.int16 if fmt.startswith("s16") else np.int32
                chunk = (chunk * np.iinfo(kind).max).astype(kind)
            if not fmt.endswith("p"):
                chunk = np.ascontiguousarray(chunk.T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format=fmt, layout=layout)
            frame.sample_rate, frame.pts = rate, start
            frame.time_base = Fraction(1, rate)
            mux(audio.encode(frame))
        mux(audio.encode(None))
        if video is not None:
            times = frame_times or [i / fps for i in range(int(seconds * (fps or 0)))]
            for i, t in enumerate(times):
                grey = np.full((32, 32, 3), i * 7 % 256, np.uint8)
                picture = av.VideoFrame.from_ndarray(grey, format="rgb24")
                if frame_times:
                    picture.pts, picture.time_base = round(t * 1000), Fraction(1, 1000)
                out.mux(video.encode(picture))
            out.mux(video.encode(None))
    return path


def first_picture_time(path: Path) -> float:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return float(frame.pts * frame.time_base)


def audio_onset(path: Path, threshold: float = 0.1) -> float | None:
    """Seconds from the first picture (without video: the first sample) to the first
    audio sample above `threshold`, by the timestamps the demuxer and decoder give (edit
    lists, priming and skip marks honoured), as a player would play it."""
    with av.open(str(path)) as container:
        start = first_picture_time(path) if container.streams.video else None
        for frame in container.decode(audio=0):
            if start is None:
                start = float(frame.pts * frame.time_base)
            data = frame.to_ndarray()
            if not frame.format.is_planar:
                data = data.reshape(-1, frame.layout.nb_channels).T
            if data.dtype.kind in "iu":
                data = data / float(np.iinfo(data.dtype).max)
            hits = np.flatnonzero(np.abs(data).max(axis=0) > threshold)
            if hits.size:
                return float(frame.pts * frame.time_base) + hits[0] / frame.sample_rate - start
    return None


def ffmpeg_onset(path: Path, threshold: float = 0.1) -> float | None:
    """The first loud sample of the first audio track as the ffmpeg tool decodes it from
    its start (an independent decoder; the audit's onset.py)."""
    assert FFMPEG is not None
    raw = subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", "48000",
         "-f", "f32le", "-"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    data = np.frombuffer(raw, np.float32)
    hits = np.flatnonzero(np.abs(data) > threshold)
    return hits[0] / 48000 if hits.size else None


def audio_stream_info(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        context = stream.codec_context
        return {
            "codec": context.codec.canonical_name,
            "channels": context.layout.nb_channels,
            "layout": context.layout.name,
            "rate": context.sample_rate,
        }
