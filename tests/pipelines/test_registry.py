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


@pytest.mark.parametrize("name", ["nope", "a/b/c", "../x", "org/..", "relative/path/", ""])
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
