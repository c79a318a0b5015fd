"""QueueController: picks the next job, drives the worker, and is the only writer of job
state.

Every transition is committed in the store before its event is published. The worker
runs on one thread (a CapacityLimiter of 1) and reaches the event loop only through
`_WorkerHooks`, which forward its reports with `anyio.from_thread.run_sync`; the loop
reaches the worker only through the job's `JobControl` latches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec

from ..errors import JobFailure, ShuttingDown, WrongState
from ..pipelines.control import JobAborted, JobControl
from ..protocol import (
    ClearResult,
    EnqueueResult,
    Event,
    JobError,
    JobRecord,
    JobSpec,
    JobsResult,
    MoveResult,
    QueueCounts,
    QueueStateResult,
    ResolvedJob,
    RunningInfo,
)
from .state import QueueStateTracker
from .store import JobStore

__all__ = ["Publish", "QueueController", "Worker"]

log = logging.getLogger("wangend.queue")

Publish = Callable[[str, int | None, dict[str, Any]], Event]
LIVE = ("running", "paused")


class Worker:
    """The protocol the GPU worker implements (pipelines.runtime.GenerationRuntime)."""

    device: str
    loaded_model: str | None

    def run(self, job_id: int, job: ResolvedJob, control: JobControl, hooks: Any) -> list[str]:
        raise NotImplementedError


class Inputs:
    """The protocol of pipelines.inputs.TaskInputManager."""

    def resolve(self, spec: JobSpec) -> ResolvedJob:
        raise NotImplementedError


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class QueueController:
    def __init__(
        self,
        store: JobStore,
        worker: Worker,
        inputs: Inputs,
        publish: Publish,
        *,
        max_attempts: int = 2,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.inputs = inputs
        self.publish = publish
        self.max_attempts = max_attempts
        self._limiter = limiter or anyio.CapacityLimiter(1)
        self._stopping = False
        self._requeue_on_unwind = False
        self._wake: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        # Recover what an unclean stop left behind, before anything can be scheduled.
        recovery = store.recover(max_attempts)
        if recovery.requeued:
            log.warning("requeued jobs interrupted by the last stop: %s", recovery.requeued)
        if recovery.failed:
            log.warning("failed jobs interrupted too often: %s", recovery.failed)
        self.state = QueueStateTracker(store.get_meta("pause_mode"))

    # --- the scheduling loop ---------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _next_runnable(self) -> JobRecord | None:
        if self._stopping or self.state.paused or self.state.running is not None:
            return None
        return self.store.next_queued()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._idle = anyio.Event()
        self._idle.set()
        task_status.started()
        while True:
            record = self._next_runnable()
            if record is None:
                # No await between the check and the new Event: a kick cannot be lost.
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self._run_one(record)

    async def _run_one(self, queued: JobRecord) -> None:
        control = JobControl()
        record = self.store.transition(
            queued.id, "running", allowed_from=("queued",), attempts_delta=1, started=True
        )
        self.state.begin(record, control)
        assert self._idle is not None
        self._idle = anyio.Event()
        self.publish(
            "job.started", record.id, {"attempt": record.attempts, "model": record.spec.model}
        )
        log.info("job %d started (attempt %d, %s)", record.id, record.attempts, record.spec.model)
        hooks = _WorkerHooks(self, record.id)
        try:
            outputs = await anyio.to_thread.run_sync(
                self.worker.run, record.id, record.spec, control, hooks, limiter=self._limiter
            )
        except JobAborted:
            self._finish_aborted(record.id)
        except JobFailure as exc:
            self._finish_failed(record.id, JobError(type=exc.kind, message=exc.message))
        except Exception as exc:
            log.exception("job %d crashed", record.id)
            self._finish_failed(record.id, JobError(type="InternalError", message=one_line(exc)))
        else:
            done = self.store.transition(
                record.id, "succeeded", allowed_from=LIVE, outputs=outputs, finished=True
            )
            self.publish("job.succeeded", done.id, {"outputs": done.outputs})
            log.info("job %d succeeded: %s", done.id, ", ".join(done.outputs))
        finally:
            self.state.end()
            self._idle.set()

    def _finish_aborted(self, job_id: int) -> None:
        if self._requeue_on_unwind:
            # A graceful stop, not a user's abort: back to the queue, and this attempt
            # does not count against max_attempts.
            self.store.transition(job_id, "queued", allowed_from=LIVE, attempts_delta=-1)
            log.info("job %d put back in the queue for the next start", job_id)
            return
        error = JobError(type="Aborted", message="aborted by request")
        self.store.transition(job_id, "aborted", allowed_from=LIVE, error=error, finished=True)
        self.publish("job.aborted", job_id, {"error": msgspec.to_builtins(error)})
        log.info("job %d aborted", job_id)

    def _finish_failed(self, job_id: int, error: JobError) -> None:
        self.store.transition(job_id, "failed", allowed_from=LIVE, error=error, finished=True)
        self.publish("job.failed", job_id, {"error": msgspec.to_builtins(error)})
        log.warning("job %d failed: %s: %s", job_id, error.type, error.message)

    # --- reports from the worker (on the loop thread) ------------------------------------

    def _on_progress(self, job_id: int, step: int, steps: int, phase: str) -> None:
        progress = self.state.update(step, steps, phase)
        self.publish("job.progress", job_id, msgspec.to_builtins(progress))

    def _on_paused(self, job_id: int, step: int, steps: int) -> None:
        self.store.transition(job_id, "paused", allowed_from=("running",))
        if self.state.running is not None:
            self.state.running.held = True
        self.publish("job.paused", job_id, {"step": step, "steps": steps})

    def _on_resumed(self, job_id: int, step: int, steps: int) -> None:
        self.store.transition(job_id, "running", allowed_from=("paused",))
        self.state.resumed()
        self.publish("job.resumed", job_id, {"step": step, "steps": steps})

    # --- the control API (loop thread) -------------------------------------------------

    def enqueue(self, spec: JobSpec) -> EnqueueResult:
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down and takes no new jobs")
        resolved = self.inputs.resolve(spec)
        return self._add(resolved, spec.priority, None)

    def _add(self, spec: ResolvedJob, priority: int, retry_of: int | None) -> EnqueueResult:
        record = self.store.insert(spec, priority, retry_of)
        position = self.store.queue_order().index(record.id)
        self.publish(
            "job.queued", record.id, {"position": position, "spec": msgspec.to_builtins(spec)}
        )
        self._kick()
        return EnqueueResult(job=record.id, state="queued", position=position, spec=spec)

    def pause(self, mode: str = "now") -> QueueStateResult:
        running = self.state.running
        if running is not None:
            if mode == "now":
                running.control.request_pause()
            else:  # after_current: a held job may go on and finish
                running.control.release_pause()
        if self.state.pause_mode != mode:
            self.state.pause_mode = mode
            self.store.set_meta("pause_mode", mode)
            self.publish("queue.paused", None, {"mode": mode})
        return QueueStateResult(paused=True, mode=mode)

    def resume(self) -> QueueStateResult:
        if self.state.pause_mode is not None:
            self.state.pause_mode = None
            self.store.set_meta("pause_mode", None)
            if self.state.running is not None:
                self.state.running.control.release_pause()
            self.publish("queue.resumed", None, {})
            self._kick()
        return QueueStateResult(paused=False, mode=None)

    def abort(self, job_id: int | None = None) -> JobRecord:
        running = self.state.running
        if job_id is None:
            if running is None:
                raise WrongState("nothing is running")
            job_id = running.id
        if running is not None and running.id == job_id:
            running.control.request_abort()
            return self.job(job_id)
        record = self.store.get(job_id)
        if record.state != "queued":
            raise WrongState(f"job {job_id} is already {record.state}", {"job": job_id})
        error = JobError(type="Cancelled", message="cancelled before it started")
        record = self.store.transition(
            job_id, "aborted", allowed_from=("queued",), error=error, finished=True
        )
        self.publish("job.aborted", job_id, {"error": msgspec.to_builtins(error)})
        return record

    def clear(self) -> ClearResult:
        cancelled = self.store.clear_queued()
        error = {"type": "Cancelled", "message": "cancelled by clear"}
        for job_id in cancelled:
            self.publish("job.aborted", job_id, {"error": error})
        self.publish("queue.cleared", None, {"cancelled": cancelled})
        return ClearResult(cancelled=cancelled)

    def retry(self, job_id: int) -> EnqueueResult:
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down and takes no new jobs")
        record = self.store.get(job_id)
        if record.state not in ("failed", "aborted"):
            raise WrongState(
                f"job {job_id} is {record.state}; only failed or aborted jobs can be retried",
                {"job": job_id, "state": record.state},
            )
        return self._add(record.spec, record.priority, job_id)

    def move(self, job_id: int, position: int) -> MoveResult:
        new_position = self.store.move(job_id, position)
        self.publish("job.moved", job_id, {"position": new_position})
        self._kick()
        return MoveResult(job=job_id, position=new_position)

    def _live(self, record: JobRecord) -> JobRecord:
        running = self.state.running
        if running is not None and running.id == record.id:
            return msgspec.structs.replace(record, progress=running.progress)
        return record

    def job(self, job_id: int) -> JobRecord:
        return self._live(self.store.get(job_id))

    def jobs(self, states: Sequence[str] | None = None, limit: int = 100) -> JobsResult:
        return JobsResult(jobs=[self._live(r) for r in self.store.list(states, limit)])

    def snapshot(self) -> tuple[bool, str | None, QueueCounts, RunningInfo | None]:
        running = self.state.running
        info = None
        if running is not None:
            p = running.progress
            info = RunningInfo(
                job=running.id,
                state="paused" if running.held else "running",
                model=running.record.spec.model,
                step=p.step,
                steps=p.steps,
                phase=p.phase,
                eta=p.eta,
            )
        return self.state.paused, self.state.pause_mode, self.store.counts(), info

    async def stop(self, mode: str = "graceful", timeout: float = 30.0) -> None:
        """Take no new jobs; requeue the running one ("graceful") or let it end ("finish").

        "graceful" unwinds the worker at its next transformer block rather than waiting
        for a step boundary: the job restarts from its first step after the next start
        anyway (latents are not persisted), so sooner is better.
        """
        self._stopping = True
        running = self.state.running
        if running is not None and mode == "graceful":
            self._requeue_on_unwind = True
            running.control.request_abort()
        elif running is not None:
            running.control.release_pause()
        if self._idle is not None:
            with anyio.move_on_after(timeout):
                await self._idle.wait()
        if self.state.running is not None:
            log.warning(
                "job %d still running at exit; it is requeued at the next start",
                self.state.running.id,
            )


class _WorkerHooks:
    """RunHooks for one job: called on the worker thread, run on the loop thread."""

    def __init__(self, controller: QueueController, job_id: int) -> None:
        self._c = controller
        self._job = job_id

    def progress(self, step: int, steps: int, phase: str) -> None:
        anyio.from_thread.run_sync(self._c._on_progress, self._job, step, steps, phase)

    def paused(self, step: int, steps: int) -> None:
        anyio.from_thread.run_sync(self._c._on_paused, self._job, step, steps)

    def resumed(self, step: int, steps: int) -> None:
        anyio.from_thread.run_sync(self._c._on_resumed, self._job, step, steps)

    def model_loading(self, model: str, data: dict[str, Any]) -> None:
        anyio.from_thread.run_sync(self._c.publish, "model.loading", None, {"model": model, **data})

    def model_loaded(self, model: str, data: dict[str, Any]) -> None:
        anyio.from_thread.run_sync(self._c.publish, "model.loaded", None, {"model": model, **data})
