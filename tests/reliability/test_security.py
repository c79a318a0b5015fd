"""Who may drive the daemon: the token over TCP, file modes on disk, output paths."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ..support.harness import DaemonProcess
from ..support.wire import job_event

pytestmark = pytest.mark.slow

PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_methods() -> list[str]:
    """Every method in the methods table of docs/protocol.md."""
    text = PROTOCOL_DOC.read_text()
    table = text[text.index("## Methods") :].split("\n### ", 1)[0]
    methods = re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)
    assert "auth" in methods and "shutdown" in methods, methods
    return methods


def test_tcp_refuses_every_method_but_auth_without_the_token(daemon: DaemonProcess) -> None:
    methods = [m for m in documented_methods() if m != "auth"]
    assert len(methods) >= 13
    with daemon.tcp(authed=False) as client:
        for method in methods:
            for params in (None, {}, {"job": 1}):
                reply = client.call(method, params)
                assert reply.get("error", {}).get("code") == -32001, (method, reply)
        # a batch cannot sneak past the check either
        batch = [{"jsonrpc": "2.0", "id": i, "method": m} for i, m in enumerate(methods)]
        client.send_raw(json.dumps(batch).encode() + b"\n")
        replies = json.loads(client.read_line())
        assert [r["error"]["code"] for r in replies] == [-32001] * len(methods)
    with daemon.unix() as client:  # nothing of the above happened
        assert client.result("status")["pid"] == daemon.proc.pid


def test_a_wrong_token_is_answered_late(daemon: DaemonProcess) -> None:
    with daemon.tcp(authed=False) as client:
        for token in ("wrong", daemon.token[:-1], daemon.token + "x"):
            started = time.monotonic()
            reply = client.call("auth", {"token": token})
            assert reply["error"]["code"] == -32001
            assert time.monotonic() - started >= 0.15
        assert client.call("status")["error"]["code"] == -32001
        assert client.result("auth", {"token": daemon.token}) == {"ok": True}
        assert client.result("status")["pid"] == daemon.proc.pid


def test_socket_and_token_file_are_private(daemon: DaemonProcess) -> None:
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.token_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_refuses_to_start_with_a_token_file_others_can_read(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    token = state / "token"
    token.write_text("s3cret-token-value\n")
    os.chmod(token, mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANGEN_")}
    done = subprocess.run(
        [sys.executable, "-m", "wangend.cli", "serve", "--state-dir", str(state),
         "--output-dir", str(tmp_path / "out"), "--socket", str(state / "s.sock"),
         "--port", "0"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done
    message = done.stdout + done.stderr
    assert "token file" in message and "chmod 600" in message, message
    assert "Traceback" not in message
    assert "s3cret" not in message
    assert not (state / "s.sock").exists()


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "/etc/passwd", "..", "x/../../y", "{prompt}/../z", "a\\b"]
)
def test_output_name_cannot_leave_the_output_dir(daemon: DaemonProcess, name: str) -> None:
    with daemon.unix() as client:
        reply = client.call("enqueue", {"prompt": "x", "steps": 1, "output_name": name})
        assert reply.get("error", {}).get("code") == -32602, reply
        assert reply["error"]["data"]["field"] == "$.params.output_name"


def test_a_prompt_full_of_slashes_stays_in_the_output_dir(daemon: DaemonProcess) -> None:
    with daemon.unix() as client:
        client.result("subscribe", {})
        spec = {"prompt": "../../etc/x/..", "steps": 1, "width": 16, "height": 16,
                "frames": 1, "output_name": "{prompt}"}  # fmt: skip
        job = client.result("enqueue", spec)["job"]
        client.wait_event(job_event(job, "job.succeeded", "job.failed", "job.aborted"))
        record = client.result("status", {"job": job})
    if record["state"] == "succeeded":
        out = Path(record["outputs"][0]).resolve()
        assert out.parent == daemon.output_dir.resolve(), out
    else:  # refusing such a name is also fine; escaping is not
        assert record["state"] == "failed", record


def test_input_folders_confine_what_a_job_may_make_the_daemon_read(tmp_path: Path) -> None:
    """With `input_folders`, every input path must resolve inside them: files elsewhere,
    `..` and symlinks that lead out are refused naming the field; files inside pass."""
    allowed, outside = tmp_path / "inputs", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    from PIL import Image

    for folder in (allowed, outside):
        Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "start.png")
    (allowed / "link.png").symlink_to(outside / "start.png")
    config = tmp_path / "config.toml"
    config.write_text(f'input_folders = ["{allowed}"]\n')
    root = Path(tempfile.mkdtemp(prefix="wsec", dir="/tmp"))  # a short Unix socket path
    daemon = DaemonProcess(root, "--config", str(config)).start()
    try:
        with daemon.unix() as client:

            def check(path: Path, **extra: object) -> dict:
                spec = {"prompt": "p", "model": "tiny-i2v", "image": str(path), **extra}
                return client.call("validate", spec)

            assert check(allowed / "start.png")["result"]["spec"]["image"] == str(
                allowed / "start.png"
            )
            for path in (
                outside / "start.png",
                allowed / ".." / "private" / "start.png",
                allowed / "link.png",
                Path("/etc/passwd"),
            ):
                error = check(path)["error"]
                assert error["code"] == -32602 and error["data"]["field"] == "$.params.image"
                assert str(allowed) in error["message"]
            audio = client.call("validate", {"prompt": "p", "audio": "/etc/hostname"})
            assert audio["error"]["data"]["field"] == "$.params.audio"
            matting = client.call(
                "validate",
                {"kind": "matanyone", "input": str(outside / "start.png"), "mask": "/x.png"},
            )
            assert matting["error"]["data"]["field"] == "$.params.input"
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_token_files_contents_as_read_let_a_client_in(daemon: DaemonProcess) -> None:
    """The docs say: send the contents of the token file. Read whole, they end in a
    newline; that is not part of the token. On the Unix socket `auth` is already done."""
    contents = daemon.token_file.read_text()
    assert contents.endswith("\n")
    with daemon.tcp(authed=False) as client:
        assert client.result("auth", {"token": contents}) == {"ok": True}
        assert client.result("status")["pid"] == daemon.proc.pid
    with daemon.unix() as client:
        assert client.result("auth", {"token": contents}) == {"ok": True}
        assert client.result("auth", {"token": "anything"}) == {"ok": True}
        assert client.result("status")["pid"] == daemon.proc.pid
