"""GenerationRuntime on the real tiny diffusers model: same frames as diffusers itself,
pause that changes nothing, abort within one block, a warm pipeline that stays clean."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from wangend.errors import JobFailure
from wangend.media.writers import read_video_metadata
from wangend.pipelines.calls import scheduler_for
from wangend.pipelines.control import JobAborted, JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime, to_uint8
from wangend.protocol import GenerateSpec, ResolvedGenerate

from .conftest import RecordingHooks


@pytest.fixture(scope="module")
def job(registry: ModelRegistry) -> ResolvedGenerate:
    inputs = TaskInputManager(registry, "tiny", "auto")
    return inputs.resolve(GenerateSpec(prompt="a fox in the snow, 雪の中の狐", seed=1234))


@pytest.fixture(scope="module")
def reference(models_dir: Path, job: ResolvedGenerate) -> np.ndarray:
    """What diffusers' WanPipeline gives when called directly, on a pipeline of its own."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(
        models_dir / "tiny", dtype=torch.float32, use_safetensors=True, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_for(pipe.scheduler, job.flow_shift)
    frames = pipe(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        height=job.height,
        width=job.width,
        num_frames=job.frames,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(job.seed),
        output_type="np",
    ).frames[0]
    return to_uint8(frames)


def warm(runtime: GenerationRuntime, job: ResolvedGenerate):
    record = runtime.production.registry.resolve(job.model)
    return runtime.production.ensure(record, job.dtype, RecordingHooks())


def hook_counts(pipe) -> int:
    modules = [pipe.text_encoder, *pipe.transformer.blocks, *pipe.vae.decoder.modules()]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def test_frames_equal_a_direct_diffusers_call(runtime, job, reference) -> None:
    pipe = warm(runtime, job)
    frames = runtime.generate_frames(pipe, job, JobControl(), RecordingHooks())
    assert frames.dtype == np.uint8 and frames.shape == (9, 64, 64, 3)
    assert np.array_equal(frames, reference)
    assert hook_counts(pipe) == 0
    other = runtime.generate_frames(
        pipe, type(job)(**{**_fields(job), "prompt": "a cat"}), JobControl(), RecordingHooks()
    )
    assert not np.array_equal(other, reference)  # the prompt reaches the model


def _fields(job: ResolvedGenerate) -> dict:
    return {f: getattr(job, f) for f in job.__struct_fields__}


def test_run_writes_the_video_and_reports_every_phase(runtime, job, reference, hooks) -> None:
    import av

    outputs = runtime.run(3, job, JobControl(), hooks)
    assert len(outputs) == 1
    path = Path(outputs[0])
    assert path.is_absolute() and path.parent == runtime.output_dir and path.suffix == ".mp4"
    assert sorted(p.name for p in runtime.output_dir.iterdir()) == [path.name]
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == reference.shape
    assert np.abs(decoded.astype(int) - reference).mean() < 12  # lossy, but the same video
    meta = read_video_metadata(path)
    assert meta["job"] == 3 and meta["settings"]["seed"] == 1234
    assert meta["settings"]["dtype"] == "float32" and meta["device"] == "cpu"
    assert set(meta["timings"]) >= {"load", "encoding", "denoising", "decoding"}

    progress = hooks.named("progress")
    assert progress == [
        (0, 4, "loading"),
        (0, 4, "encoding"),
        (0, 4, "denoising"),
        (1, 4, "denoising"),
        (2, 4, "denoising"),
        (3, 4, "denoising"),
        (4, 4, "denoising"),
        (4, 4, "decoding"),
        (4, 4, "saving"),
    ]
    assert runtime.loaded_model == "tiny" and runtime.device == "cpu"


def run_in_thread(target) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def body() -> None:
        try:
            result["value"] = target()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


def test_pause_requested_before_start_holds_and_resumes_identically(
    runtime, job, reference, hooks
) -> None:
    pipe = warm(runtime, job)
    control = JobControl()
    control.request_pause()
    thread, result = run_in_thread(lambda: runtime.generate_frames(pipe, job, control, hooks))
    assert hooks.paused_event.wait(30)
    thread.join(0.3)
    assert thread.is_alive()  # held at the boundary after step 1
    assert hooks.named("paused") == [(1, 4)]
    assert hooks.named("progress")[-1] == (1, 4, "denoising")
    control.release_pause()
    thread.join(30)
    assert hooks.named("resumed") == [(1, 4)]
    assert np.array_equal(result["value"], reference)


def test_pause_from_another_thread_while_running(runtime, job, reference, hooks) -> None:
    pipe = warm(runtime, job)
    control = JobControl()
    at_step_2, pause_sent = threading.Event(), threading.Event()

    def on_progress(step: int, steps: int, phase: str) -> None:
        if (step, phase) == (2, "denoising"):
            at_step_2.set()
            assert pause_sent.wait(30)

    hooks.on_progress = on_progress
    thread, result = run_in_thread(lambda: runtime.generate_frames(pipe, job, control, hooks))
    assert at_step_2.wait(30)
    control.request_pause()  # from the test thread, while the worker is mid-run
    pause_sent.set()
    assert hooks.paused_event.wait(30)
    assert hooks.named("paused") == [(2, 4)]
    control.release_pause()
    thread.join(30)
    assert np.array_equal(result["value"], reference)


def test_abort_during_denoising_stops_within_one_block(runtime, job, reference, hooks) -> None:
    pipe = warm(runtime, job)
    control = JobControl()
    done: list[bool] = []  # one entry per finished block, True once the abort was requested

    def after_block(module, args, output) -> None:
        done.append(control.aborted)
        if len(done) == 5:  # step 2, cond pass, first block: abort arrives mid-step
            control.request_abort()

    handles = [b.register_forward_hook(after_block) for b in pipe.transformer.blocks]
    try:
        with pytest.raises(JobAborted):
            runtime.run(4, job, control, hooks)
    finally:
        for handle in handles:
            handle.remove()
    assert sum(done) <= 1 and len(done) <= 6
    assert "decoding" not in [p for _, _, p in hooks.named("progress")]
    assert not runtime.output_dir.exists() or not list(runtime.output_dir.iterdir())
    # The warm pipeline is clean and gives the same frames as a fresh one.
    assert hook_counts(pipe) == 0
    assert np.array_equal(runtime.generate_frames(pipe, job, JobControl(), hooks), reference)


def test_abort_during_vae_decode(runtime, job, reference, hooks) -> None:
    pipe = warm(runtime, job)
    control = JobControl()
    done: list[bool] = []

    def after_block(module, args, output) -> None:
        done.append(control.aborted)
        control.request_abort()  # during the first decoder block of the first frame

    handles = [b.register_forward_hook(after_block) for b in pipe.vae.decoder.up_blocks]
    try:
        with pytest.raises(JobAborted):
            runtime.run(5, job, control, hooks)
    finally:
        for handle in handles:
            handle.remove()
    assert done == [False]  # no decoder block ran after the abort
    assert hooks.named("progress")[-1] == (4, 4, "decoding")
    assert not runtime.output_dir.exists() or not list(runtime.output_dir.iterdir())
    assert hook_counts(pipe) == 0
    assert np.array_equal(runtime.generate_frames(pipe, job, JobControl(), hooks), reference)


def test_abort_at_a_step_boundary_from_another_thread(runtime, job, hooks) -> None:
    control = JobControl()
    at_step, aborted = threading.Event(), threading.Event()

    def on_progress(step: int, steps: int, phase: str) -> None:
        if (step, phase) == (1, "denoising"):
            at_step.set()
            assert aborted.wait(30)

    hooks.on_progress = on_progress
    thread, result = run_in_thread(lambda: runtime.run(6, job, control, hooks))
    assert at_step.wait(30)
    control.request_abort()
    aborted.set()
    thread.join(30)
    assert isinstance(result.get("error"), JobAborted)
    assert hooks.named("progress")[-1] == (1, 4, "denoising")
    assert not runtime.output_dir.exists() or not list(runtime.output_dir.iterdir())


def test_abort_before_start_loads_nothing(registry, tmp_path, job, hooks) -> None:
    production = ProductionManager(registry, device="cpu", allow_download=False)
    control = JobControl()
    control.request_abort()
    with pytest.raises(JobAborted):
        GenerationRuntime(production, tmp_path).run(1, job, control, hooks)
    assert hooks.calls == [] and production.loaded_model is None


def test_warm_pipeline_reused_then_switched(registry, models_dir, tmp_path, job, hooks) -> None:
    production = ProductionManager(registry, device="cpu", allow_download=False)
    runtime = GenerationRuntime(production, tmp_path / "out")
    runtime.run(1, job, JobControl(), hooks)
    first = production.pipeline
    runtime.run(2, job, JobControl(), hooks)
    assert production.pipeline is first
    # one load: its progress reports, each naming the model, start from component 0 once
    starts = [m for m, d in hooks.named("model_loading") if d.get("components_loaded") == 0]
    assert starts == ["tiny"]
    data = hooks.named("model_loaded")[0][1]
    assert data["reason"] == "cold" and data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["seconds"] >= 0 and data["source"] == str(models_dir / "tiny")

    copy = tmp_path / "copy"
    shutil.copytree(models_dir / "tiny", copy)
    inputs = TaskInputManager(registry, "tiny")
    other = inputs.resolve(GenerateSpec(prompt="a fox", model=str(copy), seed=1))
    runtime.run(3, other, JobControl(), hooks)
    assert production.pipeline is not first and production.loaded_model == str(copy)
    loading = [(m, d) for m, d in hooks.named("model_loading") if d.get("components_loaded") == 0]
    assert [m for m, _ in loading] == ["tiny", str(copy)] and loading[1][1]["reason"] == "switch"
    assert len(list((tmp_path / "out").iterdir())) == 3
    production.release()
    assert production.loaded_model is None and production.pipeline is None


def test_unavailable_models_fail_with_one_sentence(registry, tmp_path, hooks) -> None:
    production = ProductionManager(registry, device="cpu", allow_download=False)
    runtime = GenerationRuntime(production, tmp_path / "out")
    inputs = TaskInputManager(registry, "tiny")
    hub = inputs.resolve(GenerateSpec(prompt="p", model="nobody-here/not-a-model", seed=1))
    with pytest.raises(JobFailure) as info:
        runtime.run(1, hub, JobControl(), hooks)
    assert info.value.kind == "ModelUnavailable"
    assert "nobody-here/not-a-model" in info.value.message and "\n" not in info.value.message

    copy = tmp_path / "copy"
    shutil.copytree(registry.models_dir / "tiny", copy)
    local = inputs.resolve(GenerateSpec(prompt="p", model=str(copy), seed=1))
    shutil.rmtree(copy / "text_encoder")  # removed after the job was queued
    with pytest.raises(JobFailure) as info:
        runtime.run(2, local, JobControl(), hooks)
    assert info.value.kind == "ModelUnavailable" and "text_encoder/ folder" in info.value.message
    assert not (tmp_path / "out").exists()


def test_an_input_deleted_after_queueing_fails_the_job_before_any_load(
    family_models: Path, tmp_path: Path
) -> None:
    """The start image went away while the job waited: the job fails naming it, and the
    warm model is not swapped for one the job could not use."""
    from PIL import Image

    image = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (200, 30, 10)).save(image)
    registry = ModelRegistry(family_models)
    job = TaskInputManager(registry, "tiny-i2v").resolve(
        GenerateSpec(prompt="she smiles", image=str(image), width=32, height=32, frames=5)
    )
    image.unlink()
    production = ProductionManager(registry, device="cpu", allow_download=False)
    warm = production.ensure(registry.resolve("tiny"), "float32", RecordingHooks())
    runtime = GenerationRuntime(production, tmp_path / "out")
    with pytest.raises(JobFailure) as caught:
        runtime.run(1, job, JobControl(), RecordingHooks())
    assert caught.value.kind == "InvalidInput"
    assert caught.value.message == f"image {image} is gone since the job was queued"
    assert production.pipeline is warm and production.loaded_model == "tiny"
    production.release()
