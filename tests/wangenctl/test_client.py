"""The client library: where it looks for the daemon, how it pairs replies with calls
while events stream in, how it fails, and how it resumes a subscription."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from wangenctl.client import (
    AuthError,
    DaemonUnavailable,
    Endpoint,
    EventFollower,
    ProtocolError,
    RpcError,
    connect,
    parse_url,
    resolve_endpoint,
    resolve_token_file,
)
from wangend.protocol import DEFAULT_PORT, ErrorCode, Event, StatusResult

from .fake_daemon import FakeConnection, FakeDaemon, Hangup, Reply, running

pytestmark = pytest.mark.anyio

STATUS = {
    "version": "0.1.0",
    "pid": 1,
    "uptime": 2.0,
    "device": "cpu",
    "paused": False,
    "pause_mode": None,
    "model": None,
    "queue": {},
    "running": None,
    "last_seq": 7,
}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="wc", dir="/tmp") as d:
        yield Path(d)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- where the daemon is --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://10.0.0.5:9000", Endpoint("tcp", host="10.0.0.5", port=9000)),
        ("tcp://localhost", Endpoint("tcp", host="localhost", port=DEFAULT_PORT)),
        ("TCP://[::1]:7871", Endpoint("tcp", host="::1", port=7871)),
        ("unix:///run/wangend.sock", Endpoint("unix", path="/run/wangend.sock")),
        ("/run/wangend.sock", Endpoint("unix", path="/run/wangend.sock")),
    ],
)
def test_parse_url(url: str, expected: Endpoint) -> None:
    assert parse_url(url) == expected


def test_urls_print_back_as_urls() -> None:
    assert parse_url("tcp://[::1]:7871").url == "tcp://[::1]:7871"
    assert str(parse_url("/a/b.sock")) == "unix:///a/b.sock"


def test_bare_path_expands_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/ada")
    assert parse_url("~/w.sock") == Endpoint("unix", path="/home/ada/w.sock")


@pytest.mark.parametrize(
    "url", ["", "http://host:80", "tcp://host:port", "tcp://host:1/path", "unix://"]
)
def test_bad_urls_are_refused_with_a_hint(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


def test_explicit_url_beats_environment(tmp_path: Path) -> None:
    env = {"WANGEN_URL": "tcp://127.0.0.1:1", "WANGEN_STATE_DIR": str(tmp_path)}
    assert resolve_endpoint("unix:///x.sock", env).endpoint == Endpoint("unix", path="/x.sock")
    assert resolve_endpoint(None, env).endpoint == Endpoint("tcp", host="127.0.0.1", port=1)


def test_default_prefers_the_socket_when_it_exists(tmp_path: Path) -> None:
    env = {"WANGEN_STATE_DIR": str(tmp_path)}
    sock = tmp_path / "wangend.sock"
    missing = resolve_endpoint(None, env)
    assert missing.endpoint == Endpoint("tcp", host="127.0.0.1", port=DEFAULT_PORT)
    # The error message names both places it looked.
    assert missing.where == f"unix://{sock} or tcp://127.0.0.1:{DEFAULT_PORT}"
    sock.touch()
    assert resolve_endpoint(None, env).endpoint == Endpoint("unix", path=str(sock))


def test_wangen_socket_moves_the_default(tmp_path: Path) -> None:
    sock = tmp_path / "elsewhere.sock"
    sock.touch()
    env = {"WANGEN_SOCKET": str(sock)}
    assert resolve_endpoint(None, env).endpoint == Endpoint("unix", path=str(sock))


def test_token_file_lookup(tmp_path: Path) -> None:
    assert resolve_token_file("/t/a", {"WANGEN_TOKEN_FILE": "/t/b"}) == Path("/t/a")
    assert resolve_token_file(None, {"WANGEN_TOKEN_FILE": "/t/b"}) == Path("/t/b")
    assert resolve_token_file(None, {"WANGEN_STATE_DIR": str(tmp_path)}) == tmp_path / "token"


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
        return STATUS

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
    assert str(info.value) == "steps must be >= 1 (field $.params.steps)"
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
    fake = FakeDaemon({"status": lambda conn, p: _value(STATUS)}, token="s3cret")
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


# --- resuming a subscription --------------------------------------------------------------


async def test_follower_resubscribes_with_since_and_skips_duplicates(short_dir: Path) -> None:
    async def subscribe(conn: FakeConnection, params: dict[str, Any]) -> Any:
        if conn.number == 1:

            async def stream_then_drop() -> None:
                await anyio.sleep(0.05)
                for seq in (11, 12, 13):
                    await conn.event(seq, "job.progress", 5, step=seq - 10, steps=5)
                await conn.stream.aclose()  # the daemon restarts

            conn.spawn(stream_then_drop)
            return {"last_seq": 10, "replayed": 0, "complete": True}

        async def replay() -> None:
            await anyio.sleep(0.05)
            # The ring buffer replays from `since`; 13 again must be skipped.
            for seq in (13, 14):
                await conn.event(seq, "job.progress", 5, step=seq - 10, steps=5)
            await conn.event(15, "job.succeeded", 5, outputs=["/out/a.mp4"])

        conn.spawn(replay)
        return {"last_seq": 15, "replayed": 2, "complete": True}

    same_process = {**STATUS, "last_seq": 15}
    fake = FakeDaemon({"subscribe": subscribe, "status": lambda conn, p: _value(same_process)})
    notices: list[str] = []
    delivered: list[int] = []

    def handle(event: Event) -> bool:
        delivered.append(event.seq)
        return event.type == "job.succeeded"

    with running(fake, unix=short_dir / "d.sock") as url:
        follower = EventFollower(url, on_notice=notices.append, retry_for=5)
        with anyio.fail_after(10):
            await follower.run(handle)
    assert delivered == [11, 12, 13, 14, 15]
    subscribes = [(n, p) for n, m, p in fake.calls if m == "subscribe"]
    assert subscribes == [(1, {}), (2, {"since": 13})]
    assert follower.reconnects == 1
    assert any("reconnecting" in n for n in notices)


async def test_follower_catches_up_from_the_start_after_a_restart(short_dir: Path) -> None:
    """A restarted daemon numbers events from 1 again; `since` from before means nothing."""

    async def status(conn: FakeConnection, params: dict[str, Any]) -> Any:
        if conn.number == 1:
            return {**STATUS, "pid": 100, "last_seq": 40}
        return {**STATUS, "pid": 200, "last_seq": 2}

    async def subscribe(conn: FakeConnection, params: dict[str, Any]) -> Any:
        async def first_life() -> None:
            await anyio.sleep(0.05)
            await conn.event(41, "job.started", 5, attempt=1, model="tiny")
            await conn.stream.aclose()

        async def second_life() -> None:
            await anyio.sleep(0.05)
            await conn.event(1, "job.started", 5, attempt=2, model="tiny")
            await conn.event(2, "job.progress", 5, step=1, steps=2, phase="denoising")
            await conn.event(3, "job.succeeded", 5, outputs=["/out/5.mp4"])

        conn.spawn(first_life if conn.number == 1 else second_life)
        return {"last_seq": 40 if conn.number == 1 else 2, "replayed": 0, "complete": True}

    fake = FakeDaemon({"status": status, "subscribe": subscribe})
    delivered: list[tuple[int, str]] = []
    notices: list[str] = []

    def handle(event: Event) -> bool:
        delivered.append((event.seq, event.type))
        return event.type == "job.succeeded"

    with running(fake, unix=short_dir / "d.sock") as url:
        follower = EventFollower(url, jobs=[5], on_notice=notices.append, retry_for=5)
        with anyio.fail_after(10):
            await follower.run(handle)
    assert delivered == [
        (41, "job.started"),
        (1, "job.started"),
        (2, "job.progress"),
        (3, "job.succeeded"),
    ]
    subscribes = [p for n, m, p in fake.calls if m == "subscribe"]
    assert subscribes == [{"jobs": [5]}, {"since": 0, "jobs": [5]}]
    assert any("restarted" in n for n in notices)


async def test_follower_fails_at_once_when_there_never_was_a_daemon(short_dir: Path) -> None:
    follower = EventFollower(f"unix://{short_dir}/none.sock", retry_for=30)
    with anyio.fail_after(5), pytest.raises(DaemonUnavailable, match="wangend serve"):
        await follower.run(lambda e: True)


# --- helpers ---------------------------------------------------------------------------------


async def _value(value: Any) -> Any:
    return value
