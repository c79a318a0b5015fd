"""JobRouter: one queue, several kinds of job.

The queue controller knows one `Worker` and one `Inputs` (queue/controller.py); the
router is both, and hands each job to what runs its kind: generations to the generation
runtime, matting runs to the matting runtime. Both share the single worker thread, so a
matting job waits its turn like any generation and never competes for the GPU.

The warm Wan pipeline is kept while a matting job runs: the matting network is small
(~35 M parameters) next to it, and the next generation then starts warm.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..pipelines.control import JobControl, RunHooks
from ..protocol import (
    GenerateSpec,
    JobSpec,
    MatAnyOneSpec,
    ResolvedGenerate,
    ResolvedJob,
    ResolvedMatAnyOne,
)

__all__ = ["JobRouter"]


class _Runner(Protocol):
    def run(self, job_id: int, job: Any, control: JobControl, hooks: RunHooks) -> list[str]: ...


class _Resolver(Protocol):
    def resolve(self, spec: Any) -> Any: ...


class _GenerationRunner(_Runner, Protocol):
    @property
    def device(self) -> str: ...

    @property
    def loaded_model(self) -> str | None: ...

    def resume_step(self, job_id: int) -> int | None: ...

    def forget(self, job_id: int, succeeded: bool = False) -> None: ...

    def finished(self, job_id: int) -> bool: ...

    def output_problem(self) -> str | None: ...


class _Planner(_Resolver, Protocol):
    def plan(self, job: Any) -> dict[str, Any]: ...


class JobRouter:
    """Worker and Inputs for every job kind (see the module docstring)."""

    def __init__(
        self,
        generation: _GenerationRunner,
        generation_inputs: _Resolver,
        matting: _Runner,
        matting_inputs: _Planner,
    ) -> None:
        self.generation = generation
        self.generation_inputs = generation_inputs
        self.matting = matting
        self.matting_inputs = matting_inputs

    @property
    def device(self) -> str:
        return self.generation.device

    @property
    def loaded_model(self) -> str | None:
        return self.generation.loaded_model

    def resume_step(self, job_id: int) -> int | None:
        """Only generations write resume points."""
        return self.generation.resume_step(job_id)

    def forget(self, job_id: int, succeeded: bool = False) -> None:
        self.generation.forget(job_id, succeeded=succeeded)

    def finished(self, job_id: int) -> bool:
        return self.generation.finished(job_id)

    def output_problem(self) -> str | None:
        """Every job kind writes under the one output folder the generation side has."""
        return self.generation.output_problem()

    def resolve(self, spec: JobSpec) -> ResolvedJob:
        if isinstance(spec, MatAnyOneSpec):
            return self.matting_inputs.resolve(spec)
        if isinstance(spec, GenerateSpec):
            return self.generation_inputs.resolve(spec)
        raise TypeError(f"no resolver for {type(spec).__name__}")

    def plan(self, job: ResolvedJob) -> dict[str, Any]:
        """What a run would do, for `validate` (a dry run): sizes, frames, outputs."""
        if isinstance(job, ResolvedMatAnyOne):
            return self.matting_inputs.plan(job)
        plan: dict[str, Any] = {
            "kind": "generate",
            "model": job.model,
            "family": job.family,
            "size": [job.width, job.height],
            "frames": job.frames,
            "steps": job.steps,
            "seconds_of_video": round(job.frames / job.fps, 3),
        }
        inputs = {
            name: value
            for name in ("image", "last_image", "video", "mask", "audio")
            if (value := getattr(job, name))
        }
        if job.reference_images:
            inputs["reference_images"] = list(job.reference_images)
        if inputs:
            plan["inputs"] = inputs
        if job.loras:
            plan["loras"] = [f"{lora.name}:{lora.multiplier}" for lora in job.loras]
        return plan

    def run(self, job_id: int, job: ResolvedJob, control: JobControl, hooks: RunHooks) -> list[str]:
        if isinstance(job, ResolvedMatAnyOne):
            return self.matting.run(job_id, job, control, hooks)
        if isinstance(job, ResolvedGenerate):
            return self.generation.run(job_id, job, control, hooks)
        raise TypeError(f"no runner for {type(job).__name__}")
