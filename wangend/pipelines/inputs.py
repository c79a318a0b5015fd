"""From what a client asks for to what the worker runs.

`TaskInputManager.resolve` turns a `GenerateSpec` (fields may be missing) into a frozen
`ResolvedGenerate` with every value filled in, at enqueue time. Doing it then, not when
the job runs, means a bad request is refused before it waits in the queue, the job record
shows exactly what will run, a retry runs the same thing, and a random seed is chosen
once and recorded, so any output can be reproduced.

Output names are templates (`{date}_{model}_{seed}`) checked here and rendered when the
job runs (the job id and the time are known only then). Placeholder values are sanitised
and no template can name a path outside the output folder.
"""

from __future__ import annotations

import re
import secrets
import string
import unicodedata
from datetime import datetime

from ..errors import InvalidParams
from ..protocol import GenerateSpec, ResolvedGenerate
from .registry import ModelRecord, ModelRegistry

__all__ = [
    "DEFAULT_OUTPUT_NAME",
    "OUTPUT_NAME_FIELDS",
    "TaskInputManager",
    "check_output_name",
    "render_output_name",
]

DEFAULT_OUTPUT_NAME = "{date}_{model}_{seed}"
OUTPUT_NAME_FIELDS = frozenset({"job", "seed", "model", "date", "steps", "frames", "prompt"})
PROMPT_CHARS = 40  # how much of the prompt `{prompt}` keeps
MAX_STEM_BYTES = 180  # leaves room for "(NNN).mp4" and temp-name decoration under 255
SEED_BITS = 32  # random seeds stay short enough to type back in


class TaskInputManager:
    """Fills defaults from the model record and validates sizes and names."""

    def __init__(
        self, registry: ModelRegistry, default_model: str, dtype_name: str = "auto"
    ) -> None:
        self.registry = registry
        self.default_model = default_model
        self.dtype_name = dtype_name

    def resolve(self, spec: GenerateSpec) -> ResolvedGenerate:
        record = self.registry.resolve(spec.model or self.default_model)
        d = record.defaults
        width = spec.width if spec.width is not None else d.width
        height = spec.height if spec.height is not None else d.height
        frames = spec.frames if spec.frames is not None else d.frames
        check_size(record, width, height, frames)
        output_name = spec.output_name if spec.output_name is not None else DEFAULT_OUTPUT_NAME
        check_output_name(output_name)
        return ResolvedGenerate(
            model=record.name,
            source=record.source,
            prompt=spec.prompt,
            negative_prompt=(
                spec.negative_prompt if spec.negative_prompt is not None else d.negative_prompt
            ),
            width=width,
            height=height,
            frames=frames,
            steps=spec.steps if spec.steps is not None else d.steps,
            guidance_scale=(
                spec.guidance_scale if spec.guidance_scale is not None else d.guidance_scale
            ),
            seed=spec.seed if spec.seed is not None else secrets.randbits(SEED_BITS),
            fps=spec.fps if spec.fps is not None else d.fps,
            flow_shift=spec.flow_shift if spec.flow_shift is not None else d.flow_shift,
            output_name=output_name,
            dtype=self.dtype_name,
        )


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


def check_output_name(template: str) -> None:
    """A template may use only the known placeholders and can never leave the folder."""
    field = "$.params.output_name"
    if any(ord(c) < 32 or ord(c) == 127 for c in template):
        raise InvalidParams("output_name must not contain control characters", field=field)
    if "/" in template or "\\" in template or ".." in template:
        raise InvalidParams(
            "output_name is a file name, not a path: it must not contain '/', '\\' or '..'",
            field=field,
        )
    if template.startswith((".", "~")):
        raise InvalidParams("output_name must not start with '.' or '~'", field=field)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidParams(f"output_name is not a valid template: {exc}", field=field) from None
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in OUTPUT_NAME_FIELDS or spec or conversion:
            known = ", ".join("{" + f + "}" for f in sorted(OUTPUT_NAME_FIELDS))
            raise InvalidParams(
                f"output_name placeholder {{{name}}} is not supported; use {known}",
                field=field,
            )


def sanitise(text: str, limit: int | None = None) -> str:
    """Letters, digits, '.', '_' and '-' only (any script); runs of others become '-'."""
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r"[^\w.\-]+", "-", text, flags=re.UNICODE)
    text = re.sub(r"\.{2,}", ".", text)
    if limit is not None:
        text = text[:limit]
    return text.strip(".-_")


def render_output_name(
    template: str, *, job_id: int, job: ResolvedGenerate, now: datetime | None = None
) -> str:
    """The file stem for a run: the template filled in, safe as one file name."""
    check_output_name(template)
    model = job.model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    values = {
        "job": str(job_id),
        "seed": str(job.seed),
        "model": sanitise(model) or "model",
        "date": (now or datetime.now()).strftime("%Y%m%d-%H%M%S"),
        "steps": str(job.steps),
        "frames": str(job.frames),
        "prompt": sanitise(job.prompt, PROMPT_CHARS) or "prompt",
    }
    stem = sanitise(template.format(**values)) or f"job-{job_id}"
    encoded = stem.encode("utf-8")[:MAX_STEM_BYTES]
    return encoded.decode("utf-8", errors="ignore").strip(".-_") or f"job-{job_id}"
