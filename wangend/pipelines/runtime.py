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

How a job becomes a diffusers call (which class, which arguments, resuming) is
calls.py.

Noise comes from a CPU `torch.Generator`, so a seed gives the same video on any device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from ..adapters.lora_injection import LoRAInjectionManager
from ..adapters.prompt_enhancer import EnhanceContext, PromptEnhancerBridge
from ..errors import JobFailure, ModelUnavailable
from ..media.atomic import folder_problem
from ..media.metadata import MetadataState
from ..media.naming import render_output_name
from ..media.persistence import MediaPersistenceContext, write_video
from ..protocol import ResolvedGenerate
from .acceleration import EngineOptions
from .calls import (
    abort_points,
    call_plan,
    denoising_steps,
    encode_prompts,
    restoring_scheduler,
    resuming_view,
    scheduler_for,
)
from .catalog import ModelRecord
from .conditioning import MediaError
from .control import JobAborted, JobControl, RunHooks
from .production import OOM_ERRORS, ProductionManager
from .resume import ResumeStore, RunResume, fingerprint
from .stepping import StepExtras

__all__ = ["GenerationRuntime", "to_uint8"]

log = logging.getLogger(__name__)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounded (not truncated) and clipped."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


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
    enhancer), `resume` (where resume points go; resume.py). Without `loras`, a job
    that names LoRAs fails before any step; without `resume`, a job cut off starts
    again from step 0.
    """

    def __init__(
        self,
        production: ProductionManager,
        output_dir: Path,
        *,
        media: MediaPersistenceContext | None = None,
        loras: LoRAInjectionManager | None = None,
        enhancer: PromptEnhancerBridge | None = None,
        resume: ResumeStore | None = None,
    ) -> None:
        self.production = production
        self.output_dir = Path(output_dir).absolute()
        self.media = media or MediaPersistenceContext()
        self.loras = loras
        self.enhancer = enhancer
        self.resume = resume

    @property
    def device(self) -> str:
        return self.production.device

    @property
    def loaded_model(self) -> str | None:
        return self.production.loaded_model

    def resume_step(self, job_id: int) -> int | None:
        """The step a cut-off job's resume point holds (None without one)."""
        return self.resume.peek(job_id) if self.resume is not None else None

    def output_problem(self) -> str | None:
        """Why outputs cannot be written into the output folder now, or None."""
        return folder_problem(self.output_dir)

    def finished(self, job_id: int) -> bool:
        """An earlier attempt wrote and noted every output: a rerun only returns them."""
        return self.resume is not None and self.resume.finished(job_id)

    def forget(self, job_id: int, succeeded: bool = False) -> None:
        """The queue has recorded the job's end: its resume point and noted outputs go,
        and, unless it `succeeded`, any output an attempt named but never noted."""
        if self.resume is not None:
            self.resume.discard(job_id, succeeded=succeeded)

    def run(
        self, job_id: int, job: ResolvedGenerate, control: JobControl, hooks: RunHooks
    ) -> list[str]:
        """Generate and save one job; returns the absolute output paths."""
        control.check_abort()
        written = self.resume.recorded_outputs(job_id) if self.resume is not None else None
        if written is not None:  # killed after writing them, before the queue knew
            log.info("job %d: its outputs were written before the stop; keeping them", job_id)
            return written
        if self.resume is not None:  # killed while naming them: those files go first
            self.resume.claims.undo(job_id)
        hooks.progress(0, job.steps, "loading")
        try:
            record = self.production.registry.resolve(job.model)
        except ModelUnavailable as exc:
            raise JobFailure("ModelUnavailable", exc.message) from None
        record = _as_queued(record, job, job_id)
        _check_inputs_still_there(job)  # before a load that could take minutes
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
        resume = None
        if self.resume is not None and options.step_cache != "mag":  # resume.py: why
            weights = record.load_source  # a folder or file replaced since: not resumed
            mark = fingerprint(job, options, self.device, pipe.scheduler, weights)
            offset = job.steps - denoising_steps(job)
            resume = RunResume(self.resume, job_id, mark, offset=offset)
        try:
            with self.production.run_scope(pipe, options, steps=job.steps) as report:
                frames = self.generate_frames(pipe, job, control, hooks, timings, resume)
            control.check_abort()  # the last chance: from here on the file gets written
        except JobAborted:
            if resume is not None and not control.suspending:
                resume.discard()  # a user's abort: the job is over
            raise
        except BaseException:
            if resume is not None:
                resume.discard()
            raise
        if resume is not None and resume.skip:
            report.notes.append(
                f"resumed after step {resume.offset + resume.skip} of {job.steps} from the "
                "resume point of an earlier attempt"
            )
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
        try:
            on_claim = None
            if self.resume is not None:
                claims = self.resume.claims
                on_claim = lambda temp: claims.note(job_id, temp)  # noqa: E731
            paths = write_video(
                frames, self.output_dir, stem, job.fps, self.media, state, audio=job.audio,
                on_claim=on_claim,
            )  # fmt: skip
        except BaseException:
            if resume is not None:
                resume.discard()
            raise
        outputs = [str(path) for path in paths]
        if self.resume is not None:  # the point goes when the queue has recorded the end
            self.resume.record_outputs(job_id, outputs)
        return outputs

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
        resume: RunResume | None = None,
    ) -> np.ndarray:
        """Run the pipeline for `job`: (frames, height, width, 3) uint8 RGB. With
        `resume`, resume points are written as it runs, and a run whose earlier attempt
        left one goes on from there."""
        tracker = _Tracker(hooks, job.steps)
        # V2V runs only its last steps; progress counts the skipped ones as done, and
        # so does a resumed run the steps its earlier attempt finished.
        resumed = resume.skip if resume is not None else 0
        skipped = job.steps - denoising_steps(job) + resumed
        extras = StepExtras(pipe, job, self.loras, denoising_steps(job))
        # The first step at a new size compiles (minutes on real models): say so.
        compiling = self.production.compiles_at(pipe, (job.width, job.height, job.frames))

        def on_encoder(module: Any, args: Any) -> None:
            control.check_abort()
            tracker.enter("encoding", 0)

        def on_block(module: Any, args: Any) -> None:
            control.check_abort()
            if tracker.phase not in ("denoising", "compiling"):
                if resume is not None:  # a stop may now wait for the step's end
                    control.set_resumable(True)
                tracker.enter("compiling" if compiling else "denoising", skipped)

        def on_decoder(module: Any, args: Any) -> None:
            if tracker.phase != "decoding":
                control.set_resumable(False)
            control.check_abort()
            tracker.enter("decoding", job.steps)

        def on_step_end(called: Any, i: int, _t: Any, tensors: dict) -> dict:
            if i < resumed:  # the pipeline did not pass over the finished steps
                raise RuntimeError(f"a run resumed at step {resumed} ran step {i}")
            done = skipped - resumed + i + 1
            if tracker.phase == "compiling":  # the step event below says "denoising"
                tracker.enter("denoising", done, report=False)
            save = None
            if resume is not None:
                latents = tensors["latents"]

                def save() -> None:
                    resume.save(i + 1, latents, called.scheduler)

                if resume.due():  # before the step is reported: a step seen is kept
                    save()
            preview = extras.after_step(called, i, done, job.steps, tensors)
            hooks.progress(done, job.steps, "denoising", preview=preview)
            control.step_boundary(hooks, done, job.steps, save=save)
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
            if resumed:
                log.info(
                    "job %d resumes after step %d of %d",
                    resume.job_id,
                    resumed,
                    denoising_steps(job),
                )
                runner = resuming_view(runner, resumed)
                if "strength" in task_args:  # V2V: its video only makes the first
                    task_args.pop("video")  # latents, which the point replaces

                def restore(scheduler: Any) -> None:
                    resume.restore(scheduler)
                    extras.start_at(scheduler, resumed)

                restoring_scheduler(runner.scheduler, restore)
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
                callback_on_step_end_tensor_inputs=extras.tensor_inputs
                if resume is None
                else sorted({*extras.tensor_inputs, "latents"}),
                **({"latents": resume.point.latents} if resume and resume.point else {}),
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
            control.set_resumable(False)
            for handle in handles:
                handle.remove()
        if timings is not None:
            timings.update(tracker.timings(time.perf_counter()))
        return to_uint8(np.asarray(output.frames[0]))


def _check_inputs_still_there(job: ResolvedGenerate) -> None:
    """JobFailure("InvalidInput") naming the first input file that went away since the
    job was queued (checked then), so the job fails before loading a model it cannot
    use. The audio source is left out: without it the video is written silent."""
    paths = [
        (name, value)
        for name in ("image", "last_image", "video", "mask")
        if (value := getattr(job, name))
    ]
    paths += [("reference_images", path) for path in job.reference_images]
    for name, path in paths:
        if not Path(path).is_file():
            raise JobFailure("InvalidInput", f"{name} {path} is gone since the job was queued")


def _as_queued(record: ModelRecord, job: ResolvedGenerate, job_id: int) -> ModelRecord:
    """The model as the job was queued with it. A [models.NAME] whose files the config
    changed since still runs the files the job records (the same job, the same frames);
    one whose base changed cannot, and the job fails saying so."""
    if not job.files or dict(record.files) == job.files:
        return record
    if record.source != job.source:
        raise JobFailure(
            "ModelUnavailable",
            f"model {job.model} now has base {record.source}, not {job.source} as when job "
            f"{job_id} was queued; queue the job again",
        )
    log.info("job %d: model %s names other files now; running those it was queued with",
             job_id, job.model)  # fmt: skip
    return msgspec.structs.replace(record, files=tuple(job.files.items()))
