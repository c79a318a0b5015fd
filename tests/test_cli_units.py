"""`wangend install-units`: the systemd units it writes, checked by systemd-analyze."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wangend.cli import app
from wangend.config import ServerConfig
from wangend.server.systemd import render_units

REPO = Path(__file__).resolve().parents[1]
WANGEND = str(Path(sys.executable).parent / "wangend")  # the venv's entry point
runner = CliRunner()
STOP_UNWIND = 30.0  # QueueController.stop's default timeout for the job to unwind


def install(*args: str) -> str:
    result = runner.invoke(app, ["install-units", *args])
    assert result.exit_code == 0, result.output
    return result.output


def verify(*units: Path, user: bool = False, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    env = {**os.environ}
    if user:  # a user manager needs a runtime dir even to verify
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    cmd = [tool, "verify", *(["--user"] if user else []), *map(str, units)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    # verify reports unknown keys and bad values on stderr without failing: both count.
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr + done.stdout


def test_system_units_are_written_with_this_wangend_and_pass_verify(tmp_path: Path) -> None:
    output = install("--dest", str(tmp_path), "--exec", WANGEND)
    service, sock = tmp_path / "wangend.service", tmp_path / "wangend.socket"
    assert f"wrote {service} (ExecStart={WANGEND} serve)" in output
    assert f"wrote {sock}" in output and "enable --now wangend.socket" in output
    text = service.read_text()
    assert f"ExecStart={WANGEND} serve --state-dir /var/lib/wangend" in text
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure"):
        assert line in text.splitlines()
    assert "DeviceAllow=char-nvidia* rw" in text and "\nPrivateDevices" not in text
    assert "SupplementaryGroups=video render" in text
    assert "ListenStream=127.0.0.1:7870" in sock.read_text()
    verify(service, sock, tmp_path=tmp_path)


def test_user_unit_has_no_sandboxing_and_passes_verify(tmp_path: Path) -> None:
    output = install("--user", "--dest", str(tmp_path), "--exec", WANGEND)
    assert "systemctl --user daemon-reload" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wangend.service"]
    text = (tmp_path / "wangend.service").read_text()
    assert f"ExecStart={WANGEND} serve\n" in text and "Type=notify" in text
    for option in ("Protect", "Private", "Restrict", "DeviceAllow", "NoNewPrivileges"):
        assert f"\n{option}" not in text
    verify(tmp_path / "wangend.service", user=True, tmp_path=tmp_path)


def test_dry_run_prints_and_writes_nothing(tmp_path: Path) -> None:
    output = install("--dry-run", "--dest", str(tmp_path / "units"), "--exec", WANGEND)
    assert f"# would write {tmp_path / 'units' / 'wangend.service'}" in output
    assert "[Service]" in output and "[Socket]" in output
    assert not (tmp_path / "units").exists()


def test_exec_path_defaults_to_the_running_wangend(tmp_path: Path) -> None:
    done = subprocess.run(
        [WANGEND, "install-units", "--user", "--dry-run", "--dest", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"ExecStart={WANGEND} serve\n" in done.stdout


def test_checked_in_units_match_the_rendered_ones() -> None:
    system = render_units("/usr/local/bin/wangend")
    for name, text in system.items():
        assert (REPO / "systemd" / name).read_text() == text, name
    user = render_units("%h/.local/bin/wangend", user=True)["wangend.service"]
    assert (REPO / "systemd" / "wangend-user.service").read_text() == user


@pytest.mark.parametrize("user", [False, True])
def test_stop_timeout_leaves_room_for_the_graceful_stop(user: bool) -> None:
    """systemd kills the daemon after TimeoutStopSec: the default stop (no grace, the
    running job unwinding for up to STOP_UNWIND seconds) must fit well inside it, and
    docs/operations.md tells operators who set `stop_grace` to raise it to match."""
    text = render_units(WANGEND, user=user)["wangend.service"]
    timeout = int(next(line for line in text.splitlines() if line.startswith("TimeoutStopSec=")
                       ).split("=", 1)[1])  # fmt: skip
    assert ServerConfig().stop_grace + STOP_UNWIND < timeout
    docs = (REPO / "docs" / "operations.md").read_text()
    assert "TimeoutStopSec" in docs and "stop_grace" in docs
