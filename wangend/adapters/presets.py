"""LoRA presets: a named set of LoRAs with their multipliers and an optional prompt.

Two file forms are read, both JSON:

* Wan2GP's `.lset`: `{"loras": ["a.safetensors", ...], "loras_mult": "1 0.5,0", "prompt":
  "...", "full_prompt": false}`. `loras_mult` is one string with a multiplier per LoRA
  separated by spaces or new lines (a list is accepted too); lines starting with `#` are
  comments. Unknown keys are ignored (Wan2GP adds new ones over time), but the keys used
  here must have the right types.
* wangend's `.json`: `{"format": "wangend-preset/1", "description": "...", "loras":
  [{"name": "style/anime", "multiplier": "1;0"}], "prompt": "...", "prompt_mode":
  "prefix"}`. Strict: unknown keys are errors, so a typo never passes silently.

A preset's prompt is used in one of two ways: "prefix" (the default, and an `.lset` with
`full_prompt: false`): it goes in front of the job's prompt, the usual home of trigger
words; "replace" (`full_prompt: true`): it is the whole prompt and the job's prompt is
dropped. Comment lines (`#`) in a preset prompt are removed.

A preset's name is its path below a root without the suffix ("anime" or "wan/anime").
Only regular files (or links to them) are presets: a named pipe or a device with a
preset's suffix is passed over without being opened (opening a FIFO blocks until a
writer comes; see media/access.py `open_regular`).

How to call it:

    presets = PresetLibrary([Path("~/presets").expanduser()])
    presets.list() -> list[PresetInfo]
    preset = presets.load("anime")          # raises PresetError (missing, unreadable, invalid)
    preset.loras -> list[LoraRef]; preset.apply_prompt(job_prompt) -> str
    build_lora_payload(library, family, spec.loras, preset)  (adapters/payload.py)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import msgspec
from msgspec import Struct

from ..media.access import is_regular, open_regular
from ..protocol import LoraRef

__all__ = ["PRESET_SUFFIXES", "Preset", "PresetError", "PresetInfo", "PresetLibrary"]

PRESET_SUFFIXES = (".lset", ".json")
MAX_PRESET_BYTES = 1024 * 1024
FORMAT_TAG = "wangend-preset/1"
PromptMode = Literal["prefix", "replace"]


class PresetError(Exception):
    """A preset that cannot be used; the message names the file and the field."""


class Preset(Struct, frozen=True, kw_only=True):
    name: str
    path: str
    loras: list[LoraRef]
    prompt: str | None = None
    prompt_mode: PromptMode = "prefix"
    description: str = ""

    def apply_prompt(self, prompt: str) -> str:
        """The prompt a job runs with once this preset is applied."""
        if not self.prompt:
            return prompt
        if self.prompt_mode == "replace":
            return self.prompt
        return f"{self.prompt} {prompt}".strip()


class PresetInfo(Struct, frozen=True, kw_only=True):
    name: str
    path: str
    loras: list[str] = msgspec.field(default_factory=list)
    has_prompt: bool = False
    description: str = ""
    error: str | None = None


class _WangendPreset(Struct, forbid_unknown_fields=True, kw_only=True):
    format: Literal["wangend-preset/1"]
    loras: list[LoraRef] = msgspec.field(default_factory=list)
    prompt: str | None = None
    prompt_mode: PromptMode = "prefix"
    description: str = ""


def _strip_comments(text: str) -> str:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).strip()


def _parse_lset(name: str, path: Path, data: dict[str, Any]) -> Preset:
    where = path.name
    loras = data.get("loras", [])
    if not isinstance(loras, list) or not all(isinstance(x, str) and x for x in loras):
        raise PresetError(f"preset {where}: `loras` must be a list of file names")
    raw_mult = data.get("loras_mult", "")
    if isinstance(raw_mult, str):
        mults = _strip_comments(raw_mult).split()
    elif isinstance(raw_mult, list) and all(isinstance(x, (str, int, float)) for x in raw_mult):
        mults = [str(x).strip() for x in raw_mult]
    else:
        raise PresetError(f"preset {where}: `loras_mult` must be a string or a list")
    if len(mults) > len(loras):
        raise PresetError(
            f"preset {where}: `loras_mult` has {len(mults)} values for {len(loras)} LoRAs"
        )
    mults += ["1"] * (len(loras) - len(mults))
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise PresetError(f"preset {where}: `prompt` must be a string")
    full = data.get("full_prompt", False)
    if not isinstance(full, bool):
        raise PresetError(f"preset {where}: `full_prompt` must be true or false")
    description = data.get("description", "")
    return Preset(
        name=name,
        path=str(path),
        loras=[
            LoraRef(name=lora, multiplier=mult) for lora, mult in zip(loras, mults, strict=True)
        ],
        prompt=_strip_comments(prompt) or None if prompt else None,
        prompt_mode="replace" if full else "prefix",
        description=description if isinstance(description, str) else "",
    )


def parse_preset(name: str, path: Path, raw: bytes) -> Preset:
    """Decode one preset file's bytes (used by PresetLibrary.load; public for tests)."""
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise PresetError(f"preset {path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PresetError(f"preset {path.name} must be a JSON object")
    if "format" in data or path.suffix.lower() == ".json":
        try:
            spec = msgspec.convert(data, _WangendPreset)
        except msgspec.ValidationError as exc:
            raise PresetError(f"preset {path.name}: {exc}") from None
        prompt = _strip_comments(spec.prompt) if spec.prompt else None
        return Preset(
            name=name,
            path=str(path),
            loras=spec.loras,
            prompt=prompt or None,
            prompt_mode=spec.prompt_mode,
            description=spec.description,
        )
    return _parse_lset(name, path, data)


class PresetLibrary:
    """Lists and loads presets below a set of roots. Files are small and read on demand:
    a preset is loaded once per enqueue, so there is nothing worth caching."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [Path(root).expanduser() for root in roots]

    def _files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for root in self.roots:
            if not root.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if filename.startswith(".") or not filename.lower().endswith(PRESET_SUFFIXES):
                        continue
                    full = Path(dirpath) / filename
                    if not is_regular(full):
                        continue
                    stem = full.relative_to(root).as_posix().rsplit(".", 1)[0]
                    found.setdefault(stem, full)
        return found

    def scan(self) -> list[tuple[str, Path, Preset | PresetError]]:
        """Every preset file, read once (one walk of the folders): its name, its path,
        and the preset or why it cannot be used."""
        found: list[tuple[str, Path, Preset | PresetError]] = []
        for name, path in sorted(self._files().items()):
            try:
                found.append((name, path, _read(name, path)))
            except PresetError as exc:
                found.append((name, path, exc))
        return found

    def list(self) -> list[PresetInfo]:
        infos = []
        for name, path, preset in self.scan():
            if isinstance(preset, PresetError):
                infos.append(PresetInfo(name=name, path=str(path), error=str(preset)))
                continue
            infos.append(
                PresetInfo(
                    name=name,
                    path=str(path),
                    loras=[ref.name for ref in preset.loras],
                    has_prompt=bool(preset.prompt),
                    description=preset.description,
                )
            )
        return infos

    def load(self, name: str) -> Preset:
        text = name.replace("\\", "/").strip()
        if not text or text.startswith("/") or ".." in text.split("/"):
            raise PresetError(f"preset name {name!r} must be a path inside the preset folder")
        stem = text.rsplit(".", 1)[0] if text.lower().endswith(PRESET_SUFFIXES) else text
        path = self._files().get(stem)
        if path is None:
            where = ", ".join(str(r) for r in self.roots) or "(no preset folders configured)"
            raise PresetError(f"no preset named {name!r} in {where}")
        return _read(stem, path)


def _read(name: str, path: Path) -> Preset:
    try:
        with open_regular(path) as handle:
            raw = handle.read(MAX_PRESET_BYTES + 1)
    except OSError as exc:
        raise PresetError(f"preset {path.name} cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_PRESET_BYTES:
        raise PresetError(f"preset {path.name} is larger than 1 MiB")
    return parse_preset(name, path, raw)
