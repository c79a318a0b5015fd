"""ProductionManager: the one warm pipeline and the decision to keep or replace it.

Loading a Wan model takes seconds to minutes and most of the GPU, so the daemon keeps
exactly one pipeline warm and reuses it while jobs ask for the same (source, dtype,
device). A different model releases the old pipeline completely first (dropping every
reference, collecting, emptying the CUDA cache): two 14B models never sit in memory at
once.

Loading always goes through `from_pretrained(..., use_safetensors=True)`, for every
component including the tokenizer and text encoder of a user's folder, so no pickle is
ever unpickled. The local cache is tried first (`local_files_only=True`), and the hub only
when downloads are allowed (not under HF_HUB_OFFLINE). Every way a load can fail becomes
`JobFailure("ModelUnavailable", <one sentence>)`; tracebacks stay in the log.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import JobFailure
from .control import RunHooks
from .registry import ModelRecord, ModelRegistry, check_folder
from .tiny import ensure_tiny_model

__all__ = ["DTYPES", "ProductionManager", "resolve_device", "resolve_dtype"]

DTYPES = ("float32", "bfloat16", "float16")
OOM_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", MemoryError),)


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


def _env_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


class ProductionManager:
    """Owns the warm pipeline. Used from the worker thread only."""

    def __init__(
        self,
        registry: ModelRegistry,
        device: str = "auto",
        dtype: str = "auto",
        allow_download: bool | None = None,  # None: unless HF_HUB_OFFLINE is set
    ) -> None:
        self.registry = registry
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self.allow_download = allow_download
        self._pipe: Any = None
        self._key: tuple[str, str, str] | None = None
        self._model: str | None = None

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

    def downloads_allowed(self) -> bool:
        if self.allow_download is not None:
            return self.allow_download
        from huggingface_hub import constants

        return not (_env_offline() or constants.HF_HUB_OFFLINE)

    def job_dtype(self, dtype: str) -> str:
        """The concrete dtype a job runs in ("auto" -> this manager's default)."""
        return self._dtype if dtype == "auto" else resolve_dtype(dtype, self._device)

    def ensure(self, record: ModelRecord, dtype: str, hooks: RunHooks) -> Any:
        """The warm pipeline for `record` in `dtype`, loading it if needed."""
        dtype_name = self.job_dtype(dtype)
        key = (record.source, dtype_name, self._device)
        if self._pipe is not None and self._key == key:
            self._model = record.name
            return self._pipe
        reason = "cold" if self._pipe is None else "switch"
        self.release()
        data: dict[str, Any] = {
            "source": record.source,
            "device": self._device,
            "dtype": dtype_name,
            "reason": reason,
        }
        hooks.model_loading(record.name, data)
        started = time.perf_counter()
        pipe = self._load(record, dtype_name)
        self._pipe, self._key, self._model = pipe, key, record.name
        hooks.model_loaded(
            record.name, {**data, "seconds": round(time.perf_counter() - started, 3)}
        )
        return pipe

    def release(self) -> None:
        """Drop the warm pipeline and give its memory back."""
        if self._pipe is None:
            return
        self._pipe = self._key = self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, record: ModelRecord, dtype_name: str) -> Any:
        import diffusers

        name = record.name
        if record.tiny:
            ensure_tiny_model(Path(record.source).parent)
        if record.kind != "hub":
            folder = Path(record.source)
            if not folder.is_dir():
                raise JobFailure("ModelUnavailable", f"model {name}: folder {folder} is gone")
            missing = check_folder(folder)[1]
            if missing:
                raise JobFailure(
                    "ModelUnavailable",
                    f"model {name} cannot load from {folder}: missing {', '.join(missing)}",
                )
        pipeline_cls = getattr(diffusers, record.pipeline)
        torch_dtype = getattr(torch, dtype_name)
        # Keep the VAE in float32 under half precision: Wan's VAE decodes visibly worse
        # in bf16 and is small next to the transformer.
        dtype: Any = (
            torch_dtype
            if dtype_name == "float32"
            else {"default": torch_dtype, "vae": torch.float32}
        )

        def load(local_only: bool) -> Any:
            return pipeline_cls.from_pretrained(
                record.source, dtype=dtype, use_safetensors=True, local_files_only=local_only
            )

        try:
            try:
                pipe = load(local_only=True)
            except OOM_ERRORS:
                raise
            except Exception as exc:
                if record.kind != "hub":
                    raise JobFailure(
                        "ModelUnavailable",
                        f"model {name} could not be loaded from {record.source}: {one_line(exc)}",
                    ) from exc
                if not self.downloads_allowed():
                    raise JobFailure(
                        "ModelUnavailable",
                        f"model {name} ({record.source}) is not complete in the local Hugging "
                        "Face cache and downloading is switched off",
                    ) from exc
                try:
                    pipe = load(local_only=False)
                except OOM_ERRORS:
                    raise
                except Exception as exc2:
                    raise JobFailure(
                        "ModelUnavailable",
                        f"model {name} could not be downloaded from the Hugging Face hub "
                        f"({record.source}): {one_line(exc2)}",
                    ) from exc2
            pipe.to(self._device)
        except OOM_ERRORS as exc:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise JobFailure(
                "OutOfMemory",
                f"model {name} does not fit in {self._device} memory in {dtype_name}",
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe
