"""A daemon killed in the milliseconds between an output getting its final name and the
runtime noting it: the restart takes that unrecorded copy back and writes the output
once, with no second copy and no hidden temp file left behind.

The kill lands exactly there because the daemon runs with a `sitecustomize` that makes
the directory fsync right after the video's hard link (media/atomic.py `_claim`) exit
the process with status 9, as `kill -9` would end it: no cleanup, no `finally`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames, files_under
from ..support.wire import job_event
from .conftest import dot_files

pytestmark = pytest.mark.slow

SPEC = {"prompt": "a fox", "width": 32, "height": 32, "frames": 5, "steps": 3, "seed": 9}
TERMINAL = ("job.succeeded", "job.failed", "job.aborted")

DIE_AFTER_LINK = """
import os
import wangend.media.atomic as atomic

_fsync_dir = atomic.fsync_dir
_outputs = os.environ["WANGEN_TEST_DIE_IN"]


def fsync_dir(folder):
    if str(folder) == _outputs and not os.path.exists(_outputs + ".died"):
        open(_outputs + ".died", "w").close()
        os._exit(9)
    _fsync_dir(folder)


atomic.fsync_dir = fsync_dir
"""


def test_a_kill_between_naming_and_noting_leaves_one_output_and_no_temp(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_AFTER_LINK)
    outputs = (tmp_path / "outputs").absolute()
    env = {"PYTHONPATH": str(hook), "WANGEN_TEST_DIE_IN": str(outputs)}
    daemon = DaemonProcess(tmp_path, env=env).start()
    with daemon.unix() as client:
        job = client.result("enqueue", SPEC)["job"]
    assert daemon.wait(timeout=120) == 9  # died right after the link, before the note
    orphans = [
        p for p in files_under(outputs) if p.suffix == ".mp4" and p not in dot_files(outputs)
    ]
    assert len(orphans) == 1 and len(dot_files(outputs)) == 1  # the named copy, the temp link
    claims = json.loads((daemon.state_dir / "resume" / f"{job}.claims.json").read_text())
    assert [c["stem"] for c in claims] == [orphans[0].stem]

    again = DaemonProcess(tmp_path, env=env).start()  # the hook has fired: runs plainly
    try:
        with again.unix() as client:
            client.result("subscribe", {"since": 0})
            final = client.wait_event(job_event(job, *TERMINAL))
            record = client.result("status", {"job": job})
    finally:
        again.stop()
    assert final["type"] == "job.succeeded", final
    [output] = record["outputs"]
    assert "(2)" not in Path(output).name and Path(output).exists()
    assert [str(p) for p in files_under(outputs)] == [output]
    assert dot_files(outputs) == []
    frames, _ = decode_frames(output)
    assert frames.shape == (5, 32, 32, 3)
    assert "writing it again" in again.log()
    assert not list((again.state_dir / "resume").iterdir())
