"""Engine figures on the tiny model on CPU: what wangend's runtime path costs over a plain
diffusers call, what each step cache saves and how far it moves the frames (PSNR against
the uncached run), group offload against none, cold and warm loads, and the time from a
job being taken to its first denoising step on a warm model.

The tiny model is a few thousand times smaller than Wan 1.3B, so absolute times say
little; the ratios say what the engine adds or saves. bench/gpu_step.py measures the same
on the real-size architecture on a GPU.

    .venv/bin/python bench/engine_cpu.py [--steps 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from engine_common import FirstStepHooks as Hooks  # bench/ is on the path as a script
from engine_common import plain_call, psnr

from wangend.pipelines.acceleration import EngineOptions
from wangend.pipelines.control import JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime
from wangend.pipelines.tiny import ensure_tiny_model
from wangend.protocol import GenerateSpec


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def paired(
    base: Callable[[], Any], variant: Callable[[], Any], repeat: int
) -> tuple[float, float, Any]:
    """Median variant/base time ratio over back-to-back pairs (the machine is shared, so
    only runs seconds apart are compared), the median variant time, the last result."""
    ratios, times, result = [], [], None
    for _ in range(repeat):
        t_base, _ = median_time(base, 1)
        t_var, result = median_time(variant, 1)
        ratios.append(t_var / t_base)
        times.append(t_var)
    return statistics.median(ratios), statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="wangend-bench-"))
    ensure_tiny_model(work / "models")
    registry = ModelRegistry(work / "models")
    spec = GenerateSpec(
        prompt="a red kite over a beach", seed=5, steps=args.steps, width=128, height=128, frames=17
    )
    job = TaskInputManager(registry, "tiny", "auto").resolve(spec)
    record = registry.resolve("tiny")
    rows: list[tuple[str, str]] = []

    manager = ProductionManager(registry, device="cpu", allow_download=False)
    start = time.perf_counter()
    pipe = manager.ensure(record, EngineOptions(), Hooks())
    cold = time.perf_counter() - start
    warm, _ = median_time(lambda: manager.ensure(record, EngineOptions(), Hooks()), 5)
    rows += [("load, cold (from disk)", f"{cold * 1000:.0f} ms")]
    rows += [("load, warm (reuse)", f"{warm * 1e6:.0f} us")]

    runtime = GenerationRuntime(manager, work / "out")

    def through_runtime(options: EngineOptions) -> np.ndarray:
        p = manager.ensure(record, options, Hooks())
        with manager.run_scope(p, options, steps=job.steps):
            return runtime.generate_frames(p, job, JobControl(), Hooks())

    plain_call(pipe, job)  # warm-up
    ratio, t_none, ref = paired(
        lambda: plain_call(pipe, job), lambda: through_runtime(EngineOptions()), args.repeat
    )
    assert np.array_equal(ref, plain_call(pipe, job))
    rows.append(("wangend runtime, s/step", f"{t_none / job.steps * 1000:.1f} ms"))
    rows.append(("wangend runtime / plain diffusers", f"x{ratio:.2f} time, same frames"))

    def uncached() -> np.ndarray:
        return through_runtime(EngineOptions())

    group = ProductionManager(registry, device="cpu", allow_download=False)
    gpipe = group.ensure(record, EngineOptions(memory_profile="group"), Hooks())
    grt = GenerationRuntime(group, work / "out")
    ratio, _, frames = paired(
        uncached,
        lambda: grt.generate_frames(gpipe, job, JobControl(), Hooks()),
        args.repeat,
    )
    rows.append(("memory_profile group / none", f"x{ratio:.2f} time, PSNR {psnr(frames, ref)}"))
    group.release()

    fp8 = EngineOptions(fp8=True)
    fp8_manager = ProductionManager(registry, device="cpu", allow_download=False)
    fpipe = fp8_manager.ensure(record, fp8, Hooks())
    frt = GenerationRuntime(fp8_manager, work / "out")
    ratio, _, frames = paired(
        uncached,
        lambda: frt.generate_frames(fpipe, job, JobControl(), Hooks()),
        args.repeat,
    )
    rows.append(("fp8 storage / none", f"x{ratio:.2f} time, PSNR {psnr(frames, ref):.1f} dB"))
    fp8_manager.release()

    compiled = ProductionManager(registry, device="cpu", allow_download=False)
    cpipe = compiled.ensure(record, EngineOptions(compile=True), Hooks())
    crt = GenerationRuntime(compiled, work / "out")
    t_first, _ = median_time(lambda: crt.generate_frames(cpipe, job, JobControl(), Hooks()), 1)
    ratio, _, frames = paired(
        uncached,
        lambda: crt.generate_frames(cpipe, job, JobControl(), Hooks()),
        args.repeat,
    )
    rows.append(
        (
            "regional compile / none",
            f"x{ratio:.2f} time, PSNR {psnr(frames, ref):.1f} dB "
            f"(the first job, compiling: {t_first:.1f} s)",
        )
    )
    compiled.release()

    through_runtime(EngineOptions(step_cache="mag"))  # measures the ratios
    for name, threshold in (("fbc", None), ("fbc", 0.2), ("mag", None), ("taylorseer", None)):
        options = EngineOptions(step_cache=name, step_cache_threshold=threshold)
        ratio, _, frames = paired(uncached, lambda o=options: through_runtime(o), args.repeat)
        label = f"step_cache {name}" + (f" (threshold {threshold})" if threshold else "")
        rows.append((label, f"x{1 / ratio:.2f} speed-up, PSNR {psnr(frames, ref):.1f} dB"))
    options = EngineOptions(step_cache="pab")
    ratio, _, frames = paired(uncached, lambda: through_runtime(options), args.repeat)
    rows.append(("step_cache pab", f"x{1 / ratio:.2f} speed-up, PSNR {psnr(frames, ref):.1f} dB"))

    waits = []
    for _ in range(1 + args.repeat):
        hooks = Hooks()
        start = time.perf_counter()
        runtime.run(1, job, JobControl(), hooks)
        assert hooks.first_step is not None
        waits.append(hooks.first_step - start)
    rows.append(
        (
            "taken -> first step, warm (first job / median of next)",
            f"{waits[0] * 1000:.1f} ms / {statistics.median(waits[1:]) * 1000:.1f} ms",
        )
    )

    print(
        f"# engine_cpu: tiny model, {job.width}x{job.height}, {job.frames} frames, "
        f"{job.steps} steps, CFG {job.guidance_scale}; median of {args.repeat}"
    )
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
