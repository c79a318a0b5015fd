"""The client: how it pairs replies with calls while events stream in, and how it fails.

Where it looks for the daemon is tested in test_endpoint.py, resuming a subscription in
test_follower.py."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

from wangenctl.client import (
    AuthError,
    DaemonUnavailable,
    ProtocolError,
    RpcError,
    connect,
)
from wangend.protocol import ErrorCode, Event, StatusResult

from .fake_daemon import IDLE_STATUS, FakeConnection, FakeDaemon, Hangup, Reply, running

pytestmark = pytest.mark.anyio


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- no daemon ------------------------------------------------------------------------


async def test_missing_socket_says_where_and_how_to_start(short_dir: Path) -> None:
    path = short_dir / "nothing.sock"
    with pytest.raises(DaemonUnavailable) as info:
        async with connect(f"unix://{path}"):
            pass
    message = str(info.value)
    assert message == (
        f"no wangend daemon at unix://{path} (no such socket; start one with `wangend serve`)"
    )


async def test_closed_port_says_connection_refused() -> None:
    port = closed_port()
    with pytest.raises(DaemonUnavailable, match=rf"tcp://127.0.0.1:{port} \(connection refused"):
        async with connect(f"tcp://127.0.0.1:{port}"):
            pass


# --- calls and events on one connection -------------------------------------------------


async def test_replies_are_paired_by_id_while_events_interleave(short_dir: Path) -> None:
    release = anyio.Event()

    async def slow(conn: FakeConnection, params: dict[str, Any]) -> Any:
        await release.wait()
        return {"which": "slow"}

    async def status(conn: FakeConnection, params: dict[str, Any]) -> Any:
        for seq in (1, 2, 3):
            await conn.event(seq, "job.progress", 4, step=seq, steps=3, phase="denoising")
        release.set()  # the slow reply now goes out after this one's events
        return IDLE_STATUS

    fake = FakeDaemon({"slow": slow, "status": status})
    with running(fake, unix=short_dir / "d.sock") as url:
        async with connect(url) as client:
            results: dict[str, Any] = {}

            async def call_slow() -> None:
                results["slow"] = await client.call("slow")

            async with anyio.create_task_group() as tg:
                tg.start_soon(call_slow)
                await anyio.sleep(0.05)
                results["status"] = await client.call("status", None, StatusResult)

            seen = []
            async for event in client.events():
                seen.append(event)
                if len(seen) == 3:
                    break
    assert results["slow"] == {"which": "slow"}
    assert isinstance(results["status"], StatusResult)
    assert results["status"].last_seq == 7
    assert [e.seq for e in seen] == [1, 2, 3]
    assert all(isinstance(e, Event) and e.job == 4 for e in seen)


async def test_error_reply_raises_rpc_error_with_field(short_dir: Path) -> None:
    async def enqueue(conn: FakeConnection, params: dict[str, Any]) -> Any:
        raise Reply(-32602, "steps must be >= 1", {"field": "$.params.steps"})

    with running(FakeDaemon({"enqueue": enqueue}), unix=short_dir / "d.sock") as url:
        async with connect(url) as client:
            with pytest.raises(RpcError) as info:
                await client.enqueue({"prompt": "x", "steps": 0})
            # The connection stays usable after an error reply.
            with pytest.raises(RpcError) as missing:
                await client.call("nope")
    assert info.value.code == ErrorCode.INVALID_PARAMS
    assert info.value.field == "$.params.steps"
    # The daemon's own sentence names the field already, so it is shown as it is.
    assert str(info.value) == info.value.message == "steps must be >= 1"
    assert missing.value.code == ErrorCode.METHOD_NOT_FOUND


async def test_params_structs_and_dicts_go_out_as_objects(short_dir: Path) -> None:
    async def echo(conn: FakeConnection, params: dict[str, Any]) -> Any:
        return {"ok": True}

    fake = FakeDaemon({"pause": echo, "subscribe": echo, "abort": echo})
    with running(fake, unix=short_dir / "d.sock") as url:
        async with connect(url) as client:
            await client.call("pause", {"mode": "after_current"})
            await client.call("subscribe", {"since": 3, "jobs": [1]})
            await client.call("abort")
    assert [(m, p) for _, m, p in fake.calls] == [
        ("pause", {"mode": "after_current"}),
        ("subscribe", {"since": 3, "jobs": [1]}),
        ("abort", {}),
    ]


async def test_tcp_authenticates_first(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    fake = FakeDaemon({"status": lambda conn, p: _value(IDLE_STATUS)}, token="s3cret")
    with running(fake) as url:
        async with connect(url, token_file) as client:
            status = await client.status()
    assert status.device == "cpu"
    assert [m for _, m, _ in fake.calls] == ["auth", "status"]
    assert fake.calls[0][2] == {"token": "s3cret"}


async def test_wrong_or_missing_token_is_an_auth_error(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("guess")
    with running(FakeDaemon({}, token="s3cret")) as url:
        with pytest.raises(AuthError, match="refused the token"):
            async with connect(url, token_file):
                pass
        with pytest.raises(AuthError, match=str(tmp_path / "absent")):
            async with connect(url, tmp_path / "absent"):
                pass


async def test_daemon_hanging_up_is_daemon_unavailable(short_dir: Path) -> None:
    async def crash(conn: FakeConnection, params: dict[str, Any]) -> Any:
        raise Hangup

    with running(FakeDaemon({"status": crash}), unix=short_dir / "d.sock") as url:
        async with connect(url) as client:
            with pytest.raises(DaemonUnavailable) as info:
                await client.status()
            assert info.value.lost
            assert client.closed
            with pytest.raises(DaemonUnavailable):
                async for _ in client.events():
                    pass
            with pytest.raises(DaemonUnavailable):  # and later calls fail at once
                await client.status()


async def test_garbage_from_the_daemon_is_a_protocol_error(short_dir: Path) -> None:
    async def garble(conn: FakeConnection, params: dict[str, Any]) -> Any:
        await conn.raw(b"this is not json\n")
        await anyio.sleep(1)

    with running(FakeDaemon({"status": garble}), unix=short_dir / "d.sock") as url:
        async with connect(url) as client:
            with pytest.raises(ProtocolError):
                await client.status()


async def test_errors_from_the_body_are_not_wrapped(short_dir: Path) -> None:
    with running(FakeDaemon({}), unix=short_dir / "d.sock") as url, pytest.raises(KeyError):
        async with connect(url):
            raise KeyError("mine")


# --- helpers ---------------------------------------------------------------------------------


async def _value(value: Any) -> Any:
    return value
