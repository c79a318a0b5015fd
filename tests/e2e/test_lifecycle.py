"""Starting and stopping the real daemon: a start refused for a bad value, and a stop
with a job running (the grace period, a second signal, and the restart that picks the
job up again). Outcomes are read from the queue database after the process has exited,
so nothing the daemon says about itself is taken on trust.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ..support.harness import DaemonProcess
from ..support.wire import WireClient, job_event, progressed

pytestmark = pytest.mark.slow
TERMINAL = ("job.succeeded", "job.failed", "job.aborted")


def stored(daemon: DaemonProcess, job: int) -> dict[str, Any]:
    """The job's row as the stopped daemon left it."""
    with sqlite3.connect(daemon.state_dir / "queue.sqlite3") as db:
        state, attempts, outputs, error = db.execute(
            "SELECT state, attempts, outputs, error FROM jobs WHERE id = ?", (job,)
        ).fetchone()
    return {"state": state, "attempts": attempts, "outputs": outputs, "error": error}


def wait_running(client: WireClient, job: int, timeout: float = 60.0) -> None:
    """Until `job` is running and past its first denoising step (after a restart the
    job may already be running when we connect, so events alone could miss it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = client.result("status")["running"]
        ready = running and running["job"] == job and running["phase"] == "denoising"
        if ready and running["step"] >= 1:
            return
        time.sleep(0.05)
    raise TimeoutError(f"job {job} did not start running")


@pytest.mark.parametrize("device", ["gpu0", "cuda"])
def test_a_device_this_machine_cannot_give_is_one_line_and_exit_2(
    tmp_path: Path, device: str
) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    daemon = DaemonProcess(tmp_path, "--device", device)
    code, output = daemon.run_until_exit()
    assert code == 2, output
    assert "Traceback" not in output, output
    # "gpu0" is refused with the config ("invalid value for device (flag --device): not
    # a device; ..."), "cuda" when the daemon starts; both as a logged ERROR line.
    errors = [line for line in output.splitlines() if "invalid value for device" in line]
    assert len(errors) == 1, output
    assert " ERROR wangend: " in errors[0], output
    assert "--device" in errors[0] if device == "gpu0" else device in errors[0]
    assert not daemon.state_dir.exists()  # refused before anything was created


def test_a_config_a_model_name_clashes_in_is_one_logged_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[models.tiny]\nbase = "tiny"\ntransformer = "/x.safetensors"\n')
    daemon = DaemonProcess(tmp_path, "--config", str(config))
    code, output = daemon.run_until_exit()
    assert code == 2 and "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if " ERROR " in line]
    assert "models.tiny: tiny is the name of a built-in model" in line, output


def test_stop_grace_second_signal_and_restart(tmp_path: Path) -> None:
    # 1. A grace period too short for the running job: it goes back to the queue, not
    #    failed, not aborted. `second` waits behind it with a higher priority.
    daemon = DaemonProcess(tmp_path, "--stop-grace", "0.2").start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            first = client.result("enqueue", {"prompt": "long", "steps": 200})["job"]
            client.wait_event(progressed(first, 1))
            spec = {"prompt": "short", "steps": 30, "priority": 10}
            second = client.result("enqueue", spec)["job"]
            daemon.signal(signal.SIGTERM)
            requeued = client.wait_event(job_event(first, "job.queued", *TERMINAL))
            assert requeued["data"]["requeued"] == "stopped", requeued
        assert daemon.wait(60) == 0
    finally:
        daemon.stop()
    row = stored(daemon, first)
    assert row["state"] == "queued" and row["error"] is None and row["attempts"] == 0, row
    assert stored(daemon, second)["state"] == "queued"
    assert "has 0.2 s to finish" in daemon.log()

    # 2. A long grace cut short by a second SIGTERM: requeued at once, still exit 0.
    daemon.extra_args = ["--stop-grace", "600"]
    daemon.start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            wait_running(client, second)  # the higher priority runs first
            daemon.signal(signal.SIGTERM)
            stopping = client.wait_event(lambda e: e["type"] == "daemon.stopping")
            assert stopping["data"] == {"mode": "graceful", "grace": 600.0}
            daemon.signal(signal.SIGTERM)
            requeued = client.wait_event(job_event(second, "job.queued", *TERMINAL))
            assert requeued["type"] == "job.queued", requeued
        assert daemon.wait(60) == 0
    finally:
        daemon.stop()
    assert stored(daemon, second)["state"] == "queued"
    assert "SIGTERM while stopping: hurrying the running job back to the queue" in daemon.log()

    # 3. The job resumes as queued at the next start; a grace period long enough lets it
    #    finish before the daemon exits, and no new work is taken meanwhile.
    daemon.extra_args = ["--stop-grace", "60"]
    daemon.start()
    try:
        with daemon.unix() as client:
            client.result("subscribe", {})
            wait_running(client, second)
            daemon.signal(signal.SIGTERM)
            client.wait_event(lambda e: e["type"] == "daemon.stopping")
            late = client.call("enqueue", {"prompt": "too late", "steps": 2})
            assert late["error"]["code"] == -32005  # ShuttingDown
            final = client.wait_event(job_event(second, *TERMINAL), timeout=120)
            assert final["type"] == "job.succeeded", final
        assert daemon.wait(60) == 0
    finally:
        daemon.stop()
    row = stored(daemon, second)
    assert row["state"] == "succeeded" and row["error"] is None
    assert row["attempts"] == 1  # the stop gave its attempt back
    assert Path(json.loads(row["outputs"])[0]).is_file()
    assert stored(daemon, first)["state"] == "queued"  # never started again: stopping
