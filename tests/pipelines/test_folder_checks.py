"""Folders whose parts do not fit together, and folders that change under a warm model.

The first half: folders a user could hand over that load and then fail mid-run with a
tensor-shape error (a pipeline class its transformer cannot run, half of Wan 2.2's
keys, a scheduler without `set_begin_index`, a Git LFS pointer for weights) are refused
when the job is queued, naming the file to fix. The second half: a warm model whose
folder is rewritten in place or has files renamed over keeps running the job it has,
never dies of SIGBUS, and the next job loads the folder's new contents.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from wangend.errors import InvalidParams, ModelUnavailable
from wangend.pipelines.acceleration import EngineOptions
from wangend.pipelines.control import JobControl
from wangend.pipelines.inputs import TaskInputManager, check_size
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime
from wangend.protocol import GenerateSpec

from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames
from ..support.wire import job_event, progressed
from .conftest import RecordingHooks
from .folder_tools import cut, edit_index, plain_copy

SMALL = {"width": 32, "height": 32, "frames": 5, "steps": 2, "seed": 3}
TERMINAL = ("job.succeeded", "job.failed", "job.aborted")
WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry(tmp_path_factory.mktemp("state") / "models")


def refusal(registry: ModelRegistry, folder: Path) -> str:
    with pytest.raises(ModelUnavailable) as info:
        registry.resolve(str(folder))
    return info.value.message


def swap_config(folder: Path, part: str, source: Path) -> None:
    """`part` of `folder` replaced by another family's (config and weights)."""
    shutil.rmtree(folder / part)
    shutil.copytree(source / part, folder / part)


def reweighted(folder: Path, target: Path, seed: int, dtype: torch.dtype) -> Path:
    """The transformer weights of `folder`, nudged from a fixed seed, saved in `dtype`
    under `target`: another model of the same shape (fp16: half the file's size)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(folder / "transformer")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.to(dtype).save_pretrained(target)
    return target / "diffusion_pytorch_model.safetensors"


# --- parts that do not fit together --------------------------------------------------


def test_a_pipeline_class_its_transformer_cannot_run_is_refused(
    registry: ModelRegistry, family_models: Path, tmp_path: Path
) -> None:
    t2v_as_i2v = plain_copy(family_models / "tiny", tmp_path / "t2v-as-i2v")
    edit_index(t2v_as_i2v, _class_name="WanImageToVideoPipeline")
    assert (
        "WanImageToVideoPipeline needs a transformer with 36 input channels (16 latent "
        "channels, twice, and 4 for the mask); transformer/config.json has 16 (a "
        "text-to-video transformer)"
    ) in refusal(registry, t2v_as_i2v)

    i2v_as_t2v = plain_copy(family_models / "tiny-i2v", tmp_path / "i2v-as-t2v")
    edit_index(i2v_as_t2v, _class_name="WanPipeline")
    message = refusal(registry, i2v_as_t2v)
    assert "WanPipeline needs a transformer with 16 input channels" in message
    assert "has 36 (an image-to-video transformer)" in message

    t2v_as_vace = plain_copy(family_models / "tiny", tmp_path / "t2v-as-vace")
    edit_index(t2v_as_vace, _class_name="WanVACEPipeline")
    assert "WanVACEPipeline needs a VACE transformer; transformer/config.json has no " in (
        refusal(registry, t2v_as_vace)
    )
    vace_as_t2v = plain_copy(family_models / "tiny-vace", tmp_path / "vace-as-t2v")
    edit_index(vace_as_t2v, _class_name="WanPipeline")
    assert "is a VACE transformer (it has vace_layers); model_index.json names WanPipeline" in (
        refusal(registry, vace_as_t2v)
    )
    # The folders they were made from are fine.
    for name in ("tiny", "tiny-i2v", "tiny-vace", "tiny-wan22", "tiny-ti2v"):
        copy = plain_copy(family_models / name, tmp_path / f"whole-{name}")
        assert registry.resolve(str(copy)).family


def test_half_of_wan22s_keys_is_refused(
    registry: ModelRegistry, family_models: Path, tmp_path: Path
) -> None:
    no_second = plain_copy(family_models / "tiny", tmp_path / "no-second")
    edit_index(no_second, boundary_ratio=0.875)
    assert "sets boundary_ratio (where Wan 2.2 switches to its second expert) but lists no " in (
        refusal(registry, no_second)
    )
    only_second = plain_copy(family_models / "tiny-wan22", tmp_path / "only-second")
    shutil.rmtree(only_second / "transformer")
    edit_index(only_second, transformer=[None, None])
    assert "lists transformer_2 (Wan 2.2's low-noise expert) but no transformer" in (
        refusal(registry, only_second)
    )
    beyond = plain_copy(family_models / "tiny-wan22", tmp_path / "beyond")
    edit_index(beyond, boundary_ratio=1.5)
    assert "boundary_ratio must be in (0, 1], not 1.5" in refusal(registry, beyond)
    edit_index(beyond, boundary_ratio="high")
    assert "boundary_ratio 'high' is not a number" in refusal(registry, beyond)
    edit_index(beyond, boundary_ratio=1.0)
    assert registry.resolve(str(beyond)).boundary_ratio == 1.0


def test_a_scheduler_the_pipelines_cannot_drive_is_refused(
    registry: ModelRegistry, family_models: Path, tmp_path: Path
) -> None:
    folder = plain_copy(family_models / "tiny", tmp_path / "ddim")
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}))
    assert "scheduler DDIMScheduler cannot drive the Wan pipelines" in refusal(registry, folder)
    config.write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert "names 'WanPipeline', which is not a diffusers scheduler" in refusal(registry, folder)
    config.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3}))
    assert registry.resolve(str(folder)).defaults.flow_shift == 3.0


def test_weights_that_are_stand_ins_are_named_at_enqueue(
    registry: ModelRegistry, family_models: Path, tmp_path: Path
) -> None:
    folder = plain_copy(family_models / "tiny", tmp_path / "stand-ins")
    weights = folder / WEIGHTS
    size = weights.stat().st_size
    cut(weights, size - 100)
    assert f"has damaged weights: {WEIGHTS}: cut short: {size - 100} of {size} bytes" in (
        refusal(registry, folder)
    )
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4096\n")
    assert "a Git LFS pointer, not the weights (fetch them: git lfs pull)" in (
        refusal(registry, folder)
    )
    weights.write_text("<!DOCTYPE html><html><body>429 Too Many Requests</body></html>")
    assert "an HTML page, not the weights" in refusal(registry, folder)


def test_what_is_not_a_folder_is_called_what_it_is(
    registry: ModelRegistry, family_models: Path, tmp_path: Path
) -> None:
    single = family_models / "tiny" / WEIGHTS
    assert "is a file, not a diffusers folder; a single transformer file" in (
        refusal(registry, single)
    )
    bad_json = plain_copy(family_models / "tiny", tmp_path / "bad-json")
    (bad_json / "model_index.json").write_text('{"_class_name": "WanPipeline",')
    assert "model_index.json is not a JSON object" in refusal(registry, bad_json)
    nameless = plain_copy(family_models / "tiny", tmp_path / "nameless")
    edit_index(nameless, _class_name=None)
    assert "its model_index.json names no pipeline (_class_name)" in refusal(registry, nameless)


def test_a_models_folder_entry_resolves_by_any_name_it_is_listed_under(
    tmp_path: Path, family_models: Path
) -> None:
    registry = ModelRegistry(tmp_path / "models")
    plain_copy(family_models / "tiny", tmp_path / "models" / "my wan é")
    [listed] = [m for m in registry.list() if m.name == "my wan é"]
    assert listed.available
    assert registry.resolve("my wan é").source == str(tmp_path / "models" / "my wan é")


def test_sizes_beyond_the_rotary_table_are_refused_at_enqueue(
    registry: ModelRegistry, family_models: Path, tmp_path: Path
) -> None:
    tiny = registry.resolve("tiny")
    check_size(tiny, 512, 512, 125)  # the largest the tiny transformers take
    with pytest.raises(InvalidParams, match="width 576 is more than tiny takes: at most 512"):
        check_size(tiny, 576, 64, 9)
    with pytest.raises(InvalidParams, match="frames 129 is more than tiny takes: at most 125"):
        check_size(tiny, 64, 64, 129)
    folder = registry.resolve(str(plain_copy(family_models / "tiny", tmp_path / "copy")))
    assert folder.size.span == 32  # read from its transformer's config
    assert registry.resolve("wan2.1-t2v-14b").size.span is None


# --- folders that change under a warm model ------------------------------------------


def test_a_folders_identity_follows_what_a_load_reads(
    registry: ModelRegistry, family_models: Path, tmp_path: Path
) -> None:
    folder = plain_copy(family_models / "tiny", tmp_path / "ident")
    first = registry.resolve(str(folder)).load_source
    (folder / "README.md").write_text("# notes\n")
    assert registry.resolve(str(folder)).load_source == first  # beside the index: no
    other = reweighted(folder, tmp_path / "other", seed=7, dtype=torch.float32)
    os.replace(other, folder / WEIGHTS)  # renamed over
    renamed = registry.resolve(str(folder)).load_source
    assert renamed != first
    edit_index(folder, _diffusers_version="0.99.0")
    assert registry.resolve(str(folder)).load_source not in (first, renamed)


@pytest.fixture
def manager(registry: ModelRegistry) -> Iterator[ProductionManager]:
    manager = ProductionManager(registry, device="cpu", allow_download=False)
    yield manager
    manager.release()


def frames(manager: ProductionManager, folder: Path, hooks: RecordingHooks) -> np.ndarray:
    inputs = TaskInputManager(manager.registry, "tiny", "auto")
    job = inputs.resolve(GenerateSpec(prompt="a kite", model=str(folder), **SMALL))
    record = manager.registry.resolve(job.model)
    pipe = manager.ensure(record, EngineOptions.from_job(job, "float32"), hooks)
    runtime = GenerationRuntime(manager, folder.parent / "out")
    return runtime.generate_frames(pipe, job, JobControl(), RecordingHooks())


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps")
def test_a_warm_model_on_the_host_maps_none_of_its_files(
    manager: ProductionManager, family_models: Path, tmp_path: Path
) -> None:
    folder = plain_copy(family_models / "tiny", tmp_path / "mapped")
    hooks = RecordingHooks()
    before = frames(manager, folder, hooks)
    maps = Path("/proc/self/maps").read_text()
    assert str(folder.resolve()) not in maps
    # Rewritten in place (same inode): the warm model is not the file's pages, and the
    # next job sees other files and loads them.
    shutil.copyfile(reweighted(folder, tmp_path / "half", 7, torch.float16), folder / WEIGHTS)
    after = frames(manager, folder, hooks)
    reasons = [data["reason"] for _model, data in hooks.named("model_loaded")]
    assert reasons == ["cold", "changed"]
    assert not np.array_equal(before, after)
    manager.release()
    assert np.array_equal(frames(manager, folder, RecordingHooks()), after)  # a cold load


def test_a_daemon_keeps_its_job_and_its_life_when_the_folder_is_rewritten(
    family_models: Path, tmp_path: Path
) -> None:
    """A real daemon on the CPU: a job paused mid-denoising while its model's weights
    are cut to half their size, then rewritten with other weights, ends with the frames
    of the same job run undisturbed; the next job runs the new weights."""
    folder = plain_copy(family_models / "tiny", tmp_path / "live")
    smaller = reweighted(folder, tmp_path / "half", 7, torch.float16)
    spec = {"prompt": "a kite", "model": str(folder), **SMALL, "steps": 20}
    (tmp_path / "daemon").mkdir()
    daemon = DaemonProcess(tmp_path / "daemon").start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {"since": client.result("status")["last_seq"]})
            quiet = client.result("enqueue", spec)["job"]
            undisturbed = client.wait_event(job_event(quiet, *TERMINAL))
            assert undisturbed["type"] == "job.succeeded", undisturbed

            job = client.result("enqueue", spec)["job"]
            client.wait_event(progressed(job, 2))
            client.result("pause", {"mode": "now"})
            assert client.wait_event(job_event(job, "job.paused", *TERMINAL))["type"] == (
                "job.paused"
            )
            os.truncate(folder / WEIGHTS, (folder / WEIGHTS).stat().st_size // 2)
            shutil.copyfile(smaller, folder / WEIGHTS)  # same inode, half the size
            client.result("resume")
            disturbed = client.wait_event(job_event(job, *TERMINAL))
            assert disturbed["type"] == "job.succeeded", disturbed

            after = client.result("enqueue", spec)["job"]
            loaded = client.wait_event(
                lambda e: e.get("type") == "model.loaded" and e["data"]["job"] == after
            )
            assert loaded["data"]["reason"] == "changed"
            changed = client.wait_event(job_event(after, *TERMINAL))
            assert changed["type"] == "job.succeeded", changed
        assert daemon.proc is not None and daemon.proc.poll() is None  # alive
    finally:
        daemon.stop()

    def sha(event: dict) -> str:
        return json.loads(decode_frames(event["data"]["outputs"][0])[1]["comment"])["frames_sha256"]

    assert sha(disturbed) == sha(undisturbed)
    assert sha(changed) != sha(undisturbed)
