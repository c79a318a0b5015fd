"""Engine: everything that turns a job spec into output files, built from the config.

The daemon owns one Engine. It builds, in this order: the model registry, the warm
pipeline's manager (ProductionManager), the adapter libraries (LoRAs, presets) and the
prompt enhancer, the media writer settings, the two runtimes (generation, matting) and
their input resolvers, and the JobRouter that the queue controller sees as its one
worker and one resolver. It also answers the read-only questions clients ask about the
engine (`models`, `loras`, `presets`, `validate`).

Threads: jobs run on the worker thread; `validate`, `loras` and `presets` run on a
helper thread (they read files) and enqueue resolves on the event loop. The LoRA and
preset libraries keep caches that are not thread-safe, so every use of them outside the
worker goes through one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

import msgspec

from ..adapters.lora import LoRALibrary, size_hint
from ..adapters.lora_injection import LoRAInjectionManager
from ..adapters.presets import PresetError, PresetLibrary
from ..adapters.prompt_enhancer import PromptEnhancerBridge
from ..adapters.requests import AdapterRequests
from ..config import ConfigError, ServerConfig
from ..matting.inputs import MattingInputs
from ..matting.runtime import MattingRuntime
from ..media.access import InputAccess
from ..media.persistence import MediaPersistenceContext
from ..pipelines.inputs import TaskInputManager
from ..pipelines.production import ProductionManager
from ..pipelines.registry import ModelRegistry
from ..pipelines.resume import ResumeStore
from ..pipelines.runtime import GenerationRuntime
from ..protocol import (
    JobSpec,
    LoraInfo,
    LorasResult,
    ModelsResult,
    PresetInfo,
    PresetsResult,
    ResolvedGenerate,
    ValidateResult,
)
from .workers import JobRouter

__all__ = ["Engine", "lora_roots", "preset_roots"]

log = logging.getLogger(__name__)


def lora_roots(config: ServerConfig) -> list[Path]:
    """`[lora] folders`, else `<state dir>/loras`."""
    folders = config.lora.folders or [str(config.state_path / "loras")]
    return [Path(f).expanduser().absolute() for f in folders]


def preset_roots(config: ServerConfig) -> list[Path]:
    """`[lora] presets`, else `<state dir>/presets`."""
    folders = config.lora.presets or [str(config.state_path / "presets")]
    return [Path(f).expanduser().absolute() for f in folders]


class Engine:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = ModelRegistry(config.models_path, config.models)
        self.production = ProductionManager(
            self.registry, config.device, config.dtype, keep_models_gb=config.engine.keep_models_gb
        )
        self._lock = threading.Lock()
        self.lora_library = LoRALibrary(lora_roots(config))
        self.preset_library = PresetLibrary(preset_roots(config))
        self.lora_manager = LoRAInjectionManager(config.lora.cache_budget)
        self.enhancer = PromptEnhancerBridge(config.enhancer, device=self.production.device)
        self.media = MediaPersistenceContext.from_config(config.media)
        access = InputAccess(config.input_folders)
        self.resume = (
            ResumeStore(config.state_path / "resume", every=config.engine.resume_every)
            if config.engine.resume
            else None
        )
        self.generation = GenerationRuntime(
            self.production,
            config.output_path,
            media=self.media,
            loras=self.lora_manager,
            enhancer=self.enhancer,
            resume=self.resume,
        )
        self.generation_inputs = TaskInputManager(
            self.registry,
            config.model,
            self.production.dtype_name,
            engine=config.engine,
            metadata_default=config.media.metadata,
            adapters=AdapterRequests(self.lora_library, self.preset_library, config.enhancer),
            access=access,
        )
        self.matting = MattingRuntime(
            config.output_path, config.matanyone.weights, self.production.device, self.media
        )
        self.matting_inputs = MattingInputs(
            config.matanyone, access, metadata_default=config.media.metadata
        )
        self.router = JobRouter(
            self.generation, self.generation_inputs, self.matting, self.matting_inputs
        )

    # --- what the queue needs: `router` runs jobs; this resolves them -----------------

    def resolve(self, spec: JobSpec) -> Any:
        """The controller's Inputs: the router's resolve, under the libraries' lock."""
        with self._lock:
            return self.router.resolve(spec)

    def check_enhance(self, field: str) -> None:
        """The controller's check before `retry {"enhance": true}`. No lock: it only
        reads which enhancer is configured, and must not wait behind a long resolve."""
        self.generation_inputs.check_enhance(field)

    def sweep_resume_points(self, queued: Collection[int]) -> None:
        """At start: drop the resume points of jobs that will not run again (they ended,
        or were removed, while the daemon was down)."""
        if self.resume is not None:
            gone = self.resume.sweep(set(queued))
            if gone:
                log.info("removed the resume points of ended jobs %s", gone)

    # --- what clients ask -------------------------------------------------------------

    def models(self) -> ModelsResult:
        return ModelsResult(
            models=self.registry.list(
                default=self.config.model, loaded=self.production.loaded_model
            )
        )

    def validate(self, spec: JobSpec) -> ValidateResult:
        job = self.resolve(spec)
        plan = self.router.plan(job)
        if isinstance(job, ResolvedGenerate):
            plan.update(self._model_plan(job.model))
        return ValidateResult(spec=job, plan=plan)

    def _model_plan(self, name: str) -> dict[str, Any]:
        """Whether the job's model is on disk, and what running it would do if not: a
        dry run that says "valid" should not hide a 60 GB download, or a failure."""
        record = self.registry.resolve(name)
        if self.registry.available(record):
            return {"model_on_disk": True}
        if record.kind != "hub":
            why = "its files are missing; the job would fail"
        elif self.production.downloads_allowed():
            why = f"the job would first download {record.source} from the Hugging Face hub"
        else:
            why = (
                f"{record.source} is not in the Hugging Face cache and downloading is off "
                "(HF_HUB_OFFLINE); the job would fail"
            )
        return {"model_on_disk": False, "note": f"model {name} is not on disk: {why}"}

    def loras(self, model: str | None, state: bool) -> LorasResult:
        name = model or self.config.model
        record = self.registry.resolve(name)  # ModelUnavailable names what was tried
        size = size_hint(record.name)
        with self._lock:
            found = self.lora_library.list(record.family, size)
            folders = [str(f) for f in self.lora_library.folders(record.family, size)]
        return LorasResult(
            family=record.family,
            folders=folders,
            loras=[
                LoraInfo(
                    name=info.name,
                    path=str(info.path),
                    size=info.size,
                    format=str(info.format or ""),
                    rank=info.rank,
                    error=info.error,
                )
                for info in found
            ],
            state=self.lora_manager.snapshot_state() if state else None,
        )

    def presets(self) -> PresetsResult:
        with self._lock:
            scanned = self.preset_library.scan()
        presets = []
        for name, path, preset in scanned:
            if isinstance(preset, PresetError):
                presets.append(PresetInfo(name=name, path=str(path), error=str(preset)))
            else:
                loras, prompt = list(preset.loras), preset.prompt
                presets.append(PresetInfo(name=name, path=str(path), loras=loras, prompt=prompt))
        return PresetsResult(folders=[str(r) for r in self.preset_library.roots], presets=presets)

    def reload(self, config: ServerConfig) -> list[str]:
        """Apply what can change while running (LoRA and preset folders, the enhancer,
        the [models.NAME] tables); returns what was applied. The warm model and the queue
        are untouched."""
        applied = []
        models = self.config.models
        if config.models != self.config.models:
            try:
                self.registry.set_files(config.models)
            except ConfigError as exc:
                log.error("config reloaded: [models] not applied: %s", exc)
            else:
                models = config.models
                applied.append("models")
        with self._lock:
            if config.lora != self.config.lora:
                self.lora_library = LoRALibrary(lora_roots(config))
                self.preset_library = PresetLibrary(preset_roots(config))
                self.lora_manager.budget = config.lora.cache_budget  # evicts on the next job
                self.generation_inputs.adapters = AdapterRequests(
                    self.lora_library, self.preset_library, config.enhancer
                )
                applied.append("lora")
            if config.enhancer != self.config.enhancer:
                self.enhancer.reset()
                self.enhancer = PromptEnhancerBridge(config.enhancer, device=self.production.device)
                self.generation.enhancer = self.enhancer
                self.generation_inputs.adapters = AdapterRequests(
                    self.lora_library, self.preset_library, config.enhancer
                )
                applied.append("enhancer")
        self.config = msgspec.structs.replace(
            self.config, lora=config.lora, enhancer=config.enhancer, models=models
        )
        return applied
