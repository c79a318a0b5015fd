"""How a job becomes one diffusers call on the warm pipeline.

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

A run resumed from a resume point (resume.py) is the same call on a view that passes
over the finished steps (`resuming_view`), with a scheduler that gets its saved state
back once the pipeline has set its timesteps (`restoring_scheduler`).

`abort_points` names the modules whose forward pre-hooks carry the abort latch and the
phase marks (runtime.py attaches them).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from ..protocol import ResolvedGenerate
from .conditioning import load_image, load_mask, load_video

__all__ = [
    "abort_points",
    "call_plan",
    "denoising_steps",
    "encode_prompts",
    "pipeline_view",
    "restoring_scheduler",
    "resuming_view",
    "scheduler_for",
]

MAX_SEQUENCE_LENGTH = 512  # what every Wan pipeline's __call__ uses


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


def pipeline_view(pipe: Any, class_name: str | type, **config: Any) -> Any:
    """`pipe` itself when it is already `class_name` (a diffusers class name, or a class)
    with `config`, else a pipeline of that class over the same (not copied, not cast)
    components."""
    import diffusers

    cls = getattr(diffusers, class_name) if isinstance(class_name, str) else class_name
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


def _skipping_interrupt(self: Any) -> bool:
    if self._resume_skip > 0:
        self._resume_skip -= 1
        return True
    return self._interrupt


def resuming_view(runner: Any, skip: int) -> Any:
    """`runner` as a pipeline that passes over its first `skip` denoising steps.

    Every Wan pipeline's loop starts each step with `if self.interrupt: continue`, before
    the transformer and the scheduler run: answering True `skip` times passes over the
    steps an earlier attempt finished, and nothing else of the call changes. A subclass
    per resumed run, so the warm pipeline's own class is never touched.
    """
    cls = type(runner)
    resumed = type(cls.__name__, (cls,), {"interrupt": property(_skipping_interrupt)})
    view = pipeline_view(runner, resumed)
    view._resume_skip = skip
    return view


def restoring_scheduler(scheduler: Any, restore: Callable[[Any], None]) -> None:
    """Make `scheduler.set_timesteps` call `restore(scheduler)` after it has run.

    The pipeline sets the timesteps inside its call, which resets the solver; the
    resumed state must go on after that and before the first step. Only this run's
    fresh scheduler (scheduler_for) is changed, on the instance."""
    original = scheduler.set_timesteps

    @functools.wraps(original)
    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        restore(scheduler)
        return result

    scheduler.set_timesteps = set_timesteps


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
