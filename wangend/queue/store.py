"""JobStore: the durable queue, one SQLite file.

Job state lives here and nowhere else. Every change is one guarded statement inside one
`BEGIN IMMEDIATE` transaction, committed before the controller announces it, so whatever
a client has been told survives kill -9. WAL with synchronous=FULL: a commit is on disk
when the call returns. The store is used from the event loop thread only; each call takes
well under a millisecond, so it is synchronous and needs one connection.

Run order is (priority desc, position asc). A new job's position is its id, so equal
priorities run first come, first served; `move` permutes the positions the queued jobs
already hold and never invents new ones, so no renumbering drifts and a job enqueued
later always lands behind.

The SQL lives in named constants so a test can EXPLAIN QUERY PLAN the exact statement.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from ..errors import StoreUnavailable, UnknownJob, WrongState
from ..protocol import JOB_STATES, JobError, JobRecord, QueueCounts, ResolvedJob

__all__ = ["LIVE_STATES", "SCHEMA_VERSION", "JobStore", "Recovery"]

SCHEMA_VERSION = 1
LIVE_STATES = ("running", "paused")

CREATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    state       TEXT    NOT NULL CHECK (state IN
                    ('queued', 'running', 'paused', 'succeeded', 'failed', 'aborted')),
    priority    INTEGER NOT NULL DEFAULT 0,
    position    INTEGER NOT NULL,
    spec        TEXT    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    outputs     TEXT    NOT NULL DEFAULT '[]',
    error       TEXT,
    retry_of    INTEGER REFERENCES jobs (id),
    created_at  REAL    NOT NULL,
    started_at  REAL,
    finished_at REAL,
    updated_at  REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_next ON jobs (state, priority DESC, position);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

JOB_COLUMNS = (
    "id, state, priority, spec, attempts, outputs, error, retry_of, "
    "created_at, started_at, finished_at, updated_at"
)
RUN_ORDER = "ORDER BY priority DESC, position"

INSERT_JOB = (
    "INSERT INTO jobs (state, priority, position, spec, retry_of, created_at, updated_at) "
    "VALUES ('queued', :priority, 0, :spec, :retry_of, :now, :now)"
)
# The new id as the position: first come, first served among equal priorities.
SET_POSITION_TO_ID = "UPDATE jobs SET position = id WHERE id = ?"
SELECT_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
SELECT_STATE = "SELECT state FROM jobs WHERE id = ?"
# Only a live job's spec may change (the worker records what it resolved while running,
# e.g. the enhanced prompt); a finished job's record is history and stays as it was.
UPDATE_SPEC = (
    "UPDATE jobs SET spec = :spec, updated_at = :now "
    "WHERE id = :id AND state IN ('running', 'paused')"
)
SELECT_NEXT = f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' {RUN_ORDER} LIMIT 1"
SELECT_QUEUED = f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' {RUN_ORDER} LIMIT ?"
SELECT_QUEUE_ORDER = f"SELECT id FROM jobs WHERE state = 'queued' {RUN_ORDER}"
SELECT_QUEUE_SLOTS = f"SELECT id, priority, position FROM jobs WHERE state = 'queued' {RUN_ORDER}"
SELECT_LIVE = f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('running', 'paused') ORDER BY id"
SELECT_NEWEST = (
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN (SELECT value FROM json_each(?)) "
    "ORDER BY id DESC LIMIT ?"
)
SELECT_COUNTS = "SELECT state, COUNT(*) FROM jobs GROUP BY state"
SELECT_INTERRUPTED = (
    "SELECT id, attempts FROM jobs WHERE state IN ('running', 'paused') ORDER BY id"
)
# The one guarded transition. Old column values are read on the right-hand side, so the
# start of a run (queued -> running) counts an attempt and stamps started_at, and entering
# a final state stamps finished_at, whoever calls. A live job put back in the queue (a
# graceful stop) gets its attempt back: attempts count the runs started, less those a
# stop put back (a finished run counts, whatever its outcome). (Crash recovery requeues
# with REQUEUE_JOB, which keeps the count.)
TRANSITION = """
UPDATE jobs SET
    state       = :to,
    attempts    = attempts + (state = 'queued' AND :to = 'running')
                           - (state IN ('running', 'paused') AND :to = 'queued'),
    started_at  = CASE WHEN state = 'queued' AND :to = 'running' THEN :now ELSE started_at END,
    finished_at = CASE WHEN :to IN ('succeeded', 'failed', 'aborted') THEN :now
                       ELSE finished_at END,
    outputs     = COALESCE(:outputs, outputs),
    error       = COALESCE(:error, error),
    updated_at  = :now
WHERE id = :id AND state IN (SELECT value FROM json_each(:allowed))
"""
SET_SLOT = "UPDATE jobs SET priority = ?, position = ?, updated_at = ? WHERE id = ?"
CANCEL_QUEUED = (
    "UPDATE jobs SET state = 'aborted', error = ?, finished_at = ?, updated_at = ? "
    "WHERE state = 'queued'"
)
REQUEUE_JOB = "UPDATE jobs SET state = 'queued', updated_at = ? WHERE id = ?"
FAIL_JOB = (
    "UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ? WHERE id = ?"
)
ABORT_JOB = (
    "UPDATE jobs SET state = 'aborted', error = ?, finished_at = ?, updated_at = ? WHERE id = ?"
)
SELECT_META = "SELECT value FROM meta WHERE key = ?"
UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
DELETE_META = "DELETE FROM meta WHERE key = ?"


def _refuse(db: sqlite3.Connection, job_id: int, rule: str) -> NoReturn:
    """A guarded UPDATE matched no row: say why (no such job, or the state it is in)."""
    row = db.execute(SELECT_STATE, (job_id,)).fetchone()
    if row is None:
        raise UnknownJob(job_id)
    raise WrongState.of_job(job_id, row[0], rule)


def either(states: Sequence[str]) -> str:
    """("queued", "running", "paused") -> "queued, running or paused"."""
    *rest, last = states
    return f"{', '.join(rest)} or {last}" if rest else last


class Recovery(msgspec.Struct, frozen=True, kw_only=True):
    """What `recover` did with the jobs an unclean stop left on the worker."""

    requeued: list[int]
    failed: list[int]
    aborted: list[int] = msgspec.field(default_factory=list)


class JobStore:
    """The jobs table and a small key/value table (`meta`, e.g. the pause mode)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # isolation_level=None: no implicit transactions; `transaction()` says where they are.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
            self._configure()
        except BaseException:
            self._db.close()
            raise
        self._spec = msgspec.json.Decoder(ResolvedJob)
        self._error = msgspec.json.Decoder(JobError)
        self._outputs = msgspec.json.Decoder(list[str])
        # `status` asks for counts on every call; they only change when a write commits.
        self._counts: QueueCounts | None = None

    def _configure(self) -> None:
        db = self._db
        db.execute("PRAGMA busy_timeout = 5000")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{self.path} has schema version {version}; this wangend knows up to "
                f"{SCHEMA_VERSION} (it was written by a newer wangend)"
            )
        if version < SCHEMA_VERSION:
            # Version 0 is a new file. Later versions migrate here, step by step.
            db.executescript(
                f"BEGIN IMMEDIATE; {CREATE_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.

        IMMEDIATE takes the write lock up front, so a read-then-write inside never meets
        a concurrent writer halfway (the daemon's lock file makes that rare, not
        impossible: an operator's sqlite3 shell). A write SQLite refuses (a full disk, a
        locked or read-only file) raises StoreUnavailable, saying so, with nothing done.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back on its own
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:  # a full disk, a read-only file system
            raise StoreUnavailable(
                f"the queue database {self.path} cannot be written: {exc}"
            ) from exc
        finally:
            self._counts = None

    # --- reading -----------------------------------------------------------------------

    def _record(self, row: Sequence[Any]) -> JobRecord:
        (job_id, state, priority, spec, attempts, outputs, error, retry_of,
         created, started, finished, updated) = row  # fmt: skip
        return JobRecord(
            id=job_id,
            state=state,
            spec=self._spec.decode(spec),
            priority=priority,
            attempts=attempts,
            outputs=self._outputs.decode(outputs),
            error=self._error.decode(error) if error else None,
            retry_of=retry_of,
            created_at=created,
            started_at=started,
            finished_at=finished,
            updated_at=updated,
        )

    def get(self, job_id: int) -> JobRecord:
        _check_id(job_id)
        row = self._db.execute(SELECT_JOB, (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        return self._record(row)

    def list(self, states: Sequence[str] | None = None, limit: int = 100) -> list[JobRecord]:
        """Up to `limit` jobs in the order a person reads a queue: the live one (running or
        paused), then the queued ones in run order, then the finished ones, newest (highest
        id) first. `states` keeps only those states."""
        wanted = set(states or JOB_STATES)
        records: list[JobRecord] = []
        if wanted & set(LIVE_STATES):
            rows = self._db.execute(SELECT_LIVE).fetchall()
            records += [self._record(r) for r in rows if r[1] in wanted]
        if "queued" in wanted and len(records) < limit:
            rows = self._db.execute(SELECT_QUEUED, (limit - len(records),)).fetchall()
            records += [self._record(r) for r in rows]
        finished = sorted(wanted - {"queued", *LIVE_STATES})
        if finished and len(records) < limit:
            args = (msgspec.json.encode(finished).decode(), limit - len(records))
            records += [self._record(r) for r in self._db.execute(SELECT_NEWEST, args)]
        return records[:limit]

    def queue_order(self) -> list[int]:
        """Queued job ids, the next to run first."""
        return [row[0] for row in self._db.execute(SELECT_QUEUE_ORDER)]

    def next_queued(self) -> JobRecord | None:
        """The job to run next: highest priority, then lowest position (oldest)."""
        row = self._db.execute(SELECT_NEXT).fetchone()
        return self._record(row) if row else None

    def counts(self) -> QueueCounts:
        if self._counts is None:
            self._counts = QueueCounts(**dict(self._db.execute(SELECT_COUNTS).fetchall()))
        return self._counts

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute(SELECT_META, (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        """Store `value` under `key`; None removes the key."""
        with self.transaction() as db:
            if value is None:
                db.execute(DELETE_META, (key,))
            else:
                db.execute(UPSERT_META, (key, value))

    # --- writing -----------------------------------------------------------------------

    def insert(
        self, spec: ResolvedJob, priority: int = 0, retry_of: int | None = None
    ) -> JobRecord:
        """A new `queued` job behind every queued job of the same priority."""
        params = {
            "priority": priority,
            "spec": msgspec.json.encode(spec).decode(),
            "retry_of": retry_of,
            "now": time.time(),
        }
        with self.transaction() as db:
            job_id = db.execute(INSERT_JOB, params).lastrowid
            db.execute(SET_POSITION_TO_ID, (job_id,))
        return self.get(job_id)

    def transition(
        self,
        job_id: int,
        to: str,
        *,
        allowed_from: Sequence[str],
        outputs: list[str] | None = None,
        error: JobError | None = None,
    ) -> JobRecord:
        """Move one job to `to` if, and only if, it is in one of `allowed_from`.

        One guarded UPDATE in one transaction: two callers can never both move the same
        job out of the same state. The changes a transition carries are its `outputs`
        and `error`; the store itself counts an attempt and stamps `started_at` when a job
        goes from queued to running, and stamps `finished_at` on a final state.
        Raises UnknownJob, or WrongState naming the job's current state.
        """
        if to not in JOB_STATES:
            raise ValueError(f"{to!r} is not a job state")
        _check_id(job_id)
        params = {
            "id": job_id,
            "to": to,
            "now": time.time(),
            "allowed": msgspec.json.encode(list(allowed_from)).decode(),
            "outputs": None if outputs is None else msgspec.json.encode(outputs).decode(),
            "error": None if error is None else msgspec.json.encode(error).decode(),
        }
        with self.transaction() as db:
            if db.execute(TRANSITION, params).rowcount == 0:
                _refuse(db, job_id, f"only a {either(allowed_from)} job can become {to}")
        return self.get(job_id)

    def update_spec(self, job_id: int, spec: ResolvedJob) -> JobRecord:
        """Replace a running job's resolved spec (WrongState when it is not running)."""
        _check_id(job_id)
        params = {"id": job_id, "spec": msgspec.json.encode(spec).decode(), "now": time.time()}
        with self.transaction() as db:
            if db.execute(UPDATE_SPEC, params).rowcount == 0:
                _refuse(db, job_id, "only a running job's spec can change")
        return self.get(job_id)

    def move(self, job_id: int, position: int) -> int:
        """Put a queued job at `position` in the run order (0 = next to run); returns the
        index it ended at (a position past the end means last).

        Run order is (priority desc, position asc), so a place is only reachable with a
        fitting priority. The rule: the job keeps its priority when its new neighbours
        allow it; moved in front of a job of higher priority it takes that job's
        priority, moved behind a job of lower priority it takes that one's. Either way
        the job sits exactly where it was asked to, and jobs enqueued later at those
        priorities still queue behind it.
        """
        _check_id(job_id)
        with self.transaction() as db:
            row = db.execute(SELECT_STATE, (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(job_id)
            if row[0] != "queued":
                raise WrongState.of_job(job_id, row[0], "only a queued job can move")
            slots = db.execute(SELECT_QUEUE_SLOTS).fetchall()
            positions = [pos for _id, _prio, pos in slots]  # ascending within the new order
            me = next(s for s in slots if s[0] == job_id)
            others = [s for s in slots if s[0] != job_id]
            index = max(0, min(position, len(others)))
            priority = me[1]
            if index < len(others):  # never below the job it goes in front of
                priority = max(priority, others[index][1])
            if index > 0:  # never above the job it goes behind
                priority = min(priority, others[index - 1][1])
            order = [(i, p) for i, p, _ in others[:index]]
            order += [(job_id, priority)] + [(i, p) for i, p, _ in others[index:]]
            # Reuse the queued jobs' own positions, in ascending order along the new run
            # order; priorities along it never rise, so ORDER BY gives exactly this order.
            now = time.time()
            old = {i: (p, pos) for i, p, pos in slots}
            for (i, p), pos in zip(order, sorted(positions), strict=True):
                if old[i] != (p, pos):
                    db.execute(SET_SLOT, (p, pos, now, i))
        return index

    def clear_queued(self) -> list[int]:
        """Cancel every queued job (each ends `aborted`, error "Cancelled") in one
        transaction; returns their ids in the order they would have run."""
        now = time.time()
        error = JobError(type="Cancelled", message="cancelled by clear before it started")
        with self.transaction() as db:
            ids = [row[0] for row in db.execute(SELECT_QUEUE_ORDER)]
            db.execute(CANCEL_QUEUED, (msgspec.json.encode(error).decode(), now, now))
        return ids

    def recover(
        self,
        max_attempts: int,
        finished: Callable[[int], bool] = lambda job_id: False,
        aborting: Collection[int] = (),
    ) -> Recovery:
        """After an unclean stop: give back to the queue what the worker held.

        A job found `running` or `paused` was on the worker when the daemon died. It goes
        back to `queued`, at its old place and keeping its attempt count, unless it has
        been started `max_attempts` times already: then it fails ("Interrupted"), so one
        job that takes the daemon down cannot bring it down forever. A job `finished`
        says wrote all its outputs before the stop is queued again whatever its count:
        its next run only returns them, and a finished job must not end `failed`.
        A job in `aborting` had an abort acknowledged that had not landed: it ends
        `aborted`, as the user was told it would.
        """
        requeued: list[int] = []
        failed: list[int] = []
        aborted: list[int] = []
        now = time.time()
        with self.transaction() as db:
            for job_id, attempts in db.execute(SELECT_INTERRUPTED).fetchall():
                if job_id in aborting:
                    error = JobError(
                        type="Aborted",
                        message="aborted while running (the daemon stopped before the "
                        "abort landed)",
                    )
                    db.execute(ABORT_JOB, (msgspec.json.encode(error).decode(), now, now, job_id))
                    aborted.append(job_id)
                    continue
                if attempts < max_attempts or finished(job_id):
                    db.execute(REQUEUE_JOB, (now, job_id))
                    requeued.append(job_id)
                    continue
                times = "once" if attempts == 1 else f"{attempts} times"
                error = JobError(
                    type="Interrupted",
                    message=f"the daemon stopped while this job ran, {times}; it is not "
                    "started again automatically (retry it to run it once more)",
                )
                db.execute(FAIL_JOB, (msgspec.json.encode(error).decode(), now, now, job_id))
                failed.append(job_id)
        return Recovery(requeued=requeued, failed=failed, aborted=aborted)


def _check_id(job_id: int) -> None:
    """No job has an id outside SQLite's INTEGER range (the wire allows up to 2**64-1);
    binding one would raise OverflowError, an internal error, instead of unknown job."""
    if not -(2**63) <= job_id < 2**63:
        raise UnknownJob(job_id)
