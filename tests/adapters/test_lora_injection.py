"""LoRAs injected into the real tiny Wan pipeline through diffusers/peft."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="LoRA injection needs peft (diffusers' LoRA backend)")

from wangend.adapters.lora import LoRALibrary
from wangend.adapters.lora_injection import LoRAInjectionManager
from wangend.errors import JobFailure
from wangend.protocol import ResolvedLora

from .conftest import run_tiny
from .lora_files import write_lora


def ref(path: Path, multiplier: str = "1", sha: str = "") -> ResolvedLora:
    return ResolvedLora(name=path.stem, path=str(path), multiplier=multiplier, sha256=sha)


@pytest.fixture(scope="module")
def base(tiny_pipe) -> torch.Tensor:
    return run_tiny(tiny_pipe)


@pytest.fixture
def manager(tiny_pipe):
    """A fresh manager per test; the pipeline is shared, so each test starts by clearing
    whatever adapters an earlier test left loaded."""
    present = [a for names in tiny_pipe.get_list_adapters().values() for a in names]
    if present:
        tiny_pipe.delete_adapters(present)
    return LoRAInjectionManager(budget=4)


def adapters(pipe) -> set[str]:
    return {a for names in pipe.get_list_adapters().values() for a in names}


def scaling(pipe, adapter: str, module: str = "blocks.0.attn1.to_q", transformer="transformer"):
    layer = dict(getattr(pipe, transformer).named_modules())[module]
    return layer.scaling[adapter]


@pytest.mark.parametrize("layout", ["peft", "orig", "kohya"])
def test_each_layout_changes_output_and_zero_equals_base(
    tiny_pipe, base, manager, lora_root: Path, layout: str
) -> None:
    path = lora_root / "wan_tiny" / f"{layout}.safetensors"
    manager.hydrate(tiny_pipe, [ref(path, "1")])
    assert not torch.equal(run_tiny(tiny_pipe), base)
    state = manager.hydrate(tiny_pipe, [ref(path, "0")])
    assert state.loaded == [] and len(state.reused) == 1
    assert torch.equal(run_tiny(tiny_pipe), base)
    manager.hydrate(tiny_pipe, [])
    assert torch.equal(run_tiny(tiny_pipe), base)


def test_kohya_alpha_equals_original_wan_layout(tiny_pipe, manager, tmp_path: Path) -> None:
    """alpha == rank: the musubi/kohya file carries the same weights as the Wan one."""
    wan = write_lora(tmp_path / "w.safetensors", "wan", seed=21)
    kohya = write_lora(tmp_path / "k.safetensors", "kohya", seed=21)
    manager.hydrate(tiny_pipe, [ref(wan)])
    first = run_tiny(tiny_pipe)
    manager.hydrate(tiny_pipe, [ref(kohya)])
    assert torch.equal(run_tiny(tiny_pipe), first)


def test_two_loras_mix(tiny_pipe, base, manager, lora_root: Path) -> None:
    a = lora_root / "wan_tiny" / "peft.safetensors"  # attention only
    b = lora_root / "wan_tiny" / "orig.safetensors"  # attention and FFN
    manager.hydrate(tiny_pipe, [ref(a, "1")])
    only_a = run_tiny(tiny_pipe)
    manager.hydrate(tiny_pipe, [ref(b, "1")])
    only_b = run_tiny(tiny_pipe)
    state = manager.hydrate(tiny_pipe, [ref(a, "1"), ref(b, "0.5")])
    both = run_tiny(tiny_pipe)
    assert [x.name for x in state.active] == ["peft", "orig"]
    assert manager.snapshot_state()["weights"] == [1.0, 0.5]
    for other in (base, only_a, only_b):
        assert not torch.equal(both, other)
    # b at 0 inside the mix gives exactly a alone
    manager.hydrate(tiny_pipe, [ref(a, "1"), ref(b, "0")])
    assert torch.equal(run_tiny(tiny_pipe), only_a)


def test_schedule_changes_weights_per_step(tiny_pipe, base, manager, lora_root: Path) -> None:
    path = lora_root / "wan_tiny" / "orig.safetensors"
    state = manager.hydrate(tiny_pipe, [ref(path, "1,0.5,0")])
    adapter = state.active[0].adapter
    seen = [scaling(tiny_pipe, adapter)]
    changed = []

    def callback(pipe, i, t, kwargs):
        changed.append(manager.apply_step(pipe, i + 1, 3))
        seen.append(scaling(pipe, adapter))
        return {}

    scheduled = run_tiny(tiny_pipe, steps=3, callback=callback)
    # peft's scaling is weight * alpha / rank; this LoRA has alpha == rank
    assert seen == [1.0, 0.5, 0.0, 0.0]
    assert changed == [True, True, False]  # step 3 does not exist: clamps, no change
    manager.hydrate(tiny_pipe, [ref(path, "1")])
    assert not torch.equal(scheduled, run_tiny(tiny_pipe))
    assert not torch.equal(scheduled, base)


def test_switching_reuses_loaded_adapters(tiny_pipe, manager, lora_root: Path, monkeypatch) -> None:
    calls = []
    original = tiny_pipe.load_lora_weights
    monkeypatch.setattr(
        tiny_pipe, "load_lora_weights", lambda *a, **k: calls.append(k) or original(*a, **k)
    )
    a = ref(lora_root / "wan_tiny" / "peft.safetensors")
    b = ref(lora_root / "wan_tiny" / "kohya.safetensors")
    manager.hydrate(tiny_pipe, [a])
    first = run_tiny(tiny_pipe)
    manager.hydrate(tiny_pipe, [b])
    state = manager.hydrate(tiny_pipe, [a])
    assert len(calls) == 2  # a and b once each; the second `a` job loads nothing
    assert state.loaded == [] and state.reused == [state.active[0].adapter]
    assert torch.equal(run_tiny(tiny_pipe), first)
    assert all(name.startswith("lora_") and name.isidentifier() for name in adapters(tiny_pipe))


def test_budget_evicts_least_recently_used(tiny_pipe, manager, lora_root: Path) -> None:
    manager.budget = 1
    folder = lora_root / "wan_tiny"
    states = [
        manager.hydrate(tiny_pipe, [ref(folder / f"{n}.safetensors")])
        for n in ("peft", "orig", "kohya")
    ]
    names = [s.active[0].adapter for s in states]
    assert states[2].evicted == [names[0]]
    assert adapters(tiny_pipe) == {names[1], names[2]}
    state = manager.hydrate(tiny_pipe, [])  # now both are inactive: one may stay
    assert state.evicted == [names[1]] and adapters(tiny_pipe) == {names[2]}
    assert manager.snapshot_state()["evictions"] >= 1


def bad_files(folder: Path, lora_root: Path) -> dict[str, tuple[Path, str]]:
    good = lora_root / "wan_tiny" / "peft.safetensors"
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    garbage = folder / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    wide = write_lora(folder / "wide.safetensors", "diffusers", seed=1, dim=48)
    from safetensors.torch import save_file

    elsewhere = folder / "elsewhere.safetensors"
    save_file(
        {
            "transformer.blocks.9.attn1.to_q.lora_A.weight": torch.zeros(4, 24),
            "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.zeros(24, 4),
        },
        str(elsewhere),
    )
    kohya_partial = folder / "kohya_partial.safetensors"
    save_file(
        {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 24)}, str(kohya_partial)
    )
    return {
        "missing": (folder / "missing.safetensors", "is missing"),
        "truncated": (truncated, "truncated"),
        "garbage": (garbage, "safetensors"),
        "wrong shapes": (wide, "does not fit"),
        "no such module": (elsewhere, "does not fit"),
        "unconvertible": (kohya_partial, "does not fit"),
    }


def test_bad_files_fail_before_any_step_and_leave_the_pipeline_clean(
    tiny_pipe, base, manager, lora_root: Path, tmp_path: Path
) -> None:
    good = ref(lora_root / "wan_tiny" / "orig.safetensors", "1")
    manager.hydrate(tiny_pipe, [good])
    with_good = run_tiny(tiny_pipe)
    before = adapters(tiny_pipe)
    for what, (path, words) in bad_files(tmp_path, lora_root).items():
        with pytest.raises(JobFailure) as info:
            manager.hydrate(tiny_pipe, [good, ref(path)])
        assert info.value.kind == "LoraUnavailable", what
        assert path.name in info.value.message and words in info.value.message, what
        assert "\n" not in info.value.message
        assert adapters(tiny_pipe) == before, what
        # the previous job's activation is still in place ...
        assert torch.equal(run_tiny(tiny_pipe), with_good), what
    # ... and the next job without LoRAs gets the base frames
    manager.hydrate(tiny_pipe, [])
    assert torch.equal(run_tiny(tiny_pipe), base)


def test_file_changed_since_enqueue(tiny_pipe, manager, tmp_path: Path) -> None:
    path = write_lora(tmp_path / "c.safetensors", "diffusers", seed=3)
    digest = LoRALibrary([]).sha256(path)
    write_lora(path, "diffusers", seed=4)
    with pytest.raises(JobFailure, match="changed after the job was queued"):
        manager.hydrate(tiny_pipe, [ref(path, sha=digest)])


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps")
def test_a_cached_adapter_is_not_its_files_pages(tiny_pipe, base, manager, tmp_path: Path) -> None:
    """A LoRA file rewritten (or cut short) while its adapter is cached must neither
    change the adapter nor kill the daemon: nothing maps it."""
    path = write_lora(tmp_path / "mapped.safetensors", "diffusers", seed=5)
    manager.hydrate(tiny_pipe, [ref(path)])
    with_lora = run_tiny(tiny_pipe)
    assert str(path) not in Path("/proc/self/maps").read_text()
    path.write_bytes(b"")  # cut to nothing under the cached adapter
    assert torch.equal(run_tiny(tiny_pipe), with_lora)
    manager.hydrate(tiny_pipe, [])


def test_two_expert_pipeline_gets_per_phase_weights(tiny_pipe, lora_root: Path) -> None:
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=tiny_pipe.tokenizer,
        text_encoder=tiny_pipe.text_encoder,
        vae=tiny_pipe.vae,
        transformer=copy.deepcopy(tiny_pipe.transformer),
        transformer_2=copy.deepcopy(tiny_pipe.transformer),
        scheduler=tiny_pipe.scheduler,
        boundary_ratio=0.5,
    )
    for t in (pipe.transformer, pipe.transformer_2):  # copies of a shared, maybe-injected model
        names = list(getattr(t, "peft_config", {}) or {})
        if names:
            t.delete_adapters(names)
    manager = LoRAInjectionManager(budget=2)
    state = manager.hydrate(pipe, [ref(lora_root / "wan_tiny" / "orig.safetensors", "1;0")])
    adapter = state.active[0].adapter
    assert adapter in pipe.transformer_2.peft_config
    assert scaling(pipe, adapter) == 1.0
    assert scaling(pipe, adapter, transformer="transformer_2") == 0.0
    manager.hydrate(pipe, [ref(lora_root / "wan_tiny" / "orig.safetensors", "1,0.5;0.25,0")])
    assert manager.apply_step(pipe, 2, 8, boundary=4)
    assert scaling(pipe, adapter) == 0.5
    assert scaling(pipe, adapter, transformer="transformer_2") == 0.25
    manager.apply_step(pipe, 7, 8, boundary=4)
    assert scaling(pipe, adapter, transformer="transformer_2") == 0.0
