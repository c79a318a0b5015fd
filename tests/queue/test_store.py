"""JobStore on a real SQLite file: the queue's order, guarded transitions, and what a
restart after kill -9 finds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from wangend.errors import UnknownJob, WrongState
from wangend.protocol import JobError, QueueCounts
from wangend.queue.store import SCHEMA_VERSION, SELECT_NEXT, JobStore

from .conftest import make_spec

LIVE = ("running", "paused")


def enqueue(store: JobStore, *priorities: int) -> list[int]:
    return [store.insert(make_spec(f"job {i}", seed=i), p).id for i, p in enumerate(priorities)]


def test_a_new_file_is_wal_versioned_and_ready(store: JobStore, db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert store.counts() == QueueCounts()
    assert store.next_queued() is None and store.queue_order() == []


def test_insert_then_get_round_trips_the_resolved_spec(store: JobStore) -> None:
    spec = make_spec("a fox in the snow, 雪の中の狐", seed=2**40)
    record = store.insert(spec, priority=3)
    again = store.get(record.id)
    assert again == record
    assert again.spec == spec and again.state == "queued" and again.priority == 3
    assert again.attempts == 0 and again.outputs == [] and again.error is None
    assert again.created_at > 0 and again.started_at is None and again.finished_at is None
    with pytest.raises(UnknownJob):
        store.get(record.id + 100)


def test_higher_priority_runs_first_then_first_come_first_served(store: JobStore) -> None:
    low, first, urgent, second = enqueue(store, -1, 0, 5, 0)
    assert store.queue_order() == [urgent, first, second, low]
    assert store.next_queued().id == urgent
    store.transition(urgent, "running", allowed_from=("queued",))
    assert store.next_queued().id == first


def test_the_next_job_query_walks_the_index(store: JobStore) -> None:
    enqueue(store, 0, 1, 2)
    plan = " ".join(row[-1] for row in store._db.execute("EXPLAIN QUERY PLAN " + SELECT_NEXT))
    assert "USING INDEX jobs_next" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # the index gives the order; nothing is sorted


def test_list_shows_live_then_run_order_then_history_newest_first(store: JobStore) -> None:
    a, b, c, d, e = enqueue(store, 0, 0, 0, 0, 9)
    store.transition(e, "running", allowed_from=("queued",))
    store.transition(e, "succeeded", allowed_from=LIVE, outputs=["/out/e.mp4"])
    store.transition(a, "running", allowed_from=("queued",))
    store.transition(a, "failed", allowed_from=LIVE, error=JobError(type="X", message="y"))
    store.transition(b, "running", allowed_from=("queued",))
    store.move(d, 0)
    assert [r.id for r in store.list()] == [b, d, c, e, a]
    assert [r.id for r in store.list(["queued"])] == [d, c]
    assert [r.id for r in store.list(["succeeded", "failed"])] == [e, a]
    assert [r.id for r in store.list(limit=2)] == [b, d]


def test_transitions_are_guarded_and_stamp_their_times(store: JobStore) -> None:
    [job] = enqueue(store, 0)
    running = store.transition(job, "running", allowed_from=("queued",))
    assert running.state == "running" and running.attempts == 1 and running.started_at
    held = store.transition(job, "paused", allowed_from=("running",))
    assert held.attempts == 1  # only queued -> running counts an attempt
    store.transition(job, "running", allowed_from=("paused",))
    done = store.transition(job, "succeeded", allowed_from=LIVE, outputs=["/out/a.mp4"])
    assert done.outputs == ["/out/a.mp4"] and done.finished_at >= done.started_at

    with pytest.raises(WrongState) as info:
        store.transition(job, "aborted", allowed_from=("queued", *LIVE))
    assert "has succeeded" in info.value.message and info.value.data["state"] == "succeeded"
    assert store.get(job) == done  # nothing changed
    with pytest.raises(UnknownJob):
        store.transition(job + 1, "running", allowed_from=("queued",))


def test_move_puts_a_job_exactly_where_asked(store: JobStore) -> None:
    a, b, c, d = enqueue(store, 0, 0, 0, 0)
    assert store.move(d, 0) == 0
    assert store.queue_order() == [d, a, b, c]
    assert store.move(d, 2) == 2
    assert store.queue_order() == [a, b, d, c]
    assert store.move(a, 99) == 3  # past the end: last
    assert store.queue_order() == [b, d, c, a]
    later = store.insert(make_spec("later")).id
    assert store.queue_order() == [b, d, c, a, later]  # a new job still queues behind
    assert {store.get(i).priority for i in (a, b, c, d)} == {0}


def test_moving_across_priorities_adopts_the_neighbours_priority(store: JobStore) -> None:
    urgent, plain, low = enqueue(store, 5, 0, -3)
    # In front of a higher-priority job: it takes that priority.
    assert store.move(low, 0) == 0
    assert store.queue_order() == [low, urgent, plain]
    assert store.get(low).priority == 5
    # Behind a lower-priority job: it takes that one's.
    assert store.move(urgent, 2) == 2
    assert store.queue_order() == [low, plain, urgent]
    assert store.get(urgent).priority == 0
    # Where its own priority fits, it keeps it.
    assert store.move(plain, 1) == 1 and store.get(plain).priority == 0


def test_only_queued_jobs_move(store: JobStore) -> None:
    a, _ = enqueue(store, 0, 0)
    store.transition(a, "running", allowed_from=("queued",))
    with pytest.raises(WrongState, match="only a queued job can move"):
        store.move(a, 1)
    with pytest.raises(UnknownJob):
        store.move(404, 0)


def test_clear_cancels_every_queued_job_in_one_go(store: JobStore) -> None:
    a, b, c = enqueue(store, 0, 0, 1)
    store.transition(a, "running", allowed_from=("queued",))
    assert store.clear_queued() == [c, b]
    for job in (b, c):
        record = store.get(job)
        assert record.state == "aborted" and record.error.type == "Cancelled"
        assert record.finished_at is not None
    assert store.get(a).state == "running"
    assert store.counts() == QueueCounts(running=1, aborted=2)
    assert store.clear_queued() == []


def test_counts_follow_every_commit(store: JobStore) -> None:
    a, b, _ = enqueue(store, 0, 0, 0)
    assert store.counts() == QueueCounts(queued=3)
    store.transition(a, "running", allowed_from=("queued",))
    store.transition(b, "aborted", allowed_from=("queued",))
    assert store.counts() == QueueCounts(queued=1, running=1, aborted=1)


def crash_with_jobs_on_the_worker(db_path: Path) -> tuple[int, int, int]:
    """A daemon that dies with one job running, one held and one waiting."""
    store = JobStore(db_path)
    running, held, waiting = enqueue(store, 0, 0, 0)
    store.transition(running, "running", allowed_from=("queued",))
    store.transition(held, "running", allowed_from=("queued",))
    store.transition(held, "paused", allowed_from=("running",))
    store.close()  # no outcome recorded: as after kill -9
    return running, held, waiting


def test_recover_requeues_interrupted_jobs_with_their_attempts(db_path: Path) -> None:
    running, held, waiting = crash_with_jobs_on_the_worker(db_path)
    with JobStore(db_path) as store:
        recovery = store.recover(max_attempts=2)
        assert recovery.requeued == [running, held] and recovery.failed == []
        for job in (running, held):
            record = store.get(job)
            assert record.state == "queued" and record.attempts == 1
        assert store.queue_order() == [running, held, waiting]  # their old places
        assert store.recover(max_attempts=2).requeued == []  # nothing left to recover


def test_a_job_interrupted_max_attempts_times_fails(db_path: Path) -> None:
    running, held, _ = crash_with_jobs_on_the_worker(db_path)
    with JobStore(db_path) as store:
        store.recover(max_attempts=2)
        store.transition(running, "running", allowed_from=("queued",))  # its second start
    with JobStore(db_path) as store:  # ... and the daemon dies again
        recovery = store.recover(max_attempts=2)
        assert recovery.failed == [running] and recovery.requeued == []
        record = store.get(running)
        assert record.state == "failed" and record.attempts == 2
        assert record.error.type == "Interrupted" and "2 times" in record.error.message
        assert store.get(held).state == "queued"


def test_meta_survives_a_reopen_and_none_removes_it(db_path: Path) -> None:
    with JobStore(db_path) as store:
        assert store.get_meta("pause_mode") is None
        store.set_meta("pause_mode", "now")
        store.set_meta("pause_mode", "after_current")
    with JobStore(db_path) as store:
        assert store.get_meta("pause_mode") == "after_current"
        store.set_meta("pause_mode", None)
        assert store.get_meta("pause_mode") is None


def test_the_file_stays_sound_and_refuses_a_newer_schema(db_path: Path) -> None:
    with JobStore(db_path) as store:
        jobs = enqueue(store, 0, 2, 1)
        store.move(jobs[0], 0)
        store.clear_queued()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(sqlite3.DatabaseError, match="newer wangend"):
        JobStore(db_path)


def test_a_failed_transaction_leaves_nothing_behind(store: JobStore) -> None:
    [job] = enqueue(store, 0)
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (job,))
        raise RuntimeError("power cut")
    assert store.get(job).state == "queued"
