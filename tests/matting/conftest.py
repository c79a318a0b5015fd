"""Real media made in the test: a short mp4 with an AAC track, a mask PNG, hooks that
record what a run reports."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

W, H, FRAMES, FPS = 64, 48, 6, 12


def make_video(path: Path, frames: int = FRAMES, audio: bool = True) -> Path:
    import av

    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = None
        if audio:
            a = out.add_stream("aac", rate=44100)
            a.layout = "mono"
        for i in range(frames):
            img = np.zeros((H, W, 3), dtype=np.uint8)
            img[:, :] = (30, 60, 200)
            x = 10 + 3 * i
            img[12:36, x : x + 20] = (230, 200, 40)  # a moving yellow box
            for packet in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in v.encode():
            out.mux(packet)
        if a is not None:
            samples = int(44100 * frames / FPS)
            t = np.arange(samples) / 44100
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
            frame.sample_rate = 44100
            frame.time_base = Fraction(1, 44100)
            frame.pts = 0
            for packet in a.encode(frame):
                out.mux(packet)
            for packet in a.encode():
                out.mux(packet)
    return path


def make_mask(path: Path, size: tuple[int, int] = (W, H), empty: bool = False) -> Path:
    img = np.zeros((size[1], size[0]), dtype=np.uint8)
    if not empty:
        sx, sy = size[0] / W, size[1] / H
        img[int(12 * sy) : int(36 * sy), int(10 * sx) : int(30 * sx)] = 255
    Image.fromarray(img, mode="L").save(path)
    return path


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matting-media")
    return {
        "video": make_video(root / "clip.mp4"),
        "silent": make_video(root / "silent.mp4", audio=False),
        "mask": make_mask(root / "mask.png"),
        "big_mask": make_mask(root / "mask_big.png", (128, 96)),
        "empty_mask": make_mask(root / "empty.png", empty=True),
    }


class RecordingHooks:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.model_data: list[dict[str, Any]] = []  # what each model event carried

    def progress(self, step: int, steps: int, phase: str, preview: Any = None) -> None:
        self.events.append(("progress", (step, steps, phase)))

    def paused(self, step: int, steps: int) -> None:
        self.events.append(("paused", step))

    def resumed(self, step: int, steps: int) -> None:
        self.events.append(("resumed", step))

    def model_loading(self, model: str, data: dict[str, Any]) -> None:
        self.events.append(("loading", model))
        self.model_data.append(data)

    def model_loaded(self, model: str, data: dict[str, Any]) -> None:
        self.events.append(("loaded", model))
        self.model_data.append(data)


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tiny network is launch-bound: on a shared 2-core machine, intra-op threads
    only contend (10x slower); one thread keeps the suite quick. Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
