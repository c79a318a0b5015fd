"""QueueStateTracker: what the queue knows that is not worth a disk write.

Job state lives only in SQLite. What lives here is derived or fleeting: the running job's
live progress and ETA (updated every step; persisting it would cost an fsync per step),
its JobControl, and the pause latch (mirrored into the store's meta table by the
controller so a paused queue stays paused across restarts).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..pipelines.control import JobControl
from ..protocol import JobRecord, Progress

__all__ = ["QueueStateTracker", "RunningJob"]


@dataclass
class RunningJob:
    record: JobRecord
    control: JobControl
    progress: Progress = field(default_factory=lambda: Progress(phase="starting"))
    held: bool = False  # the worker is holding at a step boundary (job state `paused`)
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=8))
    last_step_at: float | None = None

    @property
    def id(self) -> int:
        return self.record.id


class QueueStateTracker:
    def __init__(self, pause_mode: str | None = None) -> None:
        self.pause_mode = pause_mode  # None | "now" | "after_current"
        self.running: RunningJob | None = None

    @property
    def paused(self) -> bool:
        return self.pause_mode is not None

    def begin(self, record: JobRecord, control: JobControl) -> RunningJob:
        self.running = RunningJob(record=record, control=control)
        return self.running

    def end(self) -> None:
        self.running = None

    def update(self, step: int, steps: int, phase: str, now: float | None = None) -> Progress:
        """Record a progress report; the ETA is the recent mean step time times the steps
        left (None until a step has been timed: a guess would be worse than nothing)."""
        job = self.running
        if job is None:
            return Progress(step=step, steps=steps, phase=phase)
        now = time.monotonic() if now is None else now
        if phase == "denoising" and step > job.progress.step and job.last_step_at is not None:
            job.step_times.append((now - job.last_step_at) / (step - job.progress.step))
        if phase == "denoising":
            job.last_step_at = now
        eta = None
        if job.step_times and phase in ("denoising", "decoding", "saving"):
            eta = sum(job.step_times) / len(job.step_times) * max(steps - step, 0)
        job.progress = Progress(step=step, steps=steps, phase=phase, eta=eta)
        return job.progress

    def resumed(self) -> None:
        """After a hold the next step's time would include the pause: start timing anew."""
        if self.running is not None:
            self.running.last_step_at = None
            self.running.held = False
