"""Import a saved Wan2GP queue into wangend: `wangenctl import-queue FILE`.

What Wan2GP writes (its "Save Queue" button and its `--process` input):

* `queue.zip`: a `queue.json` manifest plus the attached media, flat, named like
  `task3_image_start_0.png`. The manifest is a JSON list of `{"id": N, "params": {...}}`;
  an attachment param (`image_start`, `image_end`, `image_refs`, `video_guide`,
  `video_mask`, `video_source`, ...) holds a file name inside the zip, or a list of them.
* a bare `queue.json` (the same list; relative names are beside the file), or a
  settings export: one JSON object of params.

`params` carry the UI's settings: `model_type` (and `base_model_type` for fine-tunes),
`prompt`, `negative_prompt`, `resolution` ("832x480"), `video_length` (frames),
`num_inference_steps`, `guidance_scale`, `guidance2_scale` with `guidance_phases` and
`switch_threshold` (two-expert Wan 2.2), `flow_shift`, `seed` (-1: random),
`activated_loras` with `loras_multipliers` (one value per LoRA, space separated),
`image_prompt_type` / `video_prompt_type` (letters saying which inputs are used),
`repeat_generation`, `force_fps`, `denoising_strength`.

Each task maps onto one GenerateSpec (or `repeat_generation` of them); what cannot be
mapped is skipped with the reason, and what is ignored is noted. Attached media are
extracted to a folder the daemon can read before anything is enqueued. A dry run asks the
daemon to validate each spec instead, with the attachments in a scratch folder inside
that same folder (`staging_dir`), so it refuses exactly what the import would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec

from wangend.protocol import GenerateSpec, JobError

__all__ = [
    "MODEL_MAP",
    "ImportTask",
    "QueueFile",
    "QueueImportError",
    "default_media_dir",
    "describe",
    "extract_media",
    "map_tasks",
    "parse_model_map",
    "read_queue",
    "staging_dir",
]

# Wan2GP model_type -> wangend registry name.
MODEL_MAP: dict[str, str] = {
    "t2v": "wan2.1-t2v-14b",
    "t2v_1.3B": "wan2.1-t2v-1.3b",
    "i2v": "wan2.1-i2v-480p",
    "i2v_720p": "wan2.1-i2v-720p",
    "vace_1.3B": "wan2.1-vace-1.3b",
    "vace_14B": "wan2.1-vace-14b",
    "t2v_2_2": "wan2.2-t2v-a14b",
    "i2v_2_2": "wan2.2-i2v-a14b",
    "ti2v_2_2": "wan2.2-ti2v-5b",
}
# Wan2GP attachment param -> (GenerateSpec field, the *_prompt_type param and letter
# that switch it on). A param whose switch is absent from the task counts as on.
ATTACHMENTS: dict[str, tuple[str, str, str]] = {
    "image_start": ("image", "image_prompt_type", "S"),
    "image_end": ("last_image", "image_prompt_type", "E"),
    "video_source": ("video", "image_prompt_type", "V"),
    "video_guide": ("video", "video_prompt_type", "V"),
    "video_mask": ("mask", "video_prompt_type", "M"),
    "image_mask": ("mask", "video_prompt_type", "A"),
    "image_refs": ("reference_images", "video_prompt_type", "I"),
}
# Inputs wangend has no model for: a task that uses one is skipped.
UNSUPPORTED_INPUTS = {
    "audio_guide": "audio-driven generation (talking heads) is not supported",
    "audio_guide2": "audio-driven generation (talking heads) is not supported",
    "image_guide": "image-guided editing is not supported",
}
# Settings wangend does not apply; noted, not fatal.
IGNORED_SETTINGS = {
    "prompt_enhancer": "the prompt enhancer setting (the daemon's [enhancer] applies)",
    "spatial_upsampling": "spatial upsampling",
    "temporal_upsampling": "temporal upsampling",
    "MMAudio_setting": "MMAudio soundtrack",
}
MAX_REPEATS = 100


class QueueImportError(Exception):
    """The queue file cannot be read; the message names the file and what is wrong."""


class ImportTask(msgspec.Struct, kw_only=True):
    """One Wan2GP task (one of its repeats) and what became of it."""

    index: int  # 1-based position in the manifest
    source_id: Any = None  # Wan2GP's task id
    model_type: str = ""
    spec: dict[str, Any] | None = None  # the GenerateSpec sent (None when skipped)
    skipped: str | None = None  # why nothing was enqueued
    notes: list[str] = msgspec.field(default_factory=list)
    job: int | None = None  # the daemon's job id once queued
    # The daemon refused the spec: `{type, message}`, the shape of a job record's error.
    error: JobError | None = None


class QueueFile(msgspec.Struct, kw_only=True):
    """A parsed queue: its tasks and where their attachments are (`zip` or `folder`)."""

    path: Path
    tasks: list[dict[str, Any]]
    zip_names: list[str] = msgspec.field(default_factory=list)  # empty: not a zip

    @property
    def is_zip(self) -> bool:
        return bool(self.zip_names)


def default_media_dir(queue_path: Path, env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_DATA_HOME/wangend/imports/<file stem>` (~/.local/share/... by default)."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "share")
    return Path(base).expanduser() / "wangend" / "imports" / queue_path.stem


def parse_model_map(pairs: Sequence[str]) -> dict[str, str]:
    """The built-in map with `old=new` overrides laid over it."""
    mapping = dict(MODEL_MAP)
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise QueueImportError(f"--model-map {pair!r}: expected WAN2GP_TYPE=MODEL")
        mapping[old.strip()] = new.strip()
    return mapping


def read_queue(path: Path) -> QueueFile:
    """Read `queue.zip`, a bare `queue.json` or a settings `.json`."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if "queue.json" not in names:
                    raise QueueImportError(f"{path}: no queue.json inside, not a Wan2GP queue")
                data = json.loads(zf.read("queue.json").decode("utf-8"))
            return QueueFile(path=path, tasks=_tasks(path, data), zip_names=names)
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QueueImportError(f"{path} does not exist") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise QueueImportError(f"cannot read {path}: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise QueueImportError(f"{path} is not valid JSON: {exc}") from None
    return QueueFile(path=path, tasks=_tasks(path, data))


def _tasks(path: Path, data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):  # a settings export: one task's params
        return [{"id": None, "params": data}]
    if not isinstance(data, list):
        raise QueueImportError(f"{path}: expected a list of tasks, found {type(data).__name__}")
    return [t if isinstance(t, dict) else {"id": None, "params": t} for t in data]


def map_tasks(
    queue: QueueFile, model_map: Mapping[str, str], media_dir: Path
) -> tuple[list[ImportTask], dict[Path, str]]:
    """Every task as ImportTasks, and the attachments to extract (target -> zip name)."""
    out: list[ImportTask] = []
    extract: dict[Path, str] = {}
    for index, task in enumerate(queue.tasks, start=1):
        out += _map_task(index, task, queue, model_map, media_dir, extract)
    return out, extract


def _map_task(
    index: int,
    task: Mapping[str, Any],
    queue: QueueFile,
    model_map: Mapping[str, str],
    media_dir: Path,
    extract: dict[Path, str],
) -> list[ImportTask]:
    params = task.get("params")
    item = ImportTask(index=index, source_id=task.get("id"))
    if not isinstance(params, dict):
        item.skipped = "the task has no params object"
        return [item]
    item.model_type = str(params.get("model_type") or params.get("base_model_type") or "")
    try:
        spec = _spec(params, item, queue, model_map, media_dir, extract)
    except _Skip as skip:
        item.skipped = str(skip)
        return [item]
    return _repeats(item, spec, params)


class _Skip(Exception):
    pass


def _spec(
    p: Mapping[str, Any],
    item: ImportTask,
    queue: QueueFile,
    model_map: Mapping[str, str],
    media_dir: Path,
    extract: dict[Path, str],
) -> dict[str, Any]:
    if str(p.get("mode") or "").startswith("edit_"):
        raise _Skip(f"a {p['mode']} post-processing task, not a generation")
    model = model_map.get(item.model_type)
    base = str(p.get("base_model_type") or "")
    if model is None and base in model_map:
        model = model_map[base]
        item.notes.append(f"fine-tune {item.model_type} imported as its base type {base}")
    if model is None:
        shown = item.model_type or "(none)"
        raise _Skip(f"unknown model type {shown!r}; map it with --model-map {shown}=MODEL")
    prompt = str(p.get("prompt") or "").strip()
    if not prompt:
        raise _Skip("the task has no prompt")
    for key, reason in UNSUPPORTED_INPUTS.items():
        if p.get(key):
            raise _Skip(reason)
    spec: dict[str, Any] = {"prompt": prompt, "model": model}
    if p.get("negative_prompt"):
        spec["negative_prompt"] = str(p["negative_prompt"])
    if p.get("resolution"):
        width, sep, height = str(p["resolution"]).lower().partition("x")
        if not (sep and width.strip().isdigit() and height.strip().isdigit()):
            raise _Skip(f"resolution {p['resolution']!r} is not WIDTHxHEIGHT")
        spec["width"], spec["height"] = int(width), int(height)
    _copy(p, spec, "video_length", "frames", int)
    _copy(p, spec, "num_inference_steps", "steps", int)
    _copy(p, spec, "guidance_scale", "guidance_scale", float)
    _copy(p, spec, "flow_shift", "flow_shift", float)
    seed = p.get("seed")
    if isinstance(seed, int) and seed >= 0:
        spec["seed"] = seed
    if _number(p.get("guidance_phases")) >= 2:
        _copy(p, spec, "guidance2_scale", "guidance_scale_2", float)
        threshold = _number(p.get("switch_threshold"))
        if 0 < threshold < 1000:
            spec["boundary_ratio"] = threshold / 1000.0
    fps = _number(p.get("force_fps"))
    if fps > 0:
        spec["fps"] = int(fps)
    spec.update(_media(p, item, queue, media_dir, extract))
    if "video" in spec and p.get("video_source"):
        strength = _number(p.get("denoising_strength"))
        if 0 < strength <= 1:
            spec["strength"] = strength
    loras = _loras(p)
    if loras:
        spec["loras"] = loras
    for key, what in IGNORED_SETTINGS.items():
        if p.get(key):
            item.notes.append(f"ignored: {what}")
    try:
        msgspec.convert(spec, GenerateSpec)
    except msgspec.ValidationError as exc:
        raise _Skip(f"not a valid job: {exc}") from None
    return spec


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _copy(p: Mapping[str, Any], spec: dict[str, Any], key: str, field: str, kind: type) -> None:
    value = p.get(key)
    if value is None or value == "":
        return
    try:
        spec[field] = kind(value)
    except (TypeError, ValueError):
        raise _Skip(f"{key} {value!r} is not a number") from None


def _loras(p: Mapping[str, Any]) -> list[dict[str, str]]:
    names = p.get("activated_loras") or []
    if isinstance(names, str):
        names = [names]
    text = str(p.get("loras_multipliers") or "")
    lines = [line for line in text.splitlines() if not line.strip().startswith("#")]
    multipliers = " ".join(lines).split()
    out = []
    for i, name in enumerate(names):
        stem = PurePosixPath(str(name).replace("\\", "/")).name
        stem = stem.removesuffix(".safetensors")
        out.append({"name": stem, "multiplier": multipliers[i] if i < len(multipliers) else "1"})
    return out


def _media(
    p: Mapping[str, Any],
    item: ImportTask,
    queue: QueueFile,
    media_dir: Path,
    extract: dict[Path, str],
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, (field, switch, letter) in ATTACHMENTS.items():
        value = p.get(key)
        if not value:
            continue
        if switch in p and letter not in str(p.get(switch) or ""):
            item.notes.append(f"ignored: {key} ({switch} {p.get(switch)!r} does not use it)")
            continue
        if field in fields:
            item.notes.append(f"ignored: {key} ({field} already comes from another input)")
            continue
        names = value if isinstance(value, list) else [value]
        paths = [_attachment(str(n), key, queue, media_dir, extract) for n in names]
        if field == "reference_images":
            fields[field] = paths
        else:
            if len(paths) > 1:
                item.notes.append(f"{key}: only the first of {len(paths)} files is used")
            fields[field] = paths[0]
    return fields


def _attachment(
    name: str, key: str, queue: QueueFile, media_dir: Path, extract: dict[Path, str]
) -> str:
    """The absolute path the daemon will read `name` from."""
    if not queue.is_zip:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else queue.path.parent / path
        if not path.is_file():
            raise _Skip(f"{key}: file {path} does not exist")
        return str(path.absolute())
    inner = PurePosixPath(name.replace("\\", "/"))
    if inner.is_absolute() or ".." in inner.parts or name not in queue.zip_names:
        raise _Skip(f"{key}: {name!r} is not a file inside {queue.path.name}")
    target = (media_dir / inner.name).absolute()
    extract[target] = name
    return str(target)


def extract_media(queue: QueueFile, extract: Mapping[Path, str]) -> None:
    """Write the attachments the mapped tasks use (and nothing else) out of the zip."""
    if not extract:
        return
    with zipfile.ZipFile(queue.path) as zf:
        for target, name in extract.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            tmp.write_bytes(zf.read(name))
            os.replace(tmp, target)


@contextmanager
def staging_dir(media_dir: Path) -> Iterator[Path]:
    """A scratch folder inside `media_dir` for a dry run's attachments; it is removed
    afterwards, with every folder made for it, so the dry run leaves nothing behind.

    Inside `media_dir`, not the system's temp folder: the daemon then reads the files
    under the same `input_folders` rule and folder permissions as after the real import,
    so its validation refuses what the import would and nothing else. Made with `mkdir`
    (the umask's mode, as the import makes its folders), not mkdtemp's private 0700.
    """
    made = []
    for folder in (media_dir, *media_dir.parents):
        if folder.exists():
            break
        made.append(folder)  # deepest first: the order to remove them in
    media_dir.mkdir(parents=True, exist_ok=True)
    scratch = media_dir / f".dry-run-{os.getpid()}-{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # something else was put there meanwhile: keep it
                break


def _repeats(item: ImportTask, spec: dict[str, Any], p: Mapping[str, Any]) -> list[ImportTask]:
    """`repeat_generation` N: N jobs; a fixed seed counts up so each video differs."""
    count = int(min(max(_number(p.get("repeat_generation")), 1), MAX_REPEATS))
    if count == 1:
        item.spec = spec
        return [item]
    out = []
    for k in range(count):
        copy = dict(spec)
        if "seed" in copy:
            copy["seed"] = copy["seed"] + k
        notes = [*item.notes, f"repeat {k + 1} of {count}"]
        out.append(msgspec.structs.replace(item, spec=copy, notes=notes))
    return out


def describe(task: ImportTask) -> str:
    """One line per task for the terminal."""
    head = f"task {task.index}"
    if task.source_id is not None:
        head += f" (Wan2GP id {task.source_id})"
    if task.skipped:
        return f"{head}: skipped: {task.skipped}"
    spec = task.spec or {}
    size = f"{spec['width']}x{spec['height']}" if "width" in spec else "default size"
    what = f"{spec.get('model')}, {size}"
    inputs = [f for f in ("image", "last_image", "video", "mask", "reference_images") if f in spec]
    if inputs:
        what += ", with " + ", ".join(inputs)
    if task.error:
        status = f"refused by the daemon: {task.error.message}"
    elif task.job is not None:
        status = f"queued as job {task.job}"
    else:
        status = "would queue"
    notes = f" [{'; '.join(task.notes)}]" if task.notes else ""
    return f"{head}: {status} ({what}){notes}"
