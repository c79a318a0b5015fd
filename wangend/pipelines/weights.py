"""Which safetensors files one model component loads from, and whether they are whole.

diffusers and transformers find weights by fixed names, not by any `*.safetensors`:
`diffusion_pytorch_model` (diffusers models) or `model` (transformers models), then
`.<variant>` when the folder was saved with `variant="fp16"` (or "bf16", ...), then
`.safetensors`. A sharded checkpoint has an index instead (`<stem>.safetensors.index.json`,
`<stem>.safetensors.index.<variant>.json`, or the older `<stem>.safetensors.<variant>.index.json`)
whose `weight_map` names the shards. Reading the same names here means a folder that
passes these checks is one `from_pretrained` reads, and one that fails is refused with
the file it lacks, not with a loader's traceback.

A component without plain weights loads its variant: that is what the folder's author
shipped, and the dtype of the job is applied when it loads either way. With several
variants the most precise one wins (fp32, bf16, fp16, then by name). Pickled weights
(`.bin`, `.pt`, ...) never count: unpickling runs code, so wangend loads safetensors only.

`cut_short(path)` reads a safetensors header (its first 8 bytes and a JSON table of
tensor offsets) and compares the size it promises with the file's size: a partial
download is caught before the loader meets it, and named. Every check follows symlinks,
so a Hugging Face cache snapshot (links into `blobs/`) reads like a plain folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ComponentWeights",
    "component_weights",
    "cut_short",
    "file_identity",
    "folder_identity",
    "read_header",
    "short_of",
]

# The weights file stem each library's from_pretrained looks for.
STEMS = {"diffusers": ("diffusion_pytorch_model",), "transformers": ("model",)}
ANY_STEM = ("diffusion_pytorch_model", "model")
VARIANT_ORDER = ("fp32", "bf16", "fp16")  # the most precise first
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class ComponentWeights:
    """What `from_pretrained` will read for a component: `variant` to pass it (None for
    the plain files), the files themselves, or `problem` saying what is wrong."""

    variant: str | None = None
    files: tuple[Path, ...] = ()
    problem: str | None = None


def _patterns(stems: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    stem = "|".join(re.escape(s) for s in stems)
    return (
        re.compile(rf"(?:{stem})\.safetensors\.index(?:\.(?P<variant>\w+))?\.json"),
        re.compile(rf"(?:{stem})\.safetensors\.(?P<variant>\w+)\.index\.json"),  # older naming
        re.compile(rf"(?:{stem})(?:\.(?P<variant>\w+))?\.safetensors"),
    )


def _variant_rank(variant: str | None) -> tuple[int, str]:
    if variant is None:
        return (0, "")
    if variant in VARIANT_ORDER:
        return (1 + VARIANT_ORDER.index(variant), variant)
    return (1 + len(VARIANT_ORDER), variant)


def _describe_missing(path: Path) -> str:
    return " (a link to a missing file)" if path.is_symlink() else ""


def _shards(folder: Path, name: str, index: Path) -> tuple[tuple[Path, ...], str | None]:
    """The shards an index names, or the problem with them."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        shards = sorted({str(v) for v in (weight_map or {}).values()})
    except (OSError, ValueError, AttributeError):
        shards = []
    if not shards:
        return (), f"{name}/{index.name} (unreadable or names no shards)"
    files = tuple(folder / shard for shard in shards)
    lacking = [f"{name}/{f.name}{_describe_missing(f)}" for f in files if not f.is_file()]
    return files, ", ".join(lacking) or None


def component_weights(folder: Path, name: str, library: str) -> ComponentWeights:
    """The safetensors files `folder` (the component called `name`, from `library`)
    loads from: plain before a variant, an index before a single file for diffusers and
    the other way round for transformers (each library's own order)."""
    stems = STEMS.get(library, ANY_STEM)
    try:
        entries = sorted(p.name for p in folder.iterdir())
    except OSError as exc:
        return ComponentWeights(problem=f"{name}/ (unreadable: {exc.strerror})")
    index_first = library != "transformers"
    patterns = _patterns(stems)
    found: dict[str | None, list[tuple[int, str]]] = {}
    for entry in entries:
        for kind, pattern in enumerate(patterns):
            match = pattern.fullmatch(entry)
            if match:
                order = kind if index_first else -kind
                found.setdefault(match["variant"], []).append((order, entry))
                break
    if found:
        variant = min(found, key=_variant_rank)
        chosen = folder / min(found[variant])[1]
        if chosen.name.endswith(".json"):
            files, problem = _shards(folder, name, chosen)
            return ComponentWeights(variant=variant, files=files, problem=problem)
        if not chosen.is_file():
            return ComponentWeights(
                variant=variant, problem=f"{name}/{chosen.name}{_describe_missing(chosen)}"
            )
        return ComponentWeights(variant=variant, files=(chosen,))
    expected = f"{stems[0]}.safetensors"
    pickled = [e for e in entries if e.endswith(PICKLED)]
    if pickled:
        return ComponentWeights(
            problem=f"{name}/*.safetensors (only pickled weights, {', '.join(pickled)}; "
            "wangend loads safetensors only and never unpickles)"
        )
    other = [e for e in entries if e.endswith(".safetensors")]
    if other:
        return ComponentWeights(
            problem=f"{name}/*.safetensors (no {expected}; {', '.join(other)} is not a name "
            f"{library} loads)"
        )
    return ComponentWeights(problem=f"{name}/*.safetensors (no {expected} and no shard index)")


def read_header(path: Path) -> tuple[dict, int, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets; and
    `__metadata__`), where its tensor data starts, and the file's size. Reads 8 bytes
    and the JSON table, never the tensors, so a 28 GB checkpoint is inspected in
    milliseconds. OSError when the file cannot be read; ValueError (saying why) when it
    is not safetensors."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(
                _stand_in(head + handle.read(64))
                or (f"cut short or not safetensors ({size} bytes, no complete header)")
            )
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header does not parse)")
    return header, 8 + length, size


def _stand_in(start: bytes) -> str | None:
    """What a file that is no safetensors file is instead, when it is a known stand-in."""
    if start.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (fetch them: git lfs pull)"
    if start.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not the weights (a download that got an error page?)"
    return None


def cut_short(path: Path) -> str | None:
    """None when the safetensors file holds every byte its header promises, else what is
    wrong with it (a partial download is the usual cause)."""
    try:
        return short_of(*read_header(path))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except ValueError as exc:
        return str(exc)


def short_of(header: dict, start: int, size: int) -> str | None:
    """`cut_short` for a header already read (`read_header`'s three values)."""
    try:
        end = max(
            (
                int(entry["data_offsets"][1])
                for key, entry in header.items()
                if key != "__metadata__"
            ),
            default=0,
        )
    except (TypeError, KeyError, IndexError, AttributeError, ValueError):
        return "not a safetensors file (its header does not parse)"
    expected = start + end
    if size < expected:
        return f"cut short: {size} of {expected} bytes (an unfinished download?)"
    return None


def file_identity(path: str | Path) -> str:
    """inode, size and modification time: a file replaced under the same name (renamed
    over, or rewritten) reads as another file, so a warm model or a resume point made
    from the old one is not taken for the new one's."""
    try:
        st = Path(path).stat()
    except OSError:
        return "missing"
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def folder_identity(folder: str | Path) -> str:
    """A short digest of the identities of model_index.json and of every file one level
    down (the components' configs, weights and tokenizer files): a warm model, or a
    resume point, made from a folder whose files were since replaced (renamed over,
    rewritten, another model moved in) is not taken for the folder's new contents.
    Stat calls only; files beside model_index.json (a README, .git) do not count."""
    folder = Path(folder)
    paths = [folder / "model_index.json"]
    try:
        subs = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        subs = []
    for sub in subs:
        if sub.is_dir():
            try:
                paths.extend(sorted(p for p in sub.iterdir() if not p.name.startswith(".")))
            except OSError:
                continue
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.relative_to(folder)}={file_identity(path)}\n".encode())
    return digest.hexdigest()[:16]
