"""The daemon's Engine, built from a config as the daemon builds it: what clients may ask
it (validate, loras, presets) and what SIGHUP may change while it runs."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from wangend.config import LoraConfig, load_config
from wangend.errors import InvalidParams
from wangend.protocol import GenerateSpec, LoraRef, MatAnyOneSpec
from wangend.server.engine import Engine

from ..adapters.lora_files import write_lora


@pytest.fixture
def engine(tmp_path: Path, models_dir: Path) -> Engine:
    config = load_config(
        overrides={"state_dir": str(tmp_path / "state"), "output_dir": str(tmp_path / "out")},
        env={"HOME": str(tmp_path)},
    )
    engine = Engine(config)
    engine.registry.models_dir = models_dir  # the session's tiny models, already built
    return engine


def test_validate_resolves_without_running_anything(engine: Engine) -> None:
    answer = engine.validate(GenerateSpec(prompt="a fox", seed=3, frames=5))
    assert answer.spec.frames == 5 and answer.spec.seed == 3
    assert answer.plan["kind"] == "generate" and answer.plan["frames"] == 5
    assert engine.production.pipeline is None  # nothing was loaded
    with pytest.raises(InvalidParams) as info:
        engine.validate(MatAnyOneSpec(input="/nope.mp4", mask="/nope.png"))
    assert info.value.data["field"] == "$.params.input"


def test_loras_and_presets_come_from_the_state_dir_by_default(engine: Engine) -> None:
    state = engine.config.state_path
    (state / "loras" / "wan_tiny").mkdir(parents=True)
    write_lora(state / "loras" / "wan_tiny" / "soft.safetensors", "diffusers", seed=1)
    (state / "presets").mkdir()
    (state / "presets" / "gentle.lset").write_text(
        json.dumps({"loras": ["soft.safetensors"], "loras_mult": "0.4"})
    )
    listed = engine.loras("tiny", state=True)
    assert [lora.name for lora in listed.loras] == ["soft"] and listed.state is not None
    [preset] = engine.presets().presets
    assert preset.name == "gentle" and preset.loras[0].multiplier == "0.4"
    job = engine.resolve(GenerateSpec(prompt="p", preset="gentle"))
    [lora] = job.loras  # named as the .lset names it: by file
    assert lora.path.endswith("soft.safetensors") and lora.multiplier == "0.4"


def test_a_reload_switches_lora_folders_without_touching_the_model(
    engine: Engine, tmp_path: Path
) -> None:
    other = tmp_path / "more-loras"
    (other / "wan_tiny").mkdir(parents=True)
    write_lora(other / "wan_tiny" / "bold.safetensors", "wan", seed=2)
    with pytest.raises(InvalidParams):
        engine.resolve(GenerateSpec(prompt="p", loras=[LoraRef(name="bold")]))
    production = engine.production
    new = msgspec.structs.replace(engine.config, lora=LoraConfig(folders=[str(other)]))
    assert engine.reload(new) == ["lora"]
    job = engine.resolve(GenerateSpec(prompt="p", loras=[LoraRef(name="bold")]))
    assert job.loras[0].path == str(other / "wan_tiny" / "bold.safetensors")
    assert engine.production is production
    assert engine.reload(new) == []


def test_a_dry_run_says_when_the_model_is_not_on_disk(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`valid` must not hide that running the job means a 60 GB download, or a failure."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert engine.validate(GenerateSpec(prompt="a fox", frames=5)).plan["model_on_disk"]
    spec = GenerateSpec(prompt="a fox", model="wan2.1-t2v-1.3b")
    engine.production.allow_download = True
    plan = engine.validate(spec).plan
    assert plan["model_on_disk"] is False
    assert plan["note"] == (
        "model wan2.1-t2v-1.3b is not on disk: the job would first download "
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers from the Hugging Face hub"
    )
    engine.production.allow_download = False
    assert "downloading is off" in engine.validate(spec).plan["note"]


def test_a_reload_adds_a_file_model_and_refuses_a_clashing_one(
    engine: Engine, tmp_path: Path, models_dir: Path
) -> None:
    """A new [models.NAME] is usable after SIGHUP, without a restart (and the warm model);
    one named like a built-in is refused and the tables in force stay."""
    from wangend.config import ModelFiles
    from wangend.errors import ModelUnavailable
    from wangend.pipelines.tiny import ensure_tiny_model

    from ..pipelines.checkpoint_files import write_checkpoint

    ckpt = write_checkpoint(
        ensure_tiny_model(models_dir) / "transformer", tmp_path / "wan_tiny.safetensors"
    )
    spec = GenerateSpec(prompt="a fox", model="comfy", frames=5)
    with pytest.raises(ModelUnavailable):
        engine.validate(spec)
    added = {"comfy": ModelFiles(base="tiny", transformer=str(ckpt))}
    assert engine.reload(msgspec.structs.replace(engine.config, models=added)) == ["models"]
    assert engine.validate(spec).spec.files == {"transformer": str(ckpt)}
    clash = {"tiny": ModelFiles(base="tiny", transformer=str(ckpt))}
    assert engine.reload(msgspec.structs.replace(engine.config, models=clash)) == []
    assert engine.config.models == added and engine.validate(spec).spec.model == "comfy"
