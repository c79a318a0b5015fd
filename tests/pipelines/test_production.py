"""ProductionManager on real tiny model folders: what forces a reload and what does not,
load progress by component and bytes, parked models within their RAM budget."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from wangend.errors import JobFailure
from wangend.pipelines.acceleration import EngineOptions
from wangend.pipelines.production import ProductionManager, pipeline_bytes
from wangend.pipelines.registry import ModelRegistry

from .conftest import RecordingHooks


@pytest.fixture(scope="module")
def second(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model: a copy of the tiny folder under another name."""
    folder = tmp_path_factory.mktemp("second") / "other"
    shutil.copytree(models_dir / "tiny", folder)
    return folder


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every transformer read from disk (the real loader still runs)."""
    from diffusers import WanTransformer3DModel

    loads: list[str] = []
    real = WanTransformer3DModel.from_pretrained.__func__

    def counting(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", classmethod(counting))
    return loads


def test_load_reports_components_and_bytes(registry: ModelRegistry, models_dir: Path) -> None:
    manager = ProductionManager(registry, device="cpu", allow_download=False)
    hooks = RecordingHooks()
    manager.ensure(registry.resolve("tiny"), EngineOptions(), hooks)
    updates = [data for _model, data in hooks.named("model_loading")]
    sizes = sum(f.stat().st_size for f in (models_dir / "tiny").rglob("*.safetensors"))
    assert updates[0]["components_loaded"] == 0 and updates[0]["reason"] == "cold"
    assert [u["components_loaded"] for u in updates] == list(range(6))
    assert all(u["components_total"] == 5 and u["bytes_total"] == sizes for u in updates)
    loaded = [u["bytes_loaded"] for u in updates]
    assert loaded == sorted(loaded) and loaded[-1] == sizes
    assert {u.get("component") for u in updates[1:]} == {
        "scheduler",
        "text_encoder",
        "tokenizer",
        "transformer",
        "vae",
    }
    (final,) = hooks.named("model_loaded")
    assert final[1]["seconds"] >= 0 and final[1]["memory_profile"] == "none"
    manager.release()


def test_reload_only_when_the_loaded_modules_change(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = ProductionManager(registry, device="cpu", allow_download=False)
    loads = count_loads(monkeypatch)
    record = registry.resolve("tiny")
    first = manager.ensure(record, "auto", RecordingHooks())  # the older call still works
    for per_run in (
        EngineOptions(step_cache="fbc", step_cache_threshold=0.2),
        EngineOptions(attention="flash"),  # falls back to native on CPU
        EngineOptions(memory_profile="sequential"),  # runs as "none" on CPU
    ):
        assert manager.ensure(record, per_run, RecordingHooks()) is first
    assert len(loads) == 1
    for changed in (EngineOptions(dtype="bfloat16"), EngineOptions(memory_profile="group")):
        hooks = RecordingHooks()
        assert manager.ensure(record, changed, hooks) is not first
        assert hooks.named("model_loading")[0][1]["reason"] == "switch"
    assert len(loads) == 3
    manager.release()
    assert manager.pipeline is None and manager.parked == []


def test_parked_models_switch_back_without_reading_disk(
    registry: ModelRegistry, second: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = ProductionManager(registry, device="cpu", allow_download=False)
    size = pipeline_bytes(probe.ensure(registry.resolve("tiny"), "float32", RecordingHooks()))
    probe.release()
    budget_gb = 1.5 * size / (1 << 30)  # room for one parked model, not two
    manager = ProductionManager(
        registry, device="cpu", allow_download=False, keep_models_gb=budget_gb
    )
    loads = count_loads(monkeypatch)
    tiny, other = registry.resolve("tiny"), registry.resolve(str(second))
    first = manager.ensure(tiny, EngineOptions(), RecordingHooks())
    manager.ensure(other, EngineOptions(), RecordingHooks())
    assert manager.parked == [("tiny", size)]
    hooks = RecordingHooks()
    assert manager.ensure(tiny, EngineOptions(), hooks) is first  # from RAM, not from disk
    assert hooks.named("model_loaded")[0][1]["reason"] == "unpark"
    assert len(loads) == 2 and [m for m, _ in manager.parked] == [str(second)]
    shutil.copytree(second, second.parent / "third", dirs_exist_ok=True)
    third = registry.resolve(str(second.parent / "third"))
    manager.ensure(third, EngineOptions(), RecordingHooks())  # evicts the oldest parked
    assert len(manager.parked) == 1 and sum(s for _, s in manager.parked) <= budget_gb * (1 << 30)
    assert [m for m, _ in manager.parked] == ["tiny"]
    manager.release()


def test_missing_component_is_named(registry: ModelRegistry, second: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(second, broken)
    record = registry.resolve(str(broken))
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    manager = ProductionManager(registry, device="cpu", allow_download=False)
    with pytest.raises(JobFailure) as info:
        manager.ensure(record, EngineOptions(), RecordingHooks())
    assert info.value.kind == "ModelUnavailable" and "vae/*.safetensors" in info.value.message


def test_hub_model_offline_fails_in_one_sentence(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = ProductionManager(registry, device="cpu")
    with pytest.raises(JobFailure) as info:
        manager.ensure(registry.resolve("nobody-here/no-model"), EngineOptions(), RecordingHooks())
    assert "downloading is switched off" in info.value.message and "\n" not in info.value.message
