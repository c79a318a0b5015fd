"""Model records: which models wangend knows, where their files come from, and the
defaults and size rules each one brings.

A job names its model in one of four ways, tried in this order:

1. a built-in name: "tiny" (built offline on first use), "wan2.1-t2v-1.3b", "wan2.1-t2v-14b";
2. a diffusers folder dropped into the models directory, named by its folder name;
3. an absolute path (or `~/...`) to a diffusers folder (one with model_index.json);
4. a Hugging Face hub id ("org/name"), loaded from the local cache or downloaded.

Anything else is refused at enqueue time with ModelUnavailable, and a local folder is
checked for its parts then too, so a job never waits in the queue only to fail on a
missing `transformer/`. Checks here are cheap (stat and small JSON reads): the registry is
asked on every enqueue and by `models`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import Struct

from ..errors import ModelUnavailable
from ..protocol import ModelInfo

__all__ = ["ModelDefaults", "ModelRecord", "ModelRegistry", "SizeRules", "check_folder"]

WAN21_T2V = "wan2.1-t2v"
# diffusers pipeline classes this daemon can run, by family.
SUPPORTED_PIPELINES = {"WanPipeline": WAN21_T2V}
# Component name -> how to check it. Anything else listed in model_index.json is a model.
REQUIRED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
TINY_MARKER = "wangend-tiny.json"  # written by tiny.ensure_tiny_model
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SizeRules(Struct, frozen=True, kw_only=True):
    """What sizes the model accepts: width and height a multiple of `multiple` (VAE
    stride x patch size), frames of the form `frame_step * k + 1` (temporal VAE stride)."""

    multiple: int = 16
    frame_step: int = 4


class ModelDefaults(Struct, frozen=True, kw_only=True):
    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    fps: int
    flow_shift: float
    negative_prompt: str = ""


class ModelRecord(Struct, frozen=True, kw_only=True):
    name: str  # what jobs record as `model`
    family: str
    source: str  # what from_pretrained loads: a local folder or a hub id
    kind: Literal["builtin", "hub", "local"]
    description: str = ""
    defaults: ModelDefaults
    size: SizeRules = SizeRules()
    pipeline: str = "WanPipeline"
    tiny: bool = False  # built by tiny.ensure_tiny_model before loading


# Our own short list of what Wan 2.1 output should avoid; users override it per job.
WAN_NEGATIVE = (
    "blurry, low quality, worst quality, overexposed, static, still frame, subtitles, "
    "watermark, jpeg artifacts, deformed, extra fingers, bad hands, bad face, messy background"
)
WAN_1_3B_DEFAULTS = ModelDefaults(
    width=832,
    height=480,
    frames=81,
    steps=50,
    guidance_scale=5.0,
    fps=16,
    flow_shift=3.0,
    negative_prompt=WAN_NEGATIVE,
)
TINY_DEFAULTS = ModelDefaults(
    width=64, height=64, frames=9, steps=4, guidance_scale=5.0, fps=8, flow_shift=3.0
)


def builtin_records(models_dir: Path) -> dict[str, ModelRecord]:
    return {
        "tiny": ModelRecord(
            name="tiny",
            family=WAN21_T2V,
            source=str(models_dir / "tiny"),
            kind="builtin",
            description="tiny random Wan 2.1 T2V model built offline (demo and tests)",
            defaults=TINY_DEFAULTS,
            tiny=True,
        ),
        "wan2.1-t2v-1.3b": ModelRecord(
            name="wan2.1-t2v-1.3b",
            family=WAN21_T2V,
            source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            kind="hub",
            description="Wan 2.1 text-to-video, 1.3B parameters, 480p",
            defaults=WAN_1_3B_DEFAULTS,
        ),
        "wan2.1-t2v-14b": ModelRecord(
            name="wan2.1-t2v-14b",
            family=WAN21_T2V,
            source="Wan-AI/Wan2.1-T2V-14B-Diffusers",
            kind="hub",
            description="Wan 2.1 text-to-video, 14B parameters, 720p",
            defaults=msgspec.structs.replace(
                WAN_1_3B_DEFAULTS, width=1280, height=720, flow_shift=5.0
            ),
        ),
    }


def _read_json(path: Path) -> dict | None:
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
        index = _read_json(indexes[0]) or {}
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            return [f"{name}/{indexes[0].name} (unreadable or empty)"]
        return [f"{name}/{shard}" for shard in shards if not (folder / shard).is_file()]
    if any(folder.glob("*.safetensors")):
        return []
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        return [f"{name}/*.safetensors (only pickled weights, which wangend does not load)"]
    return [f"{name}/*.safetensors"]


def check_folder(folder: Path) -> tuple[str | None, list[str]]:
    """Inspect a diffusers folder: (pipeline class name, list of missing parts)."""
    index = _read_json(folder / "model_index.json")
    if index is None:
        return None, ["model_index.json"]
    pipeline = index.get("_class_name")
    missing: list[str] = []
    listed = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    present = {k for k, v in listed.items() if len(v) == 2 and v[0] and v[1]}
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
        else:
            missing.extend(_check_weights(sub, name))
    return pipeline if isinstance(pipeline, str) else None, missing


def _hub_cached(repo_id: str) -> bool:
    """Cheap: the index and the transformer config are in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return all(
            isinstance(try_to_load_from_cache(repo_id, name), str)
            for name in ("model_index.json", "transformer/config.json")
        )
    except Exception:  # a malformed id or unreadable cache: simply not available
        return False


class ModelRegistry:
    """Resolves model names to records; owns no loaded weights (production.py does)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir).expanduser().absolute()
        self._builtins = builtin_records(self.models_dir)

    @property
    def names(self) -> list[str]:
        return list(self._builtins)

    def resolve(self, name: str) -> ModelRecord:
        """The record for `name`; ModelUnavailable says what was tried when none fits."""
        name = name.strip()
        if name in self._builtins:
            return self._builtins[name]
        for record in self._builtins.values():
            if record.kind == "hub" and record.source == name:
                return record
        if name.startswith(("/", "~")):
            return self._local(Path(name).expanduser(), name=str(Path(name).expanduser()))
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) and name != "tiny":
            folder = self.models_dir / name
            if (folder / "model_index.json").is_file():
                return self._local(folder, name=name)
        if HUB_ID.match(name) and ".." not in name:
            return ModelRecord(
                name=name,
                family=WAN21_T2V,
                source=name,
                kind="hub",
                description="Hugging Face hub model",
                defaults=WAN_1_3B_DEFAULTS,
            )
        raise ModelUnavailable(
            f"unknown model {name!r}: not a built-in name ({', '.join(self._builtins)}), "
            f"not a model folder in {self.models_dir}, not an absolute path to a diffusers "
            "folder and not a Hugging Face hub id (org/name)",
            {"model": name},
        )

    def _local(self, folder: Path, name: str) -> ModelRecord:
        folder = folder.absolute()
        if not folder.is_dir():
            raise ModelUnavailable(f"model folder {folder} does not exist", {"model": name})
        pipeline, missing = check_folder(folder)
        if missing:
            raise ModelUnavailable(
                f"model folder {folder} is incomplete: missing {', '.join(missing)}",
                {"model": name, "missing": missing},
            )
        if pipeline not in SUPPORTED_PIPELINES:
            raise ModelUnavailable(
                f"model folder {folder} holds a {pipeline} pipeline; wangend runs "
                f"{', '.join(SUPPORTED_PIPELINES)}",
                {"model": name},
            )
        tiny = (folder / TINY_MARKER).is_file()
        defaults = TINY_DEFAULTS if tiny else WAN_1_3B_DEFAULTS
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json") or {}
        shift = scheduler.get("flow_shift", scheduler.get("shift"))
        if isinstance(shift, int | float) and shift > 0:
            defaults = msgspec.structs.replace(defaults, flow_shift=float(shift))
        return ModelRecord(
            name=name,
            family=SUPPORTED_PIPELINES[pipeline],
            source=str(folder),
            kind="local",
            description=f"local diffusers folder {folder}",
            defaults=defaults,
            pipeline=pipeline,
        )

    def available(self, record: ModelRecord) -> bool:
        """On disk, in the HF cache, or buildable offline (tiny)."""
        if record.tiny:
            return True
        if record.kind == "hub":
            return _hub_cached(record.source)
        return not check_folder(Path(record.source))[1]

    def list(self, default: str | None = None, loaded: str | None = None) -> list[ModelInfo]:
        """Built-in models, then folders in the models directory (broken ones included,
        marked unavailable, so a user sees why their folder does not work)."""
        entries = [(r, self.available(r)) for r in self._builtins.values()]
        if self.models_dir.is_dir():
            for folder in sorted(self.models_dir.iterdir()):
                if folder.name.startswith(".") or folder.name in self._builtins:
                    continue
                if not (folder / "model_index.json").is_file():
                    continue
                try:
                    entries.append((self._local(folder, name=folder.name), True))
                except ModelUnavailable as exc:
                    broken = ModelRecord(
                        name=folder.name,
                        family="unknown",
                        source=str(folder),
                        kind="local",
                        description=exc.message,
                        defaults=WAN_1_3B_DEFAULTS,
                    )
                    entries.append((broken, False))
        return [
            ModelInfo(
                name=r.name,
                source=r.source,
                family=r.family,
                description=r.description,
                available=ok,
                loaded=loaded is not None and loaded == r.name,
                default=default is not None and default == r.name,
            )
            for r, ok in entries
        ]
