"""QueueController: picks the next job, drives the worker, and is the only writer of job
state.

Three rules hold everywhere below:

* Every transition is committed in the store before the event that announces it is
  published, so a client never hears of a state the daemon could forget.
* The loop never polls: it sleeps on an `anyio.Event` that every change able to make a
  job runnable sets (enqueue, resume, move, a job ending).
* The worker runs on one thread (a CapacityLimiter of 1) and reaches the loop only
  through `_LoopHooks`, which forward its reports with `anyio.from_thread.run_sync`; the
  loop reaches the worker only through the job's `JobControl` latches.

Construction recovers what an unclean stop left behind (`store.recover`) and restores the
pause latch from the store, so a daemon killed with -9 comes back with the same queue and
a paused queue stays paused; an abort that was acknowledged but had not landed ends the
job `aborted`. There is no separate start step: a controller that exists is consistent
with its store.

A store that cannot be written (StoreUnavailable: a full disk) never takes the daemon
down. A call that needs a write answers with the reason. A run's outcome is tried again
every SETTLE_RETRY seconds, holding the queue (no next job starts) until it is written
or the daemon stops, when the next start's recovery settles the job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import msgspec

from ..errors import (
    InvalidParams,
    JobFailure,
    ShuttingDown,
    StoreUnavailable,
    UnknownJob,
    WrongState,
)
from ..pipelines.control import JobAborted, JobControl, RunHooks
from ..protocol import (
    TERMINAL_STATES,
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
    ResolvedGenerate,
    ResolvedJob,
    RunningInfo,
)
from .state import PAUSE_MODES, QueueStateTracker, RunningJob
from .store import LIVE_STATES, JobStore

__all__ = ["PAUSE_META_KEY", "Inputs", "Publish", "QueueController", "Worker", "one_line"]

log = logging.getLogger(__name__)

Publish = Callable[[str, int | None, dict[str, Any]], Event]
PAUSE_META_KEY = "pause_mode"
# The job a "pause after_current" lets finish. Stored, so a stop or a crash that sends
# it back to the queue does not leave it waiting behind the pause it was exempt from.
FINISHING_META_KEY = "pause_finishes"
# The running job an acknowledged abort is on its way to: stored, so a crash before the
# worker unwinds does not bring the job back to run to its end.
ABORT_META_KEY = "aborting"
# Why the daemon itself paused the queue (an output folder it cannot write), until resumed.
PAUSE_REASON_META_KEY = "pause_reason"
SETTLE_RETRY = 2.0  # seconds between tries to record an outcome the store refused
STOP_MODES = ("graceful", "finish")
MESSAGE_LIMIT = 300  # characters of an unexpected exception kept in a job's error


class Worker(Protocol):
    """What runs jobs (pipelines.runtime.GenerationRuntime); called on the worker thread."""

    @property
    def device(self) -> str: ...

    @property
    def loaded_model(self) -> str | None: ...

    def resume_step(self, job_id: int) -> int | None:
        """The step a queued job's resume point holds, or None."""
        ...

    def forget(self, job_id: int, succeeded: bool = False) -> None:
        """The job's end is recorded: drop what a rerun of it would have used (and,
        unless it `succeeded`, outputs an attempt named but never noted)."""
        ...

    def output_problem(self) -> str | None:
        """Why outputs cannot be written now (a read-only or full output folder), or
        None. Asked before each job starts and after a job fails writing its output."""
        ...

    def finished(self, job_id: int) -> bool:
        """An attempt cut off before the queue knew wrote and noted all its outputs."""
        ...

    def run(
        self, job_id: int, job: ResolvedJob, control: JobControl, hooks: RunHooks
    ) -> list[str]: ...


class Inputs(Protocol):
    """What resolves a request into a runnable job (pipelines.inputs.TaskInputManager)."""

    def resolve(self, spec: JobSpec) -> ResolvedJob: ...

    def check_enhance(self, field: str) -> None:
        """Refuse (InvalidParams naming `field`) a wish for an enhanced prompt when the
        daemon has no prompt enhancer."""
        ...


def one_line(exc: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """`ExceptionClass: first line of the message`, cut to `limit` characters: what a
    user sees of a failure nobody foresaw (the traceback goes to the log)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class QueueController:
    """The queue's one writer: the RPC methods call it on the loop thread, `run()` feeds
    the worker, and the worker's reports come back through `_LoopHooks`."""

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
        # One GPU, one job: a limiter of 1 also keeps a second controller (or anything
        # else given the same limiter) off the worker thread while a job runs.
        self._limiter = limiter
        self._stopping = False
        self._wake: anyio.Event | None = None  # made by the loop; None until it waits
        self._job_done: anyio.Event | None = None  # set when the running job's outcome is in
        self._recover()
        pause_mode = store.get_meta(PAUSE_META_KEY)
        if pause_mode not in PAUSE_MODES:
            pause_mode = None
        self.state = QueueStateTracker(pause_mode)
        self.pause_reason = store.get_meta(PAUSE_REASON_META_KEY) if pause_mode else None

    def _recover(self) -> None:
        aborting = self.store.get_meta(ABORT_META_KEY)
        recovery = self.store.recover(
            self.max_attempts,
            self.worker.finished,
            aborting=[int(aborting)] if aborting and aborting.isdigit() else [],
        )
        for job_id in recovery.aborted:
            record = self.store.get(job_id)
            log.warning("job %d: its abort is carried out now, after the last stop", job_id)
            self.publish("job.aborted", job_id, {"error": msgspec.to_builtins(record.error)})
            self._forget(job_id)
        if aborting:
            self.store.set_meta(ABORT_META_KEY, None)
        for job_id in recovery.requeued:
            log.warning("job %d was interrupted by the last stop; it is queued again", job_id)
            self._announce_queued(self.store.get(job_id), reason="recovered")
        for job_id in recovery.failed:
            record = self.store.get(job_id)
            log.warning("job %d failed: %s", job_id, record.error.message if record.error else "")
            self.publish("job.failed", job_id, {"error": msgspec.to_builtins(record.error)})

    # --- the scheduling loop ---------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run queued jobs one after the other until `stop()` (or cancellation).

        Sleeps on an Event while paused, while the queue is empty, or while stopping.
        Returns on its own once stopped and idle.
        """
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        task_status.started()
        while not self._stopping:
            record = self._next()
            problem = await self._output_problem() if record is not None else None
            if problem is not None:
                self._hold(problem)  # paused now: _next() gives nothing until resumed
                continue
            if record is None:
                # No await between the check and the new Event, so no kick is lost.
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self._run_one(record)

    def _next(self) -> JobRecord | None:
        """The job to start: the next queued one, or while paused "after_current" only
        the job that pause lets finish, if a stop or a crash put it back in the queue."""
        if not self.state.paused:
            return self.store.next_queued()
        finishing = self.store.get_meta(FINISHING_META_KEY)
        if self.state.pause_mode != "after_current" or not finishing:
            return None
        try:
            record = self.store.get(int(finishing))
        except (UnknownJob, ValueError):
            return None
        return record if record.state == "queued" else None

    async def _run_one(self, queued: JobRecord) -> None:
        control = JobControl()
        record = self.store.transition(queued.id, "running", allowed_from=("queued",))
        running = self.state.begin(record, control)
        self._job_done = done_event = anyio.Event()
        self.publish(
            "job.started", record.id, {"attempt": record.attempts, "model": record.spec.model}
        )
        log.info("job %d started (attempt %d, %s)", record.id, record.attempts, record.spec.model)
        outcome: Callable[[], None]
        try:
            try:
                # abandon_on_cancel=False: cancelling the loop waits for the worker to
                # return, so an outcome is never lost and two jobs never overlap.
                outputs = await anyio.to_thread.run_sync(
                    self.worker.run,
                    record.id,
                    record.spec,
                    control,
                    _LoopHooks(self, record.id),
                    abandon_on_cancel=False,
                    limiter=self._limiter,
                )
            except JobAborted:
                outcome = functools.partial(self._unwound, running)
            except JobFailure as exc:
                problem = None
                if exc.kind == "OutputWriteFailed":
                    problem = await self._output_problem()
                if problem is not None:  # the folder, not the job: it waits for the fix
                    outcome = functools.partial(self._held_back, record.id, problem)
                else:
                    error = JobError(type=exc.kind, message=exc.message)
                    outcome = functools.partial(self._failed, record.id, error)
            except Exception as exc:
                log.exception("job %d failed with an unexpected error", record.id)
                error = JobError(type="InternalError", message=one_line(exc))
                outcome = functools.partial(self._failed, record.id, error)
            else:
                outcome = functools.partial(self._succeeded, record.id, outputs)
            await self._settle(record.id, outcome)
        finally:
            self.state.end()
            try:
                self._after(record.id)
            finally:
                done_event.set()  # a stop waits on it, whatever happened above

    async def _output_problem(self) -> str | None:
        """The worker's answer, off the loop: a hung network share must not stall RPC."""
        return await anyio.to_thread.run_sync(self.worker.output_problem)

    async def _settle(self, job_id: int, record_outcome: Callable[[], None]) -> None:
        """Record a run's outcome. While the store refuses the write (a full disk) the
        queue holds: one ERROR line, then a try every SETTLE_RETRY seconds, until it is
        written or the daemon stops (the job stays `running` in the store, and the next
        start's recovery settles it)."""
        warned = False
        while True:
            try:
                record_outcome()
                if warned:
                    log.warning("job %d: its end is recorded; the queue goes on", job_id)
                return
            except StoreUnavailable as exc:
                if self._stopping:
                    why = f"{exc.message}; the next start settles it"
                    log.error("job %d: its end is not recorded: %s", job_id, why)
                    return
                if not warned:
                    why = (
                        f"{exc.message}; no job starts until it is (tried every {SETTLE_RETRY:g} s)"
                    )
                    log.error("job %d: its end cannot be recorded: %s", job_id, why)
                    warned = True
            await anyio.sleep(SETTLE_RETRY)

    def _succeeded(self, job_id: int, outputs: list[str]) -> None:
        done = self.store.transition(job_id, "succeeded", allowed_from=LIVE_STATES, outputs=outputs)
        self.publish("job.succeeded", done.id, {"outputs": done.outputs})
        log.info("job %d succeeded: %s", done.id, ", ".join(done.outputs))

    def _after(self, job_id: int) -> None:
        """Housekeeping once a run is over: an ended job's resume files go (the worker
        keeps them for a requeued one), and it no longer holds a pause's exemption."""
        try:
            state = self.store.get(job_id).state
            if state not in TERMINAL_STATES:
                return
            self.worker.forget(job_id, succeeded=state == "succeeded")
            for key in (FINISHING_META_KEY, ABORT_META_KEY):
                if self.store.get_meta(key) == str(job_id):
                    self.store.set_meta(key, None)
        except Exception:  # the next start's sweep and recovery settle what is left
            log.exception("job %d: housekeeping after its end failed", job_id)

    def _forget(self, job_id: int) -> None:
        """A queued job was cancelled: a resume point it kept from an earlier attempt
        (tens of MB at real sizes) goes now, not at the next start's sweep."""
        try:
            self.worker.forget(job_id)
        except Exception:
            log.exception("job %d: dropping its resume point failed", job_id)

    def _unwound(self, running: RunningJob) -> None:
        """The worker raised JobAborted: a user's abort, or a graceful stop's requeue."""
        if running.requeue_requested and not running.abort_requested:
            # Back to its old place in the queue; the attempt it used still counts.
            record = self.store.transition(running.id, "queued", allowed_from=LIVE_STATES)
            self._announce_queued(record, reason="stopped")
            log.info("job %d is queued again for the next start", running.id)
            return
        error = JobError(type="Aborted", message="aborted while running")
        self.store.transition(running.id, "aborted", allowed_from=LIVE_STATES, error=error)
        self.publish("job.aborted", running.id, {"error": msgspec.to_builtins(error)})
        log.info("job %d aborted", running.id)

    def _held_back(self, job_id: int, problem: str) -> None:
        """A job that could not write its output because of the folder: back to its
        place in the queue (its resume point kept), and the queue paused until a user
        has fixed the folder and resumes."""
        record = self.store.transition(job_id, "queued", allowed_from=LIVE_STATES)
        self._announce_queued(record, reason="held")
        log.error("job %d could not write its output; it is queued again", job_id)
        self._hold(problem)

    def _hold(self, reason: str) -> None:
        """Pause the queue ("now") for a reason outside any job, said in the log, the
        `queue.paused` event and `status` until a `resume`."""
        try:
            self.store.set_meta(PAUSE_REASON_META_KEY, reason)
            self.store.set_meta(PAUSE_META_KEY, "now")
        except StoreUnavailable as exc:  # held in memory all the same
            log.error("the hold is not recorded: %s", exc.message)
        self.state.pause_mode, self.pause_reason = "now", reason
        self.publish("queue.paused", None, {"mode": "now", "reason": reason})
        log.error("queue paused: %s; fix it, then `wangenctl resume`", reason)

    def _failed(self, job_id: int, error: JobError) -> None:
        self.store.transition(job_id, "failed", allowed_from=LIVE_STATES, error=error)
        self.publish("job.failed", job_id, {"error": msgspec.to_builtins(error)})
        log.warning("job %d failed: %s: %s", job_id, error.type, error.message)

    def _announce_queued(self, record: JobRecord, reason: str | None = None) -> int:
        position = self.store.queue_order().index(record.id)
        data: dict[str, Any] = {
            "position": position,
            "priority": record.priority,
            "spec": msgspec.to_builtins(record.spec),
        }
        if record.retry_of is not None:
            data["retry_of"] = record.retry_of
        if reason is not None:  # queued again: "recovered" after a crash, "stopped"
            data["requeued"] = reason
        self.publish("job.queued", record.id, data)
        return position

    # --- reports from the worker (run on the loop thread) ------------------------------

    def _on_progress(
        self, job_id: int, step: int, steps: int, phase: str, preview: dict | None = None
    ) -> None:
        data = msgspec.to_builtins(self.state.update(step, steps, phase))
        if preview is not None:
            data["preview"] = preview
        self.publish("job.progress", job_id, data)

    def _on_paused(self, job_id: int, step: int, steps: int) -> None:
        # The hold is real whether or not the store can say so: a crash while held
        # recovers the job the same way from `running`.
        with _logged(StoreUnavailable, "job %d: its hold is not recorded", job_id):
            self.store.transition(job_id, "paused", allowed_from=("running",))
        self.state.held()
        self.publish("job.paused", job_id, {"step": step, "steps": steps})

    def _on_resumed(self, job_id: int, step: int, steps: int) -> None:
        # WrongState: the hold itself was never recorded, so the store says running.
        with _logged((StoreUnavailable, WrongState), "job %d: going on, not recorded", job_id):
            self.store.transition(job_id, "running", allowed_from=("paused",))
        self.state.resumed()
        self.publish("job.resumed", job_id, {"step": step, "steps": steps})

    def _on_spec(self, job_id: int, spec: ResolvedJob) -> None:
        record = self.store.update_spec(job_id, spec)
        self.publish("job.updated", job_id, {"spec": msgspec.to_builtins(record.spec)})

    def _on_model(self, event: str, job_id: int, model: str, data: dict[str, Any]) -> None:
        self.publish(event, None, {"model": model, "job": job_id, **data})

    # --- the control API (loop thread) -------------------------------------------------

    def enqueue(self, spec: JobSpec) -> EnqueueResult:
        """Resolve, store as `queued`, announce. A bad spec raises (InvalidParams,
        ModelUnavailable) before anything is stored."""
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down and takes no new jobs")
        return self.add(self.inputs.resolve(spec), spec.priority)

    async def enqueue_async(self, spec: JobSpec) -> EnqueueResult:
        """`enqueue` with the resolving on a helper thread: it reads and hashes media
        files and LoRA headers, which must not stall every other client on the loop.
        (The worker thread is not used: a long job must not delay an enqueue.)"""
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down and takes no new jobs")
        resolved = await anyio.to_thread.run_sync(self.inputs.resolve, spec)
        if self._stopping:  # the daemon began stopping while the spec was checked
            raise ShuttingDown("the daemon is shutting down and takes no new jobs")
        return self.add(resolved, spec.priority)

    def add(self, spec: ResolvedJob, priority: int = 0) -> EnqueueResult:
        """Queue an already resolved spec (loop thread)."""
        return self._add(spec, priority, None)

    def _add(self, spec: ResolvedJob, priority: int, retry_of: int | None) -> EnqueueResult:
        record = self.store.insert(spec, priority, retry_of)
        position = self._announce_queued(record)
        self._kick()
        return EnqueueResult(job=record.id, state="queued", position=position, spec=spec)

    def pause(self, mode: str = "now") -> QueueStateResult:
        """Stop starting jobs. Mode "now" also holds the running job at its next step
        boundary; "after_current" lets it finish (releasing a hold). Pausing a paused
        queue only changes the mode."""
        if mode not in PAUSE_MODES:
            raise InvalidParams(
                f"pause mode must be one of {', '.join(PAUSE_MODES)}", field="$.params.mode"
            )
        running = self.state.running
        # The store first: a write it refuses (StoreUnavailable) leaves nothing changed.
        if mode == "now" or running is not None:
            finishing = str(running.id) if mode == "after_current" and running else None
            self.store.set_meta(FINISHING_META_KEY, finishing)
        changed = self.state.pause_mode != mode
        if changed:
            self.store.set_meta(PAUSE_META_KEY, mode)
        if running is not None:
            if mode == "now":
                running.control.request_pause()
            else:
                running.control.release_pause()
        if changed:
            self.state.pause_mode = mode
            self.publish("queue.paused", None, {"mode": mode})
            log.info("queue paused (%s)", mode)
        return QueueStateResult(paused=True, mode=mode)

    def resume(self) -> QueueStateResult:
        """Release a held job (it goes on from the step it held at) and start queued
        jobs again. Resuming a queue that is not paused does nothing."""
        if self.state.pause_mode is not None:
            self.store.set_meta(PAUSE_META_KEY, None)
            self.store.set_meta(FINISHING_META_KEY, None)
            self.store.set_meta(PAUSE_REASON_META_KEY, None)
            self.state.pause_mode, self.pause_reason = None, None
            if self.state.running is not None:
                self.state.running.control.release_pause()
            self.publish("queue.resumed", None, {})
            log.info("queue resumed")
            self._kick()
        return QueueStateResult(paused=False, mode=None)

    def abort(self, job_id: int | None = None) -> JobRecord:
        """Without an id: the running (or held) job. A queued job is cancelled at once; a
        running or held one is told to stop and ends `aborted` when the worker unwinds
        (within one transformer block), which `job.aborted` announces."""
        running = self.state.running
        if job_id is None:
            if running is None:
                raise WrongState("nothing is running")
            job_id = running.id
        if running is not None and running.id == job_id:
            # Stored first: acknowledged, the abort must hold even if the daemon dies
            # before the worker unwinds. A store that refuses says so, nothing done.
            self.store.set_meta(ABORT_META_KEY, str(job_id))
            running.abort_requested = True
            running.control.request_abort()  # also wakes a held job
            log.info("job %d: abort requested", job_id)
            return self.job(job_id)
        record = self.store.get(job_id)
        if record.state != "queued":
            raise WrongState.of_job(
                job_id, record.state, "only a queued, running or paused job can be aborted"
            )
        error = JobError(type="Cancelled", message="cancelled before it started")
        record = self.store.transition(job_id, "aborted", allowed_from=("queued",), error=error)
        self.publish("job.aborted", job_id, {"error": msgspec.to_builtins(error)})
        log.info("job %d cancelled", job_id)
        self._forget(job_id)
        return record

    def clear(self) -> ClearResult:
        """Cancel every queued job in one transaction; the running job is left alone."""
        cancelled = self.store.clear_queued()
        for job_id in cancelled:
            error = self.store.get(job_id).error
            self.publish("job.aborted", job_id, {"error": msgspec.to_builtins(error)})
            self._forget(job_id)
        self.publish("queue.cleared", None, {"cancelled": cancelled})
        return ClearResult(cancelled=cancelled)

    def retry(self, job_id: int, enhance: bool = False) -> EnqueueResult:
        """A new job with the same resolved spec (same seed, so the same video) and the
        same priority; the old record stays as history. A generation whose prompt was
        enhanced reuses the enhanced prompt, unless `enhance` asks for a fresh one (from
        the original prompt)."""
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down and takes no new jobs")
        record = self.store.get(job_id)
        if record.state not in ("failed", "aborted"):
            raise WrongState.of_job(
                job_id, record.state, "only a failed or aborted job can be retried"
            )
        spec = record.spec
        if enhance:
            if not isinstance(spec, ResolvedGenerate):
                raise InvalidParams("only a generation has a prompt to enhance", "$.params.enhance")
            # As enqueue does: without an enhancer the job would run the prompt as it
            # stands, which is not what was asked for.
            self.inputs.check_enhance("$.params.enhance")
            spec = msgspec.structs.replace(
                spec,
                prompt=spec.original_prompt or spec.prompt,
                original_prompt=None,
                enhancer={"requested": True},
            )
        return self._add(spec, record.priority, job_id)

    def move(self, job_id: int, position: int) -> MoveResult:
        """Move a queued job in the run order (see JobStore.move for the priority rule)."""
        index = self.store.move(job_id, position)
        priority = self.store.get(job_id).priority
        self.publish("job.moved", job_id, {"position": index, "priority": priority})
        return MoveResult(job=job_id, position=index)

    def job(self, job_id: int) -> JobRecord:
        """The stored record, with live progress when it is the running job."""
        return self._live(self.store.get(job_id))

    def jobs(self, states: Sequence[str] | None = None, limit: int = 100) -> JobsResult:
        return JobsResult(jobs=[self._live(r) for r in self.store.list(states, limit)])

    def _live(self, record: JobRecord) -> JobRecord:
        running = self.state.running
        if running is not None and running.id == record.id:
            return msgspec.structs.replace(record, progress=running.progress)
        if record.state == "queued":
            step = self.worker.resume_step(record.id)
            if step is not None:
                return msgspec.structs.replace(record, resume_step=step)
        return record

    def snapshot(self) -> tuple[bool, str | None, QueueCounts, RunningInfo | None]:
        """(paused, pause mode, counts, the running job) for the daemon's `status`."""
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

    async def stop(
        self,
        mode: str = "graceful",
        timeout: float = 30.0,
        grace: float = 0.0,
        step_wait: float = 20.0,
    ) -> None:
        """Take no new jobs, settle the running one, and let `run()` return.

        "graceful": the running job goes back to the queue at its old place, attempts
        kept. It is told to suspend (JobControl.request_suspend): a denoising run ends
        its current step, writes a resume point and unwinds, so the next start goes on
        from that step; anything else (loading, encoding, decoding, a run with a step
        cache) unwinds at once, within one block. A step that has not ended after
        `step_wait` seconds is cut short too, and the next start resumes from the last
        point written. Because the stop asked for the unwind, not a user, the job ends
        `queued`, never `aborted`.
        With `grace` > 0, "graceful" first gives the running job up to `grace` seconds
        to finish and requeues it only if it has not; `requeue_running()` (a second
        stop signal) cuts the wait short, and a third call cuts the step short.
        "finish": the running job runs to its end. A job held by "pause now" is
        requeued as in "graceful", since finishing it would break the pause.
        After `timeout` seconds stop returns anyway. The loop still records the job's
        outcome if the worker returns before the process ends (cancelling the loop waits
        for the worker); if it never does, the job stays `running` in the store and the
        next start's recovery requeues it, counting the attempt.
        """
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(STOP_MODES)}")
        self._stopping = True
        self._kick()
        running = self.state.running
        if running is None or self._job_done is None:
            return
        if mode == "graceful" and grace > 0 and not running.control.pause_requested:
            log.info("stopping: job %d has %g s to finish, else it is requeued", running.id, grace)
            with anyio.move_on_after(grace):
                await self._job_done.wait()
            if self._job_done.is_set():
                return
        if mode == "graceful" or running.control.pause_requested:
            self.requeue_running()
        log.info("stopping (%s): waiting for job %d", mode, running.id)
        with anyio.move_on_after(timeout):
            if running.requeue_requested:
                with anyio.move_on_after(step_wait):
                    await self._job_done.wait()
                if not self._job_done.is_set():
                    log.info("job %d: its step has not ended; unwinding now", running.id)
                    running.control.request_suspend(at_once=True)
            await self._job_done.wait()
        if not self._job_done.is_set():
            # The process still waits for the worker (a thread is not cancelled) and the
            # outcome is recorded when it ends; only a kill leaves the job to the recovery.
            log.warning(
                "job %d has not ended %.0f s into the stop; the listeners close and the "
                "daemon exits when it ends (a stop signal requeues it now)",
                running.id,
                timeout,
            )

    def requeue_running(self) -> bool:
        """Send the running (or held) job back to the queue, as a graceful stop does: it
        suspends at its next step boundary; called again, at once. False when nothing
        runs or it is already unwinding at once. A second stop signal calls this to cut
        a grace period short, a third to cut the step short."""
        running = self.state.running
        if running is None or running.abort_requested or running.requeue_now:
            return False
        if running.requeue_requested:
            running.requeue_now = True
            running.control.request_suspend(at_once=True)
            return True
        running.requeue_requested = True
        running.control.request_suspend()
        return True


@contextlib.contextmanager
def _logged(
    kind: type[Exception] | tuple[type[Exception], ...], what: str, *args: Any
) -> Iterator[None]:
    """Log an exception of `kind` (one line, its message) and go on."""
    try:
        yield
    except kind as exc:
        log.error(what + ": %s", *args, getattr(exc, "message", exc))


class _LoopHooks:
    """RunHooks for one job: called on the worker thread, run on the loop thread.

    `from_thread.run_sync` blocks the worker until the loop has handled the report, so
    a pause is committed as `paused` before the worker starts waiting, and a progress
    event never overtakes the transition that follows it."""

    def __init__(self, controller: QueueController, job_id: int) -> None:
        self._c = controller
        self._job = job_id

    def progress(
        self, step: int, steps: int, phase: str, preview: dict[str, Any] | None = None
    ) -> None:
        anyio.from_thread.run_sync(self._c._on_progress, self._job, step, steps, phase, preview)

    def paused(self, step: int, steps: int) -> None:
        anyio.from_thread.run_sync(self._c._on_paused, self._job, step, steps)

    def resumed(self, step: int, steps: int) -> None:
        anyio.from_thread.run_sync(self._c._on_resumed, self._job, step, steps)

    def model_loading(self, model: str, data: dict[str, Any]) -> None:
        anyio.from_thread.run_sync(self._c._on_model, "model.loading", self._job, model, data)

    def model_loaded(self, model: str, data: dict[str, Any]) -> None:
        anyio.from_thread.run_sync(self._c._on_model, "model.loaded", self._job, model, data)

    def spec_changed(self, spec: Any) -> None:
        anyio.from_thread.run_sync(self._c._on_spec, self._job, spec)
