"""kill -9 the daemon in the middle of work, start it again: nothing is lost."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ..support.harness import DaemonProcess
from ..support.outputs import files_under
from ..support.wire import job_event, progressed

pytestmark = pytest.mark.slow
TERMINAL = ("job.succeeded", "job.failed", "job.aborted")


def test_kill_9_mid_run_then_restart_loses_nothing(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path).start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            done = client.result("enqueue", {"prompt": "finished before", "steps": 2})["job"]
            client.wait_event(job_event(done, *TERMINAL))
            running = client.result("enqueue", {"prompt": "killed", "steps": 300, "seed": 9})
            waiting = client.result("enqueue", {"prompt": "waiting", "steps": 2, "seed": 4})
            client.wait_event(progressed(running["job"], 1))
        daemon.kill9()

        daemon.start()
        with daemon.unix() as client:
            before = client.result("status", {"job": done})
            assert before["state"] == "succeeded" and len(before["outputs"]) == 1
            assert Path(before["outputs"][0]).exists()
            again = client.result("status", {"job": running["job"]})
            assert again["state"] in ("queued", "running") and again["attempts"] >= 1
            assert again["spec"]["seed"] == 9
            assert client.result("status", {"job": waiting["job"]})["state"] in (
                "queued",
                "running",
                "succeeded",
            )
            # Let the interrupted job finish quickly: abort it, the waiting one must run.
            client.result("subscribe", {})
            client.result("abort", {"job": running["job"]})
            final = client.wait_event(job_event(waiting["job"], *TERMINAL), timeout=120)
            assert final["type"] == "job.succeeded"
    finally:
        daemon.stop()
    leftovers = [p for p in files_under(daemon.output_dir) if p.name.startswith(".")]
    assert leftovers == []
    with sqlite3.connect(daemon.state_dir / "queue.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_job_interrupted_too_often_fails_instead_of_looping(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--model", "tiny").start()
    try:
        for attempt in (1, 2):
            with daemon.unix() as client:
                client.result("subscribe", {})
                if attempt == 1:
                    job = client.result("enqueue", {"prompt": "poison", "steps": 400})["job"]
                client.wait_event(progressed(job, 1))
            daemon.kill9()
            daemon.start()
        with daemon.unix() as client:
            record = client.result("status", {"job": job})
        assert record["state"] == "failed", record  # max_attempts defaults to 2
        assert record["error"]["type"] == "Interrupted"
        assert record["attempts"] == 2
    finally:
        daemon.stop()


def test_a_paused_queue_stays_paused_after_kill_9(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path).start()
    try:
        with daemon.unix() as client:
            client.result("pause", {"mode": "now"})
            job = client.result("enqueue", {"prompt": "held", "steps": 2})["job"]
            seq_before = client.result("status")["last_seq"]
        daemon.kill9()
        daemon.start()
        with daemon.unix() as client:
            status = client.result("status")
            assert status["paused"] is True and status["queue"]["queued"] == 1
            # event numbers never go back, so an old `since` cannot hide new events
            assert status["last_seq"] > seq_before
            assert client.result("status", {"job": job})["state"] == "queued"
            client.result("subscribe", {})
            client.result("resume")
            assert client.wait_event(job_event(job, *TERMINAL))["type"] == "job.succeeded"
    finally:
        daemon.stop()


def test_sigterm_requeues_the_running_job_and_it_completes_after_restart(
    tmp_path: Path,
) -> None:
    daemon = DaemonProcess(tmp_path).start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            job = client.result("enqueue", {"prompt": "stop gently", "steps": 60})["job"]
            client.wait_event(progressed(job, 1))
        assert daemon.stop() == 0
        daemon.start()
        with daemon.unix() as client:
            client.result("subscribe", {})
            record = client.result("status", {"job": job})
            assert record["state"] in ("queued", "running")
            if record["state"] != "succeeded":
                final = client.wait_event(job_event(job, *TERMINAL), timeout=120)
                assert final["type"] == "job.succeeded"
    finally:
        daemon.stop()
