"""wangenctl against a real daemon on the tiny model, typed the way a user types it.

Every command runs as the installed `wangenctl` console script in its own process, so
exit codes, stdout/stderr and Ctrl-C are exactly what a shell sees. The `daemon` fixture
(tests/conftest.py) is one `wangend serve` per module; tests that stop or restart a
daemon start their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wangend.server.daemon")

from ..support.harness import DaemonProcess

pytestmark = pytest.mark.slow

WANGENCTL = str(Path(sys.executable).with_name("wangenctl"))
# A job that runs for minutes on the tiny model (about half a second a step on a CPU), so
# it is surely still running when the test acts on it; and one that takes seconds.
LONG = ["--width", "256", "--height", "256", "--frames", "33", "--steps", "500"]
MEDIUM = ["--width", "256", "--height", "256", "--frames", "33", "--steps", "12"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANGEN_")}
    env["COLUMNS"] = "200"
    return env


def ctl(daemon: Any, *args: str, url: str | None = None, timeout: float = 120) -> Any:
    """`wangenctl --url <daemon> ARGS...` as a finished process."""
    cmd = [WANGENCTL, "--url", url or daemon.unix_url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=timeout)


def spawn(daemon: Any, *args: str) -> subprocess.Popen[str]:
    cmd = [WANGENCTL, "--url", daemon.unix_url, *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()
    )


def ok(result: Any) -> str:
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def submit_json(daemon: Any, *args: str) -> int:
    lines = ok(ctl(daemon, "--json", "submit", *args)).splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])["job"]


def job_record(daemon: Any, job: int) -> dict[str, Any]:
    return json.loads(ok(ctl(daemon, "--json", "status", str(job))))


def wait_until(check: Callable[[], bool], timeout: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def denoising(daemon: Any, job: int) -> Callable[[], bool]:
    def check() -> bool:
        record = job_record(daemon, job)
        progress = record.get("progress") or {}
        return record["state"] == "running" and progress.get("phase") == "denoising"

    return check


def queued_ids(daemon: Any) -> list[int]:
    out = ok(ctl(daemon, "--json", "list", "--state", "queued"))
    return [json.loads(line)["id"] for line in out.splitlines()]


# --- the session ----------------------------------------------------------------------------


def test_submit_follow_prints_only_the_path_and_the_file_exists(daemon: Any) -> None:
    """`out=$(wangenctl submit ... -f 2>/dev/null)` is the path; the id goes to stderr."""
    done = ctl(daemon, "submit", "a red fox in the snow", "--steps", "2", "--follow")
    [line] = ok(done).splitlines()
    path = Path(line)
    assert path.is_file() and path.stat().st_size > 0
    assert path.parent == Path(daemon.output_dir)
    job = followed_job(done.stderr)
    assert job_record(daemon, job)["outputs"] == [str(path)]


def followed_job(stderr: str) -> int:
    """The id `submit --follow` says on stderr ("job 5 queued at position 0")."""
    match = re.search(r"^job (\d+) queued at position \d+$", stderr, re.MULTILINE)
    assert match is not None, stderr
    return int(match[1])


def test_json_submit_prints_one_line_then_watch_waits_for_it(daemon: Any) -> None:
    job = submit_json(daemon, "a lighthouse at dusk", "--steps", "2", "--seed", "7")
    result = ctl(daemon, "watch", str(job))
    path = ok(result).strip()
    assert Path(path).is_file()
    record = job_record(daemon, job)
    assert record["state"] == "succeeded"
    assert record["spec"]["seed"] == 7


def test_status_and_models_over_tcp_with_the_token(daemon: Any, tmp_path: Path) -> None:
    tcp = ["--token-file", str(daemon.token_file)]
    status = ok(ctl(daemon, *tcp, "status", url=daemon.tcp_url))
    assert "device" in status and "wangend" in status
    models = ok(ctl(daemon, *tcp, "models", url=daemon.tcp_url))
    assert "tiny" in models and "default" in models

    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    refused = ctl(daemon, "--token-file", str(wrong), "status", url=daemon.tcp_url)
    assert refused.returncode == 2
    assert "refused the token" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1


def test_queue_management(daemon: Any) -> None:
    assert ok(ctl(daemon, "pause")).strip() == "queue paused"
    try:
        first = submit_json(daemon, "first", "--steps", "2")
        second = submit_json(daemon, "second", "--steps", "2")
        assert queued_ids(daemon)[-2:] == [first, second]
        assert "paused" in ok(ctl(daemon, "status"))

        assert ok(ctl(daemon, "move", str(second), "0")).strip() == (
            f"job {second} is now at position 0"
        )
        assert queued_ids(daemon)[:2] == [second, first]
        table = ok(ctl(daemon, "list", "--state", "queued"))
        assert "second" in table and "first" in table

        assert ok(ctl(daemon, "abort", str(first))).strip() == f"job {first} aborted"
        cleared = ok(ctl(daemon, "clear"))
        assert cleared.startswith("cancelled ") and str(second) in cleared
        assert queued_ids(daemon) == []

        again = int(ok(ctl(daemon, "retry", str(first))).strip())
        assert again not in (first, second)
        assert job_record(daemon, again)["retry_of"] == first
    finally:
        assert ok(ctl(daemon, "resume")).strip() == "queue running"
    assert Path(ok(ctl(daemon, "watch", str(again))).strip()).is_file()
    assert job_record(daemon, first)["state"] == "aborted"


def test_pause_holds_the_running_job_and_resume_continues_it(daemon: Any) -> None:
    job = submit_json(daemon, "a slow pan over hills", *LONG)
    wait_until(denoising(daemon, job), what="denoising")
    assert ok(ctl(daemon, "pause")).strip() == "queue paused"
    try:
        wait_until(lambda: job_record(daemon, job)["state"] == "paused", what="paused")
        assert "paused (now)" in ok(ctl(daemon, "status"))
        held_at = job_record(daemon, job)["progress"]["step"]
        time.sleep(1)
        assert job_record(daemon, job)["progress"]["step"] == held_at
    finally:
        assert ok(ctl(daemon, "resume")).strip() == "queue running"
    wait_until(lambda: job_record(daemon, job)["progress"]["step"] > held_at, what="the next step")
    assert ok(ctl(daemon, "abort", str(job))).strip() in (
        f"job {job} aborting",
        f"job {job} aborted",
    )
    assert ctl(daemon, "watch", str(job)).returncode == 1


def test_abort_the_running_job(daemon: Any) -> None:
    job = submit_json(daemon, "endless waves", *LONG)
    wait_until(denoising(daemon, job), what="denoising")
    assert ok(ctl(daemon, "abort")).strip() in (f"job {job} aborting", f"job {job} aborted")
    watched = ctl(daemon, "watch", str(job))
    assert watched.returncode == 1
    assert f"job {job} aborted" in watched.stderr
    assert job_record(daemon, job)["outputs"] == []


def test_ctrl_c_while_following_aborts_the_job(daemon: Any) -> None:
    follower = spawn(daemon, "submit", "endless rain", *LONG, "--follow")
    try:
        wait_until(lambda: bool(queued_or_running(daemon)), what="the job to appear")
        job = queued_or_running(daemon)[0]
        wait_until(denoising(daemon, job), what="denoising")
        follower.send_signal(signal.SIGINT)
        stdout, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 130, stderr
    assert followed_job(stderr) == job
    assert stdout == ""  # "job N aborting" is said on stderr, with the progress
    assert re.search(rf"^job {job} abort(ing|ed)$", stderr, re.MULTILINE), stderr
    assert "Traceback" not in stderr
    # The client leaves on the abort's reply ("aborting"); the worker stops at its next
    # block, which a loaded machine may reach a moment later.
    wait_until(lambda: job_record(daemon, job)["state"] == "aborted", 30, "the abort to land")


def test_ctrl_c_with_detach_only_stops_following(daemon: Any) -> None:
    follower = spawn(daemon, "submit", "endless snow", *LONG, "-f", "--detach")
    try:
        wait_until(lambda: bool(queued_or_running(daemon)), what="the job to appear")
        job = queued_or_running(daemon)[0]
        wait_until(denoising(daemon, job), what="denoising")
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 130, stderr
    assert "keeps running" in stderr
    assert job_record(daemon, job)["state"] == "running"
    ok(ctl(daemon, "abort", str(job)))


def test_mistakes_are_one_line_and_exit_1(daemon: Any) -> None:
    unknown = ctl(daemon, "status", "999999")
    assert (unknown.returncode, unknown.stderr) == (1, "error: no job with id 999999\n")
    bad = ctl(daemon, "submit", "x", "--steps", "0")
    assert (bad.returncode, bad.stderr) == (1, "error: steps: must be at least 1\n")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["submit", ""], "prompt: must not be empty"),
        (["submit", "x", "--frames", "0"], "frames: must be at least 1"),
        (["submit", "x", "--steps", "1000"], "steps: must be at most 500"),
    ],
)
def test_invalid_params_are_said_in_words(daemon: Any, args: list[str], said: str) -> None:
    done = ctl(daemon, *args)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"error: {said}\n")


def test_json_errors_are_one_object_with_the_daemons_words(daemon: Any) -> None:
    done = ctl(daemon, "--json", "submit", "x", "--steps", "1000")
    assert done.returncode == 1
    [line] = done.stdout.splitlines()
    error = json.loads(line)["error"]
    assert error["type"] == "RpcError" and error["code"] == -32602 and error["exit"] == 1
    assert error["message"] == "Expected `int` <= 500"
    assert error["data"]["field"] == "$.params.steps"
    unknown = json.loads(ctl(daemon, "--json", "status", "999999").stdout)["error"]
    assert (unknown["code"], unknown["message"], unknown["exit"]) == (
        -32002,
        "no job with id 999999",
        1,
    )


def queued_or_running(daemon: Any) -> list[int]:
    out = ok(ctl(daemon, "--json", "list", "--state", "queued", "--state", "running"))
    return [json.loads(line)["id"] for line in out.splitlines()]


# --- the daemon going away -----------------------------------------------------------------


def test_watch_resumes_across_a_daemon_restart(tmp_path: Path) -> None:
    own = DaemonProcess(tmp_path).start()
    watcher = None
    try:
        job = submit_json(own, "a river through a canyon", *MEDIUM)
        wait_until(denoising(own, job), what="denoising")
        watcher = spawn(own, "watch", str(job))
        time.sleep(1)
        own.stop()  # graceful: the job goes back to the queue
        own.start()  # same state dir and socket: the job runs again
        stdout, stderr = watcher.communicate(timeout=180)
        assert watcher.returncode == 0, stderr
        assert Path(stdout.strip()).is_file()
        assert "reconnecting" in stderr
        # A new process, said as such; not "no longer holds the events after #0".
        assert "the daemon restarted (now pid" in stderr
        assert "no longer holds" not in stderr
    finally:
        if watcher is not None:
            watcher.kill()
        own.stop()


def test_shutdown_stops_the_daemon(tmp_path: Path) -> None:
    own = DaemonProcess(tmp_path).start()
    try:
        assert "shutting down" in ok(ctl(own, "shutdown"))
        assert own.proc is not None
        assert own.proc.wait(30) == 0
        gone = ctl(own, "status")
        assert gone.returncode == 2
        assert gone.stderr.startswith(f"error: no wangend daemon at {own.unix_url}")
        assert len(gone.stderr.splitlines()) == 1
    finally:
        own.stop()
