"""GenerationRuntime: runs one job on the worker thread (implements the queue's Worker).

A run is: make the model warm (ProductionManager), generate the frames with the diffusers
pipeline, write them (media writers). The pipeline is driven, never patched, through two
standard seams that are attached for one run and always removed afterwards, so the warm
pipeline stays clean for the next job even after an abort:

* `callback_on_step_end`: progress after every denoising step, and the pause point. A
  pause blocks inside the callback, so latents and scheduler state stay exactly where
  they are and a resumed run is bit-identical to an unpaused one.
* forward pre-hooks on the text encoder, every transformer block and the VAE decoder and
  its blocks: each checks the abort latch (an abort lands within one block, also during
  the frame-by-frame VAE decode) and marks phase changes (encoding, denoising,
  decoding). An abort raises `JobAborted` out of the pipeline; nothing is written.

Noise comes from a CPU `torch.Generator`, so a seed gives the same video on any device.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from ..errors import JobFailure, ModelUnavailable
from ..media.metadata import build_metadata
from ..media.writers import write_video
from ..protocol import ResolvedGenerate
from .control import JobControl, RunHooks
from .inputs import render_output_name
from .production import OOM_ERRORS, ProductionManager

__all__ = ["GenerationRuntime", "scheduler_for", "to_uint8"]


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounded (not truncated) and clipped."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def scheduler_for(scheduler: Any, flow_shift: float) -> Any:
    """A fresh scheduler of the pipeline's kind with the job's flow shift.

    Fresh per run, so no step index or solver history leaks from an aborted run. UniPC
    (what Wan checkpoints ship) calls the value `flow_shift`, FlowMatchEuler `shift`.
    """
    config = dict(scheduler.config)
    key = "flow_shift" if "flow_shift" in config else "shift" if "shift" in config else None
    overrides = {key: flow_shift} if key else {}
    return type(scheduler).from_config(config, **overrides)


class _Tracker:
    """Per-run phase and timing bookkeeping shared by the hooks."""

    def __init__(self, hooks: RunHooks, steps: int) -> None:
        self.hooks = hooks
        self.steps = steps
        self.phase = ""
        self.marks: dict[str, float] = {}

    def enter(self, phase: str, step: int) -> None:
        if phase != self.phase:
            self.phase = phase
            self.marks[phase] = time.perf_counter()
            self.hooks.progress(step, self.steps, phase)

    def timings(self, end: float) -> dict[str, float]:
        order = [p for p in ("encoding", "denoising", "decoding") if p in self.marks]
        ends = [self.marks[p] for p in order[1:]] + [end]
        return {p: e - self.marks[p] for p, e in zip(order, ends, strict=True)}


class GenerationRuntime:
    def __init__(self, production: ProductionManager, output_dir: Path) -> None:
        self.production = production
        self.output_dir = Path(output_dir).absolute()

    @property
    def device(self) -> str:
        return self.production.device

    @property
    def loaded_model(self) -> str | None:
        return self.production.loaded_model

    def run(
        self, job_id: int, job: ResolvedGenerate, control: JobControl, hooks: RunHooks
    ) -> list[str]:
        """Generate and save one job; returns the absolute output paths."""
        control.check_abort()
        hooks.progress(0, job.steps, "loading")
        try:
            record = self.production.registry.resolve(job.model)
        except ModelUnavailable as exc:
            raise JobFailure("ModelUnavailable", exc.message) from None
        started = time.perf_counter()
        pipe = self.production.ensure(record, job.dtype, hooks)
        timings = {"load": time.perf_counter() - started}
        control.check_abort()
        frames = self.generate_frames(pipe, job, control, hooks, timings)
        control.check_abort()  # the last chance: from here on the file gets written
        hooks.progress(job.steps, job.steps, "saving")
        ran = msgspec.structs.replace(job, dtype=self.production.job_dtype(job.dtype))
        metadata = build_metadata(job_id, ran, timings, device=self.device)
        # H.264 encoders may give different bitstreams for identical frames, so the
        # proof that two runs made the same video is the hash of the frames themselves.
        metadata["frames_sha256"] = hashlib.sha256(frames.tobytes()).hexdigest()
        stem = render_output_name(job.output_name, job_id=job_id, job=job)
        return [str(write_video(frames, self.output_dir, stem, job.fps, metadata))]

    def generate_frames(
        self,
        pipe: Any,
        job: ResolvedGenerate,
        control: JobControl,
        hooks: RunHooks,
        timings: dict[str, float] | None = None,
    ) -> np.ndarray:
        """Run the pipeline for `job`: (frames, height, width, 3) uint8 RGB."""
        tracker = _Tracker(hooks, job.steps)

        def on_text_encoder(module: Any, args: Any) -> None:
            control.check_abort()
            tracker.enter("encoding", 0)

        def on_block(module: Any, args: Any) -> None:
            control.check_abort()
            if tracker.phase != "denoising":
                tracker.enter("denoising", 0)

        def on_decoder(module: Any, args: Any) -> None:
            control.check_abort()
            tracker.enter("decoding", job.steps)

        def on_step_end(_pipe: Any, i: int, _t: Any, _kwargs: dict) -> dict:
            hooks.progress(i + 1, job.steps, "denoising")
            control.step_boundary(hooks, i + 1, job.steps)
            return {}

        handles = [pipe.text_encoder.register_forward_pre_hook(on_text_encoder)]
        for transformer in (pipe.transformer, getattr(pipe, "transformer_2", None)):
            if transformer is not None:
                handles += [b.register_forward_pre_hook(on_block) for b in transformer.blocks]
        decoder = pipe.vae.decoder
        for module in (decoder, decoder.mid_block, *decoder.up_blocks):
            handles.append(module.register_forward_pre_hook(on_decoder))
        try:
            pipe.scheduler = scheduler_for(pipe.scheduler, job.flow_shift)
            output = pipe(
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
                callback_on_step_end_tensor_inputs=[],
            )
        except OOM_ERRORS as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise JobFailure(
                "OutOfMemory",
                f"out of memory on {self.device} generating {job.width}x{job.height}, "
                f"{job.frames} frames with {job.model}; try a smaller size or fewer frames",
            ) from exc
        finally:
            for handle in handles:
                handle.remove()
        if timings is not None:
            timings.update(tracker.timings(time.perf_counter()))
        return to_uint8(np.asarray(output.frames[0]))
