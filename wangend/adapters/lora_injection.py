"""LoRAInjectionManager: puts a job's LoRAs into the warm pipeline, and takes them out.

Loading a LoRA into a 14B transformer costs seconds, and consecutive jobs usually share
LoRAs, so adapters stay loaded (through diffusers/peft) after the job that needed them:
the active set is switched with `set_adapters`, and up to `budget` inactive adapters are
kept, least recently used evicted first with `delete_adapters`. A job with no LoRAs runs
with the adapter layers disabled, which gives the base model's output bit for bit.

Adapter names are "lora_" + the first 16 hex digits of the file's SHA-256: a safe
identifier that changes when the file does, so an edited LoRA is never mistaken for the
loaded one.

Everything that can go wrong with a file is found before the first denoising step and
reported as `JobFailure("LoraUnavailable", <one sentence naming the file>)`: missing,
unreadable or truncated, changed since enqueue (SHA-256 differs), a layout diffusers cannot
convert, or weights for another architecture (keys naming no module of this transformer,
or shapes that do not fit). The pipeline is then left as it was: adapters loaded by the
failed call are deleted and the previous activation restored.

How to call it (on the worker thread, which owns the pipeline):

    manager = LoRAInjectionManager(budget=config.lora.cache_budget)
    state = manager.hydrate(pipe, job.loras)     # before the run; sets step-0 weights
    ...in callback_on_step_end(pipe, i, t, kw), before step i + 1 runs:
    manager.apply_step(pipe, i + 1, steps, boundary=first_low_noise_step_or_None)
    manager.snapshot_state() -> dict              # diagnostics (`status`, logs)

For a two-expert Wan 2.2 pipeline (`transformer_2` set) every LoRA is loaded into both
experts; `transformer` takes phase 0 of the multiplier and `transformer_2` phase 1, both
evaluated at the current step, so the caller only passes `boundary` (the first step run
by the low-noise expert). `phase` is for one-expert pipelines and is normally 0.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

from msgspec import Struct

from ..errors import JobFailure
from ..protocol import ResolvedLora
from .lora import LoraHeaderError, LoRALibrary, read_header
from .schedule import MultiplierError, Schedule, parse_multiplier

__all__ = ["ActiveLora", "LoRAInjectionManager", "LoRAState", "adapter_name"]

FAILURE = "LoraUnavailable"
_PREFIXES = ("transformer.", "base_model.model.")


def adapter_name(sha256: str) -> str:
    return "lora_" + sha256[:16]


class ActiveLora(Struct, frozen=True, kw_only=True):
    name: str
    adapter: str
    path: str
    multiplier: str
    sha256: str


class LoRAState(Struct, frozen=True, kw_only=True):
    """What `hydrate` did: the active set, and which adapters it loaded, reused, evicted."""

    active: list[ActiveLora]
    loaded: list[str]
    reused: list[str]
    evicted: list[str]


class _Planned(Struct, frozen=True):
    lora: ResolvedLora
    adapter: str
    sha256: str
    schedule: Schedule


def _fail(path: Path, why: str) -> JobFailure:
    return JobFailure(FAILURE, f"LoRA file {path} {why}")


def _module_name(key: str) -> tuple[str, str] | None:
    """("blocks.0.attn1.to_q", "lora_A.weight") for a diffusers/peft LoRA key."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            module, _, rest = key.partition(part)
            return module, part.strip(".") + "." + rest.replace("default.", "")
    return None


def check_fits(transformer: Any, state_dict: dict[str, Any], path: Path) -> None:
    """Refuse a LoRA whose keys name no module of `transformer` or whose shapes differ.

    peft would otherwise either raise halfway through injecting layers or, for keys that
    match nothing, load an adapter that silently does nothing.
    """
    modules = dict(transformer.named_modules())
    matched = 0
    for key, tensor in state_dict.items():
        parsed = _module_name(key)
        if parsed is None:
            continue
        name, kind = parsed
        module = modules.get(name)
        if module is None:
            raise _fail(path, f"does not fit this model: no module {name}")
        base = getattr(module, "base_layer", module)
        fan_in, fan_out = getattr(base, "in_features", None), getattr(base, "out_features", None)
        shape = tuple(tensor.shape)
        if fan_in is not None and fan_out is not None:
            bad = (
                (kind == "lora_A.weight" and (len(shape) != 2 or shape[1] != fan_in))
                or (kind == "lora_B.weight" and (len(shape) != 2 or shape[0] != fan_out))
                or (kind == "lora_B.bias" and shape != (fan_out,))
            )
            if bad:
                raise _fail(
                    path,
                    f"does not fit this model: {name} is {fan_in}->{fan_out} but the LoRA "
                    f"has {kind} of shape {list(shape)}",
                )
        matched += 1
    if matched == 0:
        raise _fail(path, "holds no LoRA weights for this model")


class LoRAInjectionManager:
    """Owns the LoRA state of one warm pipeline. Worker thread only."""

    def __init__(self, budget: int, library: LoRALibrary | None = None) -> None:
        self.budget = max(0, budget)
        self._library = library if library is not None else LoRALibrary([])
        self._pipe: weakref.ref[Any] | None = None  # never keeps a released pipeline alive
        self._loaded: OrderedDict[str, ActiveLora] = OrderedDict()  # LRU: oldest first
        self._active: list[_Planned] = []
        self._weights: list[Any] | None = None
        self._enabled = False
        self.counters = {"loads": 0, "evictions": 0, "weight_updates": 0, "failures": 0}

    # --- the job's LoRAs ---------------------------------------------------------------------

    def hydrate(self, pipe: Any, loras: list[ResolvedLora]) -> LoRAState:
        """Activate exactly `loras` at their step-0 weights, loading what is not loaded."""
        self._bind(pipe)
        plan = [self._plan(lora) for lora in loras]
        if plan and not hasattr(pipe, "load_lora_weights"):
            raise _fail(
                Path(plan[0].lora.path), f"cannot be used: {type(pipe).__name__} takes no LoRAs"
            )
        seen: set[str] = set()
        for item in plan:
            if item.adapter in seen:
                raise _fail(Path(item.lora.path), "is listed twice in this job")
            seen.add(item.adapter)
        loaded_now: list[str] = []
        reused: list[str] = []
        previous = list(self._active)
        try:
            for item in plan:
                if item.adapter in self._loaded:
                    reused.append(item.adapter)
                    continue
                self._load(pipe, item)
                loaded_now.append(item.adapter)
            self._activate(pipe, plan)
        except Exception as exc:
            self.counters["failures"] += 1
            self._rollback(pipe, loaded_now, previous)
            if isinstance(exc, JobFailure):
                raise
            failed = next((i for i in plan if i.adapter not in self._loaded), plan[0])
            raise _fail(Path(failed.lora.path), f"could not be loaded: {_one_line(exc)}") from exc
        for item in plan:
            self._loaded.move_to_end(item.adapter)
        evicted = self._evict(pipe)
        return LoRAState(
            active=[self._loaded[item.adapter] for item in plan],
            loaded=loaded_now,
            reused=reused,
            evicted=evicted,
        )

    def apply_step(
        self, pipe: Any, step: int, steps: int, phase: int = 0, boundary: int | None = None
    ) -> bool:
        """Set the weights for `step`; touches the pipeline only when they change."""
        if not self._active:
            return False
        weights = self._weights_at(pipe, self._active, step, steps, phase, boundary)
        if weights == self._weights:
            return False
        pipe.set_adapters([item.adapter for item in self._active], weights)
        self._weights = weights
        self.counters["weight_updates"] += 1
        return True

    def snapshot_state(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "loaded": [
                {"adapter": a.adapter, "name": a.name, "path": a.path}
                for a in self._loaded.values()
            ],
            "active": [
                {"adapter": i.adapter, "name": i.lora.name, "multiplier": i.lora.multiplier}
                for i in self._active
            ],
            "weights": self._weights,
            "enabled": self._enabled,
            **self.counters,
        }

    # --- internals -----------------------------------------------------------------------------

    def _bind(self, pipe: Any) -> None:
        """Start over when the pipeline is not the one this state describes (a model
        switch built a new pipeline, which has no adapters)."""
        if self._pipe is not None and self._pipe() is pipe:
            return
        self._pipe = weakref.ref(pipe)
        self._loaded.clear()
        self._active, self._weights, self._enabled = [], None, False

    def _plan(self, lora: ResolvedLora) -> _Planned:
        path = Path(lora.path)
        if not path.is_file():
            raise _fail(path, "is missing")
        try:
            read_header(path)
        except LoraHeaderError as exc:
            raise _fail(path, f"is not a usable safetensors file ({exc})") from None
        try:
            digest = self._library.sha256(path)
        except OSError as exc:
            raise _fail(path, f"cannot be read ({exc.strerror})") from None
        if lora.sha256 and digest != lora.sha256:
            raise _fail(path, "changed after the job was queued (its SHA-256 differs)")
        try:
            schedule = parse_multiplier(lora.multiplier, lora=lora.name)
        except MultiplierError as exc:
            raise _fail(path, f"has a bad multiplier: {exc}") from None
        return _Planned(lora, adapter_name(digest), digest, schedule)

    def _load(self, pipe: Any, item: _Planned) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = Path(item.lora.path)
        try:
            # Read into memory, not mapped: peft keeps the tensors it is given, so a
            # mapped adapter would go on reading the file, and a file rewritten or cut
            # short while the adapter is cached would change it or kill the daemon.
            raw = load(path.read_bytes())
        except (SafetensorError, OSError, ValueError) as exc:
            raise _fail(path, f"is not a usable safetensors file ({_one_line(exc)})") from None
        try:
            state_dict = pipe.lora_state_dict(raw)
        except Exception as exc:  # diffusers' converters raise KeyError/ValueError/...
            raise _fail(path, f"does not fit this model ({_one_line(exc)})") from None
        experts = [pipe.transformer]
        if getattr(pipe, "transformer_2", None) is not None:
            experts.append(pipe.transformer_2)
        for transformer in experts:
            check_fits(transformer, state_dict, path)
        pipe.load_lora_weights(dict(state_dict), adapter_name=item.adapter)
        if len(experts) == 2:
            pipe.load_lora_weights(
                dict(state_dict), adapter_name=item.adapter, load_into_transformer_2=True
            )
        self.counters["loads"] += 1
        self._loaded[item.adapter] = ActiveLora(
            name=item.lora.name,
            adapter=item.adapter,
            path=str(path),
            multiplier=item.lora.multiplier,
            sha256=item.sha256,
        )

    def _activate(self, pipe: Any, plan: list[_Planned]) -> None:
        self._active = list(plan)
        self._weights = None
        if not plan:
            if self._loaded:  # cheap, and also covers layers a failed load just wrapped
                pipe.disable_lora()
            self._enabled = False
            return
        if not self._enabled:
            pipe.enable_lora()
            self._enabled = True
        self.apply_step(pipe, 0, 1)

    def _rollback(self, pipe: Any, loaded_now: list[str], previous: list[_Planned]) -> None:
        """Delete every adapter this call added (half-loaded ones too) and re-activate the
        previous set, so the failed job leaves the pipeline as it found it."""
        present: set[str] = set()
        try:
            present = {a for names in pipe.get_list_adapters().values() for a in names}
        except Exception:
            present = set()
        stale = [a for a in present if a not in self._loaded or a in loaded_now]
        if stale:
            pipe.delete_adapters(stale)
        for adapter in loaded_now:
            self._loaded.pop(adapter, None)
        self._enabled = bool(self._loaded) and self._enabled
        self._activate(pipe, [p for p in previous if p.adapter in self._loaded])

    def _evict(self, pipe: Any) -> list[str]:
        active = {item.adapter for item in self._active}
        inactive = [a for a in self._loaded if a not in active]
        evicted = inactive[: max(0, len(inactive) - self.budget)]
        if evicted:
            pipe.delete_adapters(evicted)
            for adapter in evicted:
                del self._loaded[adapter]
            self.counters["evictions"] += len(evicted)
        return evicted

    @staticmethod
    def _weights_at(
        pipe: Any, plan: list[_Planned], step: int, steps: int, phase: int, boundary: int | None
    ) -> list[Any]:
        if getattr(pipe, "transformer_2", None) is not None:
            return [
                {
                    "transformer": item.schedule.weight(step, steps, 0, boundary),
                    "transformer_2": item.schedule.weight(step, steps, 1, boundary),
                }
                for item in plan
            ]
        return [item.schedule.weight(step, steps, phase, boundary) for item in plan]


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0].strip() if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
