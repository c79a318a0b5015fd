"""The tiny model builds offline, deterministically, atomically, and loads like any other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from wangend.pipelines.tiny import MARKER, TINY_VERSION, build_tiny_pipeline, ensure_tiny_model

COMPONENTS = ("transformer", "vae", "text_encoder")


def weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: load_file(next((folder / c).glob("*.safetensors"))) for c in COMPONENTS}


def test_same_seed_same_weights_and_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    a, b = build_tiny_pipeline(seed=7), build_tiny_pipeline(seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = build_tiny_pipeline(seed=8).transformer.state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in a.transformer.state_dict().items())


def test_folder_is_safetensors_only_and_reproducible(models_dir: Path, tmp_path: Path) -> None:
    folder = models_dir / "tiny"
    marker = json.loads((folder / MARKER).read_text())
    assert marker["version"] == TINY_VERSION
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pkl", ".ckpt"}]
    assert all(list((folder / c).glob("*.safetensors")) for c in COMPONENTS)
    assert not list(models_dir.glob(".tiny.*"))  # no build folder left behind

    again = ensure_tiny_model(tmp_path)
    first, second = weights(folder), weights(again)
    for c in COMPONENTS:
        assert first[c].keys() == second[c].keys()
        assert all(torch.equal(first[c][k], second[c][k]) for k in first[c])


def test_reloads_offline_with_from_pretrained(models_dir: Path) -> None:
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(
        models_dir / "tiny", use_safetensors=True, local_files_only=True
    )
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    ids = pipe.tokenizer("ünïcode 日本").input_ids
    assert ids[-1] == pipe.tokenizer.eos_token_id and pipe.tokenizer.unk_token_id not in ids


def test_complete_folder_is_kept_and_broken_one_rebuilt(models_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(models_dir / "tiny", tmp_path / "tiny")
    index = tmp_path / "tiny" / "model_index.json"
    before = index.stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == tmp_path / "tiny"
    assert index.stat().st_mtime_ns == before  # nothing rebuilt

    # A crash half way: parts missing and no marker. It must be rebuilt, not trusted.
    (tmp_path / "tiny" / MARKER).unlink()
    shutil.rmtree(tmp_path / "tiny" / "transformer")
    live = f".tiny.{os.getpid()}.abc.tmp"  # a builder still at work: its folder stays
    (tmp_path / live).mkdir()
    folder = ensure_tiny_model(tmp_path)
    assert (folder / MARKER).is_file()
    assert list((folder / "transformer").glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [live, "tiny"]

    # A builder killed mid-build leaves its folder; it goes, though the model is whole.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".tiny.{dead.pid}.xyz.tmp").mkdir()
    assert ensure_tiny_model(tmp_path) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [live, "tiny"]


def test_every_family_builds_deterministically_and_atomically(tmp_path: Path) -> None:
    import pytest

    from wangend.pipelines.tiny import TINY_NAMES, build_tiny_variant

    for name in TINY_NAMES[1:]:
        a, b = build_tiny_variant(name, seed=3), build_tiny_variant(name, seed=3)
        for part in ("transformer", "transformer_2", "image_encoder", "vae"):
            if getattr(a, part, None) is None:
                continue
            sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (name, part)
        folder = ensure_tiny_model(tmp_path, name=name)
        assert folder == tmp_path / name
        assert json.loads((folder / MARKER).read_text())["name"] == name
        assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pkl"}]
    two = build_tiny_variant("tiny-wan22")
    assert not torch.equal(two.transformer.blocks[0].ffn.net[0].proj.weight,
                           two.transformer_2.blocks[0].ffn.net[0].proj.weight)  # fmt: skip
    assert build_tiny_variant("tiny-ti2v").vae.config.z_dim == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TINY_NAMES[1:])
    with pytest.raises(ValueError, match="tiny-i2v"):
        ensure_tiny_model(tmp_path, name="tiny-nope")
    # A folder holding another variant (wrong marker name) is rebuilt, not trusted.
    shutil.rmtree(tmp_path / "tiny-vace")
    shutil.copytree(tmp_path / "tiny-i2v", tmp_path / "tiny-vace")
    ensure_tiny_model(tmp_path, name="tiny-vace")
    index = json.loads((tmp_path / "tiny-vace" / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline"
