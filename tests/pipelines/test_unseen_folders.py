"""Model folders as users hand them over, built from the tiny models on disk: a Hugging
Face cache snapshot of symlinks, sharded and variant-only weights, pickled weights, a
partial download, stray entries, another scheduler, Wan 2.2 keys and awkward paths.

Each folder is classified (`ModelRegistry.resolve`), listed (`models`), loaded through
ProductionManager and, where it should work, run; where it should not, the error names
the component or file. The folders are built once for the module: the weights come from
the tiny model's fixed seed, so a folder holding the same weights in another layout must
give exactly the frames of the plain folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from wangend.errors import JobFailure, ModelUnavailable
from wangend.pipelines.acceleration import EngineOptions
from wangend.pipelines.catalog import PIPELINE_COMPONENTS
from wangend.pipelines.control import JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime
from wangend.pipelines.tiny import build_tiny_variant, ensure_tiny_model
from wangend.protocol import GenerateSpec

from ..support.harness import DaemonProcess
from ..support.wire import job_event
from .conftest import RecordingHooks
from .folder_tools import COMMIT, cut, edit_index, hub_cache, plain_copy

SMALL = {"width": 32, "height": 32, "frames": 5, "steps": 2}
TERMINAL = ("job.succeeded", "job.failed", "job.aborted")


# --- building the folders ------------------------------------------------------------


@pytest.fixture(scope="module")
def shelf(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every folder these tests hand to wangend, built once (a few seconds)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    root = tmp_path_factory.mktemp("unseen")
    for name in ("tiny-wan22", "tiny-ti2v"):
        ensure_tiny_model(models_dir, name=name)
    tiny = models_dir / "tiny"
    folders = {"plain": plain_copy(tiny, root / "plain")}

    cache = hub_cache(tiny, root / "home" / "hf-cache", "Org/TinyWan")
    folders["hub"], folders["snapshot"] = cache, cache / "snapshots" / COMMIT

    pipe = build_tiny_variant("tiny")  # the same weights as `tiny`, in memory
    pipe.save_pretrained(root / "sharded", max_shard_size="40KB")
    folders["sharded"] = root / "sharded"
    pipe.save_pretrained(root / "both", max_shard_size="40KB")
    pipe.to(torch.float16).save_pretrained(root / "both", variant="fp16", max_shard_size="20KB")
    pipe.save_pretrained(root / "fp16", variant="fp16")
    folders["both"], folders["fp16"] = root / "both", root / "fp16"

    pickled = plain_copy(tiny, root / "pickled")
    transformer = WanTransformer3DModel.from_pretrained(tiny / "transformer")
    transformer.save_pretrained(pickled / "transformer", safe_serialization=False)
    (pickled / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    folders["pickled"] = pickled
    mixed = plain_copy(tiny, root / "mixed")  # .bin beside the safetensors
    shutil.copy(pickled / "transformer" / "diffusion_pytorch_model.bin", mixed / "transformer")
    folders["mixed"] = mixed

    extras = plain_copy(tiny, root / "extras")
    (extras / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A Wan fine-tune\n")
    (extras / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (extras / "transformer" / "README.md").write_text("notes\n")
    edit_index(
        extras,
        _name_or_path="Org/TinyWan",
        feature_extractor=[None, None],
        image_encoder=[None, None],
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],  # no folder
        trained_by="someone",
    )
    folders["extras"] = extras

    euler = plain_copy(tiny, root / "euler")
    shutil.rmtree(euler / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(euler / "scheduler")
    edit_index(euler, scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    folders["euler"] = euler
    dynamic = root / "euler-dynamic"  # Flux-style: wants a `mu` per run
    shutil.copytree(euler, dynamic)
    shutil.rmtree(dynamic / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=5.0, use_dynamic_shifting=True).save_pretrained(
        dynamic / "scheduler"
    )
    folders["euler-dynamic"] = dynamic
    folders["wan22"] = plain_copy(models_dir / "tiny-wan22", root / "wan22")
    folders["ti2v"] = plain_copy(models_dir / "tiny-ti2v", root / "ti2v")

    odd = root / "my models" / "Wän ✓ 模型"
    odd.parent.mkdir()
    folders["odd"] = plain_copy(tiny, odd)
    return folders


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry(tmp_path_factory.mktemp("state") / "models")


@pytest.fixture(scope="module")
def manager(registry: ModelRegistry) -> Iterator[ProductionManager]:
    manager = ProductionManager(registry, device="cpu", allow_download=False)
    yield manager
    manager.release()


def load(manager: ProductionManager, model: str) -> tuple[object, RecordingHooks]:
    """Cold-load `model` (whatever was warm is dropped first), with its load events."""
    manager.release()
    hooks = RecordingHooks()
    record = manager.registry.resolve(model)
    return manager.ensure(record, EngineOptions(dtype="float32"), hooks), hooks


def frames_of(manager: ProductionManager, model: str, **spec: object) -> np.ndarray:
    """What a job on `model` generates: resolved as at enqueue, loaded, run. Every
    setting a folder's defaults could change is given, so folders compare."""
    inputs = TaskInputManager(manager.registry, "tiny", "auto")
    settings = {**SMALL, "seed": 3, "negative_prompt": "", "guidance_scale": 5.0, **spec}
    job = inputs.resolve(GenerateSpec(prompt="a red kite over dunes", model=model, **settings))
    record = manager.registry.resolve(job.model)
    pipe = manager.ensure(record, EngineOptions.from_job(job, "float32"), RecordingHooks())
    runtime = GenerationRuntime(manager, Path(manager.registry.models_dir).parent / "out")
    return runtime.generate_frames(pipe, job, JobControl(), RecordingHooks())


@pytest.fixture(scope="module")
def reference(manager: ProductionManager, shelf: dict[str, Path]) -> np.ndarray:
    """The frames of the plain folder: every relayout of the same weights must match."""
    return frames_of(manager, str(shelf["plain"]))


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


# --- 1. the Hugging Face cache layout --------------------------------------------------


def test_a_hub_cache_snapshot_reads_through_its_symlinks(
    manager: ProductionManager, shelf: dict[str, Path], reference: np.ndarray
) -> None:
    snapshot = shelf["snapshot"]
    weights = sorted(snapshot.rglob("*.safetensors"))
    assert weights and all(p.is_symlink() for p in snapshot.rglob("*") if p.is_file())
    record = manager.registry.resolve(str(snapshot))
    assert (record.family, record.pipeline, record.source) == (
        "wan2.1-t2v",
        "WanPipeline",
        str(snapshot),
    )
    assert record.defaults.width == 64  # the tiny marker is read through its link too
    _pipe, hooks = load(manager, str(snapshot))
    loading = hooks.named("model_loading")
    # sizes are the blobs' (a symlink itself is a few dozen bytes)
    assert loading[-1][1]["bytes_total"] == weight_bytes(shelf["plain"]) > 300_000
    assert np.array_equal(frames_of(manager, str(snapshot)), reference)


def test_the_cache_folder_itself_means_the_snapshot_refs_main_names(
    manager: ProductionManager, shelf: dict[str, Path], tmp_path: Path, reference: np.ndarray
) -> None:
    root = shelf["hub"]
    record = manager.registry.resolve(str(root))
    assert (record.name, record.source) == (str(root), str(shelf["snapshot"]))
    assert manager.registry.available(record)
    assert np.array_equal(frames_of(manager, str(root)), reference)

    # A copy whose refs/main names a snapshot that is not there, then none at all with
    # two snapshots: refused, saying what to give instead.
    other = tmp_path / "models--Org--Other"
    shutil.copytree(root, other, symlinks=True)
    (other / "refs" / "main").write_text("0" * 40)
    with pytest.raises(ModelUnavailable, match=r"refs/main names snapshot 0{40}, which is not"):
        manager.registry.resolve(str(other))
    (other / "refs" / "main").unlink()
    shutil.copytree(other / "snapshots" / COMMIT, other / "snapshots" / "1234", symlinks=True)
    with pytest.raises(ModelUnavailable, match=r"no refs/main and 2 snapshots") as info:
        manager.registry.resolve(str(other))
    assert "give the path of one snapshot" in info.value.message
    shutil.rmtree(other / "snapshots" / "1234")  # one snapshot left: that one
    assert manager.registry.resolve(str(other)).source == str(other / "snapshots" / COMMIT)


# --- 2. and 3. sharded and variant weights ---------------------------------------------


def test_sharded_weights_load_every_shard(
    manager: ProductionManager, shelf: dict[str, Path], reference: np.ndarray, tmp_path: Path
) -> None:
    folder = shelf["sharded"]
    shards = sorted(p.name for p in (folder / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("diffusion_pytorch_model-00001-of-0000")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    text_shards = sorted((folder / "text_encoder").glob("model-0000*-of-0000*.safetensors"))
    assert len(text_shards) > 1
    assert (folder / "text_encoder" / "model.safetensors.index.json").is_file()
    record = manager.registry.resolve(str(folder))
    assert record.family == "wan2.1-t2v" and record.defaults.width == 832  # no tiny marker
    _pipe, hooks = load(manager, str(folder))
    assert hooks.named("model_loading")[-1][1]["bytes_total"] == weight_bytes(folder)
    assert np.array_equal(frames_of(manager, str(folder)), reference)

    broken = tmp_path / "one-shard-short"
    shutil.copytree(folder, broken)
    (broken / "text_encoder" / text_shards[1].name).unlink()
    with pytest.raises(ModelUnavailable) as info:
        manager.registry.resolve(str(broken))
    assert f"missing text_encoder/{text_shards[1].name}" in info.value.message


def test_a_variant_only_folder_loads_its_variant(
    manager: ProductionManager, shelf: dict[str, Path]
) -> None:
    folder = shelf["fp16"]
    assert sorted(p.name for p in (folder / "transformer").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    assert (folder / "text_encoder" / "model.fp16.safetensors").is_file()
    record = manager.registry.resolve(str(folder))
    assert manager.registry.available(record)
    header = (folder / "transformer" / "diffusion_pytorch_model.fp16.safetensors").read_bytes()
    assert b'"dtype":"F16"' in header[: 8 + int.from_bytes(header[:8], "little")]
    pipe, _hooks = load(manager, str(folder))
    plain = build_tiny_variant("tiny")
    for part in ("transformer", "text_encoder", "vae"):
        ours = dict(getattr(pipe, part).named_parameters())
        for key, tensor in getattr(plain, part).named_parameters():  # rounded to fp16 once
            assert torch.equal(ours[key], tensor.half().float()), (part, key)
    frames = frames_of(manager, str(folder))
    assert frames.shape == (5, 32, 32, 3) and frames.std() > 0


def test_plain_weights_win_over_a_variant_beside_them(
    manager: ProductionManager, shelf: dict[str, Path], reference: np.ndarray, tmp_path: Path
) -> None:
    folder = shelf["both"]
    names = {p.name for p in (folder / "transformer").iterdir()}
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
    assert any(n.startswith("diffusion_pytorch_model.fp16-00001-of-") for n in names)
    assert "diffusion_pytorch_model.safetensors.index.json" in names
    _pipe, hooks = load(manager, str(folder))
    # the bytes counted are the full-precision shards only, not the fp16 copies too
    plain_shards = [p for p in folder.rglob("*.safetensors") if ".fp16" not in p.name]
    assert hooks.named("model_loading")[-1][1]["bytes_total"] == sum(
        p.stat().st_size for p in plain_shards
    )
    assert np.array_equal(frames_of(manager, str(folder)), reference)

    # Without the plain files, the sharded fp16 variant (index.fp16.json) loads.
    alone = shutil.copytree(folder, tmp_path / "fp16-shards")
    for path in alone.rglob("*"):
        if path.name.endswith((".safetensors", ".index.json")) and ".fp16" not in path.name:
            path.unlink()
    pipe, _hooks = load(manager, str(alone))
    plain = build_tiny_variant("tiny").transformer.state_dict()
    for key, tensor in pipe.transformer.state_dict().items():
        assert torch.equal(tensor, plain[key].half().float()), key


# --- 4. pickled weights ------------------------------------------------------------------


def test_pickled_weights_are_refused_naming_the_component(
    manager: ProductionManager, shelf: dict[str, Path]
) -> None:
    with pytest.raises(ModelUnavailable) as info:
        manager.registry.resolve(str(shelf["pickled"]))
    message = info.value.message
    assert "transformer/" in message and "diffusion_pytorch_model.bin" in message
    assert "safetensors only" in message and "never unpickles" in message


def test_pickled_files_beside_safetensors_are_never_unpickled(
    manager: ProductionManager,
    shelf: dict[str, Path],
    reference: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"torch.load was called: {args}")

    monkeypatch.setattr(torch, "load", refuse)
    folder = str(shelf["mixed"])
    load(manager, folder)
    assert np.array_equal(frames_of(manager, folder), reference)


# --- 5. partial downloads ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda f: shutil.rmtree(f / "vae"), "vae/ folder"),
        (lambda f: (f / "text_encoder" / "config.json").unlink(), "text_encoder/config.json"),
        (
            lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
            "transformer/*.safetensors (no diffusion_pytorch_model.safetensors",
        ),
    ],
)
def test_a_missing_part_is_refused_at_enqueue_by_name(
    manager: ProductionManager, shelf: dict[str, Path], tmp_path: Path, damage, named: str
) -> None:
    folder = shutil.copytree(shelf["plain"], tmp_path / "partial")
    damage(folder)
    inputs = TaskInputManager(manager.registry, "tiny", "auto")
    with pytest.raises(ModelUnavailable) as info:
        inputs.resolve(GenerateSpec(prompt="p", model=str(folder), **SMALL))
    assert named in info.value.message and "incomplete" in info.value.message


def test_a_cut_short_weights_file_is_named_at_enqueue_and_at_load(
    manager: ProductionManager, shelf: dict[str, Path], tmp_path: Path
) -> None:
    folder = shutil.copytree(shelf["sharded"], tmp_path / "cut")
    shard = sorted((folder / "transformer").glob("*.safetensors"))[1]
    size = shard.stat().st_size
    record = manager.registry.resolve(str(folder))  # queued while whole
    cut(shard, size // 2)
    named = f"transformer/{shard.name}: cut short: {size // 2} of {size} bytes"
    with pytest.raises(ModelUnavailable) as refused:
        manager.registry.resolve(str(folder))
    assert named in refused.value.message
    manager.release()
    with pytest.raises(JobFailure) as info:  # cut after it was queued
        manager.ensure(record, EngineOptions(dtype="float32"), RecordingHooks())
    assert info.value.kind == "ModelUnavailable"
    assert named in info.value.message
    shard.write_bytes(b"\x00" * 5)  # not even a header
    with pytest.raises(ModelUnavailable, match=rf"transformer/{shard.name}: cut short or not"):
        manager.registry.resolve(str(folder))


def test_a_daemon_fails_only_the_jobs_whose_folders_broke(
    shelf: dict[str, Path], tmp_path: Path
) -> None:
    """A real daemon: its default model is a hub cache folder given with `~`; three jobs
    whose folders break after enqueue fail naming the part; the next job runs."""
    home = shelf["hub"].parent.parent
    damages = {
        "vae/ folder": lambda f: shutil.rmtree(f / "vae"),
        "text_encoder/config.json": lambda f: (f / "text_encoder" / "config.json").unlink(),
        "transformer/diffusion_pytorch_model.safetensors: cut short": lambda f: cut(
            f / "transformer" / "diffusion_pytorch_model.safetensors", 4096
        ),
    }
    folders = {
        named: shutil.copytree(shelf["plain"], tmp_path / f"m{i}")
        for i, named in enumerate(damages)
    }
    (tmp_path / "daemon" / "state" / "models").mkdir(parents=True)
    os.symlink(shelf["pickled"], tmp_path / "daemon" / "state" / "models" / "pickled")
    env = {"HOME": str(home), "WANGEN_MODEL": "~/hf-cache/models--Org--TinyWan"}
    daemon = DaemonProcess(tmp_path / "daemon", env=env).start()
    try:
        with daemon.unix() as client:
            listed = {m["name"]: m for m in client.result("models")["models"]}
            default = listed[str(shelf["hub"])]
            assert default["default"] and default["available"]
            assert default["source"] == str(shelf["snapshot"])
            assert not listed["pickled"]["available"]
            assert "safetensors only" in listed["pickled"]["description"]
            refused = client.call("enqueue", {"prompt": "p", "model": "pickled", **SMALL})
            assert refused["error"]["code"] == -32004
            assert "transformer/" in refused["error"]["message"]

            client.result("pause")
            client.result("subscribe", {"since": client.result("status")["last_seq"]})
            jobs = {
                named: client.result("enqueue", {"prompt": "p", "model": str(f), **SMALL})["job"]
                for named, f in folders.items()
            }
            good = client.result("enqueue", {"prompt": "after the broken ones", **SMALL})["job"]
            for named, folder in folders.items():
                damages[named](folder)
            client.result("resume")
            for named, job in jobs.items():
                failed = client.wait_event(job_event(job, *TERMINAL))
                assert failed["type"] == "job.failed", failed
                assert failed["data"]["error"]["type"] == "ModelUnavailable"
                assert named in failed["data"]["error"]["message"]
            after = client.wait_event(job_event(good, *TERMINAL))
            assert after["type"] == "job.succeeded", after
            assert client.result("status")["model"] == str(shelf["hub"])
    finally:
        daemon.stop()


# --- 6. stray entries and files ---------------------------------------------------------


def test_stray_entries_and_files_are_tolerated(
    manager: ProductionManager, shelf: dict[str, Path], reference: np.ndarray
) -> None:
    folder = shelf["extras"]
    record = manager.registry.resolve(str(folder))
    assert record.family == "wan2.1-t2v" and manager.registry.available(record)
    pipe, hooks = load(manager, str(folder))
    components = {data.get("component") for _model, data in hooks.named("model_loading")}
    assert "safety_checker" not in components and "feature_extractor" not in components
    assert set(pipe.components) >= {"transformer", "vae", "text_encoder"}
    assert np.array_equal(frames_of(manager, str(folder)), reference)


# --- 7. schedulers and Wan 2.2 keys -----------------------------------------------------


def test_a_flow_match_euler_folder_keeps_its_scheduler_and_shift(
    manager: ProductionManager, shelf: dict[str, Path], reference: np.ndarray
) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = str(shelf["euler"])
    record = manager.registry.resolve(folder)
    assert record.family == "wan2.1-t2v" and record.defaults.flow_shift == 5.0  # its `shift`
    pipe, _hooks = load(manager, folder)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    frames = frames_of(manager, folder)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 5.0
    assert frames.shape == reference.shape and not np.array_equal(frames, reference)


def test_a_dynamic_shifting_scheduler_runs_with_the_jobs_static_shift(
    manager: ProductionManager, shelf: dict[str, Path]
) -> None:
    """WanPipeline never passes the `mu` dynamic shifting needs: the job's shift stands in."""
    frames = frames_of(manager, str(shelf["euler-dynamic"]))
    np.testing.assert_array_equal(frames, frames_of(manager, str(shelf["euler"])))


def test_wan22_folders_are_classified_by_their_keys(
    manager: ProductionManager, shelf: dict[str, Path], tmp_path: Path
) -> None:
    two = manager.registry.resolve(str(shelf["wan22"]))
    assert (two.family, two.boundary_ratio, two.two_experts) == ("wan2.2-t2v", 0.875, True)
    d = two.defaults
    assert (d.width, d.height, d.guidance_scale, d.guidance_scale_2) == (1280, 720, 4.0, 3.0)
    assert d.flow_shift == 3.0  # the folder's scheduler says so
    assert frames_of(manager, str(shelf["wan22"])).shape == (5, 32, 32, 3)

    ti2v = manager.registry.resolve(str(shelf["ti2v"]))
    assert (ti2v.family, ti2v.expand_timesteps, ti2v.size.multiple) == ("wan2.2-ti2v", True, 32)
    assert (ti2v.defaults.width, ti2v.defaults.height, ti2v.defaults.fps) == (1280, 704, 24)
    assert frames_of(manager, str(shelf["ti2v"])).shape == (5, 32, 32, 3)

    # No boundary_ratio in the index: the family's; a stray expand_timesteps: false is fine.
    folder = shutil.copytree(shelf["wan22"], tmp_path / "wan22-no-boundary")
    edit_index(folder, boundary_ratio=None, expand_timesteps=False)
    assert manager.registry.resolve(str(folder)).boundary_ratio == 0.875


def test_the_component_table_matches_diffusers() -> None:
    import diffusers

    for name, parts in PIPELINE_COMPONENTS.items():
        cls = getattr(diffusers, name)
        expected, _optional = cls._get_signature_keys(cls)
        assert set(parts) == set(expected), name


# --- 8. paths ------------------------------------------------------------------------------


def test_paths_with_spaces_unicode_home_and_relative(
    manager: ProductionManager,
    shelf: dict[str, Path],
    reference: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    odd = shelf["odd"]
    assert " " in str(odd) and "模型" in str(odd)
    assert manager.registry.resolve(str(odd)).name == str(odd)
    assert np.array_equal(frames_of(manager, str(odd)), reference)
    job = TaskInputManager(manager.registry, "tiny", "auto").resolve(
        GenerateSpec(prompt="a heron", model=str(odd), seed=3, **SMALL)
    )
    [output] = GenerationRuntime(manager, tmp_path / "out").run(
        1, job, JobControl(), RecordingHooks()
    )
    assert Path(output).is_file() and "模型" in Path(output).name

    monkeypatch.setenv("HOME", str(odd.parent.parent))
    home = manager.registry.resolve("~/my models/Wän ✓ 模型")
    assert home.name == home.source == str(odd)
    monkeypatch.chdir(odd.parent)
    for relative in ("./Wän ✓ 模型", "../my models/Wän ✓ 模型/", "./Wän ✓ 模型/."):
        assert manager.registry.resolve(relative).name == str(odd), relative  # absolute
    monkeypatch.chdir(odd)
    assert manager.registry.resolve(".").name == str(odd)
    monkeypatch.chdir(odd.parent.parent)
    assert manager.registry.resolve("my models/Wän ✓ 模型").name == str(odd)
    with pytest.raises(ModelUnavailable, match=r"my models/absent does not exist"):
        manager.registry.resolve("./my models/absent")
    with pytest.raises(ModelUnavailable, match="no such user"):
        manager.registry.resolve("~no-such-user-here/wan")


# --- the models listing -------------------------------------------------------------------


def test_the_models_listing_shows_every_kind_of_folder(
    shelf: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("hub", "sharded", "fp16", "pickled", "extras"):
        target = shelf[name]
        (models / (target.name if name == "hub" else name)).symlink_to(target)
    (models / "README.md").write_text("my models\n")
    monkeypatch.setenv("HOME", str(shelf["odd"].parent.parent))
    registry = ModelRegistry(models)
    listed = {
        m.name: m
        for m in registry.list(default="~/my models/Wän ✓ 模型", loaded=str(shelf["euler"]))
    }
    for name in ("models--Org--TinyWan", "sharded", "fp16", "extras"):
        assert listed[name].available and listed[name].family == "wan2.1-t2v", name
    assert listed["models--Org--TinyWan"].source == str(
        models / "models--Org--TinyWan" / "snapshots" / COMMIT
    )
    assert not listed["pickled"].available and "pickled" in listed["pickled"].description
    assert "README.md" not in listed
    default = listed[str(shelf["odd"])]
    assert default.default and default.available and not default.loaded
    assert listed[str(shelf["euler"])].loaded
    assert registry.resolve("models--Org--TinyWan").source.endswith(COMMIT)
