"""The daemon's wire protocol against the JSON-RPC 2.0 specification, over a real socket."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import wave
from pathlib import Path

import pytest

from ..support.harness import DaemonProcess
from ..support.wire import WireClient


def exchange(client: WireClient, text: str) -> object:
    client.send_raw(text.encode() + b"\n")
    return json.loads(client.read_line())


def test_spec_error_examples_and_the_connection_stays_usable(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        assert exchange(c, '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}') == {
            "jsonrpc": "2.0",
            "error": {"code": -32601, "message": "Method not found"},
            "id": "1",
        }
        reply = exchange(c, '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
        assert reply["error"]["code"] == -32700 and reply["id"] is None
        reply = exchange(c, '{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
        assert reply["error"]["code"] == -32600 and reply["id"] is None
        reply = exchange(c, "[]")
        assert reply["error"]["code"] == -32600
        replies = exchange(c, "[1,2,3]")
        assert [r["error"]["code"] for r in replies] == [-32600] * 3
        # still usable after all that
        assert c.result("status")["version"]


def test_batches_are_answered_element_by_element(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        replies = exchange(
            c,
            json.dumps(
                [
                    {"jsonrpc": "2.0", "method": "status", "id": 1},
                    {"jsonrpc": "2.0", "method": "status"},  # a notification: no reply
                    {"foo": "boo"},
                    {"jsonrpc": "2.0", "method": "nope", "id": "5"},
                    {"jsonrpc": "2.0", "method": "jobs", "params": {"limit": 0}, "id": 9},
                ]
            ),
        )
        by_id = {r["id"]: r for r in replies}
        assert len(replies) == 4
        assert "result" in by_id[1]
        assert by_id[None]["error"]["code"] == -32600
        assert by_id["5"]["error"]["code"] == -32601
        assert by_id[9]["error"]["code"] == -32602
        # a batch of notifications only gets no reply at all
        c.send_raw(b'[{"jsonrpc":"2.0","method":"status"},{"jsonrpc":"2.0","method":"nope"}]\n')
        assert c.result("status")["pid"] > 0


def test_invalid_params_name_the_field(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        error = c.call("enqueue", {"prompt": "x", "steps": 0})["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.steps"
        error = c.call("enqueue", {"prompt": "x", "stepz": 3})["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.stepz"
        error = c.call("enqueue", {"prompt": "x", "width": 50})["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.width"
        error = c.call("enqueue", {"steps": 3})["error"]
        assert error["code"] == -32602 and "prompt" in error["message"]
        error = c.call("enqueue", {"prompt": "x", "model": "no-such-model"})["error"]
        assert error["code"] == -32004
        assert c.call("status", {"job": 999999})["error"]["code"] == -32002


def test_internal_details_never_leak(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        for raw in (
            b'{"jsonrpc":"2.0","id":1,"method":"enqueue","params":{"prompt":"x","seed":-1}}',
            b'{"jsonrpc":"2.0","id":2,"method":"move","params":{"job":"a","position":1}}',
            b"\xff\xfe{}",  # not UTF-8
            b'{"jsonrpc":"2.0","id":3,"method":"status","params":'
            + b"[" * 5000
            + b"]" * 5000
            + b"}",
        ):
            c.send_raw(raw + b"\n")
            flat = c.read_line().decode()
            assert "error" in flat
            assert "Traceback" not in flat and "/wangend/" not in flat and ".py" not in flat


def test_an_oversize_line_is_refused_and_the_connection_closed(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        c.send_raw(
            b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"x":"'
            + b"a" * (1024 * 1024 + 10)
            + b'"}}\n'
        )
        reply = json.loads(c.read_line())
        assert reply["error"]["code"] == -32006
        try:
            c.read_line()
            closed = False
        except (ConnectionError, OSError):
            closed = True
        assert closed
    with daemon.unix() as other:  # the daemon itself is fine
        assert other.result("status")["pid"] > 0


def test_resync_with_since_misses_nothing(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        since = c.result("status")["last_seq"]
    with daemon.unix() as c:  # a client that is not subscribed while the job runs
        job = c.result("enqueue", {"prompt": "while away", "steps": 2})["job"]
        c.result("subscribe", {"jobs": [job]})
        c.wait_event(lambda e: e.get("job") == job and e["type"] == "job.succeeded")
    with daemon.unix() as c:  # comes back later and asks from where it left
        reply = c.result("subscribe", {"since": since, "jobs": [job]})
        assert reply["complete"] is True and reply["replayed"] >= 4
        replayed = [c.next_event() for _ in range(reply["replayed"])]
    types = [e["type"] for e in replayed]
    assert types[0] == "job.queued" and types[1] == "job.started" and types[-1] == "job.succeeded"
    seqs = [e["seq"] for e in replayed]
    assert seqs == sorted(seqs) and all(s > since for s in seqs)


# --- what the audit found (docs/protocol.md says how each is answered now) --------------


def test_a_tcp_peer_without_the_token_gets_little_for_its_bytes(daemon: DaemonProcess) -> None:
    with daemon.tcp(authed=False) as guest:
        # no list of what exists: an unknown name is as unauthorized as a real one
        assert guest.call("jobz")["error"]["code"] == -32001
        assert guest.call("jobs")["error"]["code"] == -32001
        # 1 MiB of `[1,1,...]` once came back as 40 MB while every client waited
        guest.send_raw(b"[" + b",".join([b"1"] * 524_287) + b"]\n")
        reply = guest.read_line()
        assert len(reply) < 300 and json.loads(reply)["error"]["data"] == {"limit": 1000}
        assert guest.result("auth", {"token": daemon.token}) == {"ok": True}
        # a wrong token is wrong on an authenticated connection too, which stays so
        reply = guest.call("auth", {"token": "definitely-wrong"})
        assert reply["error"]["code"] == -32001
        assert guest.result("status")["pid"] == daemon.proc.pid


def test_a_last_request_without_its_newline_is_answered(daemon: DaemonProcess) -> None:
    """`printf '%s' '{...}' | socat - UNIX-CONNECT:...` printed nothing and exited 0."""
    for request, check in (
        (b'{"jsonrpc":"2.0","id":"s","method":"status"}', lambda r: r["result"]["pid"] > 0),
        (b'{"jsonrpc":"2.0","id":"x"', lambda r: r["error"]["code"] == -32700),
    ):
        with daemon.unix() as c:
            c.send_raw(request)
            c.sock.shutdown(socket.SHUT_WR)
            assert check(c.read_message())
            with pytest.raises(ConnectionError):
                c.read_line()  # then the daemon closes


def test_a_named_pipe_in_the_lora_or_preset_folder_holds_up_no_one(
    daemon: DaemonProcess,
) -> None:
    loras = daemon.state_dir / "loras" / "wan_tiny"
    presets = daemon.state_dir / "presets"
    pipes = [loras / "pipe.safetensors", presets / "pipe.json"]
    for pipe in pipes:
        pipe.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(pipe)
    try:
        with daemon.unix(timeout=10) as c:  # a hang is a socket timeout, not a stuck suite
            assert "pipe" not in [lora["name"] for lora in c.result("loras")["loras"]]
            assert "pipe" not in [preset["name"] for preset in c.result("presets")["presets"]]
            assert c.result("validate", {"prompt": "a fox", "steps": 2})["spec"]["steps"] == 2
    finally:
        for pipe in pipes:  # a daemon stuck in open() is let go before the pipe goes
            with contextlib.suppress(OSError):
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            pipe.unlink()


def test_audio_is_decoded_before_the_job_is_queued(daemon: DaemonProcess, tmp_path: Path) -> None:
    fake = tmp_path / "notaudio.wav"
    fake.write_text("this is not audio\n")
    real = tmp_path / "tone.wav"
    with wave.open(str(real), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x10" * 2000)
    with daemon.unix() as c:
        before = c.result("jobs")["jobs"]
        for method in ("validate", "enqueue"):
            error = c.call(method, {"prompt": "with audio", "steps": 2, "audio": str(fake)})
            assert error["error"]["code"] == -32602, error
            assert error["error"]["data"]["field"] == "$.params.audio"
            assert "Errno" not in error["error"]["message"]
        assert c.result("jobs")["jobs"] == before  # nothing was queued
        spec = c.result("validate", {"prompt": "with audio", "audio": str(real)})["spec"]
        assert spec["audio"] == str(real) and len(spec["inputs_sha256"]["audio"]) == 64
        reply = c.call("validate", {"prompt": "x", "model": "tiny-i2v", "image": "/dev/zero"})
        assert reply["error"]["message"].endswith("is a character device, not a regular file")


def test_retry_with_enhance_needs_an_enhancer_and_no_params_means_none(
    daemon: DaemonProcess,
) -> None:
    with daemon.unix() as c:
        c.result("pause", {"mode": "now"})
        try:
            job = c.result("enqueue", {"prompt": "to be retried", "steps": 2})["job"]
            c.result("abort", {"job": job})
            error = c.call("retry", {"job": job, "enhance": True})["error"]
            assert error["code"] == -32602 and error["data"]["field"] == "$.params.enhance"
        finally:
            c.result("resume")
        for method in ("presets", "models", "clear", "resume"):
            error = c.call(method, {"a": 1})["error"]
            assert error["code"] == -32602 and error["data"]["field"] == "$.params.a", method


def test_one_goodbye_for_all_and_no_idle_guests(tmp_path: Path) -> None:
    config = tmp_path / "wangend.toml"
    config.write_text("auth_timeout = 1.0\n")
    proc = DaemonProcess(tmp_path, "--config", str(config)).start()
    try:
        with proc.tcp(authed=False, timeout=10) as guest:
            goodbye = guest.read_message()  # sent nothing, had nothing: told, then closed
            assert goodbye["id"] is None and goodbye["error"]["code"] == -32001
            assert goodbye["error"]["data"] == {"timeout": 1.0}
            with pytest.raises(ConnectionError):
                guest.read_line()
        with proc.unix() as watcher, proc.unix() as idle, proc.tcp() as member:
            watcher.result("subscribe", {})
            with proc.unix() as stopper:
                assert stopper.result("shutdown", {"mode": "graceful"}) == {"ok": True}
                event = watcher.next_event()
                assert event["type"] == "daemon.stopping"
                assert event["data"] == {"mode": "graceful", "grace": 0.0} and event["seq"] > 0
                # the same event, not a differently shaped notice, for everyone else
                assert idle.next_event() == member.next_event() == stopper.next_event() == event
        assert proc.wait(30) == 0
    finally:
        proc.stop()
