"""Enqueue-time LoRA resolution: names and multipliers -> a frozen list of ResolvedLora.

The job record must say exactly what ran, and a bad LoRA must be refused before the job
waits in the queue, so this runs at enqueue: every name is found in the library, its header
read (a corrupt or truncated file is refused now), its multiplier parsed and its SHA-256
recorded (cached by size and mtime, so a repeated LoRA costs a stat).

Preset LoRAs come first, in the preset's order; a job LoRA naming the same file replaces
the preset's multiplier (and keeps its place). Naming one file twice in `loras` is an
error.

How to call it (TaskInputManager, at enqueue):

    preset = presets.load(spec.preset) if spec.preset else None   # PresetError -> InvalidParams
    resolved = build_lora_payload(library, record.family, spec.loras, preset,
                                  size=size_hint(record.name))
    prompt = preset.apply_prompt(spec.prompt) if preset else spec.prompt

Errors are `wangend.errors.InvalidParams` naming `$.params.loras[i]` (or `$.params.preset`
for a LoRA that came from the preset).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidParams
from ..protocol import LoraRef, ResolvedLora
from .lora import LoRALibrary, LoraLookupError
from .presets import Preset
from .schedule import MultiplierError, parse_multiplier

__all__ = ["TWO_EXPERT_FAMILIES", "build_lora_payload", "expert_count"]

TWO_EXPERT_FAMILIES = frozenset({"wan2.2-t2v", "wan2.2-i2v"})


def expert_count(family: str) -> int:
    """How many denoising experts (and so multiplier phases) a family runs."""
    return 2 if family in TWO_EXPERT_FAMILIES else 1


def _resolve_one(
    library: LoRALibrary, family: str, size: str | None, ref: LoraRef, field: str
) -> ResolvedLora:
    try:
        schedule = parse_multiplier(ref.multiplier, lora=ref.name)
    except MultiplierError as exc:
        raise InvalidParams(str(exc), field=field) from None
    if len(schedule.phases) > expert_count(family):
        raise InvalidParams(
            f"LoRA {ref.name}: multiplier {ref.multiplier!r} has {len(schedule.phases)} phases "
            f"but {family} models run {expert_count(family)}",
            field=field,
        )
    try:
        path = library.find(ref.name, family, size)
    except LoraLookupError as exc:
        raise InvalidParams(str(exc), field=field) from None
    try:
        info = library.info(path)
        digest = library.sha256(path)
    except OSError as exc:
        raise InvalidParams(
            f"LoRA {ref.name} cannot be read: {exc.strerror}", field=field
        ) from None
    if info.error:
        raise InvalidParams(f"LoRA {ref.name}: {info.error}", field=field)
    if info.format == "unknown":
        raise InvalidParams(
            f"LoRA {ref.name} ({path.name}) holds no LoRA weights in a known layout", field=field
        )
    return ResolvedLora(
        name=ref.name, path=str(Path(path).resolve()), multiplier=ref.multiplier, sha256=digest
    )


def build_lora_payload(
    library: LoRALibrary,
    family: str,
    loras: list[LoraRef] | None,
    preset: Preset | None,
    *,
    size: str | None = None,
) -> list[ResolvedLora]:
    """Resolve the preset's LoRAs, then the job's; see the module docstring."""
    resolved: list[ResolvedLora] = []
    by_path: dict[str, int] = {}
    if preset is not None:
        for ref in preset.loras:
            item = _resolve_one(library, family, size, ref, "$.params.preset")
            if item.path in by_path:
                resolved[by_path[item.path]] = item
            else:
                by_path[item.path] = len(resolved)
                resolved.append(item)
    from_job: set[str] = set()
    for index, ref in enumerate(loras or []):
        field = f"$.params.loras[{index}]"
        item = _resolve_one(library, family, size, ref, field)
        if item.path in from_job:
            raise InvalidParams(f"LoRA {ref.name} is listed twice", field=field)
        from_job.add(item.path)
        if item.path in by_path:
            resolved[by_path[item.path]] = item
        else:
            by_path[item.path] = len(resolved)
            resolved.append(item)
    return resolved
