"""Faults injected into a real daemon while it works: each job that meets one fails with a
clear error (a JobError type and one sentence, no traceback), memory is given back, the
next job succeeds and the daemon lives on. A fault of the output folder (gone, full,
read-only) is not the job's: the job goes back to the queue, the queue pauses saying
why, and after the fix a `resume` finishes it. Then the startup faults: a locked or corrupt
queue database and a state dir owned by another process stop `wangend serve` with one
line and a documented exit code.

The out-of-memory fault needs a stand-in (there is no GPU to exhaust): the daemon is
started through a small Python wrapper that makes a transformer block raise
`torch.OutOfMemoryError` in the middle of any job whose prompt contains "OOM".
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wangend.queue.store import JobStore

from ..support.harness import DaemonProcess
from ..support.wire import WireClient, job_event, progressed
from .conftest import rss_kib

pytestmark = pytest.mark.slow
TERMINAL = ("job.succeeded", "job.failed", "job.aborted")
RSS_GROWTH_LIMIT_KIB = 200 * 1024  # a leaked pipeline or frame buffer would show

OOM_WRAPPER = '''
"""Run `python -m wangend.cli ...` in this process with a simulated GPU out-of-memory."""
import runpy
import sys

import diffusers
import torch
from diffusers.models.transformers import transformer_wan


def install() -> None:
    flags = {"oom": False, "blocks": 0}

    def watch(cls, method):
        original = getattr(cls, method)

        def wrapped(self, *args, **kwargs):
            prompt = kwargs.get("prompt", args[0] if args else None)
            if isinstance(prompt, str):  # the job's prompt, as text (not embeddings)
                flags["oom"] = "OOM" in prompt
                flags["blocks"] = 0
            return original(self, *args, **kwargs)

        setattr(cls, method, wrapped)

    for name in ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline"):
        for method in ("__call__", "encode_prompt"):
            watch(getattr(diffusers, name), method)
    forward = transformer_wan.WanTransformerBlock.forward

    def failing_forward(self, *args, **kwargs):
        if flags["oom"]:
            flags["blocks"] += 1
            if flags["blocks"] > 6:  # the second denoising step: mid-job
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (simulated)"
                )
        return forward(self, *args, **kwargs)

    transformer_wan.WanTransformerBlock.forward = failing_forward


install()
python, dash_m, module, *rest = sys.argv[1:]
assert dash_m == "-m", sys.argv
sys.argv = [module, *rest]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("faults")
    wrapper = root / "oom_wrapper.py"
    wrapper.write_text(OOM_WRAPPER)
    daemon = DaemonProcess(root, wrapper=[sys.executable, str(wrapper)]).start()
    with daemon.unix() as client:  # build and warm the tiny model once
        outcome = run_job(client, {"prompt": "warm up", "steps": 2})
        assert outcome["type"] == "job.succeeded", outcome
    yield daemon
    assert daemon.stop() == 0


def run_job(client: WireClient, spec: dict[str, Any], during: Any = None) -> dict[str, Any]:
    """Enqueue, call `during()` once the job is past its first step, return its end."""
    client.result("subscribe", {})
    job = client.result("enqueue", spec)["job"]
    if during is not None:
        client.wait_event(progressed(job, 1))
        during()
    return client.wait_event(job_event(job, *TERMINAL), timeout=120)


def assert_clean_failure(event: dict[str, Any], kind: str, *words: str) -> None:
    assert event["type"] == "job.failed", event
    error = event["data"]["error"]
    assert error["type"] == kind, error
    for word in words:
        assert word in error["message"], error
    assert "Traceback" not in error["message"] and "\n" not in error["message"]


def run_until_held(client: WireClient, spec: dict[str, Any], during: Any) -> tuple[int, str]:
    """Enqueue, call `during()` after the first step; the job must come back to the
    queue ("held") with the queue paused. Returns the job and the pause's reason."""
    client.result("subscribe", {})
    job = client.result("enqueue", spec)["job"]
    client.wait_event(progressed(job, 1))
    during()
    held = client.wait_event(
        lambda e: e.get("job") == job and e["type"] in ("job.queued", *TERMINAL), timeout=120
    )
    assert held["type"] == "job.queued" and held["data"]["requeued"] == "held", held
    paused = client.wait_event(lambda e: e["type"] == "queue.paused")
    status = client.result("status")
    assert status["paused"] and status["pause_reason"] == paused["data"]["reason"]
    return job, paused["data"]["reason"]


def resume_and_finish(client: WireClient, job: int) -> dict[str, Any]:
    """The user fixed the folder: `resume` finishes the held job."""
    client.result("resume")
    outcome = client.wait_event(job_event(job, *TERMINAL), timeout=120)
    assert outcome["type"] == "job.succeeded", outcome
    assert client.result("status")["pause_reason"] is None
    return outcome


def assert_next_job_fine(daemon: DaemonProcess, client: WireClient) -> dict[str, Any]:
    """The daemon is the same process and the next job succeeds on the warm model."""
    assert daemon.proc is not None and daemon.proc.poll() is None
    client.seen.clear()
    outcome = run_job(client, {"prompt": "after the fault", "steps": 3})
    assert outcome["type"] == "job.succeeded", outcome
    assert not [e for e in client.seen if e["type"] == "model.loading"]  # stayed warm
    assert Path(outcome["data"]["outputs"][0]).is_file()
    assert client.result("status")["pid"] == daemon.proc.pid
    return outcome


# --- faults while running ----------------------------------------------------------


def test_output_dir_replaced_by_a_file_mid_run(faulty: DaemonProcess) -> None:
    out = faulty.output_dir
    moved = out.with_name("outputs.moved")

    def break_output_dir() -> None:
        out.rename(moved)
        out.write_bytes(b"in the way")

    try:
        with faulty.unix() as client:
            job, reason = run_until_held(
                client, {"prompt": "no dir", "steps": 20}, break_output_dir
            )
            assert f"the output folder {out} cannot be written" in reason
            out.unlink()
            moved.rename(out)
            resume_and_finish(client, job)
            assert_next_job_fine(faulty, client)
    finally:
        if moved.exists():
            out.unlink(missing_ok=True)
            moved.rename(out)


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def tmpfs_output(faulty: DaemonProcess) -> Iterator[Path]:
    """A 512 KiB tmpfs mounted over the running daemon's output dir."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = _mount("-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(faulty.output_dir))
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield faulty.output_dir
    finally:
        subprocess.run(["umount", "-l", str(faulty.output_dir)], check=False)


def test_disk_full_mid_run(faulty: DaemonProcess, tmpfs_output: Path) -> None:
    filler = tmpfs_output / ".filler"

    def fill_disk() -> None:
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass  # ENOSPC: the disk is full

    with faulty.unix() as client:
        job, reason = run_until_held(client, {"prompt": "disk full", "steps": 20}, fill_disk)
        assert f"the output folder {tmpfs_output} is nearly full" in reason
        filler.unlink()
        done = resume_and_finish(client, job)
        assert Path(done["data"]["outputs"][0]).parent == tmpfs_output
        outcome = assert_next_job_fine(faulty, client)
        assert Path(outcome["data"]["outputs"][0]).parent == tmpfs_output


def test_output_filesystem_turns_read_only_mid_run(
    faulty: DaemonProcess, tmpfs_output: Path
) -> None:
    def remount_read_only() -> None:
        assert _mount("-o", "remount,ro", str(tmpfs_output)).returncode == 0

    with faulty.unix() as client:
        job, reason = run_until_held(
            client, {"prompt": "read only", "steps": 20}, remount_read_only
        )
        assert "cannot be written: Read-only file system" in reason
        assert _mount("-o", "remount,rw", str(tmpfs_output)).returncode == 0
        resume_and_finish(client, job)
        assert_next_job_fine(faulty, client)


def test_out_of_memory_mid_job_then_the_warm_model_runs_the_next(faulty: DaemonProcess) -> None:
    assert faulty.proc is not None
    with faulty.unix() as client:
        before = rss_kib(faulty.proc.pid)
        failed = run_job(client, {"prompt": "OOM please", "steps": 6})
        assert_clean_failure(failed, "OutOfMemory", "out of memory", "smaller size")
        assert [e for e in client.seen if e["type"] == "job.progress"]  # it had started
        assert client.result("status")["model"] == "tiny"  # still warm
        assert_next_job_fine(faulty, client)
        again = run_job(client, {"prompt": "OOM again", "steps": 6})
        assert_clean_failure(again, "OutOfMemory", "out of memory")
        assert_next_job_fine(faulty, client)
        growth = rss_kib(faulty.proc.pid) - before
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB over two OOM jobs"


def test_a_corrupt_model_folder_is_named_and_the_next_job_is_fine(
    faulty: DaemonProcess,
) -> None:
    models = faulty.state_dir / "models"
    gutted, truncated = models / "gutted", models / "truncated"
    for copy in (gutted, truncated):
        shutil.copytree(models / "tiny", copy)
    for weights in (gutted / "transformer").glob("*.safetensors"):
        weights.unlink()
    for weights in (truncated / "transformer").glob("*.safetensors"):
        size = weights.stat().st_size
        with open(weights, "r+b") as fh:
            fh.truncate(size // 3)
    with faulty.unix() as client:
        refused = client.call("enqueue", {"prompt": "gutted", "model": "gutted", "steps": 2})
        assert refused["error"]["code"] == -32004, refused  # ModelUnavailable, at once
        assert "transformer/*.safetensors" in refused["error"]["message"]
        cut = client.call("enqueue", {"prompt": "truncated", "model": "truncated", "steps": 2})
        assert cut["error"]["code"] == -32004, cut  # its header says more than is there
        assert "truncated has damaged weights" in cut["error"]["message"]
        assert "cut short" in cut["error"]["message"]
        outcome = run_job(client, {"prompt": "after the fault", "steps": 3})
        assert outcome["type"] == "job.succeeded", outcome
        assert client.result("status")["model"] == "tiny"


# --- faults at startup -------------------------------------------------------------


def test_startup_refuses_a_locked_or_corrupt_database_and_a_taken_state_dir(
    tmp_path: Path,
) -> None:
    """Five `wangend serve` runs side by side (each pays for importing torch), the last
    two on a TCP port and a Unix socket that another program listens on."""
    port_holder = socket.create_server(("127.0.0.1", 0))
    socket_holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cases: dict[str, DaemonProcess] = {}
    for name in ("sqlite_locked", "corrupt", "flock", "port_taken", "socket_taken"):
        cases[name] = DaemonProcess(tmp_path / name)
        cases[name].state_dir.mkdir(parents=True, mode=0o700)
    cases["port_taken"].extra_args = ["--port", str(port_holder.getsockname()[1])]
    socket_holder.bind(str(cases["socket_taken"].socket))
    socket_holder.listen()
    db_path = cases["sqlite_locked"].state_dir / "queue.sqlite3"
    JobStore(db_path).close()  # a real queue database, then another program locks it
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    (cases["corrupt"].state_dir / "queue.sqlite3").write_bytes(b"this is no database " * 400)
    lock_fd = os.open(cases["flock"].state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(lock_fd, b"4242")
    try:
        procs = {
            name: subprocess.Popen(
                case.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=case.env
            )
            for name, case in cases.items()
        }
        results = {}
        for name, proc in procs.items():
            output, _ = proc.communicate(timeout=120)
            results[name] = (proc.returncode, output.decode(errors="replace"))
    finally:
        holder.close()
        os.close(lock_fd)
        port_holder.close()
        socket_holder.close()

    expected = {
        "sqlite_locked": (3, ["queue database", "is locked by another process"]),
        "corrupt": (2, ["queue database", "cannot be used", "move it aside"]),
        "flock": (3, ["another wangend (pid 4242)", "already uses"]),
        "port_taken": (3, ["cannot listen on 127.0.0.1:", "Address already in use", "--port"]),
        "socket_taken": (3, ["another daemon is already listening on", "wangend.sock"]),
    }
    for name, (code, words) in expected.items():
        returncode, output = results[name]
        lines = [line for line in output.splitlines() if line.strip()]
        assert returncode == code, (name, output)
        assert "Traceback" not in output, (name, output)
        errors = [line for line in lines if " ERROR " in line]
        assert len(errors) == 1, (name, output)  # exactly one line says what is wrong
        assert not any("wangend stopped" in line for line in lines), (name, output)  # never ran
        for word in words:
            assert word in errors[0], (name, errors[0])
        assert not (cases[name].state_dir / "endpoint.json").exists()
