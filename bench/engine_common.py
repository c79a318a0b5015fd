"""What the two engine benchmarks (engine_cpu.py, gpu_step.py) share: hooks that note
when the first denoising step ends, and the PSNR they compare outputs with.

Run the benchmarks as scripts (`python bench/engine_cpu.py`): Python then puts bench/ on
the import path, so this module imports as `engine_common`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class FirstStepHooks:
    """RunHooks that note when the first denoising step ends (time to first step)."""

    def __init__(self) -> None:
        self.first_step: float | None = None

    def progress(self, step: int, steps: int, phase: str, preview: Any = None) -> None:
        if phase == "denoising" and step == 1 and self.first_step is None:
            self.first_step = time.perf_counter()

    def paused(self, step: int, steps: int) -> None: ...
    def resumed(self, step: int, steps: int) -> None: ...
    def model_loading(self, model: str, data: dict[str, Any]) -> None: ...
    def model_loaded(self, model: str, data: dict[str, Any]) -> None: ...
    def spec_changed(self, spec: Any) -> None: ...


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 videos, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
