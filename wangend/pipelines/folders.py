"""What a diffusers folder (or a cached hub model) holds: its missing parts and its
Wan family, read from its own files (model_index.json, the transformer's and VAE's
configs). Cheap: stat calls and small JSON reads, so it runs on every enqueue; reading
the weights' headers (`damaged_weights`) waits for a load.

Folders arrive the way users have them: a Hugging Face cache folder (`models--Org--Name`,
snapshots of symlinks into `blobs/`) stands for the snapshot `refs/main` names; weights
may be sharded or saved as a variant only (weights.py); model_index.json may list parts
the pipeline class never takes, which are ignored as diffusers ignores them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path

from .catalog import (
    FAMILY_BOUNDARY,
    FLF2V_CAPABILITIES,
    PIPELINE_COMPONENTS,
    REQUIRED_COMPONENTS,
    WAN21_I2V,
    WAN21_T2V,
    WAN21_VACE,
    WAN22_I2V,
    WAN22_T2V,
    WAN22_TI2V,
)
from .weights import component_weights, cut_short

# Components that are configuration files, not weights.
CONFIG_ONLY = ("scheduler", "tokenizer", "image_processor")

__all__ = [
    "check_folder",
    "conflicts",
    "damaged_weights",
    "detect",
    "hub_cached",
    "hub_reader",
    "is_model_folder",
    "listed_components",
    "read_json",
    "snapshot_folder",
]


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def listed_components(index: dict) -> dict[str, tuple[str, str]]:
    """name -> (library, class) for each component model_index.json lists with a class
    (`[null, null]` means absent), in the file's order. For a pipeline wangend runs, only
    the components its class takes: diffusers never loads another entry, so a stray one
    (an old `safety_checker`, a `feature_extractor`) is neither checked nor read."""
    pipeline = index.get("_class_name")
    takes = PIPELINE_COMPONENTS.get(pipeline) if isinstance(pipeline, str) else None
    listed: dict[str, tuple[str, str]] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, cls = value
        if not (isinstance(library, str) and library and isinstance(cls, str) and cls):
            continue
        if takes is None or name in takes:
            listed[name] = (library, cls)
    return listed


def is_model_folder(folder: Path) -> bool:
    """A diffusers folder, or a Hugging Face cache folder of one (two stat calls)."""
    return (folder / "model_index.json").is_file() or (folder / "snapshots").is_dir()


def snapshot_folder(folder: Path) -> tuple[Path, str | None]:
    """The folder a model is read from, and the problem when there is none to pick.

    A folder with model_index.json is itself. A Hugging Face cache folder
    (`models--Org--Name`, holding `refs/` and `snapshots/`, as huggingface_hub stores a
    download) means the snapshot its `refs/main` names, or its only snapshot.
    """
    snapshots = folder / "snapshots"
    if (folder / "model_index.json").is_file() or not snapshots.is_dir():
        return folder, None
    ref = folder / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if commit and (snapshots / commit).is_dir():
            return snapshots / commit, None
        return folder, (
            f"refs/main names snapshot {commit or '(empty)'}, which is not in {snapshots}"
        )
    found = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return snapshots / found[0], None
    return folder, (
        f"a Hugging Face cache folder with no refs/main and {len(found)} snapshots "
        f"({', '.join(found) or 'none'}); give the path of one snapshot instead"
    )


def check_folder(folder: Path, replaced: Collection[str] = ()) -> tuple[str | None, list[str]]:
    """Inspect a diffusers folder: (pipeline class name, list of missing parts).
    `replaced`: components whose weights come from elsewhere (a single-file checkpoint):
    their folder needs its config.json only."""
    index = read_json(folder / "model_index.json")
    if index is None:
        return None, ["model_index.json"]
    pipeline = index.get("_class_name")
    missing: list[str] = []
    listed = listed_components(index)
    for name in REQUIRED_COMPONENTS:
        if name not in listed:
            missing.append(f"{name} (not listed in model_index.json)")
    if not listed.keys() & {"transformer", "transformer_2"}:
        missing.append("transformer (not listed in model_index.json)")
    for name, (library, _cls) in sorted(listed.items()):
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
        elif not (sub / "config.json").is_file():
            missing.append(f"{name}/config.json")
        elif name not in replaced:
            problem = component_weights(sub, name, library).problem
            if problem:
                missing.append(problem)
    return pipeline if isinstance(pipeline, str) else None, missing


def damaged_weights(folder: Path, replaced: Collection[str] = ()) -> list[str]:
    """`component/file: what is wrong` for each weights file that is shorter than its
    header says (a partial download) or not safetensors at all. Reads every header, so
    it runs before a load, not on every enqueue. `replaced` components are not read."""
    index = read_json(folder / "model_index.json") or {}
    damaged = []
    for name, (library, _cls) in listed_components(index).items():
        if name in CONFIG_ONLY or name in replaced:
            continue
        for path in component_weights(folder / name, name, library).files:
            problem = cut_short(path)
            if problem:
                damaged.append(f"{name}/{path.name}: {problem}")
    return damaged


def conflicts(index: dict, read: Callable[[str], dict | None]) -> list[str]:
    """What in a folder's files contradicts the rest, each as a sentence: the pipeline
    class against its transformer (input channels, VACE layers), Wan 2.2's keys against
    the experts present, a scheduler the Wan pipelines cannot drive. Every one of these
    loads, then fails mid-run with a tensor-shape error; refused up front, the user
    learns which file to fix. `read` as for `detect`; a config it lacks is not judged."""
    problems: list[str] = []
    pipeline = index.get("_class_name")
    present = listed_components(index)
    z_dim = (read("vae/config.json") or {}).get("z_dim", 16)
    image = pipeline == "WanImageToVideoPipeline"
    expected = 2 * z_dim + 4 if image else z_dim
    kinds = {z_dim: "a text-to-video", 2 * z_dim + 4: "an image-to-video"}
    for part in ("transformer", "transformer_2"):
        config = read(f"{part}/config.json") if part in present else None
        if config is None:
            continue
        channels = config.get("in_channels")
        if isinstance(channels, int) and channels != expected:
            why = f"{z_dim} latent channels" + (", twice, and 4 for the mask" if image else "")
            guess = f" ({kinds[channels]} transformer)" if channels in kinds else ""
            problems.append(
                f"{pipeline} needs a {part} with {expected} input channels ({why}); "
                f"{part}/config.json has {channels}{guess}"
            )
        vace = bool(config.get("vace_layers"))
        if pipeline == "WanVACEPipeline" and not vace:
            problems.append(
                f"WanVACEPipeline needs a VACE transformer; {part}/config.json has no vace_layers"
            )
        elif vace and pipeline != "WanVACEPipeline":
            problems.append(
                f"{part}/config.json is a VACE transformer (it has vace_layers); "
                f"model_index.json names {pipeline}, not WanVACEPipeline"
            )
    if "transformer_2" in present and "transformer" not in present:
        problems.append(
            "model_index.json lists transformer_2 (Wan 2.2's low-noise expert) but no "
            "transformer (the high-noise one)"
        )
    boundary = index.get("boundary_ratio")
    if boundary is not None:
        if isinstance(boundary, bool) or not isinstance(boundary, int | float):
            problems.append(f"model_index.json's boundary_ratio {boundary!r} is not a number")
        elif not 0 < boundary <= 1:
            problems.append(f"model_index.json's boundary_ratio must be in (0, 1], not {boundary}")
        elif "transformer_2" not in present:
            problems.append(
                "model_index.json sets boundary_ratio (where Wan 2.2 switches to its second "
                "expert) but lists no transformer_2"
            )
    problem = _scheduler_problem(read("scheduler/scheduler_config.json"))
    if problem:
        problems.append(problem)
    return problems


def _scheduler_problem(config: dict | None) -> str | None:
    """Why a scheduler config cannot drive the Wan pipelines, or None. They call
    `set_begin_index`, which DDIM, DDPM, PNDM and the like lack."""
    if config is None:
        return None
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        return f"scheduler/scheduler_config.json names {name!r}, which is not a diffusers scheduler"
    if not hasattr(cls, "set_begin_index"):
        return (
            f"scheduler {name} cannot drive the Wan pipelines (it has no set_begin_index); "
            "Wan folders use FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler or "
            "DPMSolverMultistepScheduler"
        )
    return None


def detect(index: dict, read: Callable[[str], dict | None]) -> dict:
    """Family and model facts from a folder's model_index.json; `read("vae/config.json")`
    gives a component config (or None). Returns the family_record keyword arguments."""
    pipeline = index.get("_class_name")
    present = listed_components(index)
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
        "span": span if isinstance(span := main.get("rope_max_seq_len"), int) else None,
    }


def hub_cached(repo_id: str, weights_of: Collection[str] = ("transformer",)) -> bool:
    """Cheap: the index, the transformer config and the weights (one file, or the shard
    index) of each of `weights_of` are in the local HF cache. A snapshot whose
    transformer weights were never fetched (a file model's base) is not the model."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, name), str)

    stem = "diffusion_pytorch_model.safetensors"
    try:
        return all(cached(n) for n in ("model_index.json", "transformer/config.json")) and all(
            cached(f"{part}/{stem}") or cached(f"{part}/{stem}.index.json") for part in weights_of
        )
    except Exception:  # a malformed id or unreadable cache: simply not available
        return False


def hub_reader(repo_id: str) -> Callable[[str], dict | None]:
    """Reads a cached file of a hub repo; None when it is not cached (nothing downloads)."""

    def read(name: str) -> dict | None:
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(repo_id, name)
        except Exception:
            return None
        return read_json(Path(path)) if isinstance(path, str) else None

    return read
