"""LoRA multipliers in the syntax Wan2GP users already write.

A multiplier is a string, one per LoRA:

    "0.8"              constant for the whole run
    "1,0.5,0"          a per-step schedule: the steps are split evenly into as many parts
                       as there are values (with 30 steps: 10 at 1, 10 at 0.5, 10 at 0)
    "1;0"              per phase of a two-expert Wan 2.2 model: 1 while the high-noise
                       expert runs, 0 while the low-noise expert runs
    "1,0.5;0.2"        phases and schedules together: the high-noise phase is split
                       evenly over its own steps

A schedule without `;` covers the whole run whatever the model. With `;`, phase k's values
cover only the steps of phase k, and a model with fewer phases uses the first ones (the
run's steps belong to phase 0 when no boundary is given); a phase past the last listed one
uses the last.

How to call it:

    schedule = parse_multiplier("1,0.5;0", lora="style")   # raises MultiplierError
    schedule.weight(step, steps)                             # one-expert model
    schedule.weight(step, steps, phase=1, boundary=12)       # Wan 2.2: steps >= 12 are phase 1
    schedule.is_constant, schedule.phases                    # for validation and display

`step` is 0-based and global (0 .. steps-1). Parsing is pure and cheap: the enqueue path
validates with it, and the worker evaluates it once per denoising step.
"""

from __future__ import annotations

import math

from msgspec import Struct

__all__ = ["MAX_PHASES", "MultiplierError", "Schedule", "parse_multiplier"]

MAX_PHASES = 3  # Wan 2.2 uses two; a third is accepted for models that add one
MAX_WEIGHT = 100.0  # beyond this a LoRA only produces noise; almost surely a typo


class MultiplierError(ValueError):
    """A multiplier string that does not parse; the message names the LoRA and the token."""


class Schedule(Struct, frozen=True):
    """Parsed multiplier: `phases[k]` lists the values that split phase k evenly."""

    phases: tuple[tuple[float, ...], ...]

    @property
    def is_constant(self) -> bool:
        return len({value for phase in self.phases for value in phase}) == 1

    def weight(self, step: int, steps: int, phase: int = 0, boundary: int | None = None) -> float:
        """The LoRA's weight at `step` of `steps` while phase `phase` runs.

        `boundary` is the first step of phase 1 for a two-expert model; None means the
        whole run is one phase. With a single-phase schedule the values always split the
        whole run, so "1,0" fades out across both experts.
        """
        steps = max(1, steps)
        step = min(max(0, step), steps - 1)
        if len(self.phases) == 1:
            return _pick(self.phases[0], step, 0, steps)
        values = self.phases[min(phase, len(self.phases) - 1)]
        if boundary is None:
            return _pick(values, step, 0, steps)
        boundary = min(max(0, boundary), steps)
        start, end = (0, boundary) if phase == 0 else (boundary, steps)
        return _pick(values, step, start, end)


def _pick(values: tuple[float, ...], step: int, start: int, end: int) -> float:
    """values split [start, end) evenly; steps outside the range clamp to its ends."""
    length = end - start
    if length <= 0:
        return values[-1] if step >= end else values[0]
    local = min(max(step - start, 0), length - 1)
    return values[min(len(values) - 1, local * len(values) // length)]


def parse_multiplier(text: str, lora: str = "LoRA") -> Schedule:
    """Parse one multiplier string; `lora` names the LoRA in error messages."""
    if not isinstance(text, str) or not text.strip():
        raise MultiplierError(f"LoRA {lora}: the multiplier is empty")
    parts = text.strip().split(";")
    if len(parts) > MAX_PHASES:
        raise MultiplierError(
            f"LoRA {lora}: multiplier {text!r} has {len(parts)} phases; at most {MAX_PHASES}"
        )
    phases: list[tuple[float, ...]] = []
    for part in parts:
        values: list[float] = []
        for token in part.split(","):
            token = token.strip()
            if not token:
                raise MultiplierError(f"LoRA {lora}: empty value in multiplier {text!r}")
            try:
                value = float(token)
            except ValueError:
                raise MultiplierError(
                    f"LoRA {lora}: {token!r} in multiplier {text!r} is not a number"
                ) from None
            if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
                raise MultiplierError(
                    f"LoRA {lora}: {token!r} in multiplier {text!r} is outside "
                    f"-{MAX_WEIGHT:g}..{MAX_WEIGHT:g}"
                )
            values.append(value)
        phases.append(tuple(values))
    return Schedule(tuple(phases))
