"""sd_notify, the watchdog, socket activation and SIGHUP, against a real `wangend serve`.

The test plays systemd: it binds the notify datagram socket (or the listening sockets)
itself and hands them to the daemon process the way the service manager does.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wangend.pipelines.tiny import ensure_tiny_model
from wangend.server.systemd import Notifier, listen_sockets, watchdog_interval

from ..pipelines.checkpoint_files import write_checkpoint
from ..support.harness import DaemonProcess
from ..support.wire import WireClient, job_event

TERMINAL = ("job.succeeded", "job.failed", "job.aborted")


class NotifyListener:
    """The service manager's end of $NOTIFY_SOCKET: collects every datagram."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.address = str(path)
        self.messages: list[dict[str, str]] = []
        self.arrived: list[float] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60.0) -> dict:
        """The first message (old or new) holding `key` (with `value`, if given)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if key in message and (value is None or message[key] == value):
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key} in {self.messages}")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            self.arrived.append(time.monotonic())
            fields = dict(line.split("=", 1) for line in data.decode("utf-8").splitlines())
            self.messages.append(fields)

    def collect(self, seconds: float) -> None:
        """Take in whatever arrives during `seconds`."""
        deadline = time.monotonic() + seconds
        with pytest.raises(TimeoutError):
            self.wait_for("never sent", timeout=seconds)
        assert time.monotonic() >= deadline - 0.01

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


# --- in-process units -------------------------------------------------------------------


def test_notifier_sends_utf8_to_the_abstract_namespace() -> None:
    name = f"wangend-test-{os.getpid()}-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    server.settimeout(5)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("2 queued – job 7 step 3/20 ✓")
        assert server.recv(4096).decode("utf-8") == "STATUS=2 queued – job 7 step 3/20 ✓"
        assert notifier.send("READY=1", "STATUS=two\nlines")
        assert server.recv(4096) == b"READY=1\nSTATUS=two lines"
        notifier.close()
    finally:
        server.close()


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()


def test_notifier_survives_a_missing_socket(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "gone.sock")).watchdog()


def test_notifier_drops_instead_of_blocking_when_nobody_reads(tmp_path: Path) -> None:
    """A stalled service manager must not freeze the daemon's event loop: once the
    notify socket's queue is full, sends return False at once."""
    stalled = NotifyListener(tmp_path / "stalled.sock")  # bound, never read
    notifier = Notifier(stalled.address)
    results: list[bool] = []
    sender = threading.Thread(
        target=lambda: results.extend(notifier.watchdog() for _ in range(5000)), daemon=True
    )
    try:
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "a send blocked on the full queue"
        assert results[0] is True and results.count(False) > 0
        stalled.wait_for("WATCHDOG", "1", timeout=5)  # what was queued still arrives
        assert notifier.status("after")  # one read makes room: sending goes on
    finally:
        notifier.close()
        stalled.close()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 15.0
    assert watchdog_interval({**env, "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_listen_sockets_ignores_and_removes_variables_meant_for_another_pid() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert listen_sockets(env) is None
    assert env == {"PATH": "/bin"}
    assert listen_sockets({"PATH": "/bin"}) is None


# --- a real daemon ----------------------------------------------------------------------


@pytest.mark.slow
def test_ready_status_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"}
    started = time.monotonic()
    daemon = DaemonProcess(tmp_path, env=env).start()
    try:
        ready = notify_socket.wait_for("READY", "1")
        ready_after = notify_socket.arrived[-1] - started
        assert ready["STATUS"] == "0 queued"
        assert ready["MAINPID"] == str(daemon.proc.pid)
        # The endpoint file is written before READY=1: a client told "ready" can connect.
        assert (daemon.state_dir / "endpoint.json").exists()
        print(f"READY=1 {ready_after:.2f}s after the process started")

        before = len(notify_socket.messages)
        notify_socket.collect(1.0)  # a 0.4 s watchdog: a ping every 0.2 s
        pings = sum("WATCHDOG" in m for m in notify_socket.messages[before:])
        assert pings >= 3, notify_socket.messages

        with daemon.unix() as client:
            client.result("subscribe", {})
            job = client.result("enqueue", {"prompt": "a status line", "steps": 4})["job"]
            running = notify_socket.wait_for("STATUS")
            deadline = time.monotonic() + 60
            while f"job {job} running" not in running.get("STATUS", ""):
                assert time.monotonic() < deadline, notify_socket.messages
                notify_socket.messages.remove(running)
                running = notify_socket.wait_for("STATUS")
            client.wait_event(job_event(job, *TERMINAL), timeout=120)

        # An idle client (not subscribed) must hear the goodbye, and the exit is clean.
        with daemon.unix() as idle:
            idle.result("status", {})
            daemon.proc.send_signal(signal.SIGTERM)
            stopping = notify_socket.wait_for("STOPPING", "1")
            assert stopping["STATUS"].startswith("stopping")
            goodbye = idle.read_message()
            while goodbye.get("params", {}).get("type") != "daemon.stopping":
                goodbye = idle.read_message()
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.stop()


_ACTIVATE = """
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
for target, fd in enumerate(fds, start=3):
    os.dup2(fd, target)  # inheritable; systemd hands them over from fd 3 the same way
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDNAMES"] = ":".join(["wangend"] * len(fds))
os.execv(sys.argv[2], sys.argv[2:])
"""


@pytest.mark.slow
def test_socket_activation_serves_the_inherited_sockets_only(tmp_path: Path) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = tmp_path / "run" / "wangend.sock"
    unix_path.parent.mkdir()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(unix_path))
    unix.listen()
    port = tcp.getsockname()[1]
    fds = (tcp.fileno(), unix.fileno())
    wrapper = [sys.executable, "-c", _ACTIVATE, ",".join(map(str, fds))]
    daemon = DaemonProcess(tmp_path, wrapper=wrapper, pass_fds=fds)
    try:
        daemon.start()
        tcp.close()  # the daemon holds its own copies now
        unix.close()
        assert daemon.endpoint["tcp"] == ["127.0.0.1", port]
        assert daemon.endpoint["unix"] == str(unix_path)
        assert not daemon.socket.exists()  # the configured socket was not bound
        with WireClient.tcp("127.0.0.1", port, daemon.token) as client:
            assert client.result("status", {})["pid"] == daemon.proc.pid
        with WireClient.unix(unix_path) as client:
            assert client.result("status", {})["pid"] == daemon.proc.pid
        assert daemon.stop() == 0
        assert unix_path.exists()  # systemd's socket file: not ours to remove
    finally:
        tcp.close()
        unix.close()
        daemon.stop()


@pytest.mark.slow
def test_sighup_applies_log_level_and_names_keys_that_need_a_restart(tmp_path: Path) -> None:
    config = tmp_path / "wangend.toml"
    config.write_text('log_level = "info"\nmodel = "tiny"\n')
    daemon = DaemonProcess(tmp_path, "--config", str(config)).start()
    ckpt = write_checkpoint(
        ensure_tiny_model(tmp_path / "elsewhere") / "transformer", tmp_path / "wan.safetensors"
    )
    try:
        config.write_text(
            'log_level = "debug"\nmodel = "wan2.1-t2v-1.3b"\n'
            f'[models.comfy]\nbase = "tiny"\ntransformer = "{ckpt}"\n'
        )
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "takes effect after a restart" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        log = daemon.log()
        assert "log_level = 'debug' (applied)" in log
        assert "model changed; takes effect after a restart" in log
        assert "config reloaded: models = " in log and "(applied)" in log
        with daemon.unix() as client:  # the new [models.comfy], without a restart
            listed = {m["name"]: m for m in client.result("models", {})["models"]}
        assert listed["comfy"]["available"] and listed["comfy"]["files"]["transformer"] == str(ckpt)

        config.write_text("log_level = [")  # broken: logged, the daemon keeps running
        daemon.proc.send_signal(signal.SIGHUP)
        while "config reload failed" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        with daemon.unix() as client:
            assert client.result("status", {})["pid"] == daemon.proc.pid
    finally:
        assert daemon.stop() == 0
