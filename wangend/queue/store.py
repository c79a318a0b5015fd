"""JobStore: the durable queue in SQLite.

Every state change is one guarded UPDATE inside one transaction (`transition`), committed
before the caller announces it, so whatever a client has been told survives kill -9.
WAL with synchronous=FULL: a commit is on disk when it returns. The store is used from
the event loop thread only; its calls take well under a millisecond.

SQL lives in named constants so a test can EXPLAIN QUERY PLAN the exact statement.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ..errors import UnknownJob, WrongState
from ..protocol import JobError, JobRecord, QueueCounts, ResolvedJob

__all__ = ["JobStore", "Recovery"]

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    state       TEXT    NOT NULL,
    priority    INTEGER NOT NULL DEFAULT 0,
    position    REAL    NOT NULL,
    spec        BLOB    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    outputs     BLOB    NOT NULL DEFAULT '[]',
    error       BLOB,
    retry_of    INTEGER,
    created_at  REAL    NOT NULL,
    started_at  REAL,
    finished_at REAL,
    updated_at  REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, position);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

COLUMNS = (
    "id, state, priority, position, spec, attempts, outputs, error, retry_of, "
    "created_at, started_at, finished_at, updated_at"
)
INSERT_JOB = (
    "INSERT INTO jobs (state, priority, position, spec, retry_of, created_at, updated_at) "
    "VALUES ('queued', ?, (SELECT COALESCE(MAX(position), 0) + 1 FROM jobs), ?, ?, ?, ?)"
)
SELECT_JOB = f"SELECT {COLUMNS} FROM jobs WHERE id = ?"
SELECT_QUEUED = (
    f"SELECT {COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY priority DESC, position LIMIT ?"
)
SELECT_NEXT = (
    f"SELECT {COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY priority DESC, position LIMIT 1"
)
SELECT_QUEUE_ORDER = "SELECT id FROM jobs WHERE state = 'queued' ORDER BY priority DESC, position"
SELECT_RECENT = f"SELECT {COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?"
SELECT_COUNTS = "SELECT state, COUNT(*) FROM jobs GROUP BY state"
SELECT_INTERRUPTED = "SELECT id, attempts FROM jobs WHERE state IN ('running', 'paused')"
SELECT_META = "SELECT value FROM meta WHERE key = ?"
UPSERT_META = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?"
DELETE_META = "DELETE FROM meta WHERE key = ?"
SET_POSITION = "UPDATE jobs SET priority = ?, position = ?, updated_at = ? WHERE id = ?"


class Recovery(msgspec.Struct, frozen=True):
    """What `recover` found after an unclean stop."""

    requeued: list[int]
    failed: list[int]


class JobStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA busy_timeout = 5000")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
        self._db.execute("PRAGMA synchronous = FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{self.path} was written by a newer wangend (schema {version})"
            )
        self._db.executescript(
            f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )
        self._spec_decoder = msgspec.json.Decoder(ResolvedJob)
        self._error_decoder = msgspec.json.Decoder(JobError)
        self._outputs_decoder = msgspec.json.Decoder(list[str])
        # `status` asks for counts on every call; they change only when a write commits.
        self._counts: QueueCounts | None = None

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolled back on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._counts = None

    # --- reading -----------------------------------------------------------------------

    def _record(self, row: Sequence[Any]) -> JobRecord:
        (job_id, state, priority, _pos, spec, attempts, outputs, error, retry_of,
         created, started, finished, updated) = row  # fmt: skip
        return JobRecord(
            id=job_id,
            state=state,
            spec=self._spec_decoder.decode(spec),
            priority=priority,
            attempts=attempts,
            outputs=self._outputs_decoder.decode(outputs),
            error=self._error_decoder.decode(error) if error else None,
            retry_of=retry_of,
            created_at=created,
            started_at=started,
            finished_at=finished,
            updated_at=updated,
        )

    def get(self, job_id: int) -> JobRecord:
        row = self._db.execute(SELECT_JOB, (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        return self._record(row)

    def list(self, states: Sequence[str] | None = None, limit: int = 100) -> list[JobRecord]:
        """Queued jobs in run order first, then the others newest first."""
        wanted = set(states) if states else None
        records: list[JobRecord] = []
        if wanted is None or "queued" in wanted:
            rows = self._db.execute(SELECT_QUEUED, (limit,)).fetchall()
            records += [self._record(r) for r in rows]
        if wanted is None or wanted - {"queued"}:
            others = sorted(wanted - {"queued"}) if wanted else None
            sql = f"SELECT {COLUMNS} FROM jobs WHERE state != 'queued'"
            args: list[Any] = []
            if others:
                sql += f" AND state IN ({','.join('?' * len(others))})"
                args += others
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
            records += [self._record(r) for r in rows]
        return records[:limit]

    def queue_order(self) -> list[int]:
        return [row[0] for row in self._db.execute(SELECT_QUEUE_ORDER)]

    def next_queued(self) -> JobRecord | None:
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
        with self.transaction() as db:
            if value is None:
                db.execute(DELETE_META, (key,))
            else:
                db.execute(UPSERT_META, (key, value, value))

    # --- writing -----------------------------------------------------------------------

    def insert(
        self, spec: ResolvedJob, priority: int = 0, retry_of: int | None = None
    ) -> JobRecord:
        now = time.time()
        with self.transaction() as db:
            cur = db.execute(INSERT_JOB, (priority, msgspec.json.encode(spec), retry_of, now, now))
            job_id = cur.lastrowid
        return self.get(job_id)

    def transition(
        self,
        job_id: int,
        to: str,
        *,
        allowed_from: Sequence[str],
        attempts_delta: int = 0,
        outputs: list[str] | None = None,
        error: JobError | None = None,
        started: bool = False,
        finished: bool = False,
    ) -> JobRecord:
        """Move one job to `to` if (and only if) it is in one of `allowed_from`."""
        now = time.time()
        sets = ["state = ?", "updated_at = ?", "attempts = attempts + ?"]
        args: list[Any] = [to, now, attempts_delta]
        if outputs is not None:
            sets.append("outputs = ?")
            args.append(msgspec.json.encode(outputs))
        if error is not None:
            sets.append("error = ?")
            args.append(msgspec.json.encode(error))
        if started:
            sets.append("started_at = ?")
            args.append(now)
        if finished:
            sets.append("finished_at = ?")
            args.append(now)
        marks = ",".join("?" * len(allowed_from))
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({marks})"
        with self.transaction() as db:
            changed = db.execute(sql, (*args, job_id, *allowed_from)).rowcount
            if not changed:
                row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    raise UnknownJob(job_id)
                raise WrongState(
                    f"job {job_id} is {row[0]}; it must be {' or '.join(allowed_from)} to "
                    f"become {to}",
                    {"job": job_id, "state": row[0]},
                )
        return self.get(job_id)

    def move(self, job_id: int, position: int) -> int:
        """Put a queued job at `position` in the run order (0 = next).

        Order is (priority desc, position asc). A job moved in front of a job of higher
        priority takes that priority (and behind one of lower priority, that one's), so
        the new place holds whatever is enqueued later at ordinary priorities.
        """
        with self.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(job_id)
            if row[0] != "queued":
                raise WrongState(f"job {job_id} is {row[0]}; only queued jobs can move")
            order = db.execute(
                "SELECT id, priority, position FROM jobs WHERE state = 'queued' AND id != ? "
                "ORDER BY priority DESC, position",
                (job_id,),
            ).fetchall()
            index = min(position, len(order))
            before = order[index - 1] if index > 0 else None
            after = order[index] if index < len(order) else None
            if after is not None:  # land just in front of `after`, adopting its priority
                priority = after[1]
                same = before is not None and before[1] == priority
                new_pos = (before[2] + after[2]) / 2 if same else after[2] - 1.0
            elif before is not None:  # to the end
                priority, new_pos = before[1], before[2] + 1.0
            else:  # the only queued job
                return 0
            db.execute(SET_POSITION, (priority, new_pos, time.time(), job_id))
        return self.queue_order().index(job_id)

    def clear_queued(self) -> list[int]:
        """Every queued job ends `aborted` (cancelled), in one transaction."""
        now = time.time()
        error = msgspec.json.encode(JobError(type="Cancelled", message="cancelled by clear"))
        with self.transaction() as db:
            ids = [r[0] for r in db.execute(SELECT_QUEUE_ORDER)]
            db.execute(
                "UPDATE jobs SET state = 'aborted', error = ?, finished_at = ?, updated_at = ? "
                "WHERE state = 'queued'",
                (error, now, now),
            )
        return ids

    def recover(self, max_attempts: int) -> Recovery:
        """After an unclean stop: put interrupted jobs back in the queue, or fail them.

        A job found `running` or `paused` was on the worker when the daemon died. It goes
        back to `queued` keeping its attempt count, unless it has used `max_attempts`
        already: then it fails, so one job that kills the daemon cannot loop forever.
        """
        requeued: list[int] = []
        failed: list[int] = []
        now = time.time()
        with self.transaction() as db:
            for job_id, attempts in db.execute(SELECT_INTERRUPTED).fetchall():
                if attempts >= max_attempts:
                    error = JobError(
                        type="Interrupted",
                        message=f"the daemon stopped during this job {attempts} times; "
                        "giving up (retry it to try again)",
                    )
                    db.execute(
                        "UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, "
                        "updated_at = ? WHERE id = ?",
                        (msgspec.json.encode(error), now, now, job_id),
                    )
                    failed.append(job_id)
                else:
                    db.execute(
                        "UPDATE jobs SET state = 'queued', updated_at = ? WHERE id = ?",
                        (now, job_id),
                    )
                    requeued.append(job_id)
        return Recovery(requeued=requeued, failed=failed)
