"""A daemon killed while it writes a job's output, at the moments no signal can be timed
for: while the video is encoded into its hidden temp file, right after the file gets its
final name, and right after the runtime noted the outputs. Whatever the moment, and
whether the job then runs again or is out of attempts, the output folder ends with
exactly the files the job's record names (none for a failed job): no second copy, no
hidden temp file, nothing in <state dir>/resume.

Each kill lands exactly there: the daemon runs with a `sitecustomize` that wraps one
function and ends the process with status 9 inside it, as `kill -9` would: no cleanup,
no `finally`. It fires once (a marker file), so the restarted daemon runs plainly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames, files_under
from ..support.wire import job_event
from .conftest import dot_files

pytestmark = pytest.mark.slow

SPEC = {"prompt": "a fox", "width": 32, "height": 32, "frames": 5, "steps": 3, "seed": 9}
TERMINAL = ("job.succeeded", "job.failed", "job.aborted")

HOOK = """
import os

_marker = os.environ["WANGEN_TEST_DIED"]


def _die_once():
    if not os.path.exists(_marker):
        open(_marker, "w").close()
        os._exit(9)

{wrap}
"""
WRAPS = {
    # half a video in the hidden temp file, then gone
    "encoding": """
import wangend.media.persistence as persistence

_encode = persistence._encode


def encode(frames, path, *args, **kwargs):
    with open(path, "wb") as handle:
        handle.write(b"half a video")
    _die_once()
    _encode(frames, path, *args, **kwargs)


persistence._encode = encode
""",
    # the directory fsync right after the video's hard link (media/atomic.py `_claim`)
    "named": """
import wangend.media.atomic as atomic

_fsync_dir = atomic.fsync_dir


def fsync_dir(folder):
    if str(folder) == os.environ["WANGEN_TEST_OUTPUTS"]:
        _die_once()
    _fsync_dir(folder)


atomic.fsync_dir = fsync_dir
""",
    # right after `<job>.outputs.json` is written, before the queue records the success
    "noted": """
import wangend.pipelines.resume as resume

_replace = resume.replace_durably


def replace_durably(final, data):
    _replace(final, data)
    if str(final).endswith(".outputs.json"):
        _die_once()


resume.replace_durably = replace_durably
""",
}


def killed_once(tmp_path: Path, moment: str, *args: str) -> tuple[DaemonProcess, int, dict]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK.replace("{wrap}", WRAPS[moment]))
    env = {
        "PYTHONPATH": str(hook),
        "WANGEN_TEST_DIED": str(tmp_path / "died"),
        "WANGEN_TEST_OUTPUTS": str((tmp_path / "outputs").absolute()),
    }
    daemon = DaemonProcess(tmp_path, *args, env=env).start()
    with daemon.unix() as client:
        job = client.result("enqueue", SPEC)["job"]
    assert daemon.wait(timeout=120) == 9, daemon.log()
    left = {"files": files_under(tmp_path / "outputs"), "hidden": dot_files(tmp_path / "outputs")}
    again = DaemonProcess(tmp_path, *args, env=env).start()  # the hook has fired
    try:
        with again.unix() as client:
            client.result("subscribe", {"since": 0})
            client.wait_event(job_event(job, *TERMINAL))
            record = client.result("status", {"job": job})
    finally:
        again.stop()
    return again, job, {**left, "record": record}


@pytest.mark.parametrize("moment", ["encoding", "named", "noted"])
def test_a_kill_while_writing_the_output_leaves_exactly_the_recorded_output(
    tmp_path: Path, moment: str
) -> None:
    daemon, _job, seen = killed_once(tmp_path, moment)
    assert seen["hidden"] or moment == "noted", seen  # the kill left something to clear
    record = seen["record"]
    assert record["state"] == "succeeded", record
    [output] = record["outputs"]
    assert "(2)" not in Path(output).name
    assert [str(p) for p in files_under(tmp_path / "outputs")] == [output]
    assert decode_frames(output)[0].shape == (5, 32, 32, 3)
    assert not list((daemon.state_dir / "resume").iterdir())
    if moment == "noted":  # the written output was kept, not made again
        assert [str(p) for p in seen["files"]] == [output]


@pytest.mark.parametrize("moment", ["encoding", "named", "noted"])
def test_on_its_last_attempt_the_job_ends_with_nothing_unrecorded(
    tmp_path: Path, moment: str
) -> None:
    """`max_attempts = 1`: a kill costs the job its only attempt, so it fails "Interrupted"
    and what that attempt began to write goes; unless the attempt had noted its outputs,
    when the job is done and ends succeeded with them."""
    config = tmp_path / "config.toml"
    config.write_text("max_attempts = 1\n")
    daemon, _job, seen = killed_once(tmp_path, moment, "--config", str(config))
    record = seen["record"]
    if moment == "noted":
        assert record["state"] == "succeeded", record
        assert [str(p) for p in files_under(tmp_path / "outputs")] == record["outputs"]
    else:
        assert record["state"] == "failed" and record["error"]["type"] == "Interrupted"
        assert files_under(tmp_path / "outputs") == []
    assert not list((daemon.state_dir / "resume").iterdir())
