import json
import os
from pathlib import Path

import pytest

from wangend.adapters.lora import LoRALibrary
from wangend.adapters.payload import build_lora_payload
from wangend.adapters.presets import PresetError, PresetLibrary
from wangend.errors import InvalidParams
from wangend.protocol import LoraRef

from .fifo import without_hanging
from .lora_files import write_lora


@pytest.fixture
def presets(tmp_path: Path) -> PresetLibrary:
    root = tmp_path / "presets"
    (root / "wan").mkdir(parents=True)
    lset = {
        "loras": ["peft.safetensors", "orig.safetensors"],
        "loras_mult": "# strengths\n1 0.5,0",
        "prompt": "# trigger words\nanime style",
        "full_prompt": False,
        "activated_loras": ["ignored"],  # unknown keys are ignored
    }
    (root / "anime.lset").write_text(json.dumps(lset))
    (root / "full.lset").write_text(
        json.dumps({"loras": ["peft.safetensors"], "prompt": "a cat", "full_prompt": True})
    )
    ours = {
        "format": "wangend-preset/1",
        "loras": [{"name": "kohya", "multiplier": "1;0"}],
        "description": "2.2",
    }
    (root / "wan" / "ours.json").write_text(json.dumps(ours))
    (root / "badtype.lset").write_text(json.dumps({"loras": "peft.safetensors"}))
    (root / "toomany.lset").write_text(json.dumps({"loras": ["a"], "loras_mult": "1 2"}))
    (root / "typo.json").write_text(json.dumps({"format": "wangend-preset/1", "lora": []}))
    (root / "notjson.lset").write_text("{")
    return PresetLibrary([root])


@pytest.fixture
def library(tmp_path: Path) -> LoRALibrary:
    folder = tmp_path / "loras" / "wan_tiny"
    folder.mkdir(parents=True)
    write_lora(folder / "peft.safetensors", "diffusers", seed=1)
    write_lora(folder / "orig.safetensors", "wan", seed=2)
    write_lora(folder / "kohya.safetensors", "kohya", seed=3)
    (folder / "broken.safetensors").write_bytes(b"nonsense")
    (folder / "empty.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return LoRALibrary([tmp_path / "loras"])


def test_lset_is_read_leniently(presets: PresetLibrary) -> None:
    preset = presets.load("anime")
    assert [(r.name, r.multiplier) for r in preset.loras] == [
        ("peft.safetensors", "1"),
        ("orig.safetensors", "0.5,0"),
    ]
    assert preset.prompt == "anime style" and preset.prompt_mode == "prefix"
    assert preset.apply_prompt("a fox") == "anime style a fox"
    assert presets.load("full").apply_prompt("a fox") == "a cat"
    assert presets.load("wan/ours").loras == [LoraRef(name="kohya", multiplier="1;0")]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("badtype", "`loras` must be a list"),
        ("toomany", "2 values for 1 LoRAs"),
        ("typo", "lora"),
        ("notjson", "not valid JSON"),
        ("nope", "no preset named"),
        ("../x", "inside the preset folder"),
    ],
)
def test_preset_errors(presets: PresetLibrary, name: str, words: str) -> None:
    with pytest.raises(PresetError, match=words):
        presets.load(name)


def test_list_shows_good_and_bad_presets(presets: PresetLibrary) -> None:
    infos = {info.name: info for info in presets.list()}
    assert (
        infos["anime"].loras == ["peft.safetensors", "orig.safetensors"]
        and infos["anime"].has_prompt
    )
    assert infos["wan/ours"].description == "2.2"
    assert infos["badtype"].error


def test_payload_merges_preset_and_job(library: LoRALibrary, presets: PresetLibrary) -> None:
    preset = presets.load("anime")
    out = build_lora_payload(
        library,
        "wan2.1-t2v",
        [LoraRef(name="orig", multiplier="0.25"), LoraRef(name="kohya")],
        preset,
        size="tiny",
    )
    assert [(r.name, r.multiplier) for r in out] == [
        ("peft.safetensors", "1"),
        ("orig", "0.25"),  # the job's multiplier replaces the preset's, in the preset's place
        ("kohya", "1"),
    ]
    assert all(len(r.sha256) == 64 and Path(r.path).is_absolute() for r in out)
    assert build_lora_payload(library, "wan2.1-t2v", None, None, size="tiny") == []


@pytest.mark.parametrize(
    ("refs", "field", "words"),
    [
        ([LoraRef(name="peft"), LoraRef(name="missing")], "$.params.loras[1]", "no LoRA named"),
        ([LoraRef(name="../../etc/passwd")], "$.params.loras[0]", "inside the LoRA folder"),
        ([LoraRef(name="peft", multiplier="1,a")], "$.params.loras[0]", "'a'"),
        ([LoraRef(name="peft", multiplier="1;0")], "$.params.loras[0]", "2 phases"),
        ([LoraRef(name="broken")], "$.params.loras[0]", "broken"),
        ([LoraRef(name="empty")], "$.params.loras[0]", "no LoRA weights"),
        ([LoraRef(name="peft"), LoraRef(name="peft.safetensors")], "$.params.loras[1]", "twice"),
    ],
)
def test_payload_errors_name_the_field(library: LoRALibrary, refs, field: str, words: str) -> None:
    with pytest.raises(InvalidParams) as info:
        build_lora_payload(library, "wan2.1-t2v", refs, None, size="tiny")
    assert info.value.field == field and words in info.value.message


def test_two_phase_multiplier_is_fine_for_wan22(tmp_path: Path) -> None:
    folder = tmp_path / "wan2_2"
    folder.mkdir()
    write_lora(folder / "x.safetensors", "wan", seed=1)
    out = build_lora_payload(
        LoRALibrary([tmp_path]), "wan2.2-t2v", [LoraRef(name="x", multiplier="1;0")], None
    )
    assert out[0].multiplier == "1;0"


def test_preset_lora_errors_name_the_preset(library: LoRALibrary, presets: PresetLibrary) -> None:
    with pytest.raises(InvalidParams) as info:
        build_lora_payload(library, "wan2.1-t2v", None, presets.load("wan/ours"), size="tiny")
    assert info.value.field == "$.params.preset"  # "1;0" on a one-expert family


def test_a_named_pipe_among_the_presets_is_passed_over_unopened(
    presets: PresetLibrary, tmp_path: Path
) -> None:
    root = tmp_path / "presets"
    pipes = [root / "pipe.json", root / "wan" / "pipe.lset"]
    for pipe in pipes:
        os.mkfifo(pipe)
    names = [info.name for info in without_hanging(presets.list, pipes)]
    assert "pipe" not in names and "wan/pipe" not in names and "wan/ours" in names
    with pytest.raises(PresetError, match="no preset named 'pipe'"):
        without_hanging(lambda: presets.load("pipe"), pipes)
    assert without_hanging(lambda: presets.load("anime"), pipes).name == "anime"
