"""A hub model that is not in the cache downloads from a real (local, fake) hub with
"downloading" progress events, safetensors only, then loads, runs, and comes from the
cache the next time without a single request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from wangend.config import ModelFiles
from wangend.errors import JobFailure
from wangend.pipelines.control import JobAborted, JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime
from wangend.pipelines.tiny import ensure_tiny_model
from wangend.protocol import GenerateSpec

from .checkpoint_files import write_checkpoint
from .conftest import RecordingHooks
from .fake_hub import FakeHub

REPO = "org/tiny-wan"
PICKLE = "transformer/diffusion_pytorch_model.bin"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The tiny model served as REPO, with a pickle beside its safetensors; the HF cache
    and endpoint pointed at temporary ones, offline mode off."""
    from huggingface_hub import constants

    ensure_tiny_model(tmp_path / "source")
    extra = {PICKLE: b"not a pickle you want", "README.md": b"# tiny"}
    with FakeHub(REPO, tmp_path / "source" / "tiny", extra, delay=0.4) as server:
        cache = tmp_path / "hf" / "hub"
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        yield server


def downloading(hooks: RecordingHooks) -> list[dict]:
    return [data for _name, data in hooks.named("model_loading") if data.get("phase")]


def test_download_reports_progress_loads_runs_and_is_cached(hub: FakeHub, tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    record = registry.resolve(REPO)
    assert record.kind == "hub" and not registry.available(record)
    manager = ProductionManager(registry, device="cpu", allow_download=True)
    hooks = RecordingHooks()
    started = time.monotonic()
    pipe = manager.ensure(record, "float32", hooks)
    seconds = time.monotonic() - started

    events = downloading(hooks)
    assert events and all(e["phase"] == "downloading" for e in events)
    assert all(e["source"] == REPO and e["reason"] == "cold" for e in events)
    last = events[-1]
    wanted = {p for p in hub.files if p.split("/")[0] != p and not p.endswith(".bin")}
    wanted.add("model_index.json")
    assert last["files_done"] == last["files_total"] == len(wanted)
    # model_index.json is fetched first (to know the components), so it is cached here
    weights = sum(len(b) for p, b in hub.files.items() if p in wanted - {"model_index.json"})
    assert last["bytes_done"] == last["bytes_total"] == weights
    done = [e["files_done"] for e in events]
    assert done == sorted(done) and done[0] == 0
    assert any(0 < n < last["files_total"] for n in done)  # progress while it runs
    assert len(events) <= 4 * seconds + 2  # throttled: at most ~4 a second
    # the load events (components) follow the download ones
    kinds = ["phase" in data for _n, data in hooks.named("model_loading")]
    assert kinds == sorted(kinds, reverse=True)

    fetched = hub.fetched()
    assert not any(p.endswith(".bin") for p in fetched) and "README.md" not in fetched
    assert set(fetched) == wanted
    assert registry.available(record)

    inputs = TaskInputManager(ModelRegistry(tmp_path / "models"), "tiny", "auto")
    job = inputs.resolve(GenerateSpec(prompt="a fox in the snow", seed=7))
    runtime = GenerationRuntime(manager, tmp_path / "out")
    frames = runtime.generate_frames(pipe, job, JobControl(), RecordingHooks())
    assert frames.dtype == np.uint8 and frames.shape == (job.frames, job.height, job.width, 3)

    # A second cold load comes from the cache: no request at all, no download events.
    manager.release()
    before = len(hub.requests)
    again = RecordingHooks()
    manager.ensure(record, "float32", again)
    assert hub.requests[before:] == [] and downloading(again) == []
    assert again.named("model_loaded")


def test_missing_repo_is_model_unavailable(hub: FakeHub, tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    manager = ProductionManager(registry, device="cpu", allow_download=True)
    with pytest.raises(JobFailure) as caught:
        manager.ensure(registry.resolve("org/nothing-here"), "float32", RecordingHooks())
    assert caught.value.kind == "ModelUnavailable"
    assert "could not be downloaded" in str(caught.value)
    assert str(caught.value).endswith(
        "not found on the hub: no such repo (or it is private), or no model_index.json"
    )


def test_a_model_that_cannot_be_fetched_leaves_the_warm_one_warm(hub: FakeHub, tmp_path) -> None:
    """A mistyped hub id (or a model not downloaded, downloads off) fails its job, but the
    warm pipeline stays: the next job on it does not pay a reload."""
    registry = ModelRegistry(tmp_path / "models")
    for allow, missing in ((True, "org/nothing-here"), (False, REPO)):
        manager = ProductionManager(registry, device="cpu", allow_download=allow)
        warm = manager.ensure(registry.resolve("tiny"), "float32", RecordingHooks())
        with pytest.raises(JobFailure):
            manager.ensure(registry.resolve(missing), "float32", RecordingHooks())
        assert manager.loaded_model == "tiny" and manager.pipeline is warm
        again = RecordingHooks()
        assert manager.ensure(registry.resolve("tiny"), "float32", again) is warm
        assert again.named("model_loading") == []
        manager.release()


def test_no_download_when_downloads_are_off(hub: FakeHub, tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    manager = ProductionManager(registry, device="cpu", allow_download=False)
    hooks = RecordingHooks()
    with pytest.raises(JobFailure) as caught:
        manager.ensure(registry.resolve(REPO), "float32", hooks)
    assert caught.value.kind == "ModelUnavailable" and "switched off" in caught.value.message
    assert hub.fetched() == [] and downloading(hooks) == []


def test_abort_stops_a_download_and_the_next_load_resumes_it(hub: FakeHub, tmp_path) -> None:
    """An abort lands while the files are still coming (not once the whole model is in);
    the cache keeps what it has and the next job's load completes the download."""
    registry = ModelRegistry(tmp_path / "models")
    record = registry.resolve(REPO)
    manager = ProductionManager(registry, device="cpu", allow_download=True)
    control = JobControl()

    class AbortOnFirstDownloadEvent(RecordingHooks):
        def model_loading(self, model: str, data: dict) -> None:
            super().model_loading(model, data)
            if data.get("phase") == "downloading":
                control.request_abort()

    hooks = AbortOnFirstDownloadEvent()
    with pytest.raises(JobAborted):
        manager.ensure(record, "float32", hooks, control.check_abort)
    events = downloading(hooks)
    assert events[-1]["files_done"] < (events[-1].get("files_total") or 2)
    assert manager.loaded_model is None and not hooks.named("model_loaded")
    assert not registry.available(record)

    again = RecordingHooks()
    manager.ensure(record, "float32", again)
    assert again.named("model_loaded") and registry.available(record)
    assert downloading(again)[-1]["files_done"] == downloading(again)[-1]["files_total"]


def test_a_file_model_on_a_hub_base_downloads_all_but_the_transformer(
    hub: FakeHub, tmp_path
) -> None:
    """A ComfyUI user's transformer file on a hub base: the base's text encoder, VAE and
    configs come down, its transformer weights do not, and the job runs on the file."""
    source = tmp_path / "source" / "tiny"
    ckpt = write_checkpoint(source / "transformer", tmp_path / "wan_t2v.safetensors")
    registry = ModelRegistry(
        tmp_path / "models", {"mine": ModelFiles(base=REPO, transformer=str(ckpt))}
    )
    record = registry.resolve("mine")
    assert record.kind == "hub" and record.source == REPO
    manager = ProductionManager(registry, device="cpu", allow_download=True)
    pipe = manager.ensure(record, "float32", RecordingHooks())
    fetched = set(hub.fetched())
    assert "transformer/config.json" in fetched and "vae/config.json" in fetched
    assert not any(p.startswith("transformer/") and ".safetensors" in p for p in fetched)
    assert any(p.startswith("text_encoder/") and ".safetensors" in p for p in fetched)
    # The snapshot serves the file model; it is not the base model itself.
    assert registry.available(record) and not registry.available(registry.resolve(REPO))

    job = TaskInputManager(registry, "tiny", "auto").resolve(
        GenerateSpec(prompt="a fox", model="mine", seed=7, steps=2, frames=5, width=32, height=32)
    )
    assert job.files == {"transformer": str(ckpt)}
    runtime = GenerationRuntime(manager, tmp_path / "out")
    frames = runtime.generate_frames(pipe, job, JobControl(), RecordingHooks())
    manager.release()
    plain = ProductionManager(ModelRegistry(tmp_path / "models"), device="cpu")
    base = plain.ensure(
        ModelRegistry(tmp_path / "source").resolve("tiny"), "float32", RecordingHooks()
    )
    expected = GenerationRuntime(plain, tmp_path / "out").generate_frames(
        base, msgspec.structs.replace(job, model="tiny", files={}), JobControl(), RecordingHooks()
    )
    assert np.array_equal(frames, expected)


def test_a_cached_model_with_a_blob_gone_names_what_it_lacks_offline(
    hub: FakeHub, tmp_path
) -> None:
    """A cache cleaned by hand (a blob deleted, its snapshot link left dangling): with
    downloads off the job says which file, not only that the cache is incomplete."""
    registry = ModelRegistry(tmp_path / "models")
    record = registry.resolve(REPO)
    ProductionManager(registry, device="cpu", allow_download=True).ensure(
        record, "float32", RecordingHooks()
    )
    cache = tmp_path / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))
    [link] = (cache / "snapshots").glob("*/transformer/diffusion_pytorch_model.safetensors")
    link.resolve().unlink()  # the blob goes; the link stays
    offline = ProductionManager(registry, device="cpu", allow_download=False)
    with pytest.raises(JobFailure) as caught:
        offline.ensure(record, "float32", RecordingHooks())
    assert "downloading is switched off: it lacks transformer/" in caught.value.message
