"""What the engine benchmarks (engine_cpu.py, gpu_step.py, job_overhead.py) share: hooks
that note when the first denoising step ends, the PSNR they compare outputs with, and a
minimal NDJSON client for driving a daemon.

Run the benchmarks as scripts (`python bench/engine_cpu.py`): Python then puts bench/ on
the import path, so this module imports as `engine_common`."""

from __future__ import annotations

import json
import socket
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


class Line:
    """A minimal NDJSON client: what any script would write."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.n = 0

    def send(self, method: str, params: Any = None) -> int:
        self.n += 1
        msg = {"jsonrpc": "2.0", "id": self.n, "method": method}
        if params is not None:
            msg["params"] = params
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return self.n

    def read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def call(self, method: str, params: Any = None) -> tuple[dict, list[dict]]:
        rid = self.send(method, params)
        events = []
        while True:
            msg = self.read()
            if msg.get("id") == rid:
                return msg, events
            events.append(msg["params"])

    def until(self, pred) -> tuple[dict, float]:
        while True:
            msg = self.read()
            if msg.get("method") == "event" and pred(msg["params"]):
                return msg["params"], time.perf_counter()
