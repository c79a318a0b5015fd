"""Exporting finished jobs as JSON lines, from the queue's SQLite file.

    with open("history.jsonl", "w") as out:
        count = export_history(state_dir / "queue.sqlite3", out, since=time.time() - 86400)

One line per job that reached `succeeded`, `failed` or `aborted`, oldest finish first:

    {"id": 7, "state": "succeeded", "kind": "generate", "spec": {...the resolved job...},
     "attempts": 1, "retry_of": null, "error": null,
     "timings": {"created_at": ..., "started_at": ..., "finished_at": ...,
                 "queued_s": 0.4, "run_s": 12.9},
     "outputs": [{"path": "/out/a.mp4", "role": "video", "exists": true}, ...]}

`since` keeps jobs finished at or after that Unix time. Roles come from the job and the
order its outputs are listed in, never from words in a file name (media/roles.py):
video, matte, image, metadata (a `.json` sidecar), source_image, frames_zip, mask, other.

Why its own connection: the export runs while a daemon holds the database (from `wangend
history`, a cron job, a backup script). It opens the file read-only (`mode=ro`), so it can
never take the write lock or change anything, and under WAL a reader sees the last
committed state without waiting for the writer. A JobStore may be passed instead of a
path; its file is read the same way. The spec is exported as stored (plain JSON), so
records written by older or newer daemons export too.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, TextIO

from ..media.roles import output_roles
from .store import JobStore

__all__ = ["FINISHED_STATES", "SELECT_FINISHED", "export_history"]

FINISHED_STATES = ("succeeded", "failed", "aborted")
SELECT_FINISHED = (
    "SELECT id, state, spec, attempts, outputs, error, retry_of, "
    "created_at, started_at, finished_at FROM jobs "
    "WHERE state IN ('succeeded', 'failed', 'aborted') "
    "AND (:since IS NULL OR finished_at >= :since) "
    "ORDER BY finished_at, id"
)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"no queue database at {path}")
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _line(row: tuple[Any, ...]) -> dict[str, Any]:
    (job_id, state, spec_text, attempts, outputs_text, error_text, retry_of,
     created, started, finished) = row  # fmt: skip
    spec = _loads(spec_text, {})
    outputs = [p for p in _loads(outputs_text, []) if isinstance(p, str)]
    timings: dict[str, float | None] = {
        "created_at": created,
        "started_at": started,
        "finished_at": finished,
        "queued_s": round(started - created, 3) if started is not None else None,
        "run_s": round(finished - started, 3) if started and finished else None,
    }
    return {
        "id": job_id,
        "state": state,
        "kind": spec.get("kind", "generate") if isinstance(spec, dict) else None,
        "spec": spec,
        "attempts": attempts,
        "retry_of": retry_of,
        "error": _loads(error_text, None),
        "timings": timings,
        "outputs": [
            {"path": p, "role": role, "exists": os.path.exists(p)}
            for p, role in zip(outputs, output_roles(spec, outputs), strict=True)
        ],
    }


def export_history(
    store_or_db_path: JobStore | Path | str, out: TextIO, since: float | None = None
) -> int:
    """Write one JSON line per finished job to `out`; returns how many were written.
    Raises FileNotFoundError when there is no database file, sqlite3.DatabaseError when
    it is not a queue database."""
    path = store_or_db_path.path if isinstance(store_or_db_path, JobStore) else store_or_db_path
    count = 0
    with closing(_connect_read_only(Path(path))) as db:
        for row in db.execute(SELECT_FINISHED, {"since": since}):
            out.write(json.dumps(_line(row), ensure_ascii=False, separators=(",", ":")))
            out.write("\n")
            count += 1
    return count
