"""ProductionManager: the warm pipeline and the decision to keep, park or replace it.

Loading a Wan model takes seconds to minutes and most of the GPU, so the daemon keeps one
pipeline warm and reuses it while jobs ask for the same load key: (source, device) plus
`EngineOptions.load_key` (dtype, memory profile, fp8, compile), the settings that change
the loaded modules. Step cache and attention backend are per-run settings applied by
`run_scope` and never force a reload. Anything else releases the old pipeline completely
first (dropping every reference, collecting, emptying the CUDA cache): two 14B models
never sit on the device at once.

With `keep_models_gb` > 0 a replaced pipeline (memory profile "none" only: offloaded
ones carry device hooks that moving would break) is parked in CPU memory instead,
least recently used first out, within that many GiB; a job that switches back moves it to
the device instead of reading it from disk again.

Loading reads the folder component by component (in model_index.json order), so
`model.loading` events report components and bytes loaded so far (bytes: the sizes of
each component's safetensors files). Every weight is read with safetensors only, so no
pickle is ever unpickled; sharded and variant-only weights load as weights.py picks
them, and each file's header is checked first, so a partial download fails naming its
file. The local cache is tried first, the hub only when downloads are allowed (not
under HF_HUB_OFFLINE; hub.py downloads). A [models.NAME] model loads its transformer(s)
from single files (checkpoints.py) and the rest from its base, whose transformer weights
are then neither required nor downloaded. Every way a load can fail becomes
`JobFailure("ModelUnavailable", <one sentence>)`; tracebacks stay in the log.

How to call it::

    pipe = manager.ensure(record, EngineOptions.from_job(job, manager.job_dtype(job.dtype)), hooks)
    with manager.run_scope(pipe, options, steps=job.steps) as scope:
        pipe(...)
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import JobFailure
from .acceleration import (
    EngineOptions,
    MagRatioTable,
    RunReport,
    apply_load_settings,
    run_settings,
    settle_options,
)
from .checkpoints import CheckpointProblem, check_file, load_transformer
from .control import JobAborted, RunHooks
from .folders import damaged_weights, listed_components, read_json, snapshot_folder
from .hub import download_snapshot
from .mappings import copy_mapped_tensors
from .registry import ModelRecord, ModelRegistry, check_folder
from .tiny import ensure_tiny_model
from .weights import component_weights

__all__ = ["DTYPES", "ProductionManager", "resolve_device", "resolve_dtype"]

DTYPES = ("float32", "bfloat16", "float16")
OOM_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", MemoryError),)
GIB = 1 << 30


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is usable, else "cpu". A named CUDA device that is
    not there is a configuration error the daemon reports at start."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    torch.device(device)  # raises on nonsense such as "gpu0"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """ "auto" -> bfloat16 on CUDA (what Wan is trained in), float32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def hub_problem(exc: BaseException) -> str:
    """Why a download failed, in words a user can act on: huggingface_hub's own
    messages run to several lines (and end in advice about the internet connection
    whatever the cause), so the kinds that matter are named here."""
    from huggingface_hub import errors

    kinds: tuple[tuple[type[BaseException], str], ...] = (
        (errors.GatedRepoError, "the repo is gated: accept its terms on the hub and log in"),
        (errors.RepositoryNotFoundError, "no such repo on the hub (or it is private)"),
        (errors.RevisionNotFoundError, "the repo has no such revision"),
        (errors.LocalEntryNotFoundError, "the hub cannot be reached and the cache lacks it"),
    )
    for kind, text in kinds:
        if isinstance(exc, kind):
            return text
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None) in (401, 404):
        return "not found on the hub: no such repo (or it is private), or no model_index.json"
    return one_line(exc)


def _env_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pipeline_bytes(pipe: Any) -> int:
    """Bytes held by a pipeline's modules (parameters and buffers)."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                total += tensor.numel() * tensor.element_size()
    return total


def component_plan(
    folder: Path, files: Mapping[str, str] | None = None
) -> list[tuple[str, str, str, str | None, int]]:
    """(name, library, class, weights variant, safetensors bytes) per component the
    pipeline takes, in model_index order. Sizes follow symlinks (a hub cache snapshot)
    and count only the files the load reads (one variant, every shard, or the single
    file in `files` that replaces a component's weights)."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    files = files or {}
    plan = []
    for name, (library, cls) in listed_components(index).items():
        if name in files:
            plan.append((name, library, cls, None, Path(files[name]).stat().st_size))
            continue
        weights = component_weights(folder / name, name, library)
        size = sum(f.stat().st_size for f in weights.files if f.is_file())
        plan.append((name, library, cls, weights.variant, size))
    return plan


class ProductionManager:
    """Owns the warm pipeline (and parked ones). Used from the worker thread only."""

    def __init__(
        self,
        registry: ModelRegistry,
        device: str = "auto",
        dtype: str = "auto",
        allow_download: bool | None = None,  # None: unless HF_HUB_OFFLINE is set
        keep_models_gb: float = 0.0,
    ) -> None:
        self.registry = registry
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self.allow_download = allow_download
        self.keep_bytes = int(keep_models_gb * GIB)
        self.mag_ratios = MagRatioTable()
        self._pipe: Any = None
        self._key: tuple[Any, ...] | None = None
        self._model: str | None = None
        # load key -> (pipeline, model name, bytes); the last entry is the most recent.
        self._parked: OrderedDict[tuple[Any, ...], tuple[Any, str, int]] = OrderedDict()
        # Sizes the warm compiled pipeline has run at (its compiled graphs cover them).
        self._compiled_shapes: set[tuple[int, ...]] = set()

    @property
    def device(self) -> str:
        return self._device

    @property
    def dtype_name(self) -> str:
        """The dtype a job with dtype "auto" runs in."""
        return self._dtype

    @property
    def loaded_model(self) -> str | None:
        return self._model

    @property
    def pipeline(self) -> Any:
        """The warm pipeline, or None."""
        return self._pipe

    @property
    def parked(self) -> list[tuple[str, int]]:
        """(model, bytes) of each parked pipeline, least recently used first."""
        return [(model, size) for _pipe, model, size in self._parked.values()]

    def downloads_allowed(self) -> bool:
        if self.allow_download is not None:
            return self.allow_download
        from huggingface_hub import constants

        return not (_env_offline() or constants.HF_HUB_OFFLINE)

    def job_dtype(self, dtype: str) -> str:
        """The concrete dtype a job runs in ("auto" -> this manager's default)."""
        return self._dtype if dtype == "auto" else resolve_dtype(dtype, self._device)

    def ensure(
        self,
        record: ModelRecord,
        options: EngineOptions | str,
        hooks: RunHooks,
        checkpoint: Callable[[], None] = lambda: None,
    ) -> Any:
        """The warm pipeline for `record` set up as `options` asks, loading it if needed.
        A plain dtype string (the older call) means default options in that dtype.

        `checkpoint` (a job's `JobControl.check_abort`) is called while a download runs
        and between components: an abort raises JobAborted within a quarter second of a
        download (which stops at its next chunk; the hub cache resumes it later) or after
        the component being read, instead of once the whole model is in."""
        if isinstance(options, str):
            options = EngineOptions(dtype=self.job_dtype(options))
        options, _notes = settle_options(options, self._device)
        key = (record.load_source, self._device, *options.load_key)
        if self._pipe is not None and self._key == key:
            self._model = record.name
            return self._pipe
        reason = "cold" if self._pipe is None else "switch"
        if self._key is not None and self._key[1:] == key[1:] and self._model == record.name:
            reason = "changed"  # the same model and settings: its files changed on disk
        data: dict[str, Any] = {
            "source": record.source,
            **({"files": dict(record.files)} if record.files else {}),
            "device": self._device,
            "dtype": options.dtype,
            "memory_profile": options.memory_profile,
            "fp8": options.fp8,
            "reason": reason,
        }
        started = time.perf_counter()
        parked = self._parked.get(key)
        # Find (or download) and check the new model's files while the warm one stays:
        # a mistyped hub id or a partial folder must not cost the next job a reload.
        folder = self._folder(record, hooks, data, checkpoint) if parked is None else None
        self._parked.pop(key, None)  # before parking the current one evicts it
        self._put_away()
        if parked is not None:
            hooks.model_loading(record.name, {**data, "reason": "unpark"})
            pipe = parked[0]
            pipe.to(self._device)
            data["reason"] = "unpark"
        else:
            assert folder is not None
            pipe = self._load(record, folder, options, hooks, data, checkpoint)
            # As loaded: a tiny model built just now has files it lacked before.
            key = (record.load_source, self._device, *options.load_key)
        self._pipe, self._key, self._model = pipe, key, record.name
        self._compiled_shapes = set()
        hooks.model_loaded(
            record.name, {**data, "seconds": round(time.perf_counter() - started, 3)}
        )
        return pipe

    def compiles_at(self, pipe: Any, shape: tuple[int, ...]) -> bool:
        """Whether a run of `pipe` at `shape` (width, height, frames) will compile first:
        true once per shape for a warm pipeline loaded with compile on. The runtime
        reports such a first step as phase "compiling" (it can take minutes), so clients
        and the ETA do not take it for a denoising step."""
        if pipe is not self._pipe or self._key is None or not self._key[-1]:
            return False
        if shape in self._compiled_shapes:
            return False
        self._compiled_shapes.add(shape)
        return True

    @contextmanager
    def run_scope(self, pipe: Any, options: EngineOptions, *, steps: int) -> Iterator[RunReport]:
        """Per-run settings (step cache, attention backend) for one run of `pipe`, removed
        afterwards even on abort; ratios a "mag" run measured are kept for this model."""
        options, notes = settle_options(options, self._device)
        source = self._key[0] if self._key is not None and pipe is self._pipe else ""
        with run_settings(
            pipe, options, steps=steps, mag_ratios=self.mag_ratios.get(source)
        ) as report:
            report.notes[:0] = notes
            yield report
        if report.measured_ratios and source:
            self.mag_ratios.record(source, report.measured_ratios)

    def release(self) -> None:
        """Drop the warm pipeline and every parked one, and give their memory back."""
        self._pipe = self._key = self._model = None
        self._parked.clear()
        _free_device_memory()

    def _put_away(self) -> None:
        """Park the warm pipeline if the budget allows, else drop it."""
        pipe, key, model = self._pipe, self._key, self._model
        self._pipe = self._key = self._model = None
        if pipe is None or key is None or model is None:
            return
        size = pipeline_bytes(pipe)
        if key[3] == "none" and 0 < size <= self.keep_bytes:
            while (
                self._parked and sum(s for *_, s in self._parked.values()) + size > self.keep_bytes
            ):
                self._parked.popitem(last=False)
            pipe.to("cpu")
            self._parked[key] = (pipe, model, size)
        del pipe
        _free_device_memory()

    def _local_folder(self, record: ModelRecord) -> Path:
        """The local diffusers folder of `record` (a tiny one built first), complete."""
        folder = Path(record.source)
        if record.tiny:
            ensure_tiny_model(folder.parent, name=folder.name)
        if not folder.is_dir():
            raise JobFailure("ModelUnavailable", f"model {record.name}: folder {folder} is gone")
        missing = check_folder(folder, dict(record.files))[1]
        if missing:
            raise JobFailure(
                "ModelUnavailable",
                f"model {record.name} cannot load from {folder}: missing {', '.join(missing)}",
            )
        return folder

    def _hub_folder(
        self,
        record: ModelRecord,
        hooks: RunHooks,
        data: dict[str, Any],
        checkpoint: Callable[[], None],
    ) -> Path:
        """The cached snapshot of a hub model, downloaded (with "downloading" progress
        events) when it is not complete in the cache and downloads are allowed."""
        import diffusers

        pipeline_cls = getattr(diffusers, record.pipeline)
        replaced = dict(record.files)
        try:
            if replaced:  # the cached snapshot as it is: its transformer may be absent
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(record.source, local_files_only=True))
            else:
                folder = Path(
                    pipeline_cls.download(
                        record.source, local_files_only=True, use_safetensors=True
                    )
                )
            missing = check_folder(folder, replaced)[1]
            if not missing:
                return folder
            problem: Exception = FileNotFoundError(", ".join(missing))
        except Exception as exc:
            problem = exc
        lacking = _cache_lacks(record.source, replaced)  # a partial download, a dangling link
        if not self.downloads_allowed():
            raise JobFailure(
                "ModelUnavailable",
                f"model {record.name} ({record.source}) is not complete in the local Hugging "
                f"Face cache and downloading is switched off{lacking}",
            ) from problem
        try:
            folder = download_snapshot(
                record.source, record.name, hooks, data, checkpoint, skip_weights=replaced
            )
            missing = check_folder(folder, replaced)[1]
            if missing:
                raise FileNotFoundError(f"the hub repo lacks {', '.join(missing)}")
            return folder
        except JobAborted:
            raise
        except Exception as exc:
            raise JobFailure(
                "ModelUnavailable",
                f"model {record.name} could not be downloaded from the Hugging Face hub "
                f"({record.source}): {hub_problem(exc)}",
            ) from exc

    def _folder(
        self,
        record: ModelRecord,
        hooks: RunHooks,
        data: dict[str, Any],
        checkpoint: Callable[[], None],
    ) -> Path:
        """The folder to load `record` from (downloaded when allowed), with every weights
        file whole (headers read) and each single file fitting the folder's config, or
        JobFailure("ModelUnavailable") naming what is missing or damaged."""
        if record.kind == "hub":
            folder = self._hub_folder(record, hooks, data, checkpoint)
        else:
            folder = self._local_folder(record)
        damaged = damaged_weights(folder, dict(record.files))
        for part, path in record.files:
            try:  # it may have changed since the job was queued; a hub base's config
                # is only on disk now
                check_file(Path(path), read_json(folder / part / "config.json"), record.source)
            except CheckpointProblem as exc:
                damaged.append(str(exc))
        if damaged:
            raise JobFailure(
                "ModelUnavailable",
                f"model {record.name} could not be loaded from {folder}: {'; '.join(damaged)}",
            )
        return folder

    def _load(
        self,
        record: ModelRecord,
        folder: Path,
        options: EngineOptions,
        hooks: RunHooks,
        data: dict[str, Any],
        checkpoint: Callable[[], None],
    ) -> Any:
        import diffusers

        name = record.name
        files = dict(record.files)
        plan = component_plan(folder, files)
        total = sum(size for *_, size in plan)
        progress = {
            **data,
            "components_loaded": 0,
            "components_total": len(plan),
            "bytes_loaded": 0,
            "bytes_total": total,
        }
        hooks.model_loading(name, dict(progress))
        torch_dtype = getattr(torch, options.dtype)
        components: dict[str, Any] = {}
        reading = "model_index.json"  # what a failure names
        try:
            try:
                for index, (part, library, cls_name, variant, size) in enumerate(plan, start=1):
                    checkpoint()
                    reading = f"{part} ({library}.{cls_name})"
                    # The VAE stays in float32 under half precision: Wan's VAE decodes
                    # visibly worse in bf16 and is small next to the transformer.
                    dtype = torch.float32 if part == "vae" else torch_dtype
                    if part in files:
                        cls = getattr(importlib.import_module(library), cls_name)
                        components[part] = load_transformer(
                            cls, Path(files[part]), folder / part, dtype
                        )
                    else:
                        components[part] = _load_component(
                            folder, part, library, cls_name, dtype, variant=variant
                        )
                    progress.update(
                        component=part,
                        components_loaded=index,
                        bytes_loaded=progress["bytes_loaded"] + size,
                    )
                    hooks.model_loading(name, dict(progress))
                reading = f"the {record.pipeline} from its parts"
                pipeline_cls = getattr(diffusers, record.pipeline)
                pipe = pipeline_cls.from_pretrained(
                    folder, **components, local_files_only=True, use_safetensors=True
                )
            except (JobAborted, *OOM_ERRORS):
                raise
            except Exception as exc:
                raise JobFailure(
                    "ModelUnavailable",
                    f"model {name} could not be loaded from {folder}: {reading}: {one_line(exc)}",
                ) from exc
            components.clear()
            if self._device == "cpu" or options.memory_profile != "none":
                # The weights stay in host memory: none may go on mapping its file
                # (mappings.py: a rewritten file would change or kill the warm model).
                copy_mapped_tensors(pipe.components.values())
            apply_load_settings(pipe, options, self._device)
        except OOM_ERRORS as exc:
            components.clear()
            pipe = None
            _free_device_memory()
            raise JobFailure(
                "OutOfMemory",
                f"model {name} does not fit in {self._device} memory in {options.dtype} "
                f"(memory_profile {options.memory_profile!r}, fp8 {options.fp8})",
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _cache_lacks(repo_id: str, replaced: Mapping[str, str]) -> str:
    """What the cached snapshot of `repo_id` lacks, as ": it lacks ...", or "" when
    there is no snapshot to look at. diffusers' own offline check only says that
    something is missing; a user who cleaned the cache by hand wants to know what."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    folder, problem = snapshot_folder(root)  # what refs/main names
    if problem or not (folder / "model_index.json").is_file():
        return ""
    missing = check_folder(folder, replaced)[1]
    return f": it lacks {', '.join(missing)}" if missing else ""


def _load_component(
    folder: Path, part: str, library: str, cls_name: str, dtype: Any, variant: str | None = None
) -> Any:
    """One component from `folder/part`, safetensors only (the `variant` files when
    weights.py chose them), never from the network."""
    module = importlib.import_module(library)
    cls = getattr(module, cls_name, None)
    if cls is None and library == "transformers" and "Tokenizer" in cls_name:
        cls = module.AutoTokenizer
    if cls is None:
        raise ValueError(f"{part}: {library} has no class {cls_name}")
    sub = folder / part
    if library == "transformers" and not issubclass(cls, torch.nn.Module):
        return cls.from_pretrained(sub, local_files_only=True)  # a tokenizer or processor
    if not issubclass(cls, torch.nn.Module):
        return cls.from_pretrained(sub)  # a scheduler: a JSON config
    return cls.from_pretrained(
        sub, dtype=dtype, use_safetensors=True, local_files_only=True, variant=variant
    )
