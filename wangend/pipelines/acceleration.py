"""Engine settings: memory profiles, fp8 storage, step caches, attention backends, compile.

Two kinds of setting, because they cost different things to change:

* load settings (dtype, memory_profile, fp8, compile) reshape the loaded modules: hooks
  that move weights, float8 storage, compiled blocks. Changing one means a reload, so they
  form `EngineOptions.load_key` and ProductionManager compares it.
* run settings (step_cache, step_cache_threshold, attention) are attached for one run
  and removed after it, so a warm model switches them for free and no cached residual or
  process-wide attention backend outlives its job.

How to call it (what GenerationRuntime does, in this order)::

    options = EngineOptions.from_job(job, production.job_dtype(job.dtype))
    pipe = production.ensure(record, options, hooks)     # load settings applied here
    with production.run_scope(pipe, options, steps=job.steps) as scope:
        output = pipe(...)                               # run settings active here
    scope.notes                                          # fallbacks, for the metadata

Which settings fail and which fall back (`settle_options`):

* fall back with a logged warning and a note: attention "flash"/"sage" when the package
  or CUDA is missing (same maths, only slower), memory_profile "model"/"sequential" on a
  CPU device (the weights already live in CPU memory, so "none" is the same footprint);
* fail with JobFailure("InvalidSettings"): an unknown value for any field, fp8 when this
  torch has no float8 type.

MagCache needs per-model magnitude ratios. None are shipped: ratios measured elsewhere
belong to other checkpoints. A "mag" run on a model with no ratios yet runs uncached while
a `RatioRecorder` measures them (the quantity diffusers' `calibrate=True` prints, measured
with our own hooks so nothing is printed to the daemon's stdout); later runs of that model
use them. `MagRatioTable` holds them and is owned by ProductionManager.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from msgspec import Struct

from ..errors import JobFailure

__all__ = [
    "ATTENTION_BACKENDS",
    "MEMORY_PROFILES",
    "STEP_CACHES",
    "EngineOptions",
    "MagRatioTable",
    "RatioRecorder",
    "RunReport",
    "apply_load_settings",
    "cache_config",
    "compile_repeated_blocks",
    "run_settings",
    "settle_options",
    "transformers_of",
]

log = logging.getLogger("wangend.engine")

MEMORY_PROFILES = ("none", "model", "group", "sequential")
STEP_CACHES = ("none", "fbc", "mag", "taylorseer", "pab")
ATTENTION_BACKENDS = ("native", "flash", "sage")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Measured magnitude ratios per model source. Empty on purpose: see the module docstring.
KNOWN_MAG_RATIOS: Mapping[str, tuple[float, ...]] = MappingProxyType({})
# Wan's self- and cross-attention modules (the default TaylorSeer pattern misses them).
WAN_ATTENTION = r"blocks\.\d+\.attn\d"


class EngineOptions(Struct, frozen=True, kw_only=True):
    """How one job wants the engine set up. Plain strings, checked by `from_job`."""

    dtype: str = "float32"
    memory_profile: str = "none"
    fp8: bool = False
    step_cache: str = "none"
    step_cache_threshold: float | None = None
    attention: str = "native"
    compile: bool = False

    @classmethod
    def from_job(cls, job: Any, dtype_name: str) -> EngineOptions:
        """From a ResolvedGenerate and the concrete dtype it runs in ("auto" resolved)."""
        options = cls(
            dtype=dtype_name,
            memory_profile=job.memory_profile,
            fp8=job.fp8,
            step_cache=job.step_cache,
            step_cache_threshold=job.step_cache_threshold,
            attention=job.attention,
            compile=job.compile,
        )
        options.check()
        return options

    def check(self) -> None:
        """Raise JobFailure naming the field when a value is not one this engine knows."""
        for field, value, allowed in (
            ("dtype", self.dtype, DTYPE_NAMES),
            ("memory_profile", self.memory_profile, MEMORY_PROFILES),
            ("step_cache", self.step_cache, STEP_CACHES),
            ("attention", self.attention, ATTENTION_BACKENDS),
        ):
            if value not in allowed:
                raise JobFailure(
                    "InvalidSettings", f"{field} must be one of {', '.join(allowed)}, not {value!r}"
                )
        threshold = self.step_cache_threshold
        if threshold is not None and not 0.0 < threshold <= 10.0:
            raise JobFailure(
                "InvalidSettings", f"step_cache_threshold must be in (0, 10], not {threshold}"
            )

    @property
    def load_key(self) -> tuple[str, str, bool, bool]:
        """The settings that change the loaded modules: a difference means a reload."""
        return (self.dtype, self.memory_profile, self.fp8, self.compile)


def settle_options(options: EngineOptions, device: str) -> tuple[EngineOptions, list[str]]:
    """The options that will really run on `device`, and a note per fallback taken."""
    import msgspec
    from diffusers.utils import is_flash_attn_available, is_sageattention_available

    options.check()
    notes: list[str] = []
    changes: dict[str, Any] = {}
    cuda = device.startswith("cuda")
    if options.fp8 and not hasattr(torch, "float8_e4m3fn"):
        raise JobFailure("InvalidSettings", "fp8 needs a torch with float8_e4m3fn")
    if options.memory_profile in ("model", "sequential") and not cuda:
        notes.append(
            f"memory_profile {options.memory_profile!r} needs an accelerator; on {device} "
            "the weights already live in CPU memory, so it ran as 'none'"
        )
        changes["memory_profile"] = "none"
    if options.attention != "native":
        present = {"flash": is_flash_attn_available, "sage": is_sageattention_available}
        package = {"flash": "flash-attn", "sage": "sageattention"}[options.attention]
        why = (
            f"needs CUDA (device is {device})"
            if not cuda
            else f"needs the {package} package"
            if not present[options.attention]()
            else ""
        )
        if why:
            notes.append(f"attention {options.attention!r} {why}; ran with 'native'")
            changes["attention"] = "native"
    for note in notes:
        log.warning("%s", note)
    return (msgspec.structs.replace(options, **changes) if changes else options), notes


def transformers_of(pipe: Any) -> list[Any]:
    """The denoising transformer(s): Wan 2.2 A14B has a second one for low noise."""
    return [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]


def apply_load_settings(pipe: Any, options: EngineOptions, device: str) -> None:
    """Put a freshly loaded pipeline on `device` the way `options` asks: fp8 storage
    first (it must wrap the real weights), then compilation (it must wrap the blocks' own
    forward, before offload hooks wrap it in turn), then placement."""
    compute = getattr(torch, options.dtype)
    if options.fp8:
        for transformer in transformers_of(pipe):
            # Norms, embeddings and the output head stay in the compute dtype (diffusers'
            # default skip list): float8 there costs quality for almost no memory.
            transformer.enable_layerwise_casting(
                storage_dtype=torch.float8_e4m3fn, compute_dtype=compute
            )
    if options.compile:
        for transformer in transformers_of(pipe):
            compile_repeated_blocks(transformer)
    profile = options.memory_profile
    if profile == "none":
        pipe.to(device)
    elif profile == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif profile == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif profile == "group":
        # One transformer block at a time on the device; the VAE stays there (small,
        # and its decoder keeps a frame cache that block hooks would only slow down).
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device.startswith("cuda"),
            exclude_modules=["vae"],
        )


def compile_repeated_blocks(transformer: Any) -> int:
    """Compile the `forward` of each repeated block (WanTransformerBlock); returns how many.

    Regional compilation, like diffusers' `compile_repeated_blocks`, with two differences
    that the daemon needs. diffusers compiles each block's `__call__`, which takes its
    forward hooks into the graph: the abort/pause pre-hooks the runtime puts on every
    block (they read a clock and raise) then break a full graph, and hooks added per
    run would force a recompile per job. Compiling `forward` keeps those hooks in plain
    Python around one compiled body that all blocks share (one graph, compiled once).
    And `fullgraph` stays off: step caches (taylorseer, pab) and fp8 storage put hooks
    inside the blocks that Dynamo cannot trace; with it off they split the graph around
    themselves instead of failing the job.
    """
    names = getattr(transformer, "_repeated_blocks", None) or ()
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=False)
    return len(blocks)


class MagRatioTable:
    """Magnitude ratios per model source: the shipped ones (none) plus those measured by
    this daemon since it started."""

    def __init__(self, known: Mapping[str, Sequence[float]] = KNOWN_MAG_RATIOS) -> None:
        self._ratios: dict[str, tuple[float, ...]] = {k: tuple(v) for k, v in known.items()}

    def get(self, source: str) -> tuple[float, ...] | None:
        return self._ratios.get(source)

    def record(self, source: str, ratios: Sequence[float]) -> None:
        if len(ratios) >= 2:
            self._ratios[source] = tuple(float(r) for r in ratios)


class RatioRecorder:
    """Measures MagCache's ratios during an uncached run: for each transformer call the
    residual (last block's output minus first block's input), then the mean per-token norm
    ratio between consecutive steps of the same guidance branch."""

    def __init__(self, transformer: Any) -> None:
        self._input: torch.Tensor | None = None
        self._residuals: list[torch.Tensor] = []
        blocks = transformer.blocks
        self._handles = [
            blocks[0].register_forward_pre_hook(self._on_first, with_kwargs=True),
            blocks[-1].register_forward_hook(self._on_last),
        ]

    def _on_first(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._input = args[0] if args else kwargs["hidden_states"]

    def _on_last(self, module: Any, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if self._input is not None and out.shape == self._input.shape:
            self._residuals.append(torch.linalg.norm((out - self._input).float(), dim=-1))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def ratios(self, steps: int) -> list[float]:
        """Per-step ratios of the conditional branch (the first call of each step)."""
        calls = len(self._residuals)
        if calls < steps or calls % steps:
            return []
        branch = self._residuals[:: calls // steps]
        out = [1.0]
        for prev, cur in itertools.pairwise(branch):
            out.append(float((cur / (prev + 1e-8)).mean()))
        return out


def cache_config(
    options: EngineOptions, pipe: Any, steps: int, mag_ratios: Sequence[float] | None
) -> Any:
    """The diffusers cache config for `options.step_cache`, or None. How the one
    threshold knob maps per cache is in docs/engine.md."""
    from diffusers import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    kind, thr = options.step_cache, options.step_cache_threshold
    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=thr if thr is not None else 0.05)
    if kind == "mag":
        if not mag_ratios:
            return None
        return MagCacheConfig(
            threshold=thr if thr is not None else 0.06,
            num_inference_steps=steps,
            mag_ratios=list(mag_ratios),
        )
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=max(2, round(thr)) if thr is not None else 4,
            disable_cache_before_step=max(1, steps // 10),
            max_order=1,
            taylor_factors_dtype=getattr(torch, options.dtype),
            cache_identifiers=[WAN_ATTENTION],
        )
    if kind == "pab":

        def timestep() -> int:
            t = pipe.current_timestep
            return int(t.flatten()[0]) if isinstance(t, torch.Tensor) else int(t or 0)

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=max(2, round(thr)) if thr is not None else 2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=timestep,
        )
    return None


class RunReport:
    """What a run scope did: notes for the job's metadata, ratios it measured."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.measured_ratios: list[float] = []


def _active_backend() -> Any:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry._active_backend


def _restore_backend(backend: Any) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(backend)


@contextmanager
def run_settings(
    pipe: Any,
    options: EngineOptions,
    *,
    steps: int,
    mag_ratios: Sequence[float] | None = None,
) -> Iterator[RunReport]:
    """Attach the run settings for one run and remove them afterwards, also when the run
    raises (abort, out of memory). A fresh cache per run: no residual from the last job
    can leak into this one. The process-wide attention backend is put back as found."""
    report = RunReport()
    transformers = transformers_of(pipe)
    saved_backend = _active_backend()
    recorder: RatioRecorder | None = None
    cached: list[Any] = []
    try:
        if options.attention != "native":
            for transformer in transformers:
                transformer.set_attention_backend(options.attention)
        config = None
        if options.step_cache != "none":
            config = cache_config(options, pipe, steps, mag_ratios)
        if options.step_cache == "mag" and config is None:
            report.notes.append(
                "step_cache 'mag': no magnitude ratios for this model yet; ran uncached "
                "and measured them for the next run"
            )
            recorder = RatioRecorder(transformers[0])
        if config is not None:
            for transformer in transformers:
                # A config object holds per-run callbacks and ratios: one per module.
                transformer.enable_cache(
                    config if not cached else cache_config(options, pipe, steps, mag_ratios)
                )
                cached.append(transformer)
        yield report
        if recorder is not None:
            report.measured_ratios = recorder.ratios(steps)
    finally:
        if recorder is not None:
            recorder.close()
        for transformer in cached:
            transformer.disable_cache()
        if options.attention != "native":
            for transformer in transformers:
                transformer.reset_attention_backend()
        _restore_backend(saved_backend)
