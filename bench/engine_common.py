"""What the engine benchmarks (engine_cpu.py, gpu_step.py, job_overhead.py) share: hooks
that note when the first denoising step ends, the PSNR they compare outputs with, the
plain diffusers call they measure against, a daemon run in the benchmark's own process
and a minimal NDJSON client for driving it.

Run the benchmarks as scripts (`python bench/engine_cpu.py`): Python then puts bench/ on
the import path, so this module imports as `engine_common`."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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


def plain_call(pipe: Any, job: Any, on_step_end: Callable[..., dict] | None = None) -> np.ndarray:
    """`job` (a ResolvedGenerate) as a plain diffusers call on `pipe`: what wangend's
    runtime is measured against. uint8 frames, like the runtime's."""
    import torch

    from wangend.pipelines.calls import scheduler_for
    from wangend.pipelines.runtime import to_uint8

    pipe.scheduler = scheduler_for(pipe.scheduler, job.flow_shift)
    out = pipe(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        height=job.height,
        width=job.width,
        num_frames=job.frames,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(job.seed),
        output_type="np",
        callback_on_step_end=on_step_end,
    )
    return to_uint8(np.asarray(out.frames[0]))


@contextmanager
def running_daemon(work: Path, **settings: Any) -> Iterator[tuple[Any, Line]]:
    """A daemon in this process (its warm pipeline and the GPU's peak memory are visible
    here) on a Unix socket under `work`, config `settings` on top; and a client on that
    socket, subscribed to every event. The daemon stops when the block ends."""
    import anyio
    import anyio.from_thread

    from wangend.config import load_config
    from wangend.server.daemon import Daemon

    base = {
        "state_dir": str(work / "state"),
        "output_dir": str(work / "out"),
        "tcp": False,
        "socket": str(work / "d.sock"),
    }
    config = load_config(None, {**base, **settings}, env={})
    daemon = Daemon(config)
    stop = threading.Event()
    with anyio.from_thread.start_blocking_portal() as portal:
        portal.start_task_soon(
            lambda: daemon.serve(shutdown_trigger=lambda: anyio.to_thread.run_sync(stop.wait))
        )
        while not (work / "state" / "endpoint.json").exists():
            time.sleep(0.05)
        client = Line(config.socket)
        client.call("subscribe", {})
        try:
            yield daemon, client
        finally:
            stop.set()
