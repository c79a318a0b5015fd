"""Output names: a template checked at enqueue, rendered into one safe file stem at run time.

A template is literal text with placeholders in braces:

    {job}                      the job id
    {seed} {model} {steps} {frames}
    {resolution}               WIDTHxHEIGHT, e.g. 832x480
    {input}                    the input file's stem (a matting job's video, a
                               generation's start image or source video; else "none")
    {mask_type}                a matting job's output: alpha, foreground, greenscreen
                               ("none" for a generation)
    {prompt} / {prompt(40)}    the first 40 (or N, 1..200) characters of the prompt
    {date} / {date(%Y-%m-%d-%Hh%Mm%Ss)}
                               the local time the output is written; default %Y%m%d-%H%M%S

The default, `{date}_{model}_{seed}`, gives `20250102-030405_tiny_42` (matting jobs:
`{date}_{input}_{mask_type}`, matting/inputs.py). Matting jobs
(ResolvedMatAnyOne) have no prompt and no denoising steps: `{prompt}` is the input file's
stem, `{steps}` the number of frames, `{seed}` the (tiny-network-only) seed.

Why checked twice: `check_output_name` refuses a bad template when the job is enqueued,
so a typo is an error the client sees at once instead of a failed job an hour later;
`render_output_name` checks again because job records written by older daemons are run
too. Rendering sanitises every value and then the whole stem (letters, digits, `.`, `_`,
`-` in any script), strips leading dots and dashes, and caps the stem at 180 UTF-8 bytes
(room for `(NNN).mp4`, `.source-N.png` and the temporary-name decoration under the usual
255-byte limit), so no template and no prompt can name a path outside the output folder.

Use:

    check_output_name(spec.output_name)                       # at enqueue; InvalidParams
    stem = render_output_name(job.output_name, job_id=7, job=job)   # when writing
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from pathlib import PurePath

from ..errors import InvalidParams
from ..protocol import ResolvedJob, ResolvedMatAnyOne

__all__ = [
    "DEFAULT_DATE_FORMAT",
    "DEFAULT_OUTPUT_NAME",
    "MAX_STEM_BYTES",
    "OUTPUT_NAME_FIELDS",
    "check_output_name",
    "render_output_name",
    "sanitise",
]

DEFAULT_OUTPUT_NAME = "{date}_{model}_{seed}"
DEFAULT_DATE_FORMAT = "%Y%m%d-%H%M%S"
OUTPUT_NAME_FIELDS = frozenset(
    {"job", "seed", "model", "date", "steps", "frames", "prompt", "resolution", "input"}
    | {"mask_type"}
)
PROMPT_CHARS = 40  # how much of the prompt a bare `{prompt}` keeps
MAX_PROMPT_CHARS = 200
MAX_STEM_BYTES = 180
FIELD = "$.params.output_name"

# One placeholder: a name and an optional argument in parentheses (no braces inside).
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)(?:\(([^(){}]*)\))?\}")
_STRFTIME_DIRECTIVES = set("aAbBcdfHIjmMpSUwWxXyYzZGuVeT%")


def _known() -> str:
    return ", ".join("{" + f + "}" for f in sorted(OUTPUT_NAME_FIELDS))


def _placeholders(template: str) -> list[tuple[str, str | None, int, int]]:
    """(name, argument, start, end) of each placeholder; stray braces are errors."""
    found = []
    pos = 0
    for match in _PLACEHOLDER.finditer(template):
        _check_literal(template[pos : match.start()])
        found.append((match.group(1), match.group(2), match.start(), match.end()))
        pos = match.end()
    _check_literal(template[pos:])
    return found


def _check_literal(text: str) -> None:
    if "{" in text or "}" in text:
        raise InvalidParams(
            f"output_name has a brace that is not part of a placeholder; use {_known()}",
            field=FIELD,
        )


def _check_argument(name: str, argument: str | None) -> None:
    if name not in OUTPUT_NAME_FIELDS:
        raise InvalidParams(
            f"output_name placeholder {{{name}}} is not supported; use {_known()}", field=FIELD
        )
    if argument is None:
        return
    if name == "prompt":
        if not argument.isdigit() or not 1 <= int(argument) <= MAX_PROMPT_CHARS:
            raise InvalidParams(
                f"{{prompt({argument})}}: the length must be a number from 1 to {MAX_PROMPT_CHARS}",
                field=FIELD,
            )
    elif name == "date":
        directives = re.findall(r"%(.)", argument.replace("%%", ""))
        if (
            not argument
            or "%" not in argument
            or any(d not in _STRFTIME_DIRECTIVES for d in directives)
        ):
            raise InvalidParams(
                f"{{date({argument})}}: the argument must be a strftime format such as "
                "%Y-%m-%d-%Hh%Mm%Ss",
                field=FIELD,
            )
    else:
        raise InvalidParams(f"output_name placeholder {{{name}}} takes no argument", field=FIELD)


def check_output_name(template: str) -> None:
    """Raise InvalidParams (field `$.params.output_name`) unless `template` uses only the
    known placeholders and, whatever they render to, stays a file name in the folder."""
    if any(ord(c) < 32 or ord(c) == 127 for c in template):
        raise InvalidParams("output_name must not contain control characters", field=FIELD)
    bare = _PLACEHOLDER.sub("", template)  # a date format may contain '/'; literals may not
    if "/" in bare or "\\" in bare or ".." in template:
        raise InvalidParams(
            "output_name is a file name, not a path: it must not contain '/', '\\' or '..'",
            field=FIELD,
        )
    if template.startswith((".", "~")):
        raise InvalidParams("output_name must not start with '.' or '~'", field=FIELD)
    if not template.strip():
        raise InvalidParams("output_name must not be blank", field=FIELD)
    for name, argument, _start, _end in _placeholders(template):
        _check_argument(name, argument)


def sanitise(text: str, limit: int | None = None) -> str:
    """Letters, digits, '.', '_' and '-' only (any script); runs of others become '-'."""
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r"[^\w.\-]+", "-", text, flags=re.UNICODE)
    text = re.sub(r"\.{2,}", ".", text)
    if limit is not None:
        text = text[:limit]
    return text.strip(".-_")


def model_label(model: str) -> str:
    """The short name of a model for file names: a hub id's or folder's last part, and
    for a Hugging Face cache snapshot (`models--Org--Name/snapshots/<commit>`) the
    repository's name rather than the 40-hex commit."""
    parts = model.rstrip("/\\").replace("\\", "/").split("/")
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1]
    if parts[-1].startswith("models--"):
        return parts[-1].split("--")[-1]
    return parts[-1]


def _values(job: ResolvedJob, job_id: int) -> dict[str, str]:
    model = model_label(job.model)
    if isinstance(job, ResolvedMatAnyOne):
        model = PurePath(model).stem if "." in model else model
        prompt, steps = PurePath(job.input).stem, job.frames
        source: str | None = job.input
        mask_type = job.mask_type
    else:
        prompt, steps = job.prompt, job.steps
        source = job.image or job.video
        mask_type = "none"
    return {
        "job": str(job_id),
        "seed": str(job.seed),
        "model": sanitise(model) or "model",
        "steps": str(steps),
        "frames": str(job.frames),
        "resolution": f"{job.width}x{job.height}",
        "prompt": prompt,
        "input": sanitise(PurePath(source).stem, 60) if source else "none",
        "mask_type": sanitise(mask_type) or "none",
    }


def render_output_name(
    template: str, *, job_id: int, job: ResolvedJob, now: datetime | None = None
) -> str:
    """The file stem for a run: the template filled in, safe as one file name (no
    extension; the writer adds it and `(N)` when the name is taken)."""
    check_output_name(template)
    values = _values(job, job_id)
    when = now or datetime.now()
    parts: list[str] = []
    pos = 0
    for name, argument, start, end in _placeholders(template):
        parts.append(template[pos:start])
        if name == "date":
            value = when.strftime(argument or DEFAULT_DATE_FORMAT)
        elif name == "prompt":
            limit = int(argument) if argument else PROMPT_CHARS
            value = sanitise(values["prompt"], limit) or "prompt"
        else:
            value = values[name]
        parts.append(sanitise(value) or name)
        pos = end
    parts.append(template[pos:])
    stem = sanitise("".join(parts)) or f"job-{job_id}"
    encoded = stem.encode("utf-8")[:MAX_STEM_BYTES]
    return encoded.decode("utf-8", errors="ignore").strip(".-_") or f"job-{job_id}"
