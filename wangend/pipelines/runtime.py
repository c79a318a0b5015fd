"""GenerationRuntime: runs one job on the worker thread (implements the queue's Worker).

A run is: make the model warm (ProductionManager), generate the frames with the diffusers
pipeline, write them (media writers). The pipeline is driven, never patched, through two
standard seams that are attached for one run and always removed afterwards, so the warm
pipeline stays clean for the next job even after an abort:

* `callback_on_step_end`: progress after every denoising step, and the pause point. A
  pause blocks inside the callback, so latents and scheduler state stay exactly where
  they are and a resumed run is bit-identical to an unpaused one.
* forward pre-hooks on the text encoder, the image encoder and VAE encoder (where a job
  uses them), every block of `transformer` and `transformer_2` (VACE blocks included) and
  the VAE decoder and its blocks: each checks the abort latch (an abort lands within one
  block, also during the frame-by-frame VAE decode) and marks phase changes (encoding,
  denoising, decoding). An abort raises `JobAborted` out of the pipeline; nothing is
  written.

One loaded pipeline serves every task its family can do: `call_plan` picks the diffusers
class for the job (T2V, I2V, V2V, VACE; Wan 2.2 TI2V runs text-only through `WanPipeline`
and with an image through `WanImageToVideoPipeline`) and builds it as a view over the
loaded components when it differs from the loaded class. Views are built with the
constructor, not `from_pipe`, because `from_pipe` casts every module to one dtype, which
would also cast the float32 VAE of a half-precision warm pipeline. The prompt is encoded
through a `WanPipeline` view for every family (the same UMT5 call diffusers makes, with
the same 512-token length); the other Wan classes need the optional `ftfy` package only
to clean prompt text, and passing embeddings keeps them from requiring it.
Conditioning media is loaded when the job runs (conditioning.py), sized to the job.

Noise comes from a CPU `torch.Generator`, so a seed gives the same video on any device.
"""

from __future__ import annotations

import inspect
import re
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from ..adapters.lora_injection import LoRAInjectionManager
from ..adapters.prompt_enhancer import EnhanceContext, PromptEnhancerBridge
from ..errors import JobFailure, ModelUnavailable
from ..media.metadata import MetadataState
from ..media.naming import render_output_name
from ..media.persistence import MediaPersistenceContext, write_video
from ..protocol import ResolvedGenerate
from .acceleration import EngineOptions
from .conditioning import MediaError, load_image, load_mask, load_video
from .control import JobControl, RunHooks
from .production import OOM_ERRORS, ProductionManager
from .stepping import StepExtras

__all__ = ["GenerationRuntime", "call_plan", "denoising_steps", "scheduler_for", "to_uint8"]

MAX_SEQUENCE_LENGTH = 512  # what every Wan pipeline's __call__ uses


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounded (not truncated) and clipped."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def scheduler_for(scheduler: Any, flow_shift: float) -> Any:
    """A fresh scheduler of the pipeline's kind with the job's flow shift.

    Fresh per run, so no step index or solver history leaks from an aborted run. UniPC
    (what Wan checkpoints ship) calls the value `flow_shift`, FlowMatchEuler `shift`.
    A FlowMatchEuler saved with `use_dynamic_shifting` (as Flux-style folders are) wants
    a resolution-dependent `mu` that Wan pipelines never pass; the job's static shift
    replaces it, so such a folder runs instead of failing at its first step.
    """
    config = dict(scheduler.config)
    key = "flow_shift" if "flow_shift" in config else "shift" if "shift" in config else None
    overrides: dict[str, Any] = {key: flow_shift} if key else {}
    if config.get("use_dynamic_shifting"):
        overrides["use_dynamic_shifting"] = False
    return type(scheduler).from_config(config, **overrides)


def denoising_steps(job: ResolvedGenerate) -> int:
    """Steps the pipeline really runs: video-to-video skips the first (1 - strength)."""
    if job.family == "wan2.1-t2v" and job.video is not None and job.strength is not None:
        return min(int(job.steps * job.strength), job.steps)
    return job.steps


def pipeline_view(pipe: Any, class_name: str, **config: Any) -> Any:
    """`pipe` itself when it is already `class_name` with `config`, else a pipeline of that
    class over the same (not copied, not cast) components."""
    import diffusers

    cls = getattr(diffusers, class_name)
    if type(pipe) is cls and all(pipe.config.get(k) == v for k, v in config.items()):
        return pipe
    takes = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in pipe.components.items() if k in takes}
    for key in ("boundary_ratio", "expand_timesteps"):
        if key in takes and key in pipe.config:
            kwargs[key] = pipe.config[key]
    kwargs.update({k: v for k, v in config.items() if k in takes})
    view = cls(**kwargs)
    view.set_progress_bar_config(disable=True)
    return view


def call_plan(pipe: Any, job: ResolvedGenerate) -> tuple[Any, dict[str, Any]]:
    """The pipeline to call for `job` and its task-specific arguments (media loaded and
    sized here). The shared arguments (prompt embeddings, size, steps, guidance, seed,
    callbacks) are added by the caller."""
    family = job.family or "wan2.1-t2v"
    w, h, n = job.width, job.height, job.frames
    args: dict[str, Any] = {}
    config: dict[str, Any] = {}
    if job.boundary_ratio is not None:
        config["boundary_ratio"] = job.boundary_ratio
        args["guidance_scale_2"] = job.guidance_scale_2
    if family == "wan2.1-t2v" and job.video is not None:
        args.update(video=load_video(job.video, w, h, n), strength=job.strength)
        return pipeline_view(pipe, "WanVideoToVideoPipeline"), args
    args["num_frames"] = n
    if family == "wan2.1-vace":
        if job.video is not None:
            args["video"] = load_video(job.video, w, h, n)
        if job.mask is not None:
            args["mask"] = load_mask(job.mask, w, h, n)
        if job.reference_images:
            args["reference_images"] = [load_image(p, w, h) for p in job.reference_images]
        return pipeline_view(pipe, "WanVACEPipeline", **config), args
    if job.image is not None:
        args["image"] = load_image(job.image, w, h)
        if job.last_image is not None:
            args["last_image"] = load_image(job.last_image, w, h)
        return pipeline_view(pipe, "WanImageToVideoPipeline", **config), args
    return pipeline_view(pipe, "WanPipeline", **config), args


def encode_prompts(pipe: Any, job: ResolvedGenerate) -> dict[str, Any]:
    """Prompt (and, with CFG, negative prompt) embeddings, as the pipeline would make them."""
    encoder = pipeline_view(pipe, "WanPipeline", boundary_ratio=None, expand_timesteps=False)
    with torch.no_grad():  # as inside the pipeline: no autograd graph on the embeddings
        positive, negative = encoder.encode_prompt(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            do_classifier_free_guidance=job.guidance_scale > 1.0,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=pipe._execution_device,
        )
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


def abort_points(pipe: Any) -> dict[str, list[Any]]:
    """Modules whose forward pre-hook checks the abort latch, by the phase they mark."""
    encoding = [pipe.text_encoder]
    image_encoder = getattr(pipe, "image_encoder", None)
    if image_encoder is not None:
        encoding.append(image_encoder)
        encoding += [
            m for name, m in image_encoder.named_modules() if re.fullmatch(r".*layers\.\d+", name)
        ]
    encoder = pipe.vae.encoder
    encoding += [encoder, encoder.mid_block, *encoder.down_blocks]
    blocks = []
    for transformer in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if transformer is not None:
            blocks += list(transformer.blocks) + list(getattr(transformer, "vace_blocks", []))
    decoder = pipe.vae.decoder
    return {
        "encoding": encoding,
        "denoising": blocks,
        "decoding": [decoder, decoder.mid_block, *decoder.up_blocks],
    }


class _Tracker:
    """Per-run phase and timing bookkeeping shared by the hooks."""

    def __init__(self, hooks: RunHooks, steps: int) -> None:
        self.hooks = hooks
        self.steps = steps
        self.phase = ""
        self.marks: dict[str, float] = {}

    def enter(self, phase: str, step: int, *, report: bool = True) -> None:
        if phase != self.phase:
            self.phase = phase
            self.marks[phase] = time.perf_counter()
            if report:
                self.hooks.progress(step, self.steps, phase)

    def timings(self, end: float) -> dict[str, float]:
        phases = ("encoding", "compiling", "denoising", "decoding")
        order = [p for p in phases if p in self.marks]
        ends = [self.marks[p] for p in order[1:]] + [end]
        return {p: e - self.marks[p] for p, e in zip(order, ends, strict=True)}


class GenerationRuntime:
    """Runs generation jobs on the worker thread; owns no model (ProductionManager does).

    Optional parts, each built by the daemon from its config: `media` (how outputs are
    written), `loras` (the LoRA adapters of the warm pipeline), `enhancer` (the prompt
    enhancer). Without `loras`, a job that names LoRAs fails before any step.
    """

    def __init__(
        self,
        production: ProductionManager,
        output_dir: Path,
        *,
        media: MediaPersistenceContext | None = None,
        loras: LoRAInjectionManager | None = None,
        enhancer: PromptEnhancerBridge | None = None,
    ) -> None:
        self.production = production
        self.output_dir = Path(output_dir).absolute()
        self.media = media or MediaPersistenceContext()
        self.loras = loras
        self.enhancer = enhancer

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
        job = self.enhance_prompt(job, hooks)
        control.check_abort()
        options = EngineOptions.from_job(job, self.production.job_dtype(job.dtype))
        started = time.perf_counter()
        pipe = self.production.ensure(record, options, hooks, control.check_abort)
        timings = {"load": time.perf_counter() - started}
        control.check_abort()
        if job.loras and self.loras is None:
            raise JobFailure("LoraUnavailable", "this daemon has no LoRA support configured")
        if self.loras is not None:
            self.loras.hydrate(pipe, job.loras)  # none: adapters off, the base weights
        with self.production.run_scope(pipe, options, steps=job.steps) as report:
            frames = self.generate_frames(pipe, job, control, hooks, timings)
        control.check_abort()  # the last chance: from here on the file gets written
        hooks.progress(job.steps, job.steps, "saving")
        ran = msgspec.structs.replace(job, dtype=options.dtype)
        # H.264 encoders may give different bitstreams for identical frames, so the
        # proof that two runs made the same video is the hash of the frames themselves
        # (MetadataState records it as frames_sha256).
        state = MetadataState.for_run(
            job_id, ran, timings=timings, device=self.device, frames=frames
        )
        if report.notes:
            state = state.with_fields(notes=list(report.notes))
        stem = render_output_name(job.output_name, job_id=job_id, job=job)
        paths = write_video(
            frames, self.output_dir, stem, job.fps, self.media, state, audio=job.audio
        )
        return [str(path) for path in paths]

    def enhance_prompt(self, job: ResolvedGenerate, hooks: RunHooks) -> ResolvedGenerate:
        """The job with its enhanced prompt, when it asked for one and has none yet.

        A job resolved with enhancing on carries `enhancer={"requested": True}`; the
        result (or why enhancing failed: the original prompt is then used) replaces it
        and is reported through `hooks.spec_changed`, so the job record, a retry and the
        output all hold the prompt that really ran.
        """
        if not (job.enhancer and job.enhancer.get("requested")):
            return job
        if self.enhancer is None:
            record = {"ok": False, "provider": "none", "reason": "no prompt enhancer configured"}
            enhanced = msgspec.structs.replace(job, enhancer=record)
        else:
            hooks.progress(0, job.steps, "enhancing")
            self.enhancer.prime(job)
            context = EnhanceContext(family=job.family, image=job.image, seed=job.seed)
            [result] = self.enhancer.enhance([job.prompt], context)
            enhanced = msgspec.structs.replace(
                job,
                prompt=result.prompt,
                original_prompt=result.original if result.ok else None,
                enhancer=result.record(),
            )
        hooks.spec_changed(enhanced)
        return enhanced

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
        # V2V runs only its last steps; progress counts the skipped ones as done.
        skipped = job.steps - denoising_steps(job)
        extras = StepExtras(pipe, job, self.loras, denoising_steps(job))
        # The first step at a new size compiles (minutes on real models): say so.
        compiling = self.production.compiles_at(pipe, (job.width, job.height, job.frames))

        def on_encoder(module: Any, args: Any) -> None:
            control.check_abort()
            tracker.enter("encoding", 0)

        def on_block(module: Any, args: Any) -> None:
            control.check_abort()
            if tracker.phase not in ("denoising", "compiling"):
                tracker.enter("compiling" if compiling else "denoising", skipped)

        def on_decoder(module: Any, args: Any) -> None:
            control.check_abort()
            tracker.enter("decoding", job.steps)

        def on_step_end(called: Any, i: int, _t: Any, tensors: dict) -> dict:
            done = skipped + i + 1
            if tracker.phase == "compiling":  # the step event below says "denoising"
                tracker.enter("denoising", done, report=False)
            preview = extras.after_step(called, i, done, job.steps, tensors)
            hooks.progress(done, job.steps, "denoising", preview=preview)
            control.step_boundary(hooks, done, job.steps)
            return {}

        try:
            runner, task_args = call_plan(pipe, job)
        except (MediaError, OSError) as exc:
            raise JobFailure("InvalidInput", f"conditioning media unusable: {exc}") from None
        control.check_abort()
        on = {"encoding": on_encoder, "denoising": on_block, "decoding": on_decoder}
        handles = [
            module.register_forward_pre_hook(on[phase])
            for phase, modules in abort_points(pipe).items()
            for module in modules
        ]
        try:
            pipe.scheduler = runner.scheduler = scheduler_for(pipe.scheduler, job.flow_shift)
            output = runner(
                **encode_prompts(pipe, job),
                **task_args,
                height=job.height,
                width=job.width,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(job.seed),
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=extras.tensor_inputs,
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
