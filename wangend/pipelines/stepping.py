"""StepExtras: what a run does at each step boundary besides progress and pause.

diffusers gives a pipeline one per-step hook, `callback_on_step_end`; the runtime uses it
for progress and the pause point, and hands the rest to this object:

* LoRA multiplier schedules ("1,0.5" across the steps, "1;0" per expert of a two-expert
  Wan 2.2 model): the weights for the next step are set before it runs
  (adapters.lora_injection.LoRAInjectionManager.apply_step). For two experts the
  schedule needs the first step the low-noise expert runs, which depends on the
  scheduler's timesteps: it is read from the called pipeline's scheduler at the first
  step, exactly as diffusers decides which expert runs (t < boundary_ratio x
  num_train_timesteps).
* latent previews (previews.PreviewMaker), every `preview_every` steps, from the
  callback's `latents` (asked for through `callback_on_step_end_tensor_inputs`).

Both read and never change the latents, so a run with previews or a constant LoRA
weight gives the same frames as one without the extras.
"""

from __future__ import annotations

import logging
from typing import Any

from ..adapters.lora_injection import LoRAInjectionManager
from ..protocol import ResolvedGenerate
from .previews import PREVIEW_MAX_SIDE, PreviewMaker

__all__ = ["StepExtras", "boundary_step"]

log = logging.getLogger(__name__)


def boundary_step(scheduler: Any, boundary_ratio: float | None) -> int | None:
    """Index of the first denoising step the low-noise expert runs, or None for a
    one-expert run."""
    if boundary_ratio is None:
        return None
    limit = boundary_ratio * scheduler.config.num_train_timesteps
    for index, t in enumerate(scheduler.timesteps):
        if float(t) < limit:
            return index
    return len(scheduler.timesteps)


class StepExtras:
    """Per-run step work for `pipe` (the warm pipeline holding the LoRA adapters)."""

    def __init__(
        self,
        pipe: Any,
        job: ResolvedGenerate,
        loras: LoRAInjectionManager | None,
        steps: int,
    ) -> None:
        self.pipe = pipe
        self.job = job
        self.loras = loras if loras is not None and job.loras else None
        self.steps = steps  # the steps the pipeline really runs (V2V runs fewer)
        self.every = job.preview_every
        self._previews: PreviewMaker | None = None
        self._previews_failed = False
        self._boundary: int | None = None
        self._boundary_known = False

    @property
    def tensor_inputs(self) -> list[str]:
        """What the pipeline must pass the callback."""
        return ["latents"] if self.every > 0 else []

    def start_at(self, scheduler: Any, index: int) -> None:
        """A resumed run starts at pipeline step `index`: give it that step's LoRA
        weights, as the step before it would have. `scheduler` has its timesteps set."""
        self._lora_weights(scheduler, index)

    def after_step(
        self, called: Any, index: int, done: int, total: int, tensors: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Run after pipeline step `index` (0-based) of this run; `done`/`total` count for
        progress. Returns a preview when one is due."""
        self._lora_weights(called.scheduler, index + 1)
        return self._preview(done, total, tensors.get("latents"))

    def _lora_weights(self, scheduler: Any, index: int) -> None:
        """Set the LoRA weights pipeline step `index` runs with (none past the last)."""
        if self.loras is None or index >= self.steps:
            return
        if not self._boundary_known:
            self._boundary = boundary_step(scheduler, self.job.boundary_ratio)
            self._boundary_known = True
        self.loras.apply_step(self.pipe, index, self.steps, boundary=self._boundary)

    def _preview(self, done: int, total: int, latents: Any) -> dict[str, Any] | None:
        if self.every <= 0 or latents is None or self._previews_failed:
            return None
        try:
            if self._previews is None:
                # Never larger than the video itself: a 64x64 job gets a 64 px preview.
                side = min(PREVIEW_MAX_SIDE, max(self.job.width, self.job.height))
                self._previews = PreviewMaker.for_channels(
                    int(latents.shape[1]), self.every, max_side=side
                )
            return self._previews.maybe(done, total, latents)
        except Exception as exc:  # a preview is a courtesy: it never costs the job
            self._previews_failed = True
            log.warning("job previews switched off for this run: %s", exc)
            return None
