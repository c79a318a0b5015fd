"""History export: one JSON line per finished job, read from the SQLite file while the
daemon's own connection has it open."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path

import msgspec
import pytest

from wangend.protocol import JobError, ResolvedJob
from wangend.queue.history import export_history
from wangend.queue.store import JobStore

from .conftest import make_spec


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def finish(store: JobStore, job_id: int, to: str, **changes) -> None:
    store.transition(job_id, "running", allowed_from=["queued"])
    store.transition(job_id, to, allowed_from=["running"], **changes)


def test_exports_finished_jobs_while_the_store_is_open(
    store: JobStore, db_path: Path, tmp_path: Path
) -> None:
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    outputs = [str(video), str(tmp_path / "a.json"), str(tmp_path / "a.source-1.png"),
               str(tmp_path / "a_alpha.mp4"), str(tmp_path / "a_frames.zip")]  # fmt: skip
    done = store.insert(make_spec("雪の狐", seed=5)).id
    finish(store, done, "succeeded", outputs=outputs)
    broken = store.insert(make_spec()).id
    finish(store, broken, "failed", error=JobError(type="OutputWriteFailed", message="disk"))
    store.insert(make_spec())  # still queued: not history
    live = store.insert(make_spec()).id
    store.transition(live, "running", allowed_from=["queued"])  # running: not history
    cancelled = store.clear_queued()

    buffer = io.StringIO()
    assert export_history(db_path, buffer) == 3
    first, second, third = lines(buffer)
    assert (first["id"], first["state"], second["state"]) == (done, "succeeded", "failed")
    assert third["state"] == "aborted" and third["id"] == cancelled[0]
    assert msgspec.convert(first["spec"], ResolvedJob) == make_spec("雪の狐", seed=5)
    assert first["kind"] == "generate" and first["attempts"] == 1 and first["error"] is None
    # Roles come from the job, not the names: a generation's `a_alpha.mp4` is a video.
    assert [(o["role"], o["exists"]) for o in first["outputs"]] == [
        ("video", True),
        ("metadata", False),
        ("source_image", False),
        ("video", False),
        ("frames_zip", False),
    ]  # fmt: skip
    timings = first["timings"]
    assert timings["created_at"] <= timings["started_at"] <= timings["finished_at"]
    assert timings["run_s"] >= 0 and timings["queued_s"] >= 0
    assert second["error"] == {"type": "OutputWriteFailed", "message": "disk"}
    assert third["timings"]["started_at"] is None and third["timings"]["run_s"] is None

    # the store's connection still writes while an export connection exists
    again = io.StringIO()
    assert export_history(store, again) == 3
    store.transition(live, "succeeded", allowed_from=["running"], outputs=[])
    assert export_history(store, io.StringIO()) == 4


def test_since_filters_on_finish_time(store: JobStore, db_path: Path) -> None:
    old = store.insert(make_spec()).id
    finish(store, old, "succeeded", outputs=[])
    cut = time.time()
    time.sleep(0.01)
    new = store.insert(make_spec()).id
    finish(store, new, "succeeded", outputs=[])
    buffer = io.StringIO()
    assert export_history(db_path, buffer, since=cut) == 1
    assert lines(buffer)[0]["id"] == new


def test_export_never_writes(store: JobStore, db_path: Path) -> None:
    job = store.insert(make_spec()).id
    finish(store, job, "succeeded", outputs=[])
    store.close()
    before = db_path.read_bytes()
    db_path.chmod(0o444)
    assert export_history(db_path, io.StringIO()) == 1
    assert db_path.read_bytes() == before


def test_missing_or_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no queue database"):
        export_history(tmp_path / "nope.sqlite3", io.StringIO())
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(sqlite3.OperationalError, match="no such table: jobs"):
        export_history(other, io.StringIO())
