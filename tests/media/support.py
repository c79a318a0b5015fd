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
