"""QueueController with the real worker on the tiny model: a user's session with the
queue, from enqueue to outputs, through pause, abort, failure, retry and shutdown.

Every event is checked as it is published: the state it announces must already be
committed, read through a second SQLite connection that sees only committed data.
Reactions to events (pause at step 2, abort at step 1) run inside the publish callback,
on the loop, while the worker waits for its report to be handled: they land at an exact
step without any sleeping.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from wangend.errors import (
    InvalidParams,
    ModelUnavailable,
    ShuttingDown,
    StoreUnavailable,
    WrongState,
)
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.resume import ResumeStore
from wangend.pipelines.runtime import GenerationRuntime
from wangend.protocol import Event, GenerateSpec, QueueCounts
from wangend.queue.controller import QueueController
from wangend.queue.store import JobStore

pytestmark = pytest.mark.anyio

# The state each job event announces; it must be committed before the event goes out.
ANNOUNCES = {
    "job.queued": "queued",
    "job.started": "running",
    "job.progress": "running",
    "job.paused": "paused",
    "job.resumed": "running",
    "job.succeeded": "succeeded",
    "job.failed": "failed",
    "job.aborted": "aborted",
}
Match = Callable[[Event], bool]


class Recorder:
    """The `publish` the controller is given: records, checks, reacts, wakes waiters."""

    def __init__(self, db_path: Path) -> None:
        self.events: list[Event] = []
        self.uncommitted: list[str] = []
        self._committed = sqlite3.connect(db_path)  # a second connection: committed only
        self._reactions: list[tuple[Match, Callable[[Event], Any]]] = []
        self._waiters: list[tuple[Match, anyio.Event]] = []

    def __call__(self, type: str, job: int | None, data: dict[str, Any]) -> Event:
        event = Event(seq=len(self.events) + 1, ts=time.time(), type=type, job=job, data=data)
        self.events.append(event)
        if type in ANNOUNCES:
            row = self._committed.execute("SELECT state FROM jobs WHERE id = ?", (job,))
            state = (row.fetchone() or ("missing",))[0]
            if state != ANNOUNCES[type]:
                self.uncommitted.append(f"{type} for job {job} while the file says {state}")
        for reaction in [r for r in self._reactions if r[0](event)]:
            self._reactions.remove(reaction)
            reaction[1](event)
        for match, flag in self._waiters:
            if match(event):
                flag.set()
        return event

    def when(self, match: Match, action: Callable[[Event], Any]) -> None:
        """Run `action` once, inside publish, for the first event that matches."""
        self._reactions.append((match, action))

    async def wait_for(self, match: Match, timeout: float = 30.0) -> Event:
        flag = anyio.Event()
        self._waiters.append((match, flag))
        with anyio.fail_after(timeout):
            while not any(match(e) for e in self.events):
                await flag.wait()
        self._waiters.remove((match, flag))
        return next(e for e in self.events if match(e))

    def of(self, job: int) -> list[Event]:
        return [e for e in self.events if e.job == job]

    def types(self, job: int) -> list[str]:
        return [e.type for e in self.of(job)]

    def started_order(self) -> list[int]:
        return [e.job for e in self.events if e.type == "job.started"]

    def close(self) -> None:
        self._committed.close()


def on(type: str, job: int, step: int | None = None) -> Match:
    def match(e: Event) -> bool:
        if e.type != type or e.job != job:
            return False
        return step is None or (e.data.get("phase") == "denoising" and e.data["step"] == step)

    return match


def ended(job: int) -> Match:
    return lambda e: e.job == job and e.type in ("job.succeeded", "job.failed", "job.aborted")


def spec(prompt: str = "a kite over dunes", seed: int = 7, steps: int = 3, **kw: Any):
    return GenerateSpec(prompt=prompt, seed=seed, steps=steps, **kw)


@pytest.fixture
def recorder(store: JobStore, db_path: Path) -> Iterator[Recorder]:
    rec = Recorder(db_path)
    yield rec
    rec.close()
    assert rec.uncommitted == [], "events announced states not yet committed"


@pytest.fixture
def controller(
    store: JobStore, runtime: GenerationRuntime, inputs: TaskInputManager, recorder: Recorder
) -> QueueController:
    return QueueController(store, runtime, inputs, recorder)


@asynccontextmanager
async def serving(controller: QueueController) -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        try:
            yield tg
        finally:
            await controller.stop("graceful", timeout=20)
            tg.cancel_scope.cancel()


async def test_jobs_run_by_priority_then_in_order_and_succeed(
    controller: QueueController, recorder: Recorder, store: JobStore
) -> None:
    first = controller.enqueue(spec("first", seed=1))
    second = controller.enqueue(spec("second", seed=2))
    urgent = controller.enqueue(spec("urgent", seed=3, priority=5))
    assert (first.position, second.position, urgent.position) == (0, 1, 0)
    assert urgent.spec.seed == 3 and urgent.spec.steps == 3 and urgent.state == "queued"
    async with serving(controller):
        await recorder.wait_for(ended(second.job))
    assert recorder.started_order() == [urgent.job, first.job, second.job]
    for job in (urgent.job, first.job, second.job):
        types = recorder.types(job)
        assert types[:2] == ["job.queued", "job.started"] and types[-1] == "job.succeeded"
        assert set(types[2:-1]) == {"job.progress"}
        progress = [e.data for e in recorder.of(job) if e.type == "job.progress"]
        assert [p["step"] for p in progress if p["phase"] == "denoising"] == [0, 1, 2, 3]
        record = controller.job(job)
        assert record.state == "succeeded" and record.attempts == 1 and record.progress is None
        [output] = record.outputs
        assert Path(output).is_file() and output == recorder.of(job)[-1].data["outputs"][0]
    assert store.counts().succeeded == 3 and controller.snapshot()[3] is None


async def test_a_bad_request_is_refused_before_anything_is_stored(
    controller: QueueController, recorder: Recorder, store: JobStore
) -> None:
    with pytest.raises(InvalidParams) as info:
        controller.enqueue(spec(width=65))
    assert info.value.field == "$.params.width"
    with pytest.raises(ModelUnavailable):
        controller.enqueue(spec(model="no-such-model"))
    assert store.counts() == QueueCounts() and recorder.events == []


async def test_progress_reports_steps_and_an_eta(
    controller: QueueController, recorder: Recorder
) -> None:
    job = controller.enqueue(spec(steps=4)).job
    seen: list[Any] = []
    recorder.when(on("job.progress", job, 2), lambda e: seen.append(controller.snapshot()[3]))
    async with serving(controller):
        await recorder.wait_for(ended(job))
    denoising = [e.data for e in recorder.of(job) if e.type == "job.progress"]
    denoising = [d for d in denoising if d["phase"] == "denoising"]
    assert [d["step"] for d in denoising] == [0, 1, 2, 3, 4]
    assert denoising[0]["eta"] is None and denoising[1]["eta"] >= 0
    assert all(d["steps"] == 4 for d in denoising)
    [running] = seen
    assert (running.job, running.state, running.step, running.phase) == (
        job,
        "running",
        2,
        "denoising",
    )


async def test_pause_now_holds_at_a_step_and_resume_finishes(
    controller: QueueController, recorder: Recorder, store: JobStore
) -> None:
    job = controller.enqueue(spec(steps=4)).job
    waiting = controller.enqueue(spec("waiting")).job
    recorder.when(on("job.progress", job, 2), lambda e: controller.pause("now"))
    async with serving(controller):
        held = await recorder.wait_for(on("job.paused", job))
        assert held.data == {"step": 2, "steps": 4}
        await anyio.wait_all_tasks_blocked()
        record = controller.job(job)
        assert record.state == "paused" and record.progress.step == 2
        paused, mode, counts, running = controller.snapshot()
        assert (paused, mode, running.state, counts.paused, counts.queued) == (
            True, "now", "paused", 1, 1,
        )  # fmt: skip
        assert controller.pause("now").paused  # pausing again is harmless
        assert controller.resume().paused is False
        await recorder.wait_for(ended(waiting))
    types = recorder.types(job)
    i = types.index("job.paused")
    assert types[i - 1 : i + 2] == ["job.progress", "job.paused", "job.resumed"]
    assert recorder.of(job)[i + 1].data["step"] == 2
    assert types[-1] == "job.succeeded" and store.get(waiting).state == "succeeded"
    assert [e.type for e in recorder.events if e.job is None and e.type.startswith("queue.")] == [
        "queue.paused",
        "queue.resumed",
    ]
    assert controller.resume().paused is False  # resuming a running queue is harmless


async def test_pause_after_current_lets_the_job_finish_and_starts_nothing(
    controller: QueueController, recorder: Recorder, store: JobStore
) -> None:
    job = controller.enqueue(spec()).job
    waiting = controller.enqueue(spec("waiting")).job
    recorder.when(on("job.progress", job, 1), lambda e: controller.pause("after_current"))
    async with serving(controller):
        await recorder.wait_for(ended(job))
        await anyio.wait_all_tasks_blocked()
        assert store.get(job).state == "succeeded" and "job.paused" not in recorder.types(job)
        assert store.get(waiting).state == "queued"
        assert controller.snapshot()[:2] == (True, "after_current")
        controller.resume()
        await recorder.wait_for(ended(waiting))
    assert store.get(waiting).state == "succeeded"


async def test_abort_the_running_job_then_the_next_one_runs(
    controller: QueueController, recorder: Recorder, runtime: GenerationRuntime
) -> None:
    job = controller.enqueue(spec(steps=4)).job
    after = controller.enqueue(spec("after")).job
    replies = []
    recorder.when(on("job.progress", job, 1), lambda e: replies.append(controller.abort()))
    async with serving(controller):
        await recorder.wait_for(ended(after))
    assert replies[0].id == job and replies[0].state == "running"
    record = controller.job(job)
    assert record.state == "aborted" and record.outputs == [] and record.error.type == "Aborted"
    assert recorder.of(job)[-1].type == "job.aborted"
    assert recorder.of(job)[-1].data["error"]["type"] == "Aborted"
    assert controller.job(after).state == "succeeded"
    assert [p.name for p in runtime.output_dir.iterdir()] == [
        Path(controller.job(after).outputs[0]).name
    ]  # the aborted job wrote nothing


async def test_abort_a_queued_job_cancels_it(
    controller: QueueController, recorder: Recorder
) -> None:
    controller.pause("now")
    keep = controller.enqueue(spec()).job
    drop = controller.enqueue(spec("drop")).job
    with pytest.raises(WrongState, match="nothing is running"):
        controller.abort()
    record = controller.abort(drop)
    assert record.state == "aborted" and record.error.type == "Cancelled"
    assert recorder.types(drop) == ["job.queued", "job.aborted"]
    with pytest.raises(WrongState, match="was aborted"):
        controller.abort(drop)
    async with serving(controller):
        controller.resume()
        await recorder.wait_for(ended(keep))
    assert controller.job(keep).state == "succeeded" and "job.started" not in recorder.types(drop)


async def test_abort_a_held_job_wakes_it_and_the_queue_stays_paused(
    controller: QueueController, recorder: Recorder, store: JobStore
) -> None:
    job = controller.enqueue(spec(steps=4)).job
    waiting = controller.enqueue(spec("waiting")).job
    recorder.when(on("job.progress", job, 1), lambda e: controller.pause("now"))
    async with serving(controller):
        await recorder.wait_for(on("job.paused", job))
        assert controller.abort().state == "paused"
        await recorder.wait_for(ended(job))
        await anyio.wait_all_tasks_blocked()
        assert store.get(job).state == "aborted" and store.get(waiting).state == "queued"
        controller.resume()
        await recorder.wait_for(ended(waiting))
    assert store.get(waiting).state == "succeeded"


async def test_a_failing_job_fails_cleanly_and_the_queue_goes_on(
    controller: QueueController, recorder: Recorder, store: JobStore
) -> None:
    # A hub model that is not downloaded, with downloads off: the worker's JobFailure.
    missing = controller.enqueue(spec(model="wan2.1-t2v-1.3b")).job
    after = controller.enqueue(spec("after")).job
    async with serving(controller):
        await recorder.wait_for(ended(after))
    record = store.get(missing)
    assert record.state == "failed" and record.error.type == "ModelUnavailable"
    assert "\n" not in record.error.message and "Traceback" not in record.error.message
    assert recorder.of(missing)[-1].data["error"]["type"] == "ModelUnavailable"
    assert store.get(after).state == "succeeded"


async def test_an_unexpected_error_becomes_one_line_and_the_traceback_is_logged(
    controller: QueueController,
    recorder: Recorder,
    production: ProductionManager,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = production.ensure
    calls = []

    def flaky(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("device-side assert triggered\n  at kernel 42\n  more")
        return real(*args)

    monkeypatch.setattr(production, "ensure", flaky)
    broken = controller.enqueue(spec()).job
    after = controller.enqueue(spec("after")).job
    with caplog.at_level(logging.ERROR, logger="wangend.queue.controller"):
        async with serving(controller):
            await recorder.wait_for(ended(after))
    error = controller.job(broken).error
    assert (error.type, error.message) == (
        "InternalError",
        "RuntimeError: device-side assert triggered",
    )
    assert any(r.exc_info for r in caplog.records), "the traceback belongs in the log"
    assert controller.job(after).state == "succeeded"


async def test_retry_runs_the_same_resolved_spec_as_a_new_job(
    controller: QueueController, recorder: Recorder
) -> None:
    controller.pause("now")
    first = controller.enqueue(spec(seed=None)).job  # a random seed, chosen at enqueue
    controller.abort(first)
    again = controller.retry(first)
    assert again.job != first and again.spec == controller.job(first).spec
    assert controller.job(again.job).retry_of == first
    assert recorder.of(again.job)[0].data["retry_of"] == first
    async with serving(controller):
        controller.resume()
        await recorder.wait_for(ended(again.job))
        assert controller.job(again.job).state == "succeeded"
        with pytest.raises(WrongState, match="only a failed or aborted job"):
            controller.retry(again.job)


async def test_retry_asking_for_an_enhanced_prompt_without_an_enhancer_is_refused(
    controller: QueueController, store: JobStore
) -> None:
    """As enqueue refuses `enhance_prompt` without an enhancer: the retry would run the
    prompt as it stands, which is not what was asked for."""
    controller.pause("now")
    first = controller.enqueue(spec()).job
    controller.abort(first)
    with pytest.raises(InvalidParams) as info:
        controller.retry(first, enhance=True)
    assert info.value.field == "$.params.enhance"
    assert "needs a prompt enhancer" in info.value.message
    assert [job.id for job in store.list()] == [first]  # no new job
    again = controller.retry(first).job  # a plain retry is still fine
    assert controller.job(again).retry_of == first


async def test_clear_and_move_reorder_a_paused_queue(
    controller: QueueController, recorder: Recorder, store: JobStore
) -> None:
    controller.pause("after_current")
    a, b, c, d = (controller.enqueue(spec(f"job {i}")).job for i in range(4))
    moved = controller.move(d, 0)
    assert (moved.job, moved.position) == (d, 0)
    assert recorder.of(d)[-1].type == "job.moved" and recorder.of(d)[-1].data["position"] == 0
    assert [r.id for r in controller.jobs(["queued"]).jobs] == [d, a, b, c]
    controller.abort(b)
    cleared = controller.clear()
    assert cleared.cancelled == [d, a, c]
    assert recorder.events[-1].type == "queue.cleared"
    assert all(recorder.types(j)[-1] == "job.aborted" for j in (a, c, d))
    assert store.counts().aborted == 4 and store.counts().queued == 0
    e, f = controller.enqueue(spec("e")).job, controller.enqueue(spec("f")).job
    controller.move(f, 0)
    async with serving(controller):
        controller.resume()
        await recorder.wait_for(ended(e))
    assert recorder.started_order() == [f, e]


async def test_graceful_stop_puts_the_running_job_back_and_a_restart_runs_it(
    controller: QueueController,
    recorder: Recorder,
    store: JobStore,
    runtime: GenerationRuntime,
    inputs: TaskInputManager,
    db_path: Path,
) -> None:
    job = controller.enqueue(spec(steps=40)).job
    waiting = controller.enqueue(spec("waiting")).job
    stopped = anyio.Event()

    async def stop() -> None:
        await controller.stop("graceful", timeout=20)
        stopped.set()

    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        recorder.when(on("job.progress", job, 2), lambda e: tg.start_soon(stop))
        await stopped.wait()
        # run() returns on its own once stopped: the task group closes without a cancel.
    record = store.get(job)
    assert record.state == "queued" and record.attempts == 0 and record.error is None
    assert "job.aborted" not in recorder.types(job)
    assert recorder.of(job)[-1].data["requeued"] == "stopped"
    assert store.get(waiting).state == "queued" and store.queue_order() == [job, waiting]
    with pytest.raises(ShuttingDown):
        controller.enqueue(spec())
    store.close()

    # The next start: the same job, at its old place; the stop did not spend an attempt.
    with JobStore(db_path) as reopened:
        again = QueueController(reopened, runtime, inputs, recorder)
        async with serving(again):
            await recorder.wait_for(ended(waiting))
        record = reopened.get(job)
        assert record.state == "succeeded" and record.attempts == 1
        assert recorder.started_order() == [job, job, waiting]


async def test_a_stop_waits_for_the_step_then_the_restart_resumes_there(
    store: JobStore,
    runtime: GenerationRuntime,
    inputs: TaskInputManager,
    recorder: Recorder,
    db_path: Path,
    tmp_path: Path,
) -> None:
    """The stop lets the running step end and its resume point be written; with no
    time to wait (`step_wait=0`) the job unwinds within a block and keeps the last
    point. Either way the next start goes on from there, not from step 0."""
    points = ResumeStore(tmp_path / "resume", every=0.0)
    resumable = GenerationRuntime(runtime.production, tmp_path / "out", resume=points)
    for step_wait in (20.0, 0.0):
        controller = QueueController(store, resumable, inputs, recorder)
        job = controller.enqueue(spec(steps=40)).job
        async with anyio.create_task_group() as tg:
            await tg.start(controller.run)
            reached = await recorder.wait_for(on("job.progress", job, 3))
            await controller.stop("graceful", timeout=20, step_wait=step_wait)
        assert store.get(job).state == "queued" and points.jobs() == [job]

        again = QueueController(store, resumable, inputs, recorder)
        async with serving(again):
            await recorder.wait_for(ended(job))
        assert store.get(job).state == "succeeded" and points.jobs() == []
        second_start = max(i for i, e in enumerate(recorder.events) if e.type == "job.started")
        steps = [
            e.data["step"]
            for e in recorder.events[second_start:]
            if e.job == job and e.type == "job.progress" and e.data["phase"] == "denoising"
        ]
        assert steps[0] >= reached.data["step"], (step_wait, steps)


async def test_cancelling_a_suspended_job_drops_its_resume_point_at_once(
    store: JobStore,
    runtime: GenerationRuntime,
    inputs: TaskInputManager,
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    """A job stopped mid-run keeps a point for its next attempt; cancelled while queued
    (`abort JOB` or `clear`), the point goes then, not at the next start's sweep."""
    points = ResumeStore(tmp_path / "resume", every=0.0)
    resumable = GenerationRuntime(runtime.production, tmp_path / "out", resume=points)
    for cancel in ("abort", "clear"):
        controller = QueueController(store, resumable, inputs, recorder)
        job = controller.enqueue(spec(steps=40)).job
        async with anyio.create_task_group() as tg:
            await tg.start(controller.run)
            await recorder.wait_for(on("job.progress", job, 3))
            await controller.stop("graceful", timeout=20)
        assert store.get(job).state == "queued" and points.jobs() == [job]
        again = QueueController(store, resumable, inputs, recorder)
        again.pause("now")  # nothing starts; the job waits with its point
        if cancel == "abort":
            again.abort(job)
        else:
            assert again.clear().cancelled == [job]
        assert store.get(job).state == "aborted" and points.jobs() == [], cancel
        again.resume()


async def test_the_job_a_pause_after_current_lets_finish_still_finishes_after_a_stop(
    controller: QueueController,
    recorder: Recorder,
    store: JobStore,
    runtime: GenerationRuntime,
    inputs: TaskInputManager,
) -> None:
    """`pause after_current`, then the daemon restarts before the job ended: the job
    still runs to its end at the next start, and nothing after it starts."""
    current = controller.enqueue(spec(steps=30)).job
    behind = controller.enqueue(spec("behind")).job
    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        await recorder.wait_for(on("job.progress", current, 2))
        controller.pause("after_current")
        await controller.stop("graceful", timeout=20)
    assert store.get(current).state == "queued"

    restarted = QueueController(store, runtime, inputs, recorder)
    assert restarted.snapshot()[:2] == (True, "after_current")
    async with serving(restarted):
        await recorder.wait_for(ended(current))
        await anyio.wait_all_tasks_blocked()
        assert store.get(current).state == "succeeded"
        assert store.get(behind).state == "queued"  # the pause holds for the rest
        restarted.resume()
        await recorder.wait_for(ended(behind))
    assert store.get_meta("pause_finishes") is None


async def test_stop_finish_lets_the_job_end_and_graceful_requeues_a_held_one(
    controller: QueueController, recorder: Recorder, store: JobStore
) -> None:
    held = controller.enqueue(spec(steps=4)).job
    recorder.when(on("job.progress", held, 1), lambda e: controller.pause("now"))
    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        await recorder.wait_for(on("job.paused", held))
        await controller.stop("graceful", timeout=20)
    assert store.get(held).state == "queued"
    assert store.get_meta("pause_mode") == "now"  # the pause outlives the stop

    store.set_meta("pause_mode", None)  # the next start finds a resumed queue
    runner = QueueController(store, controller.worker, controller.inputs, recorder)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        recorder.when(on("job.progress", held, 1), lambda e: tg.start_soon(runner.stop, "finish"))
        await recorder.wait_for(ended(held))
    assert store.get(held).state == "succeeded" and store.get(held).attempts == 1


async def test_a_stop_that_outlasts_its_timeout_says_the_job_is_still_awaited(
    controller: QueueController,
    recorder: Recorder,
    store: JobStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`shutdown --finish` on a long job: stop returns after its timeout, but the job
    runs on and its outcome is recorded, so the log must not say it was given up."""
    job = controller.enqueue(spec(steps=30)).job
    with caplog.at_level(logging.WARNING, logger="wangend.queue.controller"):
        async with anyio.create_task_group() as tg:
            await tg.start(controller.run)
            await recorder.wait_for(on("job.progress", job, 1))
            await controller.stop("finish", timeout=0.001)
            await recorder.wait_for(ended(job))
    assert store.get(job).state == "succeeded"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"job {job} has not ended" in warning and "the daemon exits when it ends" in warning


async def test_a_restart_recovers_interrupted_jobs_and_keeps_the_queue_paused(
    store: JobStore,
    runtime: GenerationRuntime,
    inputs: TaskInputManager,
    recorder: Recorder,
    db_path: Path,
) -> None:
    first = QueueController(store, runtime, inputs, recorder)
    first.pause("now")
    job = first.enqueue(spec()).job
    store.transition(job, "running", allowed_from=("queued",))  # then kill -9
    store.close()

    with JobStore(db_path) as reopened:
        restarted = QueueController(reopened, runtime, inputs, recorder)
        assert reopened.get(job).state == "queued" and reopened.get(job).attempts == 1
        assert recorder.of(job)[-1].data["requeued"] == "recovered"
        assert restarted.snapshot()[:2] == (True, "now")
        async with serving(restarted):
            await anyio.wait_all_tasks_blocked()
            assert reopened.get(job).state == "queued"  # paused: nothing starts
            restarted.resume()
            await recorder.wait_for(ended(job))
        assert reopened.get(job).state == "succeeded" and reopened.get(job).attempts == 2


async def test_an_acknowledged_abort_holds_across_a_crash(
    controller: QueueController,
    recorder: Recorder,
    runtime: GenerationRuntime,
    inputs: TaskInputManager,
    db_path: Path,
    tmp_path: Path,
) -> None:
    """`abort` answered, then kill -9 before the worker unwound: the job must not come
    back and run to its end. The queue file is copied the moment the abort is answered:
    what a kill then leaves on disk."""
    job = controller.enqueue(spec(steps=4)).job
    crashed = tmp_path / "as-killed.sqlite3"

    def abort_then_kill(event: Event) -> None:
        assert controller.abort(job).state == "running"  # acknowledged
        with sqlite3.connect(db_path) as live, sqlite3.connect(crashed) as copy:
            live.backup(copy)

    recorder.when(on("job.progress", job, 1), abort_then_kill)
    async with serving(controller):
        await recorder.wait_for(ended(job))
    with JobStore(crashed) as on_disk:
        assert on_disk.get(job).state == "running"  # the kill came first
        QueueController(on_disk, runtime, inputs, recorder)  # the next start
        record = on_disk.get(job)
        assert record.state == "aborted" and record.outputs == []
        assert "the daemon stopped before the abort landed" in record.error.message
        assert on_disk.get_meta("aborting") is None
    assert recorder.of(job)[-1].type == "job.aborted"


async def test_a_queue_file_that_refuses_writes_holds_the_queue_and_loses_nothing(
    controller: QueueController,
    recorder: Recorder,
    store: JobStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full disk (here: SQLite told to refuse writes, the same OperationalError): the
    calls that need a write say why, the finished job's end waits in memory, no next
    job starts, and once writes work again both go through. Nothing crashes."""
    monkeypatch.setattr("wangend.queue.controller.SETTLE_RETRY", 0.05)
    job = controller.enqueue(spec(steps=3)).job
    nxt = controller.enqueue(spec("next")).job
    refusals: list[str] = []

    def disk_fills(event: Event) -> None:
        store._db.execute("PRAGMA query_only = 1")  # the disk is full now
        for call in (lambda: controller.pause(), lambda: controller.enqueue(spec("more"))):
            with pytest.raises(StoreUnavailable) as refused:
                call()
            refusals.append(refused.value.message)

    recorder.when(on("job.progress", job, 1), disk_fills)
    caplog.set_level(logging.ERROR, "wangend.queue.controller")
    async with serving(controller):
        with anyio.fail_after(30):
            while "its end cannot be recorded" not in caplog.text:
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)  # several retries
        assert store.get(job).state == "running" and "job.succeeded" not in recorder.types(job)
        assert recorder.types(nxt) == ["job.queued"]  # held: nothing else started
        store._db.execute("PRAGMA query_only = 0")  # space freed
        await recorder.wait_for(ended(nxt))
    assert store.get(job).state == "succeeded" and store.get(nxt).state == "succeeded"
    assert all("cannot be written: attempt to write a readonly database" in r for r in refusals)
    assert len(refusals) == 2


async def test_an_output_folder_that_cannot_be_written_holds_the_queue_before_a_job_runs(
    production: ProductionManager,
    inputs: TaskInputManager,
    recorder: Recorder,
    store: JobStore,
    tmp_path: Path,
) -> None:
    """Nothing runs to its end only to fail saving: the queue pauses, saying why."""
    (tmp_path / "disk").write_text("a file where the output folder's parent should be")
    runtime = GenerationRuntime(production, tmp_path / "disk" / "out")
    controller = QueueController(store, runtime, inputs, recorder)
    job = controller.enqueue(spec()).job
    async with serving(controller):
        paused = await recorder.wait_for(lambda e: e.type == "queue.paused")
        reason = paused.data["reason"]
        assert f"the output folder {tmp_path / 'disk' / 'out'} cannot be written" in reason
        assert paused.data["mode"] == "now" and controller.pause_reason == reason
        assert recorder.types(job) == ["job.queued"] and store.get(job).attempts == 0
        (tmp_path / "disk").unlink()  # the user fixes it
        controller.resume()
        await recorder.wait_for(ended(job))
    assert controller.job(job).state == "succeeded" and controller.pause_reason is None


async def test_a_job_that_cannot_save_waits_for_the_folder_instead_of_failing(
    production: ProductionManager,
    inputs: TaskInputManager,
    recorder: Recorder,
    store: JobStore,
    tmp_path: Path,
) -> None:
    """The folder goes while a job denoises: the job goes back to the queue (nothing of
    it lost, its attempt given back), the queue pauses with the reason instead of
    running the next job to the same end, and once the folder is back a resume
    finishes both jobs."""
    disk = tmp_path / "disk"
    runtime = GenerationRuntime(production, disk / "out")
    controller = QueueController(store, runtime, inputs, recorder)
    job = controller.enqueue(spec(steps=3)).job
    nxt = controller.enqueue(spec("next")).job

    def unmount(event: Event) -> None:
        shutil.rmtree(disk, ignore_errors=True)
        disk.write_text("not a folder any more")

    recorder.when(on("job.progress", job, 1), unmount)
    async with serving(controller):
        paused = await recorder.wait_for(lambda e: e.type == "queue.paused")
        assert "cannot be written: Not a directory" in paused.data["reason"]
        assert store.get(job).state == "queued" and store.get(nxt).state == "queued"
        requeued = [e for e in recorder.of(job) if e.type == "job.queued"][-1]
        assert requeued.data["requeued"] == "held"
        assert "job.failed" not in recorder.types(job) and "job.started" not in recorder.types(nxt)
        disk.unlink()
        controller.resume()
        await recorder.wait_for(ended(nxt))
    assert store.get(job).state == "succeeded" and store.get(nxt).state == "succeeded"
    # The attempt the folder cut short is given back, as a graceful stop's is.
    assert store.get(job).attempts == 1 and store.get(nxt).attempts == 1
