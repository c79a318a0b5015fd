"""What a diffusers folder (or a cached hub model) holds: its missing parts and its
Wan family, read from its own files (model_index.json, the transformer's and VAE's
configs). Cheap: stat calls and small JSON reads, so it runs on every enqueue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .catalog import (
    FAMILY_BOUNDARY,
    FLF2V_CAPABILITIES,
    REQUIRED_COMPONENTS,
    WAN21_I2V,
    WAN21_T2V,
    WAN21_VACE,
    WAN22_I2V,
    WAN22_T2V,
    WAN22_TI2V,
)

__all__ = ["check_folder", "detect", "hub_cached", "hub_reader", "read_json"]


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_weights(folder: Path, name: str) -> list[str]:
    """Problems with one model component: config and safetensors weights (sharded ones
    through their index). Pickled `.bin` weights are never loaded, so they do not count."""
    if not (folder / "config.json").is_file():
        return [f"{name}/config.json"]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0]) or {}
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            return [f"{name}/{indexes[0].name} (unreadable or empty)"]
        return [f"{name}/{shard}" for shard in shards if not (folder / shard).is_file()]
    if any(folder.glob("*.safetensors")):
        return []
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        return [f"{name}/*.safetensors (only pickled weights, which wangend does not load)"]
    return [f"{name}/*.safetensors"]


def _present(index: dict) -> set[str]:
    """Components model_index.json lists with a class (`[null, null]` means absent)."""
    listed = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    return {k for k, v in listed.items() if len(v) == 2 and v[0] and v[1]}


def check_folder(folder: Path) -> tuple[str | None, list[str]]:
    """Inspect a diffusers folder: (pipeline class name, list of missing parts)."""
    index = read_json(folder / "model_index.json")
    if index is None:
        return None, ["model_index.json"]
    pipeline = index.get("_class_name")
    missing: list[str] = []
    present = _present(index)
    for name in REQUIRED_COMPONENTS:
        if name not in present:
            missing.append(f"{name} (not listed in model_index.json)")
    if not present & {"transformer", "transformer_2"}:
        missing.append("transformer (not listed in model_index.json)")
    for name in sorted(present):
        sub = folder / name
        if not sub.is_dir():
            missing.append(f"{name}/ folder")
        elif name == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                missing.append("scheduler/scheduler_config.json")
        elif name == "tokenizer":
            if not ((sub / "tokenizer.json").is_file() or (sub / "spiece.model").is_file()):
                missing.append("tokenizer/tokenizer.json (or spiece.model)")
        elif name == "image_processor":
            if not (sub / "preprocessor_config.json").is_file():
                missing.append("image_processor/preprocessor_config.json")
        else:
            missing.extend(_check_weights(sub, name))
    return pipeline if isinstance(pipeline, str) else None, missing


def detect(index: dict, read: Callable[[str], dict | None]) -> dict:
    """Family and model facts from a folder's model_index.json; `read("vae/config.json")`
    gives a component config (or None). Returns the family_record keyword arguments."""
    pipeline = index.get("_class_name")
    present = _present(index)
    two = "transformer_2" in present
    main = read("transformer/config.json") or read("transformer_2/config.json") or {}
    vae = read("vae/config.json") or {}
    z_dim = vae.get("z_dim", 16)
    boundary = index.get("boundary_ratio")
    boundary = float(boundary) if isinstance(boundary, int | float) else None
    capabilities = None
    if pipeline == "WanVACEPipeline":
        family = WAN21_VACE
    elif index.get("expand_timesteps") or z_dim == 48:
        family = WAN22_TI2V
    elif pipeline == "WanImageToVideoPipeline":
        family = WAN22_I2V if two or "image_encoder" not in present else WAN21_I2V
        if family == WAN21_I2V and main.get("pos_embed_seq_len"):
            capabilities = FLF2V_CAPABILITIES
    else:
        family = WAN22_T2V if two else WAN21_T2V
    if two and boundary is None:
        boundary = FAMILY_BOUNDARY.get(family, 0.875)
    patch = main.get("patch_size") or [1, 2, 2]
    spatial = vae.get("scale_factor_spatial") or (16 if z_dim == 48 else 8)
    multiple = int(spatial) * int(patch[1]) if isinstance(patch, list) and len(patch) == 3 else None
    return {
        "family": family,
        "pipeline": pipeline,
        "boundary_ratio": boundary if two else None,
        "capabilities": capabilities,
        "multiple": multiple,
    }


def hub_cached(repo_id: str) -> bool:
    """Cheap: the index and the transformer config are in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return all(
            isinstance(try_to_load_from_cache(repo_id, name), str)
            for name in ("model_index.json", "transformer/config.json")
        )
    except Exception:  # a malformed id or unreadable cache: simply not available
        return False


def hub_reader(repo_id: str) -> Callable[[str], dict | None]:
    """Reads a cached file of a hub repo; None when it is not cached (nothing downloads)."""

    def read(name: str) -> dict | None:
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(repo_id, name)
        except Exception:
            return None
        return read_json(Path(path)) if isinstance(path, str) else None

    return read
