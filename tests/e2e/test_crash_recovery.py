"""kill -9 the daemon in the middle of work, start it again: nothing is lost."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from wangend.media.metadata import read_metadata

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
            before = client.result("status")
        daemon.kill9()
        daemon.start()
        with daemon.unix() as client:
            status = client.result("status")
            assert status["paused"] is True and status["queue"]["queued"] == 1
            # event numbers never go back, so an old `since` cannot hide new events
            assert status["last_seq"] > before["last_seq"]
            # and the process says it is a new one
            assert status["started_at"] > before["started_at"] > 0
            assert abs(time.time() - status["uptime"] - status["started_at"]) < 5
            assert client.result("status", {"job": job})["state"] == "queued"
            client.result("subscribe", {})
            client.result("resume")
            assert client.wait_event(job_event(job, *TERMINAL))["type"] == "job.succeeded"
    finally:
        daemon.stop()


def test_sigterm_requeues_the_running_job_and_it_resumes_after_restart(
    tmp_path: Path,
) -> None:
    """A stop sends the running job back to the queue at a step boundary, with its
    resume point: the next start goes on from the step it stopped at."""
    daemon = DaemonProcess(tmp_path).start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            job = client.result("enqueue", {"prompt": "stop gently", "steps": 60})["job"]
            seen = client.wait_event(progressed(job, 3))["data"]["step"]
        assert daemon.stop() == 0
        assert f"job {job} is queued again" in daemon.log()
        daemon.start()
        with daemon.unix() as client:
            client.result("subscribe", {"since": 0})
            final = client.wait_event(job_event(job, *TERMINAL), timeout=120)
            assert final["type"] == "job.succeeded"
            steps = [e["data"]["step"] for e in client.seen if progressed(job, 0)(e)]
            assert steps[0] >= seen, (seen, steps)
    finally:
        daemon.stop()


def test_kill_9_mid_denoising_resumes_from_the_last_point(tmp_path: Path) -> None:
    """With a resume point after every step, a job killed at step 8 or later goes on
    from there after the restart, to exactly the frames of an uninterrupted run."""
    daemon = DaemonProcess(tmp_path, env={"WANGEN_ENGINE__RESUME_EVERY": "0"}).start()
    spec = {"prompt": "resume me", "steps": 60, "seed": 5}
    point = daemon.state_dir / "resume"
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            job = client.result("enqueue", spec)["job"]
            client.wait_event(progressed(job, 8))
        daemon.kill9()
        assert (point / f"{job}.safetensors").is_file()

        daemon.start()
        with daemon.unix() as client:
            client.result("subscribe", {"since": 0})  # from the daemon's first event
            final = client.wait_event(job_event(job, *TERMINAL), timeout=120)
            assert final["type"] == "job.succeeded", final
            steps = [e["data"]["step"] for e in client.seen if progressed(job, 0)(e)]
            assert steps and steps[0] >= 8, steps  # never from step 0 again
            again = client.result("enqueue", spec)["job"]  # the same job, not cut off
            whole = client.wait_event(job_event(again, *TERMINAL), timeout=120)
            assert whole["type"] == "job.succeeded", whole
    finally:
        daemon.stop()
    resumed = read_metadata(final["data"]["outputs"][0])
    assert resumed["frames_sha256"] == read_metadata(whole["data"]["outputs"][0])["frames_sha256"]
    assert any(note.startswith("resumed after step") for note in resumed["notes"])
    assert list(point.iterdir()) == []  # the point went with the job's end


def test_pause_after_current_then_kill_9_still_finishes_the_current_job(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path).start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            current = client.result("enqueue", {"prompt": "finish me", "steps": 150})["job"]
            behind = client.result("enqueue", {"prompt": "wait", "steps": 2})["job"]
            client.wait_event(progressed(current, 2))
            client.result("pause", {"mode": "after_current"})
        daemon.kill9()
        daemon.start()
        with daemon.unix() as client:
            client.result("subscribe", {"since": 0})
            final = client.wait_event(job_event(current, *TERMINAL), timeout=120)
            assert final["type"] == "job.succeeded", final
            status = client.result("status")
            assert status["paused"] is True and status["pause_mode"] == "after_current", status
            assert client.result("status", {"job": behind})["state"] == "queued"
    finally:
        daemon.stop()


def test_a_held_job_killed_with_9_shows_its_resume_step_and_goes_on_from_it(
    tmp_path: Path,
) -> None:
    """`pause now` writes the held job's resume point (default interval: 60 s, so no
    other point exists); after kill -9 the queued job says where it will go on."""
    daemon = DaemonProcess(tmp_path).start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            job = client.result("enqueue", {"prompt": "hold me", "steps": 80})["job"]
            client.wait_event(progressed(job, 2))
            client.result("pause", {"mode": "now"})
            held = client.wait_event(job_event(job, "job.paused"))["data"]["step"]
        daemon.kill9()
        daemon.start()
        with daemon.unix() as client:
            record = client.result("status", {"job": job})
            assert record["state"] == "queued" and record["resume_step"] == held, record
            client.result("subscribe", {})
            client.result("resume")
            final = client.wait_event(job_event(job, *TERMINAL), timeout=120)
            assert final["type"] == "job.succeeded", final
            steps = [e["data"]["step"] for e in client.seen if progressed(job, 0)(e)]
            assert steps[0] == held, (held, steps)
            assert client.result("status", {"job": job})["resume_step"] is None
    finally:
        daemon.stop()
