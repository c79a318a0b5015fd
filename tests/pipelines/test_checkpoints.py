"""A user coming from ComfyUI or Wan2GP points a [models.NAME] at the transformer file
they already have: the job makes exactly the frames the same weights make from a
diffusers folder, in either file layout and any float dtype; files wangend cannot use
are refused when the job is queued, saying why."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wangend.config import ConfigError, ModelFiles
from wangend.errors import JobFailure, ModelUnavailable
from wangend.pipelines.checkpoints import inspect_transformer, load_transformer
from wangend.pipelines.control import JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime
from wangend.protocol import GenerateSpec

from .checkpoint_files import write_checkpoint
from .conftest import RecordingHooks

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def files(family_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoint files as users have them, written from the tiny folders."""
    out = tmp_path_factory.mktemp("ckpts")
    t2v = family_models / "tiny" / "transformer"
    wan22 = family_models / "tiny-wan22"
    return {
        "comfy": write_checkpoint(t2v, out / "wan2.1_t2v_tiny_fp32.safetensors", prefix=PREFIX),
        "wan2gp": write_checkpoint(t2v, out / "wan2.1_text2video_tiny.safetensors"),
        "diffusers": write_checkpoint(t2v, out / "tiny_diffusers.safetensors", layout="diffusers"),
        "bf16": write_checkpoint(t2v, out / "tiny_bf16.safetensors", dtype=torch.bfloat16),
        "fp8": write_checkpoint(t2v, out / "tiny_fp8.safetensors", dtype=torch.float8_e4m3fn),
        "high": write_checkpoint(wan22 / "transformer", out / "high_noise.safetensors"),
        "low": write_checkpoint(
            wan22 / "transformer_2", out / "low_noise.safetensors", layout="diffusers"
        ),
        "i2v": write_checkpoint(
            family_models / "tiny-i2v" / "transformer", out / "i2v.safetensors"
        ),
        "vace": write_checkpoint(
            family_models / "tiny-vace" / "transformer", out / "vace.safetensors"
        ),
        "ti2v": write_checkpoint(
            family_models / "tiny-ti2v" / "transformer", out / "ti2v.safetensors"
        ),
    }


def registry_with(models: Path, **entries: ModelFiles) -> ModelRegistry:
    return ModelRegistry(models, entries)


def run(registry: ModelRegistry, model: str, out: Path, **fields) -> np.ndarray:
    inputs = TaskInputManager(registry, "tiny", "auto")
    job = inputs.resolve(
        GenerateSpec(prompt="a fox in the snow", model=model, seed=11, steps=2, frames=5,
                     width=32, height=32, **fields)
    )  # fmt: skip
    production = ProductionManager(registry, device="cpu", allow_download=False)
    try:
        record = registry.resolve(model)
        pipe = production.ensure(record, job.dtype, RecordingHooks())
        runtime = GenerationRuntime(production, out)
        return runtime.generate_frames(pipe, job, JobControl(), RecordingHooks())
    finally:
        production.release()


@pytest.mark.parametrize("which", ["comfy", "wan2gp", "diffusers"])
def test_a_transformer_file_makes_the_frames_of_its_folder(family_models, files, which, tmp_path):
    registry = registry_with(
        family_models, mine=ModelFiles(base="tiny", transformer=str(files[which]))
    )
    expected = run(registry, "tiny", tmp_path)
    assert np.array_equal(run(registry, "mine", tmp_path), expected)


def test_two_expert_files_on_a_wan22_base(family_models, files, tmp_path) -> None:
    registry = registry_with(
        family_models,
        a14b=ModelFiles(
            base="tiny-wan22", transformer=str(files["high"]), transformer_2=str(files["low"])
        ),
    )
    record = registry.resolve("a14b")
    assert record.two_experts and record.family == "wan2.2-t2v"
    assert dict(record.files) == {
        "transformer": str(files["high"]),
        "transformer_2": str(files["low"]),
    }
    assert np.array_equal(run(registry, "a14b", tmp_path), run(registry, "tiny-wan22", tmp_path))


@pytest.mark.parametrize("family", ["i2v", "vace", "ti2v"])
def test_every_family_loads_the_weights_exactly(family_models, files, family) -> None:
    import diffusers

    folder = family_models / f"tiny-{family}" / "transformer"
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    plain = cls.from_pretrained(folder).state_dict()
    loaded = load_transformer(cls, files[family], folder, torch.float32).state_dict()
    assert plain.keys() == loaded.keys()
    assert all(torch.equal(plain[k], loaded[k]) for k in plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_float32_modules_as_from_pretrained(
    family_models, files, dtype
) -> None:
    """diffusers keeps norms, the time embedder and the modulation tables in float32
    under half precision; a file loads the same way, values and dtypes."""
    from diffusers import WanTransformer3DModel

    folder = family_models / "tiny" / "transformer"
    plain = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).state_dict()
    loaded = load_transformer(WanTransformer3DModel, files["comfy"], folder, dtype).state_dict()
    assert {k: v.dtype for k, v in plain.items()} == {k: v.dtype for k, v in loaded.items()}
    assert plain["scale_shift_table"].dtype == torch.float32  # the rule is really exercised
    assert all(torch.equal(plain[k], loaded[k]) for k in plain)


def test_bf16_and_fp8_files_load_upcast(family_models, files) -> None:
    from diffusers import WanTransformer3DModel

    folder = family_models / "tiny" / "transformer"
    plain = WanTransformer3DModel.from_pretrained(folder).state_dict()
    for which, stored, name in (
        ("bf16", torch.bfloat16, "BF16"),
        ("fp8", torch.float8_e4m3fn, "F8_E4M3"),
    ):
        assert inspect_transformer(files[which]).dtypes == (name,)
        loaded = load_transformer(WanTransformer3DModel, files[which], folder, torch.float32)
        state = loaded.state_dict()
        for key, value in plain.items():
            assert state[key].dtype == torch.float32
            assert torch.equal(state[key], value.to(stored).to(torch.float32)), key


def test_the_file_replaces_the_bases_weights_and_shares_nothing_warm(
    family_models, files, tmp_path
) -> None:
    registry = registry_with(
        family_models, mine=ModelFiles(base="tiny", transformer=str(files["bf16"]))
    )
    record = registry.resolve("mine")
    assert record.load_source != registry.resolve("tiny").load_source
    production = ProductionManager(registry, device="cpu", allow_download=False)
    hooks = RecordingHooks()
    base = production.ensure(registry.resolve("tiny"), "float32", RecordingHooks())
    mine = production.ensure(record, "float32", hooks)
    assert mine is not base  # a different model, not the warm base reused
    loading = [data for _name, data in hooks.named("model_loading")]
    assert loading[0]["files"] == {"transformer": str(files["bf16"])}
    assert loading[-1]["bytes_loaded"] == loading[-1]["bytes_total"]
    assert production.ensure(registry.resolve("mine"), "float32", RecordingHooks()) is mine
    production.release()


def test_models_lists_file_models_with_their_files(family_models, files, tmp_path) -> None:
    gone = tmp_path / "deleted.safetensors"
    registry = registry_with(
        family_models,
        mine=ModelFiles(base="tiny", transformer=str(files["comfy"]), description="my fox"),
        broken=ModelFiles(base="tiny", transformer=str(gone)),
    )
    listed = {m.name: m for m in registry.list()}
    assert listed["mine"].available and listed["mine"].description == "my fox"
    assert listed["mine"].files == {"transformer": str(files["comfy"])}
    assert listed["mine"].family == "wan2.1-t2v"
    assert not listed["broken"].available and "no such file" in listed["broken"].description


def fake_file(path: Path, tensors: dict[str, torch.Tensor], metadata=None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def refusal(registry: ModelRegistry, name: str) -> str:
    with pytest.raises(ModelUnavailable) as caught:
        TaskInputManager(registry, "tiny").resolve(GenerateSpec(prompt="x", model=name))
    return caught.value.message


def test_unusable_files_are_refused_at_enqueue_saying_why(family_models, files, tmp_path) -> None:
    patch = torch.zeros(24, 16, 1, 2, 2)
    cases = {
        "missing": (tmp_path / "nope.safetensors", "no such file"),
        "pickled": (tmp_path / "wan.pth", "safetensors only"),
        "gguf": (tmp_path / "wan-Q8_0.gguf", "GGUF"),
        "quanto": (
            fake_file(
                tmp_path / "q.safetensors",
                {
                    "patch_embedding.weight": patch,
                    "blocks.0.ffn.0.weight._data": torch.zeros(2),
                    "blocks.0.ffn.0.weight._scale": torch.zeros(2),
                },
            ),
            "optimum-quanto",
        ),
        "scaled": (
            fake_file(
                tmp_path / "s.safetensors",
                {
                    PREFIX + "patch_embedding.weight": patch,
                    "scaled_fp8": torch.zeros(2),
                    PREFIX + "blocks.0.ffn.0.scale_weight": torch.zeros(1),
                },
            ),
            "scaled fp8",
        ),
        "vae": (
            fake_file(tmp_path / "vae.safetensors", {"decoder.conv1.weight": torch.zeros(2)}),
            "looks like a VAE",
        ),
        "text": (tmp_path / "notes.safetensors", "not safetensors"),
        "i2v-on-t2v": (files["i2v"], "36 input channels, an image embedder, but base tiny"),
        "cut": (tmp_path / "cut.safetensors", "cut short"),
    }
    (tmp_path / "notes.safetensors").write_text("not weights at all, just some words here")
    (tmp_path / "cut.safetensors").write_bytes(files["comfy"].read_bytes()[:20])
    registry = registry_with(
        family_models,
        **{n: ModelFiles(base="tiny", transformer=str(p)) for n, (p, _) in cases.items()},
    )
    for name, (path, words) in cases.items():
        message = refusal(registry, name)
        assert words in message and str(path) in message and message.startswith(f"model {name}"), (
            name,
            message,
        )


def test_wrong_bases_are_refused(family_models, files) -> None:
    registry = registry_with(
        family_models,
        nobase=ModelFiles(base="no-such-model", transformer=str(files["comfy"])),
        stacked=ModelFiles(base="mine", transformer=str(files["comfy"])),
        mine=ModelFiles(base="tiny", transformer=str(files["comfy"])),
        second=ModelFiles(
            base="tiny", transformer=str(files["comfy"]), transformer_2=str(files["low"])
        ),
    )
    assert "base unknown model 'no-such-model'" in refusal(registry, "nobase")
    assert "is itself a [models.*] model" in refusal(registry, "stacked")
    assert "base tiny has one transformer" in refusal(registry, "second")
    with pytest.raises(ConfigError, match=r"models\.tiny: tiny is the name of a built-in model"):
        registry_with(family_models, tiny=ModelFiles(base="tiny", transformer="x.safetensors"))


def test_a_file_damaged_after_queueing_fails_the_job_naming_it(
    family_models, files, tmp_path
) -> None:
    path = tmp_path / "later.safetensors"
    path.write_bytes(files["comfy"].read_bytes())
    registry = registry_with(family_models, mine=ModelFiles(base="tiny", transformer=str(path)))
    record = registry.resolve("mine")
    path.write_bytes(files["comfy"].read_bytes()[: path.stat().st_size // 2])
    production = ProductionManager(registry, device="cpu", allow_download=False)
    with pytest.raises(JobFailure) as caught:
        production.ensure(record, "float32", RecordingHooks())
    assert caught.value.kind == "ModelUnavailable"
    assert str(path) in caught.value.message and "cut short" in caught.value.message


def test_a_local_base_needs_no_transformer_weights_of_its_own(
    family_models, files, tmp_path
) -> None:
    """A diffusers folder kept without its 28 GB transformer weights (configs, text
    encoder, VAE) serves as the base of a file model, though not as a model itself."""
    import shutil

    base = tmp_path / "wan-parts"
    shutil.copytree(family_models / "tiny", base)
    (base / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    registry = registry_with(
        family_models, mine=ModelFiles(base=str(base), transformer=str(files["comfy"]))
    )
    record = registry.resolve("mine")
    assert registry.available(record) and record.source == str(base)
    assert "missing transformer" in refusal(registry, str(base))
    expected = run(registry, "tiny", tmp_path)
    assert np.array_equal(run(registry, "mine", tmp_path), expected)


def test_a_file_rewritten_or_replaced_under_its_name_is_another_model(
    family_models, files, tmp_path
) -> None:
    """The loaded weights are copies: rewriting the file in place changes nothing warm
    (nor kills the daemon). Replacing it under the same name reads as another file, so
    the next job loads it instead of running the old weights warm."""
    path = tmp_path / "wan.safetensors"
    path.write_bytes(files["comfy"].read_bytes())
    registry = registry_with(family_models, mine=ModelFiles(base="tiny", transformer=str(path)))
    production = ProductionManager(registry, device="cpu", allow_download=False)
    first = production.ensure(registry.resolve("mine"), "float32", RecordingHooks())
    model = first.transformer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path.write_bytes(files["comfy"].read_bytes()[:4096])  # rewritten in place, cut short
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    path.unlink()
    path.write_bytes(files["comfy"].read_bytes())
    assert production.ensure(registry.resolve("mine"), "float32", RecordingHooks()) is not first
    first = production.pipeline
    replacement = tmp_path / "new.safetensors"
    replacement.write_bytes(files["bf16"].read_bytes())
    os.replace(replacement, path)
    second = production.ensure(registry.resolve("mine"), "float32", RecordingHooks())
    assert second is not first
    weights = second.transformer.state_dict()["patch_embedding.weight"]
    assert weights.dtype == torch.float32 and torch.equal(
        weights, weights.to(torch.bfloat16).float()
    )
    production.release()


def test_a_queued_job_runs_the_files_it_was_queued_with(family_models, files, tmp_path) -> None:
    """The config changed between enqueue and run: the job still runs its recorded file
    (the same job makes the same frames); a changed base fails it, saying so."""
    from wangend.media.writers import read_video_metadata

    spec = GenerateSpec(
        prompt="a fox", model="mine", seed=3, steps=2, frames=5, width=32, height=32
    )
    queued_with = registry_with(
        family_models, mine=ModelFiles(base="tiny", transformer=str(files["comfy"]))
    )
    job = TaskInputManager(queued_with, "tiny").resolve(spec)
    now = registry_with(family_models, mine=ModelFiles(base="tiny", transformer=str(files["bf16"])))
    fresh = TaskInputManager(now, "tiny").resolve(spec)  # queued now: the new file
    hashes = []
    for registry, queued in ((queued_with, job), (now, job), (now, fresh)):
        production = ProductionManager(registry, device="cpu", allow_download=False)
        runtime = GenerationRuntime(production, tmp_path / "out")
        [output] = runtime.run(1, queued, JobControl(), RecordingHooks())
        hashes.append(read_video_metadata(Path(output))["frames_sha256"])
        production.release()
    assert hashes[0] == hashes[1] != hashes[2]

    rebased = registry_with(
        family_models, mine=ModelFiles(base="tiny-vace", transformer=str(files["vace"]))
    )
    runtime = GenerationRuntime(ProductionManager(rebased, device="cpu"), tmp_path / "out")
    with pytest.raises(JobFailure) as caught:
        runtime.run(2, job, JobControl(), RecordingHooks())
    assert "now has base" in caught.value.message and "queue the job again" in caught.value.message


def test_odd_headers_and_unreadable_paths_are_refusals_not_crashes(family_models, tmp_path) -> None:
    entry = {"dtype": "F32", "shape": ["a", 1, 1, 2, 2], "data_offsets": [0, 0]}
    header = json.dumps({"patch_embedding.weight": entry}).encode()
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(len(header).to_bytes(8, "little") + header)
    long_name = tmp_path / ("x" * 300 + ".safetensors")
    registry = registry_with(
        family_models,
        odd=ModelFiles(base="tiny", transformer=str(odd)),
        long=ModelFiles(base="tiny", transformer=str(long_name)),
    )
    assert "its header does not describe tensors" in refusal(registry, "odd")
    assert "unreadable (File name too long)" in refusal(registry, "long")
    listed = {m.name: m for m in registry.list()}
    assert not listed["odd"].available and not listed["long"].available


def test_a_file_with_tensors_the_model_lacks_is_refused_naming_them(
    family_models, tmp_path
) -> None:
    from diffusers import WanTransformer3DModel

    folder = family_models / "tiny" / "transformer"
    extra = {"motion_head.weight": torch.zeros(2)}
    odd = write_checkpoint(folder, tmp_path / "odd.safetensors", layout="diffusers", extra=extra)
    with pytest.raises(ValueError, match=r"has 1 it does not know \(motion_head\.weight, \.\.\.\)"):
        load_transformer(WanTransformer3DModel, odd, folder, torch.float32)
