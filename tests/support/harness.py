"""Run the real daemon as a separate process, the way a user or systemd does.

The daemon writes `<state dir>/endpoint.json` once its listeners are up; that is how the
harness (and wangenctl) learns the TCP port when the daemon was told `--port 0`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .wire import WireClient


class DaemonProcess:
    def __init__(
        self,
        root: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        """`wrapper`: a command the daemon's command line is appended to (it must exec
        it, so the pid stays the same); `pass_fds`: descriptors the child inherits."""
        self.root = root
        self.state_dir = root / "state"
        self.output_dir = root / "outputs"
        self.socket = root / "state" / "wangend.sock"
        self.log_path = root / "wangend.log"
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        for var in ("WANGEN_URL", "WANGEN_TOKEN_FILE", "WANGEN_CONFIG"):
            self.env.pop(var, None)
        self.wrapper = list(wrapper or [])
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint: dict = {}

    def command(self) -> list[str]:
        """The daemon's command line (the wrapper's included)."""
        return [
            *self.wrapper,
            sys.executable,
            "-m",
            "wangend.cli",
            "serve",
            "--state-dir",
            str(self.state_dir),
            "--output-dir",
            str(self.output_dir),
            "--socket",
            str(self.socket),
            "--port",
            "0",
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        endpoint_file = self.state_dir / "endpoint.json"
        endpoint_file.unlink(missing_ok=True)
        cmd = self.command()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, pass_fds=self.pass_fds
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wangend exited with {self.proc.returncode}:\n{self.log()}")
            if endpoint_file.exists():
                try:
                    self.endpoint = json.loads(endpoint_file.read_text())
                except ValueError:
                    pass  # being written
                else:
                    if self.endpoint.get("pid") == self.proc.pid:
                        return self
            time.sleep(0.05)
        raise TimeoutError(f"wangend did not come up:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    @property
    def port(self) -> int:
        return int(self.endpoint["tcp"][1])

    @property
    def token_file(self) -> Path:
        return self.state_dir / "token"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def unix(self, timeout: float = 30.0) -> WireClient:
        return WireClient.unix(self.socket, timeout)

    def tcp(self, authed: bool = True, timeout: float = 30.0) -> WireClient:
        return WireClient.tcp("127.0.0.1", self.port, self.token if authed else None, timeout)

    def run_until_exit(self, timeout: float = 60.0) -> tuple[int, str]:
        """Run `wangend serve` expecting it to fail at startup: (exit code, its output)."""
        done = subprocess.run(
            self.command(), capture_output=True, text=True, env=self.env, timeout=timeout
        )
        return done.returncode, done.stdout + done.stderr

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code once the daemon has exited by itself (after a signal sent with
        `signal`); raises subprocess.TimeoutExpired if it does not within `timeout`."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise
