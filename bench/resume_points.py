"""What resume points cost, measured in one run.

* write/read: one point (latents + a UniPC order-2 solver state, as after a few steps)
  for the latent shapes of real Wan 2.1 jobs, written with fsync and renamed, then read
  back; sizes in MB, times in ms (median of `--repeat`). This is the whole cost a point
  adds to a step on a GPU machine, less the device-to-host copy.
* job: the tiny model through GenerationRuntime, 64x64, 9 frames, 12 steps, with
  points off, and with a point after every step (`resume_every = 0`, the worst case),
  interleaved; ratio of medians.
* resume: a job suspended at step 6 of 12, then run again: the steps it skipped.

Prints figures; asserts nothing. Run: `.venv/bin/python bench/resume_points.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from wangend.pipelines.control import JobAborted, JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.resume import ResumeStore
from wangend.pipelines.runtime import GenerationRuntime
from wangend.pipelines.tiny import ensure_tiny_model
from wangend.protocol import GenerateSpec

SHAPES = {  # latents (batch, channels, latent frames, h/8, w/8) of real Wan 2.1 jobs
    "480x832, 81 frames": (1, 16, 21, 60, 104),
    "720x1280, 81 frames": (1, 16, 21, 90, 160),
}


class Hooks:
    def __init__(self, on_step=None) -> None:
        self.steps: list[int] = []
        self.on_step = on_step

    def progress(self, step, steps, phase, preview=None) -> None:
        if phase == "denoising":
            self.steps.append(step)
            if self.on_step is not None:
                self.on_step(step)

    def paused(self, step, steps) -> None: ...
    def resumed(self, step, steps) -> None: ...
    def model_loading(self, model, data) -> None: ...
    def model_loaded(self, model, data) -> None: ...
    def spec_changed(self, spec) -> None: ...


def solver_after_steps(shape: tuple[int, ...]) -> diffusers.UniPCMultistepScheduler:
    """A UniPC scheduler as it is a few steps into a 50-step run."""
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                  use_flow_sigmas=True, flow_shift=3.0)  # fmt: skip
    scheduler.set_timesteps(50)
    sample = torch.randn(shape)
    for t in scheduler.timesteps[:3]:
        sample = scheduler.step(torch.randn(shape), t, sample).prev_sample
    return scheduler


def point_costs(folder: Path, repeat: int) -> None:
    store = ResumeStore(folder)
    for name, shape in SHAPES.items():
        scheduler = solver_after_steps(shape)
        latents = torch.randn(shape)
        writes, reads = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            store.write(1, "mark", 3, latents, scheduler)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            store.read(1, "mark")
            reads.append(time.perf_counter() - t0)
        size = store.path(1).stat().st_size / 1e6
        print(
            f"point {name:<20} {size:6.1f} MB  write {statistics.median(writes) * 1e3:6.1f} ms"
            f"  read {statistics.median(reads) * 1e3:6.1f} ms"
        )
        store.discard(1)


def job_costs(folder: Path, repeat: int) -> None:
    models = folder / "models"
    ensure_tiny_model(models)
    registry = ModelRegistry(models)
    production = ProductionManager(registry, device="cpu", allow_download=False)
    inputs = TaskInputManager(registry, "tiny", "auto")
    spec = GenerateSpec(prompt="a heron over a pond", width=64, height=64, frames=9, steps=12)
    job = inputs.resolve(spec)
    plain = GenerationRuntime(production, folder / "out")
    every = GenerationRuntime(production, folder / "out", resume=ResumeStore(folder / "r", 0.0))
    plain.run(1, job, JobControl(), Hooks())  # warm
    times: dict[str, list[float]] = {"off": [], "every step": []}
    for n in range(repeat):
        for label, runtime in (("off", plain), ("every step", every)):
            t0 = time.perf_counter()
            runtime.run(100 + n, job, JobControl(), Hooks())
            times[label].append(time.perf_counter() - t0)
    off, on = (statistics.median(times[k]) for k in ("off", "every step"))
    print(
        f"tiny job, 12 steps: points off {off * 1e3:.0f} ms, a point every step "
        f"{on * 1e3:.0f} ms, ratio x{on / off:.3f} (median of {repeat})"
    )

    control = JobControl()
    first = Hooks(lambda step: control.request_suspend() if step == 6 else None)
    with contextlib.suppress(JobAborted):  # the suspend unwinds the first run
        every.run(7, job, control, first)
    second = Hooks()
    every.run(7, job, JobControl(), second)
    print(
        f"suspended at step {first.steps[-1]} of 12; the next run starts at step "
        f"{second.steps[0]} and runs {len(second.steps) - 1} steps"
    )
    production.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        point_costs(Path(tmp), args.repeat)
        job_costs(Path(tmp), args.repeat)


if __name__ == "__main__":
    main()
