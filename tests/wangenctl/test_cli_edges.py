"""wangenctl at the edges of a shell session: its output piped into a reader that stops
early (`| head -1`), and following a job on a queue that someone paused.

Every command runs as the installed `wangenctl` console script in its own process against
a real daemon on the tiny model, so exit codes and what lands on stderr are exactly what a
shell sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

pytest.importorskip("wangend.server.daemon")

from wangenctl.cli import _is_broken_pipe

from ..support.harness import DaemonProcess

pytestmark = pytest.mark.slow

WANGENCTL = str(Path(sys.executable).with_name("wangenctl"))
TINY = ["--width", "32", "--height", "32", "--frames", "5", "--steps", "2"]
SIGPIPE_EXIT = 141  # 128 + SIGPIPE, as a shell reports a tool killed by a closed pipe


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANGEN_")}
    env["COLUMNS"] = "200"
    return env


def command(daemon: DaemonProcess | str, *args: str) -> list[str]:
    """wangenctl's command line for the daemon (or the URL where none answers)."""
    url = daemon if isinstance(daemon, str) else daemon.unix_url
    return [WANGENCTL, "--url", url, *args]


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(daemon, *args), capture_output=True, text=True, env=clean_env(), timeout=120
    )


def spawn(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(daemon, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def paused(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """The daemon with its queue paused (nothing queued runs); emptied and resumed after."""
    assert ok(ctl(daemon, "pause")).strip() == "queue paused"
    try:
        yield daemon
    finally:
        ok(ctl(daemon, "clear"))
        ok(ctl(daemon, "resume"))


# --- a reader that stops early --------------------------------------------------------------


def into_closed_pipe(daemon: DaemonProcess | str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run wangenctl with stdout a pipe whose reader is already gone (`... | true`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            command(daemon, *args),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            timeout=120,
        )
    finally:
        os.close(write_end)


def into_head(daemon: DaemonProcess, *args: str) -> tuple[str, int, str]:
    """`wangenctl ARGS | head -1`: the first line, then the reader goes away. Returns that
    line, wangenctl's own exit code and its stderr."""
    proc = spawn(daemon, *args)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    return first, proc.wait(timeout=120), stderr


def test_json_list_into_head_ends_quietly_with_141(paused: DaemonProcess) -> None:
    """Far more than a pipe holds, so wangenctl is still writing when `head` leaves."""
    with paused.unix() as client:
        for n in range(150):
            client.result("enqueue", {"prompt": f"queued job {n}", "width": 32, "height": 32})
    first, code, stderr = into_head(paused, "--json", "list", "--limit", "1000")
    assert json.loads(first)["state"] == "queued"
    assert code == SIGPIPE_EXIT
    assert stderr == ""


@pytest.mark.parametrize(
    "args",
    [["status"], ["--json", "status"], ["list"], ["--json", "list"], ["models"]],
    ids=" ".join,
)
def test_a_closed_stdout_ends_any_command_quietly(paused: DaemonProcess, args: list[str]) -> None:
    ok(ctl(paused, "submit", "something to list", *TINY))
    done = into_closed_pipe(paused, *args)
    assert done.returncode == SIGPIPE_EXIT
    assert done.stderr == ""


def test_a_job_record_into_a_closed_pipe(paused: DaemonProcess) -> None:
    job = int(ok(ctl(paused, "submit", "a record to show", *TINY)).strip())
    done = into_closed_pipe(paused, "status", str(job))
    assert (done.returncode, done.stderr) == (SIGPIPE_EXIT, "")


def test_a_real_failure_is_still_said_when_stdout_is_closed(tmp_path: Path) -> None:
    """No daemon and no reader: the reason still reaches the person, with no traceback."""
    done = into_closed_pipe(f"unix://{tmp_path}/nobody.sock", "--json", "status")
    assert done.returncode == SIGPIPE_EXIT
    assert done.stderr.startswith("error: no wangend daemon at ")
    assert "Traceback" not in done.stderr


def test_only_a_broken_pipe_counts_as_one() -> None:
    pipe = BrokenPipeError(32, "Broken pipe")
    assert _is_broken_pipe(pipe)
    assert _is_broken_pipe(BaseExceptionGroup("outer", [ExceptionGroup("inner", [pipe])]))
    assert not _is_broken_pipe(ExceptionGroup("both", [pipe, ValueError("a real failure")]))
    assert not _is_broken_pipe(ConnectionResetError(104, "reset"))
    assert not _is_broken_pipe(SystemExit(1))


# --- following a job on a paused queue -----------------------------------------------------

NOTICE = "the queue is paused: job {} waits until `wangenctl resume`"


def next_line(proc: subprocess.Popen[str], stream: IO[str]) -> str:
    """The next line `proc` writes on `stream`. A process that never writes it is killed
    after a generous bound, so a missing line fails the test instead of hanging it."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():
        proc.kill()
        reader.join()
        pytest.fail("wangenctl said nothing more while it waited")
    return line[0].strip()


def test_submit_follow_on_a_paused_queue_says_so_then_finishes_after_resume(
    paused: DaemonProcess,
) -> None:
    follower = spawn(paused, "submit", "a paused fox", *TINY, "--follow")
    assert follower.stderr is not None
    queued = next_line(follower, follower.stderr)
    assert queued.startswith("job ") and queued.endswith(" queued at position 0")
    job = int(queued.split()[1])
    assert next_line(follower, follower.stderr) == NOTICE.format(job)

    ok(ctl(paused, "resume"))
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == 0, err
    assert Path(out.strip()).is_file()
    assert err.count("the queue is paused") == 0  # said once, before the progress


def test_json_submit_follow_says_it_on_stderr_as_text(paused: DaemonProcess) -> None:
    follower = spawn(paused, "--json", "submit", "a paused lighthouse", *TINY, "-f", "--detach")
    assert follower.stdout is not None and follower.stderr is not None
    job = json.loads(next_line(follower, follower.stdout))["job"]
    assert next_line(follower, follower.stderr) == NOTICE.format(job)

    ok(ctl(paused, "resume"))
    out, _ = follower.communicate(timeout=120)
    assert follower.returncode == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["type"] == "job.succeeded" and events[-1]["job"] == job


def test_watch_a_queued_job_on_a_paused_queue(paused: DaemonProcess) -> None:
    submitted = ctl(paused, "submit", "a paused cat", *TINY)
    job = int(ok(submitted).strip())
    assert submitted.stderr == ""  # without --follow there is nothing to wait for

    watcher = spawn(paused, "watch", str(job))
    assert watcher.stderr is not None
    assert next_line(watcher, watcher.stderr) == NOTICE.format(job)
    ok(ctl(paused, "resume"))
    out, err = watcher.communicate(timeout=120)
    assert watcher.returncode == 0, err
    assert Path(out.strip()).is_file()


def test_no_notice_when_the_queue_runs(daemon: DaemonProcess) -> None:
    done = ctl(daemon, "submit", "a running dog", *TINY, "--follow")
    assert Path(ok(done).strip()).is_file()
    assert "paused" not in done.stderr


# --- a daemon that does not answer ------------------------------------------------------------


def test_a_stopped_daemon_is_given_up_on_after_the_timeout(daemon: DaemonProcess) -> None:
    """SIGSTOP: the kernel still accepts the connection, nobody answers. A script must
    not hang until someone sends SIGCONT."""
    import signal

    daemon.signal(signal.SIGSTOP)
    try:
        for args in (["--timeout", "1", "status"], ["--timeout", "1", "list"]):
            stuck = ctl(daemon, *args)
            assert stuck.returncode == 2, stuck
            assert "no reply to" in stuck.stderr and "within 1s: is it stopped or stuck?" in (
                stuck.stderr
            )
    finally:
        daemon.signal(signal.SIGCONT)
    assert "queue" in ok(ctl(daemon, "--timeout", "5", "status"))  # awake, answering
