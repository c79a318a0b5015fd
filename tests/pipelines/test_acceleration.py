"""Engine settings on the real tiny model: option checks and fallbacks, memory profiles
that change nothing in the output, step caches that really skip work and leave nothing
behind, fp8 storage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from wangend.errors import JobFailure
from wangend.pipelines.acceleration import EngineOptions, settle_options, transformers_of
from wangend.pipelines.control import JobAborted, JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime
from wangend.protocol import GenerateSpec, ResolvedGenerate

from .conftest import RecordingHooks


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def job(registry: ModelRegistry) -> ResolvedGenerate:
    inputs = TaskInputManager(registry, "tiny", "auto")
    return inputs.resolve(GenerateSpec(prompt="a heron at dawn", seed=7, steps=8))


@pytest.fixture(scope="module")
def manager(registry: ModelRegistry) -> Iterator[ProductionManager]:
    production = ProductionManager(registry, device="cpu", allow_download=False)
    yield production
    production.release()


class ComputeCounter:
    """Counts real compute inside the transformer blocks: attention projections and
    feed-forward calls. A cache that skips a block or an attention shows fewer calls."""

    def __init__(self, pipe: Any) -> None:
        self.calls = 0
        self._handles = []
        for block in pipe.transformer.blocks:
            for module in (block.attn1.to_q, block.attn2.to_q, block.ffn):
                self._handles.append(module.register_forward_pre_hook(self._count))

    def _count(self, module: Any, args: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def run(
    manager: ProductionManager, job: ResolvedGenerate, options: EngineOptions
) -> tuple[np.ndarray, int, list[str], list[float]]:
    """Frames, counted block compute, notes and measured ratios of one run."""
    record = manager.registry.resolve(job.model)
    pipe = manager.ensure(record, options, RecordingHooks())
    counter = ComputeCounter(pipe)
    runtime = GenerationRuntime(manager, manager.registry.models_dir)
    try:
        with manager.run_scope(pipe, options, steps=job.steps) as scope:
            frames = runtime.generate_frames(pipe, job, JobControl(), RecordingHooks())
    finally:
        counter.close()
    return frames, counter.calls, scope.notes, scope.measured_ratios


@pytest.fixture(scope="module")
def uncached(manager: ProductionManager, job: ResolvedGenerate) -> tuple[np.ndarray, int]:
    frames, calls, notes, _ = run(manager, job, EngineOptions())
    assert notes == []
    return frames, calls


def test_from_job_names_the_bad_field(job: ResolvedGenerate) -> None:
    options = EngineOptions.from_job(msgspec.structs.replace(job, step_cache="fbc"), "float32")
    assert options.step_cache == "fbc" and options.load_key == ("float32", "none", False, False)
    for field, value in (("memory_profile", "disk"), ("attention", "xformers")):
        with pytest.raises(JobFailure) as info:
            EngineOptions.from_job(msgspec.structs.replace(job, **{field: value}), "float32")
        assert info.value.kind == "InvalidSettings" and field in info.value.message


def test_settle_falls_back_on_cpu_with_notes() -> None:
    for profile in ("model", "sequential"):
        settled, notes = settle_options(EngineOptions(memory_profile=profile), "cpu")
        assert settled.memory_profile == "none" and profile in notes[0]
    settled, notes = settle_options(EngineOptions(attention="flash", fp8=True), "cpu")
    assert settled.attention == "native" and settled.fp8 and "flash" in notes[0]
    kept, none = settle_options(EngineOptions(memory_profile="group"), "cpu")
    assert kept.memory_profile == "group" and none == []


def test_group_offload_gives_the_same_frames(
    registry: ModelRegistry, job: ResolvedGenerate, uncached: tuple[np.ndarray, int]
) -> None:
    production = ProductionManager(registry, device="cpu", allow_download=False)
    try:
        frames, _, notes, _ = run(production, job, EngineOptions(memory_profile="group"))
    finally:
        production.release()
    assert notes == []
    np.testing.assert_array_equal(frames, uncached[0])


def test_model_offload_on_cpu_runs_as_none(
    manager: ProductionManager, job: ResolvedGenerate, uncached: tuple[np.ndarray, int]
) -> None:
    before = manager.pipeline
    frames, _, notes, _ = run(manager, job, EngineOptions(memory_profile="model"))
    assert manager.pipeline is before  # settled to "none": the same warm pipeline
    assert "memory_profile 'model'" in notes[0]
    np.testing.assert_array_equal(frames, uncached[0])


@pytest.mark.parametrize(
    ("cache", "threshold"), [("fbc", 5.0), ("taylorseer", None), ("pab", None)]
)
def test_step_cache_skips_work_and_leaves_nothing_behind(
    manager: ProductionManager,
    job: ResolvedGenerate,
    uncached: tuple[np.ndarray, int],
    cache: str,
    threshold: float | None,
) -> None:
    options = EngineOptions(step_cache=cache, step_cache_threshold=threshold)
    frames, calls, _, _ = run(manager, job, options)
    assert 0 < calls < uncached[1]
    assert frames.shape == uncached[0].shape
    assert not manager.pipeline.transformer.is_cache_enabled
    again, calls_after, _, _ = run(manager, job, EngineOptions())
    assert calls_after == uncached[1]
    np.testing.assert_array_equal(again, uncached[0])


def test_mag_cache_measures_ratios_then_uses_them(
    manager: ProductionManager, job: ResolvedGenerate, uncached: tuple[np.ndarray, int]
) -> None:
    options = EngineOptions(step_cache="mag", step_cache_threshold=10.0)
    manager.mag_ratios = type(manager.mag_ratios)()  # no ratios measured yet
    first, calls, notes, ratios = run(manager, job, options)
    assert "no magnitude ratios" in notes[0] and len(ratios) == job.steps
    assert calls == uncached[1]
    np.testing.assert_array_equal(first, uncached[0])
    source = manager.registry.resolve(job.model).load_source
    assert manager.mag_ratios.get(source) == tuple(ratios)
    _, cached_calls, notes, _ = run(manager, job, options)
    assert notes == [] and 0 < cached_calls < uncached[1]


def test_run_scope_cleans_up_after_an_exception(
    manager: ProductionManager, job: ResolvedGenerate
) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    record = manager.registry.resolve(job.model)
    pipe = manager.ensure(record, EngineOptions(), RecordingHooks())
    backend = _AttentionBackendRegistry._active_backend
    scope = manager.run_scope(pipe, EngineOptions(step_cache="fbc"), steps=job.steps)
    with pytest.raises(RuntimeError, match="boom"), scope:
        assert pipe.transformer.is_cache_enabled
        raise RuntimeError("boom")
    assert not pipe.transformer.is_cache_enabled
    assert _AttentionBackendRegistry._active_backend == backend


def test_fp8_storage_runs_and_reloads(
    manager: ProductionManager, job: ResolvedGenerate, uncached: tuple[np.ndarray, int]
) -> None:
    hooks = RecordingHooks()
    record = manager.registry.resolve(job.model)
    pipe = manager.ensure(record, EngineOptions(fp8=True), hooks)
    assert hooks.named("model_loaded")[0][1]["fp8"] is True  # a different load key: reload
    dtypes = {p.dtype for t in transformers_of(pipe) for p in t.blocks.parameters()}
    assert torch.float8_e4m3fn in dtypes
    frames, _, _, _ = run(manager, job, EngineOptions(fp8=True))
    assert frames.shape == uncached[0].shape
    # float8 storage rounds the weights: the output moves, but stays a video of the
    # same prompt (mean absolute difference well below half the range).
    assert np.abs(frames.astype(int) - uncached[0].astype(int)).mean() < 64


@pytest.fixture(scope="module")
def compiled(registry: ModelRegistry) -> Iterator[ProductionManager]:
    """A warm pipeline loaded with compile on (its own manager: a different load key)."""
    production = ProductionManager(registry, device="cpu", allow_download=False)
    yield production
    production.release()


def test_compile_gives_the_frames_of_the_eager_model(
    compiled: ProductionManager, job: ResolvedGenerate, uncached: tuple[np.ndarray, int]
) -> None:
    frames, calls, notes, _ = run(compiled, job, EngineOptions(compile=True))
    blocks = compiled.pipeline.transformer.blocks
    # Each block's forward is the compiled one; its hooks (ours) run around it.
    assert all(getattr(b.forward, "_torchdynamo_orig_callable", None) for b in blocks)
    assert notes == [] and calls == uncached[1]
    assert psnr(frames, uncached[0]) > 40.0


def test_abort_lands_inside_a_compiled_transformer(
    compiled: ProductionManager, job: ResolvedGenerate
) -> None:
    """diffusers' own regional compile traces block hooks into the graph, where the
    abort hook cannot raise; compiling `forward` keeps it working at block granularity."""
    options = EngineOptions(compile=True)
    record = compiled.registry.resolve(job.model)
    pipe = compiled.ensure(record, options, RecordingHooks())
    runtime = GenerationRuntime(compiled, compiled.registry.models_dir)
    control = JobControl()
    done: list[bool] = []

    def after_block(module: Any, args: Any, output: Any) -> None:
        done.append(control.aborted)
        if len(done) == 3:  # step 1, second pass, first block
            control.request_abort()

    handles = [b.register_forward_hook(after_block) for b in pipe.transformer.blocks]
    try:
        with pytest.raises(JobAborted), compiled.run_scope(pipe, options, steps=job.steps):
            runtime.generate_frames(pipe, job, control, RecordingHooks())
    finally:
        for handle in handles:
            handle.remove()
    assert sum(done) <= 1 and len(done) <= 4


def test_compile_runs_with_a_cache_that_hooks_inside_the_blocks(
    compiled: ProductionManager, job: ResolvedGenerate, uncached: tuple[np.ndarray, int]
) -> None:
    frames, calls, _, _ = run(compiled, job, EngineOptions(compile=True, step_cache="taylorseer"))
    assert 0 < calls < uncached[1]
    assert psnr(frames, uncached[0]) > 25.0
    assert not compiled.pipeline.transformer.is_cache_enabled


def test_the_first_step_at_a_new_size_reports_compiling(
    compiled: ProductionManager, job: ResolvedGenerate
) -> None:
    """It can take minutes: a client shows "compiling", and the ETA does not count it."""
    sized = msgspec.structs.replace(job, width=48, height=32, frames=5, steps=3)
    options = EngineOptions(compile=True)
    pipe = compiled.ensure(compiled.registry.resolve(job.model), options, RecordingHooks())
    runtime = GenerationRuntime(compiled, compiled.registry.models_dir)
    timings: dict[str, float] = {}
    first, again = RecordingHooks(), RecordingHooks()
    runtime.generate_frames(pipe, sized, JobControl(), first, timings)
    runtime.generate_frames(pipe, sized, JobControl(), again)
    assert [p for p in first.named("progress") if p[2] in ("compiling", "denoising")][:2] == [
        (0, 3, "compiling"),
        (1, 3, "denoising"),
    ]
    assert "compiling" in timings and "denoising" in timings
    assert "compiling" not in [phase for _, _, phase in again.named("progress")]
