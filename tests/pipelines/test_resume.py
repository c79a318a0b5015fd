"""A job cut off mid-denoising goes on from its resume point and makes exactly the video
an uninterrupted run makes, in every tiny family; points that do not fit are ignored.

The cut here is a stop's suspend (the job unwinds at a step boundary after writing its
point) or a point file put back as a kill would have left it; tests/e2e kills a real
daemon with SIGKILL.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from wangend.media.metadata import read_metadata
from wangend.pipelines.acceleration import EngineOptions
from wangend.pipelines.control import JobAborted, JobControl
from wangend.pipelines.resume import ResumeStore, RunResume, fingerprint
from wangend.pipelines.runtime import GenerationRuntime

from .conftest import RecordingHooks
from .test_acceleration import psnr
from .test_families import CASES, family_registry, family_runtime, inputs, media, spec

__all__ = ["family_registry", "family_runtime", "inputs", "media"]  # fixtures used here

STEPS = 6


@pytest.fixture
def store(tmp_path: Path) -> ResumeStore:
    return ResumeStore(tmp_path / "resume", every=0.0)  # a point after every step


@pytest.fixture
def resumable(family_runtime: GenerationRuntime, store: ResumeStore, tmp_path: Path):
    """The family runtime's warm models, writing resume points and outputs of its own."""
    return GenerationRuntime(family_runtime.production, tmp_path / "out", resume=store)


def run(runtime: GenerationRuntime, job_id: int, job: Any, control=None, hooks=None):
    """A successful run, then what the queue does once it has recorded the success."""
    hooks = hooks or RecordingHooks()
    [path] = runtime.run(job_id, job, control or JobControl(), hooks)
    runtime.forget(job_id, succeeded=True)
    return read_metadata(path), hooks


def suspend_at(runtime: GenerationRuntime, job_id: int, job: Any, step: int) -> RecordingHooks:
    """Run `job` and stop it as a daemon's stop does, when `step` steps are done."""
    control, hooks = JobControl(), RecordingHooks()
    hooks.on_progress = lambda done, steps, phase: (
        control.request_suspend() if phase == "denoising" and done == step else None
    )
    with pytest.raises(JobAborted):
        runtime.run(job_id, job, control, hooks)
    return hooks


def denoising_steps(hooks: RecordingHooks) -> list[int]:
    """The step of each "denoising" progress event: first the step the phase starts
    at, then one per finished step."""
    return [step for step, _, phase in hooks.named("progress") if phase == "denoising"]


@pytest.mark.parametrize(("model", "fields", "cls_name"), [("tiny", {}, "WanPipeline"), *CASES])
def test_a_suspended_job_resumes_to_the_same_frames(
    resumable, store, inputs, media, model, fields, cls_name
) -> None:
    job = inputs.resolve(msgspec.structs.replace(spec(model, media, **fields), steps=STEPS))
    whole, _ = run(resumable, 1, job)
    assert store.jobs() == []  # a finished job leaves no point behind

    first = suspend_at(resumable, 2, job, step=3)
    assert denoising_steps(first)[-1] == 3
    assert store.jobs() == [2]
    # the second attempt starts at step 3, and is cut off in turn at step 4
    second = suspend_at(resumable, 2, job, step=4)
    assert denoising_steps(second) == [3, 4]

    resumed, hooks = run(resumable, 2, job)
    assert denoising_steps(hooks) == [4, 5, 6]  # no step before 4 runs again
    assert resumed["frames_sha256"] == whole["frames_sha256"]
    assert any("resumed after step 4 of 6" in note for note in resumed["notes"])
    assert store.jobs() == []


def test_a_kill_leaves_the_last_point_and_the_job_resumes_from_it(
    resumable, store, inputs, media, tmp_path
) -> None:
    """What a kill -9 leaves on disk: the point of the last finished step (copied while
    the run went on), then the run never ends."""
    job = inputs.resolve(msgspec.structs.replace(spec("tiny-wan22", media), steps=STEPS))
    kept = tmp_path / "kept.safetensors"
    hooks = RecordingHooks()
    hooks.on_progress = lambda done, steps, phase: (
        shutil.copy(store.path(3), kept) if phase == "denoising" and done == 4 else None
    )
    whole, _ = run(resumable, 3, job, hooks=hooks)  # a step reported is on disk
    shutil.copy(kept, store.path(3))

    resumed, hooks = run(resumable, 3, job)
    assert denoising_steps(hooks) == [4, 5, 6]
    assert resumed["frames_sha256"] == whole["frames_sha256"]


def test_a_user_abort_discards_the_point(resumable, store, inputs, media) -> None:
    job = inputs.resolve(msgspec.structs.replace(spec("tiny", media), steps=STEPS))
    control, hooks = JobControl(), RecordingHooks()
    hooks.on_progress = lambda done, steps, phase: (
        control.request_abort() if phase == "denoising" and done == 3 else None
    )
    with pytest.raises(JobAborted):
        resumable.run(4, job, control, hooks)
    assert store.jobs() == []


def test_a_point_for_other_settings_is_not_used(resumable, store, inputs, media) -> None:
    job = inputs.resolve(msgspec.structs.replace(spec("tiny", media), steps=STEPS))
    suspend_at(resumable, 5, job, step=3)
    other = msgspec.structs.replace(job, seed=job.seed + 1)
    _, hooks = run(resumable, 5, other)
    assert denoising_steps(hooks) == list(range(STEPS + 1))
    assert store.jobs() == []


def test_a_damaged_point_costs_only_the_head_start(resumable, store, inputs, media) -> None:
    job = inputs.resolve(msgspec.structs.replace(spec("tiny", media), steps=STEPS))
    whole, _ = run(resumable, 6, job)
    suspend_at(resumable, 6, job, step=3)
    data = store.path(6).read_bytes()
    store.path(6).write_bytes(data[: len(data) // 2])
    again, hooks = run(resumable, 6, job)
    assert denoising_steps(hooks) == list(range(STEPS + 1))
    assert again["frames_sha256"] == whole["frames_sha256"]


def test_a_held_job_writes_its_point_and_a_stop_sends_it_back(
    resumable, store, inputs, media
) -> None:
    """A pause writes the point before holding; a stop while held unwinds at once."""
    job = inputs.resolve(msgspec.structs.replace(spec("tiny", media), steps=STEPS))
    control, hooks = JobControl(), RecordingHooks()

    def on_progress(done: int, steps: int, phase: str) -> None:
        if phase == "denoising" and done == 2:
            control.request_pause()

    hooks.on_progress = on_progress
    outcome: list[BaseException] = []

    def worker() -> None:
        try:
            resumable.run(7, job, control, hooks)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    assert hooks.paused_event.wait(60)
    assert store.jobs() == [7]  # written before the hold
    control.request_suspend()
    thread.join(60)
    assert not thread.is_alive() and isinstance(outcome[0], JobAborted)
    _, again = run(resumable, 7, job)
    assert denoising_steps(again) == [2, 3, 4, 5, 6]


def test_a_mag_run_writes_no_points(resumable, store, inputs, media) -> None:
    """MagCache counts steps itself: after a skip its ratios would meet the wrong steps."""
    job = inputs.resolve(
        msgspec.structs.replace(spec("tiny", media), steps=STEPS, step_cache="mag")
    )
    hooks = suspend_at(resumable, 8, job, step=3)
    assert store.jobs() == []
    # and a suspend lands at once there (the abort latch), not at a step boundary
    assert denoising_steps(hooks)[-1] == 3


@pytest.mark.parametrize("cache", ["fbc", "taylorseer", "pab"])
def test_a_cached_run_resumes_with_its_cache_afresh(
    family_runtime, store, inputs, media, cache
) -> None:
    """The cache's state is not in the point: the resumed run starts it anew, so its
    frames are close to the uninterrupted cached run's, not equal."""
    job = inputs.resolve(msgspec.structs.replace(spec("tiny", media), steps=12, step_cache=cache))
    production = family_runtime.production
    options = EngineOptions.from_job(job, production.job_dtype(job.dtype))
    pipe = production.ensure(production.registry.resolve("tiny"), options, RecordingHooks())
    mark = fingerprint(job, options, "cpu", pipe.scheduler)

    def frames(control: JobControl, hooks: RecordingHooks, resume: RunResume | None):
        with production.run_scope(pipe, options, steps=job.steps):
            return family_runtime.generate_frames(pipe, job, control, hooks, None, resume)

    whole = frames(JobControl(), RecordingHooks(), None)
    control, hooks = JobControl(), RecordingHooks()
    hooks.on_progress = lambda done, steps, phase: (
        control.request_suspend() if phase == "denoising" and done == 6 else None
    )
    with pytest.raises(JobAborted):
        frames(control, hooks, RunResume(store, 9, mark))
    hooks = RecordingHooks()
    again = frames(JobControl(), hooks, RunResume(store, 9, mark))
    assert denoising_steps(hooks)[0] == 6
    assert psnr(again, whole) >= 30.0


def test_sweep_removes_points_of_jobs_that_are_not_queued(store, resumable, inputs, media):
    job = inputs.resolve(msgspec.structs.replace(spec("tiny", media), steps=STEPS))
    for job_id in (9, 10):
        suspend_at(resumable, job_id, job, step=2)
    (store.folder / ".11.abcd.tmp").write_bytes(b"half")
    assert store.sweep(keep={10}) == [9]
    assert store.jobs() == [10]
    assert sorted(p.name for p in store.folder.iterdir()) == ["10.safetensors"]


def test_a_lora_schedule_goes_on_at_the_resumed_step(
    family_runtime, store, inputs, media, tmp_path
) -> None:
    """The step a run resumes at gets its own LoRA weight, as in an uninterrupted run."""
    pytest.importorskip("peft", reason="LoRAs need peft")
    from wangend.adapters.lora_injection import LoRAInjectionManager
    from wangend.protocol import ResolvedLora

    from ..adapters.lora_files import write_lora

    path = write_lora(tmp_path / "glow.safetensors", "wan", seed=1, scale=2.0)
    lora = ResolvedLora(name="glow", path=str(path), multiplier="1,0,1,0.5,0,1")
    job = inputs.resolve(msgspec.structs.replace(spec("tiny", media), steps=STEPS))
    job = msgspec.structs.replace(job, loras=[lora])
    manager = LoRAInjectionManager(budget=2)
    runtime = GenerationRuntime(
        family_runtime.production, tmp_path / "out", resume=store, loras=manager
    )
    try:
        whole, _ = run(runtime, 11, job)
        plain, _ = run(runtime, 12, msgspec.structs.replace(job, loras=[]))
        assert whole["frames_sha256"] != plain["frames_sha256"]  # the LoRA matters
        suspend_at(runtime, 11, job, step=3)  # step 4 runs at weight 0.5
        resumed, hooks = run(runtime, 11, job)
        assert denoising_steps(hooks) == [3, 4, 5, 6]
        assert resumed["frames_sha256"] == whole["frames_sha256"]
    finally:
        manager.hydrate(family_runtime.production.pipeline, [])


def test_a_kill_while_decoding_goes_straight_to_the_decode(
    resumable, store, inputs, media, tmp_path
) -> None:
    """A point written after the last step: the next run denoises nothing and decodes."""
    job = inputs.resolve(msgspec.structs.replace(spec("tiny-i2v", media, image="image"), steps=4))
    kept = tmp_path / "kept.safetensors"
    hooks = RecordingHooks()
    hooks.on_progress = lambda done, steps, phase: (
        shutil.copy(store.path(13), kept) if phase == "denoising" and done == steps else None
    )
    whole, _ = run(resumable, 13, job, hooks=hooks)
    shutil.copy(kept, store.path(13))

    resumed, hooks = run(resumable, 13, job)
    assert denoising_steps(hooks) == []  # no step ran again
    assert "decoding" in [phase for _, _, phase in hooks.named("progress")]
    assert resumed["frames_sha256"] == whole["frames_sha256"]


def test_a_point_that_names_state_the_scheduler_lacks_is_refused(tmp_path) -> None:
    """A point only ever restores what a fresh scheduler already holds."""
    import diffusers
    import torch

    from wangend.pipelines.resume import restore_scheduler, scheduler_state

    scheduler = diffusers.UniPCMultistepScheduler()
    description, tensors = scheduler_state(scheduler)
    restore_scheduler(diffusers.UniPCMultistepScheduler(), description, tensors)  # fine
    for name in ("__class__", "step"):
        with pytest.raises(ValueError, match=name):
            restore_scheduler(
                diffusers.UniPCMultistepScheduler(), {**description, name: {"value": 1}}, tensors
            )
    store = ResumeStore(tmp_path)
    assert store.write(1, "mark", 2, torch.zeros(2), scheduler)
    assert store.read(1, "mark") is not None and store.read(1, "other") is None
    assert store.jobs() == []  # a point for other settings is discarded


def test_a_kill_after_the_output_is_written_keeps_that_output(resumable, store, inputs, media):
    """Killed between writing the video and the queue recording the success: the next
    attempt finds the outputs it noted and returns them; nothing runs, nothing is written
    twice. Only the queue's record of the end drops the point and the note."""
    job = inputs.resolve(msgspec.structs.replace(spec("tiny", media), steps=STEPS))
    first = resumable.run(14, job, JobControl(), RecordingHooks())  # no forget: "killed"
    assert store.jobs() == [14]
    hooks = RecordingHooks()
    assert resumable.run(14, job, JobControl(), hooks) == first
    assert hooks.named("progress") == []  # not even a load
    assert sorted(p.name for p in resumable.output_dir.iterdir()) == [Path(first[0]).name]
    resumable.forget(14, succeeded=True)
    assert store.jobs() == []
    Path(first[0]).unlink()  # a noted output that is gone means the job runs again
    store.record_outputs(15, first)
    [again] = resumable.run(15, job, JobControl(), RecordingHooks())
    assert Path(again).is_file()


def test_a_job_that_ends_without_its_outputs_takes_back_what_it_named(tmp_path: Path) -> None:
    """The queue's record of a job's end decides the fate of files an attempt named
    but never noted: kept for a success (they are its outputs), removed otherwise."""
    from wangend.media.atomic import RetryPolicy, publish

    store = ResumeStore(tmp_path / "resume")
    named = {}
    for job in (1, 2):
        named[job] = publish(
            tmp_path / "out", f"clip{job}", ".mp4", lambda t: t.write_bytes(b"video"),
            RetryPolicy(), on_claim=lambda temp, job=job: store.claims.note(job, temp),
        )  # fmt: skip
    assert store.jobs() == [1, 2]
    store.discard(1, succeeded=True)
    store.discard(2)
    assert named[1].is_file() and not named[2].exists() and store.jobs() == []
