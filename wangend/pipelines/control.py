"""The narrow boundary between the queue (event loop) and the GPU worker (a thread).

A run gets a `ResolvedJob` in, and talks back only through two objects:

* `JobControl`: latches the loop sets and the worker polls. Pause is honoured at step
  boundaries (the worker blocks inside diffusers' step callback, so latents stay where
  they are and a resumed run is bit-identical to an unpaused one). Abort is honoured at
  every transformer block and VAE decoder call (forward pre-hooks), so an abort lands
  within one block, never after a whole step or a whole decode.
* `RunHooks`: callbacks for progress and lifecycle, implemented by the queue side. They
  are called on the worker thread and must not block for long.

Nothing here knows about the event loop, SQLite or sockets, so the worker can later move
into its own process (one per GPU) behind the same two objects.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol


class JobAborted(Exception):
    """Raised inside the worker when the job's abort latch is set. No output is written."""


class JobControl:
    """Thread-safe pause/abort latches for one running job."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._abort = False
        self._pause = False
        # Plain attribute read on the hot path (every transformer block): a bool read is
        # atomic in CPython, so check_abort() takes no lock.
        self.aborted = False

    # --- called by the event loop ---------------------------------------------------

    def request_abort(self) -> None:
        with self._cond:
            self._abort = True
            self.aborted = True
            self._cond.notify_all()

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

    # --- called by the worker ---------------------------------------------------------

    def check_abort(self) -> None:
        if self.aborted:
            raise JobAborted()

    def step_boundary(self, hooks: RunHooks, step: int, steps: int) -> None:
        """Called after each denoising step. Blocks while a pause is requested."""
        self.check_abort()
        if not self._pause:
            return
        hooks.paused(step, steps)
        with self._cond:
            while self._pause and not self._abort:
                self._cond.wait()
        self.check_abort()
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
