"""Model names, hub ids and folders resolve; everything else is refused with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wangend.errors import ModelUnavailable
from wangend.pipelines.registry import ModelRegistry


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


@pytest.fixture
def tiny_copy(models_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    shutil.copytree(models_dir / "tiny", folder)
    return folder


def test_builtin_names(registry: ModelRegistry) -> None:
    tiny = registry.resolve("tiny")
    assert tiny.tiny and tiny.source == str(registry.models_dir / "tiny")
    assert (tiny.defaults.width, tiny.defaults.height, tiny.defaults.frames) == (64, 64, 9)
    small = registry.resolve("wan2.1-t2v-1.3b")
    assert small.source == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and small.kind == "hub"
    d = small.defaults
    assert (d.width, d.height, d.frames, d.steps, d.guidance_scale, d.fps, d.flow_shift) == (
        832,
        480,
        81,
        50,
        5.0,
        16,
        3.0,
    )
    big = registry.resolve("wan2.1-t2v-14b")
    assert (big.defaults.width, big.defaults.height, big.defaults.flow_shift) == (1280, 720, 5.0)
    for record in (tiny, small, big):
        assert record.family == "wan2.1-t2v" and record.pipeline == "WanPipeline"
        assert (record.size.multiple, record.size.frame_step) == (16, 4)


def test_hub_ids(registry: ModelRegistry) -> None:
    assert registry.resolve("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").name == "wan2.1-t2v-1.3b"
    other = registry.resolve("someone/Wan2.1-finetune")
    assert (other.kind, other.source, other.name) == (
        "hub",
        "someone/Wan2.1-finetune",
        other.source,
    )


def test_local_folders(registry: ModelRegistry, tiny_copy: Path) -> None:
    record = registry.resolve(str(tiny_copy))
    assert (record.kind, record.source) == ("local", str(tiny_copy))
    assert record.defaults.width == 64  # a tiny folder keeps the tiny defaults
    registry.models_dir.mkdir(parents=True)
    shutil.copytree(tiny_copy, registry.models_dir / "dropped")
    assert registry.resolve("dropped").source == str(registry.models_dir / "dropped")


@pytest.mark.parametrize("name", ["nope", "a/b/c", "..x", "org/..", "relative/path/", ""])
def test_unknown_names_say_what_was_tried(registry: ModelRegistry, name: str) -> None:
    with pytest.raises(ModelUnavailable) as info:
        registry.resolve(name)
    message = info.value.message
    assert "tiny" in message and "hub id" in message and "absolute path" in message


def test_missing_folder(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        registry.resolve(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match=r"missing model_index\.json"):
        registry.resolve(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: shutil.rmtree(f / "transformer"), "transformer/ folder"),
        (lambda f: (f / "vae" / "config.json").unlink(), "vae/config.json"),
        (
            lambda f: next((f / "text_encoder").glob("*.safetensors")).unlink(),
            "text_encoder/*.safetensors",
        ),
        (
            lambda f: next((f / "transformer").glob("*.safetensors")).rename(
                f / "transformer" / "diffusion_pytorch_model.bin"
            ),
            "only pickled weights",
        ),
        (lambda f: (f / "tokenizer" / "tokenizer.json").unlink(), "tokenizer/tokenizer.json"),
        (lambda f: shutil.rmtree(f / "scheduler"), "scheduler/ folder"),
    ],
)
def test_partial_folder_names_what_is_missing(
    registry: ModelRegistry, tiny_copy: Path, damage, expected: str
) -> None:
    damage(tiny_copy)
    with pytest.raises(ModelUnavailable) as info:
        registry.resolve(str(tiny_copy))
    assert "incomplete" in info.value.message and expected in info.value.message
    assert expected in " ".join(info.value.data["missing"])


def test_other_pipeline_class_is_refused(registry: ModelRegistry, tiny_copy: Path) -> None:
    index = tiny_copy / "model_index.json"
    index.write_text(index.read_text().replace('"WanPipeline"', '"FluxPipeline"'))
    with pytest.raises(ModelUnavailable, match="FluxPipeline"):
        registry.resolve(str(tiny_copy))


def test_list(registry: ModelRegistry, tiny_copy: Path) -> None:
    registry.models_dir.mkdir(parents=True)
    shutil.copytree(tiny_copy, registry.models_dir / "good")
    shutil.copytree(tiny_copy, registry.models_dir / "broken")
    shutil.rmtree(registry.models_dir / "broken" / "vae")
    infos = {m.name: m for m in registry.list(default="tiny", loaded="good")}
    assert list(infos)[:3] == ["tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"]
    assert infos["tiny"].available and infos["tiny"].default and not infos["tiny"].loaded
    assert infos["good"].available and infos["good"].loaded
    assert not infos["broken"].available and "vae/ folder" in infos["broken"].description
    assert isinstance(infos["wan2.1-t2v-1.3b"].available, bool)


REAL = {
    # name: (family, hub id, pipeline, width, height, frames, fps, flow shift, multiple)
    "wan2.1-i2v-480p": ("wan2.1-i2v", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                        "WanImageToVideoPipeline", 832, 480, 81, 16, 3.0, 16),
    "wan2.1-i2v-720p": ("wan2.1-i2v", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
                        "WanImageToVideoPipeline", 1280, 720, 81, 16, 5.0, 16),
    "wan2.1-vace-1.3b": ("wan2.1-vace", "Wan-AI/Wan2.1-VACE-1.3B-diffusers",
                         "WanVACEPipeline", 832, 480, 81, 16, 3.0, 16),
    "wan2.1-vace-14b": ("wan2.1-vace", "Wan-AI/Wan2.1-VACE-14B-diffusers",
                        "WanVACEPipeline", 1280, 720, 81, 16, 5.0, 16),
    "wan2.2-t2v-a14b": ("wan2.2-t2v", "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
                        "WanPipeline", 1280, 720, 81, 16, 12.0, 16),
    "wan2.2-i2v-a14b": ("wan2.2-i2v", "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                        "WanImageToVideoPipeline", 1280, 720, 81, 16, 5.0, 16),
    "wan2.2-ti2v-5b": ("wan2.2-ti2v", "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                       "WanPipeline", 1280, 704, 121, 24, 5.0, 32),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REAL))
def test_every_family_has_a_builtin(registry: ModelRegistry, name: str) -> None:
    family, hub_id, pipeline, width, height, frames, fps, shift, multiple = REAL[name]
    record = registry.resolve(name)
    assert (record.family, record.source, record.pipeline, record.kind) == (
        family,
        hub_id,
        pipeline,
        "hub",
    )
    d = record.defaults
    assert (d.width, d.height, d.frames, d.fps, d.flow_shift) == (width, height, frames, fps, shift)
    assert record.size.multiple == multiple and d.width % multiple == 0
    assert registry.resolve(hub_id).name == name
    assert record.two_experts == (family in {"wan2.2-t2v", "wan2.2-i2v"})
    assert record.expand_timesteps == (family == "wan2.2-ti2v")


def test_two_expert_defaults(registry: ModelRegistry) -> None:
    t2v, i2v = registry.resolve("wan2.2-t2v-a14b"), registry.resolve("wan2.2-i2v-a14b")
    assert (t2v.boundary_ratio, t2v.defaults.guidance_scale, t2v.defaults.guidance_scale_2) == (
        0.875,
        4.0,
        3.0,
    )
    assert (i2v.boundary_ratio, i2v.defaults.guidance_scale_2) == (0.9, 3.5)
    assert i2v.capabilities.requires == ("image",) and "last_image" in i2v.capabilities.accepts
    assert "last_image" not in registry.resolve("wan2.1-i2v-480p").capabilities.accepts


@pytest.mark.parametrize(
    ("name", "family", "pipeline", "boundary", "multiple"),
    [
        ("tiny", "wan2.1-t2v", "WanPipeline", None, 16),
        ("tiny-i2v", "wan2.1-i2v", "WanImageToVideoPipeline", None, 16),
        ("tiny-vace", "wan2.1-vace", "WanVACEPipeline", None, 16),
        ("tiny-wan22", "wan2.2-t2v", "WanPipeline", 0.875, 16),
        ("tiny-wan22-i2v", "wan2.2-i2v", "WanImageToVideoPipeline", 0.9, 16),
        ("tiny-ti2v", "wan2.2-ti2v", "WanPipeline", None, 32),
    ],
)
def test_folders_are_recognised_by_their_files(
    registry: ModelRegistry, family_models: Path, tmp_path: Path, name, family, pipeline, boundary,
    multiple,
) -> None:  # fmt: skip
    assert registry.resolve(name).family == family  # the built-in record agrees
    folder = tmp_path / f"copy-{name}"
    shutil.copytree(family_models / name, folder)
    record = registry.resolve(str(folder))
    assert (record.family, record.pipeline, record.boundary_ratio) == (family, pipeline, boundary)
    assert record.size.multiple == multiple and record.defaults.width == 64  # tiny defaults
    (folder / "wangend-tiny.json").unlink()  # an unknown folder of that family
    plain = registry.resolve(str(folder))
    assert plain.family == family and plain.defaults.frames in {81, 121}
    if boundary is not None:
        index = folder / "model_index.json"
        index.write_text(
            index.read_text().replace(f'"boundary_ratio": {boundary}', '"boundary_ratio": 0.5')
        )
        assert registry.resolve(str(folder)).boundary_ratio == 0.5


def test_models_list_says_what_each_model_takes(registry: ModelRegistry) -> None:
    infos = {m.name: m for m in registry.list()}
    assert set(REAL) | {
        "tiny-i2v",
        "tiny-vace",
        "tiny-wan22",
        "tiny-wan22-i2v",
        "tiny-ti2v",
    } <= set(infos)
    assert infos["wan2.1-i2v-720p"].requires == ["image"]
    assert infos["wan2.1-vace-14b"].accepts == ["video", "mask", "reference_images"]
    assert infos["wan2.1-t2v-1.3b"].accepts == ["video", "strength"]
    assert infos["tiny-wan22"].available and infos["tiny-wan22"].family == "wan2.2-t2v"
