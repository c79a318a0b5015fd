"""QueueStateTracker: what the queue knows that is not worth a disk write.

Job state lives only in SQLite. What lives here is fleeting or derived: the running job,
its JobControl, its live progress and ETA (updated every step; persisting them would cost
an fsync per step and they mean nothing after a restart), and the pause latch, which the
controller mirrors into the store's meta table so a paused queue stays paused across
restarts. Nothing here touches the event loop or the store, so it is tested alone.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..pipelines.control import JobControl
from ..protocol import JobRecord, Progress

__all__ = ["PAUSE_MODES", "RECENT_STEPS", "QueueStateTracker", "RunningJob"]

PAUSE_MODES = ("now", "after_current")
# The ETA averages this many recent steps: enough to smooth noise, few enough to follow
# a step time that changes (another process taking the GPU, thermal throttling).
RECENT_STEPS = 8


@dataclass
class RunningJob:
    """The job on the worker, from `job.started` until its outcome is committed."""

    record: JobRecord  # as it was when it started
    control: JobControl
    progress: Progress = field(default_factory=lambda: Progress(phase="starting"))
    held: bool = False  # holding at a step boundary (the store says `paused`)
    abort_requested: bool = False  # a user asked: the unwind ends `aborted`
    requeue_requested: bool = False  # a graceful stop asked: the unwind ends `queued`
    requeue_now: bool = False  # ... without waiting for the step boundary
    step_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    last_step: int = 0
    last_step_at: float | None = None  # None: the next step cannot be timed

    @property
    def id(self) -> int:
        return self.record.id


class QueueStateTracker:
    """The in-memory half of the queue's state: pause latch and the running job."""

    def __init__(
        self, pause_mode: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if pause_mode not in (None, *PAUSE_MODES):
            raise ValueError(f"pause mode must be one of {PAUSE_MODES} or None")
        self.pause_mode = pause_mode
        self.running: RunningJob | None = None
        self._clock = clock

    @property
    def paused(self) -> bool:
        return self.pause_mode is not None

    def begin(self, record: JobRecord, control: JobControl) -> RunningJob:
        self.running = RunningJob(record=record, control=control)
        return self.running

    def end(self) -> None:
        self.running = None

    def update(self, step: int, steps: int, phase: str) -> Progress:
        """Record a progress report from the worker and return it with an ETA.

        ETA = median seconds per step over the recent steps x steps left, while
        denoising. The median, because the first step at a size can be many times the
        rest (a compile, kernel autotuning) and must not inflate the ETA for the next
        eight. None until one step has been timed (a guess would be worse than nothing)
        and outside denoising (loading and decoding do not scale with steps).
        """
        job = self.running
        if job is None:
            return Progress(step=step, steps=steps, phase=phase)
        if phase == "denoising":
            now = self._clock()
            if job.last_step_at is not None and step > job.last_step:
                job.step_seconds.append((now - job.last_step_at) / (step - job.last_step))
            job.last_step, job.last_step_at = step, now
        eta = None
        if phase == "denoising" and job.step_seconds:
            eta = round(statistics.median(job.step_seconds) * max(steps - step, 0), 3)
        job.progress = Progress(step=step, steps=steps, phase=phase, eta=eta)
        return job.progress

    def held(self) -> None:
        if self.running is not None:
            self.running.held = True

    def resumed(self) -> None:
        """The worker goes on after a hold, from the step boundary it held at. The next
        step is timed from now, so the hold never counts as step time."""
        if self.running is not None:
            self.running.held = False
            if self.running.last_step_at is not None:
                self.running.last_step_at = self._clock()
