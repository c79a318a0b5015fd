"""Loading weights by key: round trips, clear refusals, no unpickling, no downloads."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import msgspec
import pytest
import torch

from wangend.matting.config import TINY
from wangend.matting.weights import WeightsError, build_network, load_state, save_state


def _with_config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"model": msgspec.to_builtins(TINY)}))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_state_dict_round_trips_exactly(tmp_path: Path, suffix: str) -> None:
    net, _ = build_network("tiny", seed=7)
    path = save_state(net, tmp_path / f"matanyone{suffix}")
    _with_config(tmp_path)
    loaded, source = build_network(str(path))
    assert source == str(path.resolve())
    a, b = net.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pth_needing_arbitrary_unpickling_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # would run code under a plain torch.load
            return (print, ("should never run",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"x": Payload()}, handle, protocol=2)
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_state(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        build_network(str(tmp_path / "nope.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read weights"):
        build_network(str(junk))


def test_mismatching_keys_and_shapes_are_named(tmp_path: Path) -> None:
    net, _ = build_network("tiny")
    state = dict(net.state_dict())
    del state["mask_decoder.pred_mat.weight"]
    state["extra.layer.weight"] = torch.zeros(1)
    state["key_proj.key_proj.bias"] = torch.zeros(99)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    _with_config(tmp_path)
    with pytest.raises(WeightsError) as info:
        build_network(str(path))
    message = str(info.value)
    assert "1 missing: mask_decoder.pred_mat.weight" in message
    assert "1 unexpected: extra.layer.weight" in message
    assert "key_proj.key_proj.bias (99,)" in message


def test_training_only_keys_may_be_absent_and_multi_object_input_is_narrowed(
    tmp_path: Path,
) -> None:
    net, _ = build_network("tiny", seed=2)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("aux_computer.")}
    for key in ("mask_encoder.conv1.weight", "pixel_fuser.sensory_compress.weight"):
        extra = torch.zeros_like(state[key][:, :1])
        state[key] = torch.cat([state[key], extra], dim=1)  # as a multi-object checkpoint
    path = tmp_path / "multi.pth"
    torch.save({"network": state}, path)
    _with_config(tmp_path)
    loaded, _ = build_network(str(path))
    got = loaded.state_dict()
    assert torch.equal(
        got["mask_encoder.conv1.weight"], net.state_dict()["mask_encoder.conv1.weight"]
    )


def test_hub_id_is_looked_up_in_the_local_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache"):
        build_network("PeiqingYang/MatAnyone")
    with pytest.raises(WeightsError, match="neither"):
        build_network("not-a-hub-id")
