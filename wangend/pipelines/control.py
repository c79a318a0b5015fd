"""The narrow boundary between the queue (event loop) and the GPU worker (a thread).

A run gets a `ResolvedJob` in, and talks back only through two objects:

* `JobControl`: latches the loop sets and the worker polls. Pause is honoured at step
  boundaries (the worker blocks inside diffusers' step callback, so latents stay where
  they are and a resumed run is bit-identical to an unpaused one). Abort is honoured at
  every transformer block and VAE decoder call (forward pre-hooks), so an abort lands
  within one block, never after a whole step or a whole decode. Suspend (a stop that
  sends the job back to the queue) is an abort that waits for the next step boundary
  while the run can write a resume point there (resume.py), so the next attempt goes on
  from that step; anywhere else it lands like an abort.
* `RunHooks`: callbacks for progress and lifecycle, implemented by the queue side. They
  are called on the worker thread and must not block for long.

Nothing here knows about the event loop, SQLite or sockets, so the worker can later move
into its own process (one per GPU) behind the same two objects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol


class JobAborted(Exception):
    """Raised inside the worker when the job's abort latch is set. No output is written."""


class JobControl:
    """Thread-safe pause, abort and suspend latches for one running job."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._abort = False
        self._pause = False
        self._suspend = False
        self._suspend_now = False
        self._resumable = False
        # Plain attribute read on the hot path (every transformer block): a bool read is
        # atomic in CPython, so check_abort() takes no lock. True on abort, and on
        # suspend while the run cannot wait for a step boundary.
        self.aborted = False

    def _settle(self) -> None:
        self.aborted = self._abort or (self._suspend and (self._suspend_now or not self._resumable))
        self._cond.notify_all()

    # --- called by the event loop ---------------------------------------------------

    def request_abort(self) -> None:
        with self._cond:
            self._abort = True
            self._settle()

    def request_suspend(self, at_once: bool = False) -> None:
        """Stop the run for a later attempt: at the next step boundary, after a resume
        point is written, while the run is resumable; at once otherwise, or with
        `at_once` (the last point written is kept)."""
        with self._cond:
            self._suspend = True
            self._suspend_now = self._suspend_now or at_once
            self._settle()

    def request_pause(self) -> None:
        with self._cond:
            self._pause = True

    def release_pause(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    @property
    def pause_requested(self) -> bool:
        return self._pause

    @property
    def suspending(self) -> bool:
        """A suspend (not an abort) is what stops the run: its resume point is kept."""
        return self._suspend and not self._abort

    # --- called by the worker ---------------------------------------------------------

    def set_resumable(self, resumable: bool) -> None:
        """The run can (True) or cannot (False) write a resume point at its next step
        boundary; a pending suspend then waits for it or lands at once."""
        with self._cond:
            self._resumable = resumable
            self._settle()

    def check_abort(self) -> None:
        if self.aborted:
            raise JobAborted()

    def step_boundary(
        self, hooks: RunHooks, step: int, steps: int, save: Callable[[], None] | None = None
    ) -> None:
        """Called after each denoising step. Blocks while a pause is requested; unwinds
        on a suspend. `save` writes a resume point: it is called before the run holds
        or unwinds here, so the point is the step the run stopped at."""
        self.check_abort()
        if not (self._pause or self._suspend):
            return
        if save is not None:
            save()
        if self._suspend:
            raise JobAborted()
        hooks.paused(step, steps)
        with self._cond:
            while self._pause and not self._abort and not self._suspend:
                self._cond.wait()
        self.check_abort()
        if self._suspend:
            raise JobAborted()
        hooks.resumed(step, steps)


class RunHooks(Protocol):
    """What a run reports. Implemented by the queue side; called on the worker thread."""

    def progress(
        self, step: int, steps: int, phase: str, preview: dict[str, Any] | None = None
    ) -> None:
        """After each denoising step (phase "denoising"), and on phase changes
        ("loading", "encoding", "decoding", "saving") with the step count so far.
        `preview`: a small JPEG of the latents (previews.PreviewMaker) when one is due."""

    def paused(self, step: int, steps: int) -> None:
        """The worker is now holding at a step boundary."""

    def resumed(self, step: int, steps: int) -> None:
        """The worker continues from the step it held at."""

    def model_loading(self, model: str, data: dict[str, Any]) -> None:
        """A model load starts (data: source, reason, components...)."""

    def model_loaded(self, model: str, data: dict[str, Any]) -> None:
        """A model is warm (data: seconds, device, dtype...)."""

    def spec_changed(self, spec: Any) -> None:
        """The run resolved more of its job (the enhanced prompt): record `spec` as the
        job's spec, so the record and a retry hold what really ran."""
