"""Engine figures on the real-size Wan 2.1 T2V 1.3B transformer on a CUDA GPU.

Random weights (no download): the transformer has the released checkpoint's architecture
(Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json, numbers below), the VAE the
released architecture (AutoencoderKLWan defaults), the text encoder a one-layer UMT5 with
the real width (4096) so the cross-attention sees real-size inputs. Measured at 480x832,
33 and 81 frames, bf16:

* s/step through wangend's runtime path vs a plain diffusers call (same pipeline);
* peak VRAM and s/step per memory profile (none, model, group, sequential) and fp8;
* speed-up and PSNR against the uncached frames for each step cache (random weights:
  the caches' skip decisions differ from a trained model's, so treat these as upper and
  lower bounds of the mechanism, not quality figures);
* cold load (from disk) vs warm reuse, and job taken -> first step on a warm model.

Prints a table. Without CUDA it prints "skipped: no CUDA" and exits 0.

    .venv/bin/python bench/gpu_step.py [--frames 33 81] [--steps 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from engine_common import FirstStepHooks as Hooks  # bench/ is on the path as a script
from engine_common import psnr

# transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
WAN21_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


def build_folder(folder: Path) -> None:
    """Save a real-size random WanPipeline as a diffusers folder (safetensors)."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from wangend.pipelines.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=4096,
            d_kv=64,
            d_ff=256,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=32,
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
        )
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(torch.bfloat16),
        vae=AutoencoderKLWan(),
        transformer=WanTransformer3DModel(**WAN21_1_3B).to(torch.bfloat16),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def timed(fn: Any) -> tuple[float, Any]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[33, 81])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    from wangend.pipelines.acceleration import EngineOptions
    from wangend.pipelines.control import JobControl
    from wangend.pipelines.inputs import TaskInputManager
    from wangend.pipelines.production import ProductionManager
    from wangend.pipelines.registry import ModelRegistry
    from wangend.pipelines.runtime import GenerationRuntime, scheduler_for, to_uint8
    from wangend.protocol import GenerateSpec

    work = Path(tempfile.mkdtemp(prefix="wangend-gpu-"))
    folder = work / "models" / "wan13b-random"
    build_folder(folder)
    registry = ModelRegistry(work / "models")
    record = registry.resolve(str(folder))
    inputs = TaskInputManager(registry, str(folder), "auto")
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name())]

    manager = ProductionManager(registry, device="cuda", dtype="bfloat16", allow_download=False)
    cold, pipe = timed(lambda: manager.ensure(record, EngineOptions(dtype="bfloat16"), Hooks()))
    warm, _ = timed(lambda: manager.ensure(record, EngineOptions(dtype="bfloat16"), Hooks()))
    rows += [("load cold / warm", f"{cold:.1f} s / {warm * 1e3:.2f} ms")]
    runtime = GenerationRuntime(manager, work / "out")

    for frames in args.frames:
        job = inputs.resolve(
            GenerateSpec(
                prompt="a bird", seed=1, steps=args.steps, width=832, height=480, frames=frames
            )
        )
        tag = f"{frames}f"

        def through(options: EngineOptions, job: Any = job) -> np.ndarray:
            p = manager.ensure(record, options, Hooks())
            with manager.run_scope(p, options, steps=job.steps):
                return runtime.generate_frames(p, job, JobControl(), Hooks())

        def plain(job: Any = job) -> np.ndarray:
            pipe.scheduler = scheduler_for(pipe.scheduler, job.flow_shift)
            out = pipe(
                prompt=job.prompt,
                height=job.height,
                width=job.width,
                num_frames=job.frames,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                generator=torch.Generator().manual_seed(job.seed),
                output_type="np",
            )
            return to_uint8(np.asarray(out.frames[0]))

        base = EngineOptions(dtype="bfloat16")
        through(base)  # warm-up (kernels, allocator)
        t_plain, _ = timed(plain)
        t_run, ref = timed(lambda b=base: through(b))
        rows.append(
            (
                f"{tag} plain / runtime s/step",
                f"{t_plain / job.steps:.2f} / {t_run / job.steps:.2f}",
            )
        )
        for profile, fp8 in (
            ("none", True),
            ("model", False),
            ("group", False),
            ("sequential", False),
        ):
            options = EngineOptions(dtype="bfloat16", memory_profile=profile, fp8=fp8)
            manager.release()
            torch.cuda.reset_peak_memory_stats()
            try:
                t, out = timed(lambda o=options: through(o))
            except Exception as exc:  # report and go on: one profile failing is a figure too
                rows.append((f"{tag} {profile}{' fp8' if fp8 else ''}", f"failed: {exc}"[:80]))
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append(
                (
                    f"{tag} {profile}{' fp8' if fp8 else ''}",
                    f"{t / job.steps:.2f} s/step, peak {peak:.1f} GiB, PSNR {psnr(out, ref):.1f}",
                )
            )
        manager.release()
        torch.cuda.reset_peak_memory_stats()
        through(base)
        rows.append((f"{tag} none peak", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))
        through(EngineOptions(dtype="bfloat16", step_cache="mag"))  # measure ratios
        for cache in ("fbc", "mag", "taylorseer", "pab"):
            options = EngineOptions(dtype="bfloat16", step_cache=cache)
            t, out = timed(lambda o=options: through(o))
            rows.append((f"{tag} cache {cache}", f"x{t_run / t:.2f}, PSNR {psnr(out, ref):.1f} dB"))
        hooks = Hooks()
        start = time.perf_counter()
        runtime.run(1, job, JobControl(), hooks)
        rows.append(
            (f"{tag} taken -> first step (warm)", f"{(hooks.first_step or 0) - start:.2f} s")
        )

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
