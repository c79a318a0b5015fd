"""From what a client asks for to what the worker runs.

`TaskInputManager.resolve` turns a `GenerateSpec` (fields may be missing) into a frozen
`ResolvedGenerate` with every value filled in, at enqueue time. Doing it then, not when
the job runs, means a bad request is refused before it waits in the queue, the job record
shows exactly what will run, a retry runs the same thing, and a random seed is chosen
once and recorded, so any output can be reproduced.

What a job may ask for depends on its model (registry capabilities): an image only for
image-to-video models, a video for VACE or (on a Wan 2.1 T2V model) video-to-video, a
second guidance scale and boundary only for two-expert Wan 2.2 models. A field the model
does not take, or a required one left out, is refused with InvalidParams naming the field
and the models that do take it. Media paths become absolute, are opened far enough to
know they decode (conditioning.probe; `audio`: that it has a sound track that decodes,
in an audio file or a video), and their sha256 is recorded in `inputs_sha256`.
Relative paths are taken relative to the daemon's working directory, so clients should
send absolute ones.

Output names are templates (`{date}_{model}_{seed}`) checked here and rendered when the
job runs (the job id and the time are known only then). Placeholder values are sanitised
and no template can name a path outside the output folder.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from ..adapters.requests import AdapterChoice, AdapterRequests
from ..config import EngineConfig
from ..errors import InvalidParams
from ..media.access import InputAccess, readable_message
from ..media.naming import (
    DEFAULT_OUTPUT_NAME,
    OUTPUT_NAME_FIELDS,
    check_output_name,
    render_output_name,
)
from ..protocol import GenerateSpec, ResolvedGenerate
from .conditioning import MediaError, MediaInfo, probe, sha256_file
from .registry import CONDITIONAL_FIELDS, ModelRecord, ModelRegistry

__all__ = [
    "DEFAULT_OUTPUT_NAME",
    "DEFAULT_STRENGTH",
    "OUTPUT_NAME_FIELDS",
    "TaskInputManager",
    "check_output_name",
    "render_output_name",
]

SEED_BITS = 32  # random seeds stay short enough to type back in
DEFAULT_STRENGTH = 0.8  # video-to-video: how much of the source is renoised
# What each media field may be: a VACE mask is a video or one image.
MEDIA_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "last_image": ("image",),
    "video": ("video",),
    "mask": ("video", "image"),
    "reference_images": ("image",),
}


class TaskInputManager:
    """Fills defaults from the model record and the engine config, checks that the model
    takes what the job gives, and validates sizes, media and names."""

    def __init__(
        self,
        registry: ModelRegistry,
        default_model: str,
        dtype_name: str = "auto",
        *,
        engine: EngineConfig | None = None,
        metadata_default: str = "embedded",
        adapters: AdapterRequests | None = None,
        access: InputAccess | None = None,
    ) -> None:
        self.registry = registry
        self.default_model = default_model
        self.dtype_name = dtype_name
        self.engine = engine or EngineConfig()
        self.metadata_default = metadata_default
        self.adapters = adapters
        self.access = access or InputAccess()

    def resolve(self, spec: GenerateSpec) -> ResolvedGenerate:
        record = self.registry.resolve(spec.model or self.default_model)
        self.check_capabilities(record, spec)
        media, infos, hashes = self._media(spec)
        d = record.defaults
        width = spec.width if spec.width is not None else d.width
        height = spec.height if spec.height is not None else d.height
        frames = spec.frames if spec.frames is not None else d.frames
        if spec.frames is None and "video" in infos:
            # A source video shorter than the default sets the length (rounded down to
            # the model's frame rule), so V2V/VACE does not loop a short clip.
            k = record.size.frame_step
            frames = min(frames, (infos["video"].frames - 1) // k * k + 1)
        check_size(record, width, height, frames)
        steps = spec.steps if spec.steps is not None else d.steps
        strength = None
        if record.family == "wan2.1-t2v" and spec.video is not None:
            strength = spec.strength if spec.strength is not None else DEFAULT_STRENGTH
            if int(steps * strength) < 1:
                raise InvalidParams(
                    f"strength {strength} with {steps} steps leaves no denoising step "
                    f"(int(steps * strength) must be >= 1); raise strength to at least "
                    f"{1 / steps:.3g} or use more steps",
                    field="$.params.strength",
                )
        guidance = spec.guidance_scale if spec.guidance_scale is not None else d.guidance_scale
        guidance_2 = boundary = None
        if record.two_experts:
            guidance_2 = spec.guidance_scale_2
            if guidance_2 is None:
                guidance_2 = d.guidance_scale_2 if d.guidance_scale_2 is not None else guidance
            boundary = (
                spec.boundary_ratio if spec.boundary_ratio is not None else record.boundary_ratio
            )
        output_name = spec.output_name if spec.output_name is not None else DEFAULT_OUTPUT_NAME
        check_output_name(output_name)
        audio = None
        if spec.audio is not None:
            path = self.access.check(spec.audio, "$.params.audio", "audio")
            try:
                _probe_audio(path)
            except MediaError as exc:
                message = f"audio: {readable_message(str(exc), path)}"
                raise InvalidParams(message, field="$.params.audio") from None
            hashes["audio"] = sha256_file(path)
            audio = str(path)
        e = self.engine
        choice = self.resolve_adapters(spec, record)
        return ResolvedGenerate(
            model=record.name,
            source=record.source,
            files=dict(record.files),
            prompt=choice.prompt,
            negative_prompt=(
                spec.negative_prompt if spec.negative_prompt is not None else d.negative_prompt
            ),
            width=width,
            height=height,
            frames=frames,
            steps=steps,
            guidance_scale=guidance,
            seed=spec.seed if spec.seed is not None else secrets.randbits(SEED_BITS),
            fps=spec.fps if spec.fps is not None else d.fps,
            flow_shift=spec.flow_shift if spec.flow_shift is not None else d.flow_shift,
            output_name=output_name,
            dtype=self.dtype_name,
            family=record.family,
            image=media.get("image"),
            last_image=media.get("last_image"),
            video=media.get("video"),
            mask=media.get("mask"),
            reference_images=media.get("reference_images", []),
            inputs_sha256=hashes,
            strength=strength,
            guidance_scale_2=guidance_2,
            boundary_ratio=boundary,
            memory_profile=_pick(spec.memory_profile, e.memory_profile),
            fp8=_pick(spec.fp8, e.fp8),
            step_cache=_pick(spec.step_cache, e.step_cache),
            step_cache_threshold=_pick(spec.step_cache_threshold, e.step_cache_threshold),
            attention=_pick(spec.attention, e.attention),
            compile=_pick(spec.compile, e.compile),
            preview_every=_pick(spec.preview_every, e.preview_every),
            audio=audio,
            metadata=_pick(spec.metadata, self.metadata_default),
            loras=choice.loras,
            preset=choice.preset,
            enhancer=choice.enhancer,
        )

    def resolve_adapters(self, spec: GenerateSpec, record: ModelRecord) -> AdapterChoice:
        """The job's LoRAs (files, hashes, multipliers), preset and enhancer request."""
        if self.adapters is not None:
            return self.adapters.resolve(spec, record.family, record.name)
        for field, given in (
            ("loras", bool(spec.loras)),
            ("preset", spec.preset is not None),
            ("enhance_prompt", bool(spec.enhance_prompt)),
        ):
            if given:
                raise InvalidParams(
                    f"{field} is not available: this daemon has no adapters configured",
                    field=f"$.params.{field}",
                )
        return AdapterChoice(prompt=spec.prompt, loras=[], preset=None, enhancer=None)

    def check_enhance(self, field: str = "$.params.enhance_prompt") -> None:
        """Refuse a wish for an enhanced prompt when this daemon has no enhancer: the
        job would run its prompt as it stands, which is not what was asked for. Used by
        `retry {"enhance": true}`, which asks again for a job already resolved."""
        enhancer = self.adapters.enhancer if self.adapters is not None else None
        if enhancer is None or enhancer.provider == "none":
            name = field.rsplit(".", 1)[-1]
            raise InvalidParams(
                f"{name} needs a prompt enhancer; set [enhancer] provider to 'local' or "
                "'remote' in the daemon's config",
                field=field,
            )

    def check_capabilities(self, record: ModelRecord, spec: GenerateSpec) -> None:
        """Refuse a field the model does not take, or a required one left out."""
        caps = record.capabilities
        for field in CONDITIONAL_FIELDS:
            given = getattr(spec, field) not in (None, [])
            if given and field not in caps.accepts:
                takers = self.registry.accepting(field)
                raise InvalidParams(
                    f"{record.name} ({record.family}) does not take `{field}`; models that "
                    f"do: {', '.join(takers) or 'none'}",
                    field=f"$.params.{field}",
                )
            if not given and field in caps.requires:
                raise InvalidParams(
                    f"{record.name} ({record.family}) needs `{field}`",
                    field=f"$.params.{field}",
                )
        if spec.mask is not None and spec.video is None:
            raise InvalidParams(
                "a VACE `mask` marks what to regenerate in `video`; give `video` too",
                field="$.params.mask",
            )
        if spec.strength is not None and spec.video is None:
            raise InvalidParams(
                "`strength` applies to video-to-video only; give `video` too",
                field="$.params.strength",
            )

    def _media(self, spec: GenerateSpec) -> tuple[dict, dict[str, MediaInfo], dict[str, str]]:
        """Absolute paths, probe results and sha256 of every media input."""
        paths: dict = {}
        infos: dict[str, MediaInfo] = {}
        hashes: dict[str, str] = {}
        items: list[tuple[str, str, str]] = [
            (field, field, getattr(spec, field))
            for field in ("image", "last_image", "video", "mask")
            if getattr(spec, field) is not None
        ]
        items += [
            (f"reference_images[{i}]", "reference_images", p)
            for i, p in enumerate(spec.reference_images or [])
        ]
        for key, field, raw in items:
            path = self.access.check(raw, f"$.params.{key}", key)
            try:
                info = probe(path, allow=MEDIA_KINDS[field])
            except MediaError as exc:
                message = f"{key}: {readable_message(str(exc), path)}"
                raise InvalidParams(message, field=f"$.params.{key}") from None
            hashes[key] = sha256_file(path)
            infos[key] = info
            if field == "reference_images":
                paths.setdefault(field, []).append(str(path))
            else:
                paths[field] = str(path)
        return paths, infos, hashes


def _probe_audio(path: Path) -> None:
    """Open `path` far enough to know it has sound that decodes: an audio file, or a
    video with an audio track; raise MediaError saying why not. Checked at enqueue like
    every other input: before, a text file named .wav was queued, ran, and made a silent
    video with one line in the daemon's log as the only trace."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                what = "is a video without sound" if container.streams.video else "has no sound"
                raise MediaError(f"{path} {what}; give an audio file or a video with sound")
            if next(container.decode(container.streams.audio[0]), None) is None:
                raise MediaError(f"{path} has an audio track with nothing that decodes")
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise MediaError(f"{path} is not a readable audio file or video ({why})") from None


def _pick(value, default):
    return default if value is None else value


def check_size(record: ModelRecord, width: int, height: int, frames: int) -> None:
    """Refuse sizes the model would silently round (diffusers only logs a warning)."""
    m = record.size.multiple
    for field, value in (("width", width), ("height", height)):
        if value % m:
            lower, upper = value // m * m, value // m * m + m
            hint = f"{lower} or {upper}" if lower >= m else f"{upper}"
            raise InvalidParams(
                f"{field} {value} is not a multiple of {m} for {record.name}; try {hint}",
                field=f"$.params.{field}",
            )
    k = record.size.frame_step
    if (frames - 1) % k:
        lower = (frames - 1) // k * k + 1
        raise InvalidParams(
            f"frames must be {k}k+1 for {record.name} (1, {k + 1}, {2 * k + 1}, ...); "
            f"{frames} is not, try {lower} or {lower + k}",
            field="$.params.frames",
        )
    span = record.size.span
    if span is None:
        return
    largest = {"width": span * m, "height": span * m, "frames": (span - 1) * k + 1}
    for field, value in (("width", width), ("height", height), ("frames", frames)):
        if value > largest[field]:
            raise InvalidParams(
                f"{field} {value} is more than {record.name} takes: at most "
                f"{largest[field]} (its transformer's rotary table covers {span} latent "
                "positions along each axis)",
                field=f"$.params.{field}",
            )
