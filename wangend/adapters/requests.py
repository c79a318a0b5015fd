"""AdapterRequests: what a generation asks of the adapters, settled at enqueue.

A job's LoRAs and preset become files with hashes, and its wish for an enhanced prompt
becomes a marker, when the job is queued: a missing LoRA or preset is refused at once
(naming the field), and the job record shows exactly what will run. The enhancing itself
happens when the job runs (it needs the GPU the worker owns); the runtime replaces the
marker with the result (pipelines/runtime.py `enhance_prompt`), and a retry of that job
reuses the enhanced prompt instead of asking the enhancer again.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from ..config import EnhancerConfig
from ..errors import InvalidParams
from ..protocol import GenerateSpec, ResolvedLora
from .lora import LoRALibrary, size_hint
from .payload import build_lora_payload
from .presets import PresetError, PresetLibrary

__all__ = ["AdapterChoice", "AdapterRequests"]


class AdapterChoice(Struct, frozen=True, kw_only=True):
    prompt: str  # the job's prompt with the preset's applied
    loras: list[ResolvedLora]
    preset: str | None
    enhancer: dict[str, Any] | None  # {"requested": True, "provider": ...} or None


class AdapterRequests:
    def __init__(
        self, loras: LoRALibrary, presets: PresetLibrary, enhancer: EnhancerConfig
    ) -> None:
        self.loras = loras
        self.presets = presets
        self.enhancer = enhancer

    def wants_enhancing(self, spec: GenerateSpec) -> bool:
        if self.enhancer.provider == "none":
            if spec.enhance_prompt:
                raise InvalidParams(
                    "enhance_prompt needs a prompt enhancer; set [enhancer] provider to "
                    "'local' or 'remote' in the daemon's config",
                    field="$.params.enhance_prompt",
                )
            return False
        return self.enhancer.by_default if spec.enhance_prompt is None else spec.enhance_prompt

    def resolve(self, spec: GenerateSpec, family: str, model: str) -> AdapterChoice:
        preset = None
        if spec.preset is not None:
            try:
                preset = self.presets.load(spec.preset)
            except PresetError as exc:
                raise InvalidParams(str(exc), field="$.params.preset") from None
        loras = build_lora_payload(self.loras, family, spec.loras, preset, size=size_hint(model))
        enhancer = None
        if self.wants_enhancing(spec):
            enhancer = {"requested": True, "provider": self.enhancer.provider}
        return AdapterChoice(
            prompt=preset.apply_prompt(spec.prompt) if preset else spec.prompt,
            loras=loras,
            preset=preset.name if preset else None,
            enhancer=enhancer,
        )
