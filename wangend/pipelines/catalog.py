"""The model catalog: the Wan families, what each takes, its defaults and size rules,
and the built-in records (real models on the hub, tiny ones built offline).

Data only, no file access: `registry.py` resolves names against it and `folders.py`
reads what a folder on disk holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import Struct

from .weights import file_identity, folder_identity

__all__ = [
    "CONDITIONAL_FIELDS",
    "FAMILIES",
    "Capabilities",
    "ModelDefaults",
    "ModelRecord",
    "SizeRules",
    "builtin_records",
    "family_record",
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
# What each pipeline's __init__ takes (diffusers' `_get_signature_keys`): an entry of
# model_index.json outside these is never loaded, so a stray one is neither checked nor read.
_WAN_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer", "transformer_2")
PIPELINE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "WanPipeline": _WAN_PARTS,
    "WanImageToVideoPipeline": (*_WAN_PARTS, "image_processor", "image_encoder"),
    "WanVideoToVideoPipeline": _WAN_PARTS[:-1],
    "WanVACEPipeline": _WAN_PARTS,
}
TINY_ROPE_SPAN = 32  # the tiny transformers' rope_max_seq_len: 512 px, 125 frames
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
    stride x patch size), frames of the form `frame_step * k + 1` (temporal VAE stride),
    and at most `span` latent positions along each axis when the transformer's rotary
    table says so (its `rope_max_seq_len`: a larger grid fails inside the first step)."""

    multiple: int = 16
    frame_step: int = 4
    span: int | None = None


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
    # (component, single .safetensors file) loaded instead of the source's own weights
    # for that component: a [models.NAME] model (checkpoints.py).
    files: tuple[tuple[str, str], ...] = ()

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def load_source(self) -> str:
        """What identifies the weights a load reads: the source (a folder with the
        identity of its files: one whose files were replaced is another model), and any
        files that replace its parts, each with its identity (a file replaced under the
        same name is another file). Equal load sources share a warm pipeline."""
        source = (
            self.source if self.kind == "hub" else f"{self.source}@{folder_identity(self.source)}"
        )
        files = (f"{part}={path}@{file_identity(path)}" for part, path in self.files)
        return " + ".join([source, *files])


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
    span: int | None = None,
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
        size=SizeRules(multiple=multiple or (32 if family == WAN22_TI2V else 16), span=span),
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
            defaults=TINY_DEFAULTS, tiny=True, span=TINY_ROPE_SPAN,
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
                defaults=TINY_DEFAULTS, tiny=True, span=TINY_ROPE_SPAN,
            )  # fmt: skip
    return records
