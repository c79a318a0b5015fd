"""Model records: which models wangend knows, where their files come from, what inputs
each one takes, and the defaults and size rules it brings.

A job names its model in one of four ways, tried in this order:

1. a built-in name: a real Wan model ("wan2.1-t2v-1.3b", ..., "wan2.2-ti2v-5b", loaded
   from the hub cache) or a tiny offline one ("tiny", "tiny-i2v", ... built on first use);
2. a diffusers folder dropped into the models directory, named by its folder name;
3. an absolute path (or `~/...`) to a diffusers folder (one with model_index.json);
4. a Hugging Face hub id ("org/name"), loaded from the local cache or downloaded.

Anything else is refused at enqueue time with ModelUnavailable, and a local folder is
checked for its parts then too, so a job never waits in the queue only to fail on a
missing `transformer/`. A folder's family is read from its own files (model_index.json's
`_class_name`, `transformer_2`, `image_encoder`, `boundary_ratio`, `expand_timesteps`,
the VAE's `z_dim`), so a Wan folder wangend never saw still gets the right inputs,
defaults and size rules. Checks here are cheap (stat and small JSON reads): the registry
is asked on every enqueue and by `models`.

Video-to-video has no name of its own: any Wan 2.1 T2V model given a `video` runs
through `WanVideoToVideoPipeline` built on the same loaded components.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import Struct

from ..errors import ModelUnavailable
from ..protocol import ModelInfo

__all__ = [
    "FAMILIES",
    "Capabilities",
    "ModelDefaults",
    "ModelRecord",
    "ModelRegistry",
    "SizeRules",
    "check_folder",
]

WAN21_T2V, WAN21_I2V, WAN21_VACE = "wan2.1-t2v", "wan2.1-i2v", "wan2.1-vace"
WAN22_T2V, WAN22_I2V, WAN22_TI2V = "wan2.2-t2v", "wan2.2-i2v", "wan2.2-ti2v"
FAMILIES = (WAN21_T2V, WAN21_I2V, WAN21_VACE, WAN22_T2V, WAN22_I2V, WAN22_TI2V)
# diffusers pipeline classes a Wan folder may name; the family comes from the folder.
SUPPORTED_PIPELINES = (
    "WanPipeline",
    "WanImageToVideoPipeline",
    "WanVideoToVideoPipeline",
    "WanVACEPipeline",
)
# Component name -> how to check it. Anything else listed in model_index.json is a model.
REQUIRED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
TINY_MARKER = "wangend-tiny.json"  # written by tiny.ensure_tiny_model
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Job fields that only some models take; every other field applies to all.
CONDITIONAL_FIELDS = (
    "image",
    "last_image",
    "video",
    "mask",
    "reference_images",
    "strength",
    "guidance_scale_2",
    "boundary_ratio",
)


class SizeRules(Struct, frozen=True, kw_only=True):
    """What sizes the model accepts: width and height a multiple of `multiple` (VAE
    stride x patch size), frames of the form `frame_step * k + 1` (temporal VAE stride)."""

    multiple: int = 16
    frame_step: int = 4


class Capabilities(Struct, frozen=True, kw_only=True):
    """Which of CONDITIONAL_FIELDS a model takes (`accepts`) and which it cannot run
    without (`requires`); a job giving any other is refused at enqueue."""

    accepts: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()


class ModelDefaults(Struct, frozen=True, kw_only=True):
    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    fps: int
    flow_shift: float
    negative_prompt: str = ""
    guidance_scale_2: float | None = None  # two-expert models: the low-noise expert's


class ModelRecord(Struct, frozen=True, kw_only=True):
    name: str  # what jobs record as `model`
    family: str
    source: str  # what from_pretrained loads: a local folder or a hub id
    kind: Literal["builtin", "hub", "local"]
    description: str = ""
    defaults: ModelDefaults
    size: SizeRules = SizeRules()
    pipeline: str = "WanPipeline"  # the class the folder is loaded with
    tiny: bool = False  # built by tiny.ensure_tiny_model before loading
    capabilities: Capabilities = Capabilities()
    boundary_ratio: float | None = None  # two experts: where transformer_2 takes over
    expand_timesteps: bool = False  # Wan 2.2 TI2V: per-token timesteps

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None


FAMILY_CAPABILITIES = {
    WAN21_T2V: Capabilities(accepts=("video", "strength")),  # video: V2V
    WAN21_I2V: Capabilities(accepts=("image",), requires=("image",)),
    WAN21_VACE: Capabilities(accepts=("video", "mask", "reference_images")),
    WAN22_T2V: Capabilities(accepts=("guidance_scale_2", "boundary_ratio")),
    WAN22_I2V: Capabilities(
        accepts=("image", "last_image", "guidance_scale_2", "boundary_ratio"),
        requires=("image",),
    ),
    WAN22_TI2V: Capabilities(accepts=("image",)),
}
# Wan 2.1 first-last-frame models (a CLIP position embedding for two images).
FLF2V_CAPABILITIES = Capabilities(accepts=("image", "last_image"), requires=("image", "last_image"))
FAMILY_PIPELINES = {
    WAN21_T2V: "WanPipeline",
    WAN21_I2V: "WanImageToVideoPipeline",
    WAN21_VACE: "WanVACEPipeline",
    WAN22_T2V: "WanPipeline",
    WAN22_I2V: "WanImageToVideoPipeline",
    WAN22_TI2V: "WanPipeline",
}
FAMILY_BOUNDARY = {WAN22_T2V: 0.875, WAN22_I2V: 0.9}

# Our own short list of what Wan output should avoid; users override it per job.
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
_replace = msgspec.structs.replace
WAN_720P = _replace(WAN_1_3B_DEFAULTS, width=1280, height=720, flow_shift=5.0)
FAMILY_DEFAULTS = {
    WAN21_T2V: WAN_1_3B_DEFAULTS,
    WAN21_I2V: _replace(WAN_1_3B_DEFAULTS, steps=40),
    WAN21_VACE: WAN_1_3B_DEFAULTS,
    WAN22_T2V: _replace(
        WAN_720P, steps=40, guidance_scale=4.0, guidance_scale_2=3.0, flow_shift=12.0
    ),
    WAN22_I2V: _replace(WAN_720P, steps=40, guidance_scale=3.5, guidance_scale_2=3.5),
    WAN22_TI2V: _replace(WAN_720P, width=1280, height=704, frames=121, fps=24),
}
TINY_DEFAULTS = ModelDefaults(
    width=64, height=64, frames=9, steps=4, guidance_scale=5.0, fps=8, flow_shift=3.0
)
TINY_FAMILIES = {
    "tiny": WAN21_T2V,
    "tiny-i2v": WAN21_I2V,
    "tiny-vace": WAN21_VACE,
    "tiny-wan22": WAN22_T2V,
    "tiny-wan22-i2v": WAN22_I2V,
    "tiny-ti2v": WAN22_TI2V,
}
# name, family, hub id, description, defaults
_REAL = (
    ("wan2.1-t2v-1.3b", WAN21_T2V, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
     "Wan 2.1 text-to-video (and video-to-video), 1.3B parameters, 480p", WAN_1_3B_DEFAULTS),
    ("wan2.1-t2v-14b", WAN21_T2V, "Wan-AI/Wan2.1-T2V-14B-Diffusers",
     "Wan 2.1 text-to-video (and video-to-video), 14B parameters, 720p", WAN_720P),
    ("wan2.1-i2v-480p", WAN21_I2V, "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
     "Wan 2.1 image-to-video, 14B parameters, 480p", FAMILY_DEFAULTS[WAN21_I2V]),
    ("wan2.1-i2v-720p", WAN21_I2V, "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
     "Wan 2.1 image-to-video, 14B parameters, 720p", _replace(WAN_720P, steps=40)),
    ("wan2.1-vace-1.3b", WAN21_VACE, "Wan-AI/Wan2.1-VACE-1.3B-diffusers",
     "Wan 2.1 VACE (control video, mask, reference images), 1.3B, 480p", WAN_1_3B_DEFAULTS),
    ("wan2.1-vace-14b", WAN21_VACE, "Wan-AI/Wan2.1-VACE-14B-diffusers",
     "Wan 2.1 VACE (control video, mask, reference images), 14B, 720p", WAN_720P),
    ("wan2.2-t2v-a14b", WAN22_T2V, "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
     "Wan 2.2 text-to-video, two 14B experts, 720p", FAMILY_DEFAULTS[WAN22_T2V]),
    ("wan2.2-i2v-a14b", WAN22_I2V, "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
     "Wan 2.2 image-to-video (optional end frame), two 14B experts, 720p",
     FAMILY_DEFAULTS[WAN22_I2V]),
    ("wan2.2-ti2v-5b", WAN22_TI2V, "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
     "Wan 2.2 text/image-to-video, 5B parameters, 720p at 24 fps", FAMILY_DEFAULTS[WAN22_TI2V]),
)  # fmt: skip


def family_record(
    *, name: str, family: str, source: str, kind: Literal["builtin", "hub", "local"],
    description: str, defaults: ModelDefaults, tiny: bool = False,
    pipeline: str | None = None, boundary_ratio: float | None = None,
    capabilities: Capabilities | None = None, multiple: int | None = None,
) -> ModelRecord:  # fmt: skip
    """A record with the family's capabilities, pipeline and size rules filled in."""
    if boundary_ratio is None:
        boundary_ratio = FAMILY_BOUNDARY.get(family)
    if boundary_ratio is not None and defaults.guidance_scale_2 is None:
        defaults = _replace(defaults, guidance_scale_2=defaults.guidance_scale)
    return ModelRecord(
        name=name,
        family=family,
        source=source,
        kind=kind,
        description=description,
        defaults=defaults,
        size=SizeRules(multiple=multiple or (32 if family == WAN22_TI2V else 16)),
        pipeline=pipeline or FAMILY_PIPELINES[family],
        tiny=tiny,
        capabilities=capabilities or FAMILY_CAPABILITIES[family],
        boundary_ratio=boundary_ratio,
        expand_timesteps=family == WAN22_TI2V,
    )


def builtin_records(models_dir: Path) -> dict[str, ModelRecord]:
    """The real models first (hub ids), then the tiny offline ones, "tiny" leading."""
    records = {
        "tiny": family_record(
            name="tiny", family=WAN21_T2V, source=str(models_dir / "tiny"), kind="builtin",
            description="tiny random Wan 2.1 T2V model built offline (demo and tests)",
            defaults=TINY_DEFAULTS, tiny=True,
        )
    }  # fmt: skip
    for name, family, hub_id, description, defaults in _REAL:
        records[name] = family_record(
            name=name, family=family, source=hub_id, kind="hub",
            description=description, defaults=defaults,
        )  # fmt: skip
    for name, family in TINY_FAMILIES.items():
        if name != "tiny":
            records[name] = family_record(
                name=name, family=family, source=str(models_dir / name), kind="builtin",
                description=f"tiny random {family} model built offline (demo and tests)",
                defaults=TINY_DEFAULTS, tiny=True,
            )  # fmt: skip
    return records


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


def _present(index: dict) -> set[str]:
    """Components model_index.json lists with a class (`[null, null]` means absent)."""
    listed = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    return {k for k, v in listed.items() if len(v) == 2 and v[0] and v[1]}


def check_folder(folder: Path) -> tuple[str | None, list[str]]:
    """Inspect a diffusers folder: (pipeline class name, list of missing parts)."""
    index = _read_json(folder / "model_index.json")
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


def _hub_reader(repo_id: str) -> Callable[[str], dict | None]:
    """Reads a cached file of a hub repo; None when it is not cached (nothing downloads)."""

    def read(name: str) -> dict | None:
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(repo_id, name)
        except Exception:
            return None
        return _read_json(Path(path)) if isinstance(path, str) else None

    return read


class ModelRegistry:
    """Resolves model names to records; owns no loaded weights (production.py does)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir).expanduser().absolute()
        self._builtins = builtin_records(self.models_dir)

    @property
    def names(self) -> list[str]:
        return list(self._builtins)

    @property
    def builtins(self) -> list[ModelRecord]:
        return list(self._builtins.values())

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
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            folder = self.models_dir / name
            if (folder / "model_index.json").is_file():
                return self._local(folder, name=name)
        if HUB_ID.match(name) and ".." not in name:
            return self._hub(name)
        raise ModelUnavailable(
            f"unknown model {name!r}: not a built-in name ({', '.join(self._builtins)}), "
            f"not a model folder in {self.models_dir}, not an absolute path to a diffusers "
            "folder and not a Hugging Face hub id (org/name)",
            {"model": name},
        )

    def _hub(self, repo_id: str) -> ModelRecord:
        """A hub id we have no record for: its family from the cached model_index.json
        when there is one, else Wan 2.1 T2V (the commonest fine-tune base)."""
        read = _hub_reader(repo_id)
        index = read("model_index.json")
        facts = detect(index, read) if index else {"family": WAN21_T2V}
        if facts.get("pipeline") not in SUPPORTED_PIPELINES:
            facts["pipeline"] = None
        family = facts.pop("family")
        return family_record(
            name=repo_id, source=repo_id, kind="hub", description="Hugging Face hub model",
            family=family, defaults=FAMILY_DEFAULTS[family], **facts,
        )  # fmt: skip

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
        facts = detect(
            _read_json(folder / "model_index.json") or {}, lambda p: _read_json(folder / p)
        )
        family = facts.pop("family")
        tiny = (folder / TINY_MARKER).is_file()
        defaults = TINY_DEFAULTS if tiny else FAMILY_DEFAULTS[family]
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json") or {}
        shift = scheduler.get("flow_shift", scheduler.get("shift"))
        if isinstance(shift, int | float) and shift > 0:
            defaults = _replace(defaults, flow_shift=float(shift))
        return family_record(
            name=name, source=str(folder), kind="local", family=family,
            description=f"local diffusers folder {folder} ({family})", defaults=defaults, **facts,
        )  # fmt: skip

    def available(self, record: ModelRecord) -> bool:
        """On disk, in the HF cache, or buildable offline (tiny)."""
        if record.tiny:
            return True
        if record.kind == "hub":
            return _hub_cached(record.source)
        return not check_folder(Path(record.source))[1]

    def accepting(self, field: str) -> list[str]:
        """Built-in model names that take `field` (for error messages)."""
        return [r.name for r in self._builtins.values() if field in r.capabilities.accepts]

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
                accepts=list(r.capabilities.accepts),
                requires=list(r.capabilities.requires),
            )
            for r, ok in entries
        ]
