"""The transport over real TCP and Unix sockets: connections, listeners, closing.

Framing without sockets is tested in test_framing.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
from pathlib import Path

import anyio
import anyio.abc
import pytest

from wangend.server.connection import Limits
from wangend.server.events import EventBus
from wangend.server.jsonrpc import Dispatcher
from wangend.server.transport import ListenError, Server

from .support import TOKEN, LineClient, running, transport_methods

pytestmark = pytest.mark.anyio

# --- over sockets ---------------------------------------------------------------------------


async def test_replies_and_events_keep_their_order(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        c = await srv.unix()
        assert (await c.call("subscribe", {}))["result"]["last_seq"] == 0
        # 20 pipelined calls, each publishing 50 events before it returns
        requests = [
            {"jsonrpc": "2.0", "id": i, "method": "publish", "params": {"n": 50}} for i in range(20)
        ]
        await c.send(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        seq = 0
        for i in range(20):
            for _ in range(50):
                message = await c.read()
                assert message["method"] == "event", message
                seq += 1
                assert message["params"]["seq"] == seq
            reply = await c.read()
            assert reply["id"] == i and reply["result"] == {"last_seq": seq}


async def test_subscribe_reply_then_replay_then_live_with_no_gap(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        for i in range(10):
            srv.bus.publish("test.before", None, {"i": i})
        c = await srv.unix()
        # one line: subscribe from seq 3, then publish 5 more while the reply is not out
        await c.send(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": {"since": 3}},
                {"jsonrpc": "2.0", "id": 2, "method": "publish", "params": {"n": 5}},
            ]
        )
        replies = await c.read()
        assert replies[0]["result"] == {"last_seq": 10, "replayed": 7, "complete": True}
        assert replies[1]["result"] == {"last_seq": 15}
        seqs = [(await c.read())["params"]["seq"] for _ in range(12)]
        assert seqs == list(range(4, 16))


async def test_malformed_json_is_answered_and_the_connection_stays_usable(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        tcp = await srv.tcp()
        await tcp.call("auth", {"token": TOKEN})
        for client in (await srv.unix(), tcp):
            await client.send(b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]\n')
            reply = await client.read()
            assert reply == {
                "jsonrpc": "2.0",
                "id": None,
                "error": {"code": -32700, "message": "Parse error"},
            }
            await client.send(b"\xff\xfe\r\n")
            assert (await client.read())["error"]["code"] == -32700
            assert (await client.call("echo", {"still": "here"}))["result"] == {"still": "here"}


async def test_an_oversize_line_is_refused_then_the_connection_closes(tmp_path: Path) -> None:
    async with running(tmp_path, Limits(max_line_bytes=1024)) as srv:
        c = await srv.tcp()
        await c.call("auth", {"token": TOKEN})
        good = b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"a":1}}\n'
        await c.send(good + b'{"jsonrpc":"2.0","id":2,"x":"' + b"a" * 5000 + b'"}\n' + good)
        assert (await c.read())["result"] == {"a": 1}
        reply = await c.read()
        assert reply["id"] is None and reply["error"]["code"] == -32006
        assert "1024" in reply["error"]["message"]
        assert await c.read_eof() == b""  # closed, the line after it never ran
        # refused before its newline arrives, too
        d = await srv.unix()
        await d.send(b'{"x":"' + b"a" * 2000)
        assert (await d.read())["error"]["code"] == -32006
        await d.read_eof()
        assert (await (await srv.unix()).call("echo", {}))["result"] == {}


async def test_an_oversize_tcp_line_still_being_sent_gets_its_error(tmp_path: Path) -> None:
    """The server stops parsing at the cap but drains the rest before closing, so the
    kernel sends FIN, not a reset that could destroy the -32006 before it is read."""
    async with running(tmp_path) as srv:  # the default 1 MiB cap
        c = await srv.tcp()
        payload = b'{"jsonrpc":"2.0","id":1,"method":"auth","params":{"token":"' + b"t" * 3_000_000

        async def send_slowly() -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                for i in range(0, len(payload), 65536):
                    await c.stream.send(payload[i : i + 65536])

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_slowly)
            reply = await c.read()
            assert reply["error"]["code"] == -32006 and "1048576" in reply["error"]["message"]
            assert await c.read_eof() == b""


async def test_a_client_that_stops_reading_is_dropped_and_others_get_everything(
    tmp_path: Path,
) -> None:
    count, size = 12_000, 1000  # far more than the kernel's socket buffers hold
    async with running(tmp_path, Limits(subscriber_buffer=64)) as srv:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # no autotuning
        raw.connect(("127.0.0.1", srv.port))
        stalled = LineClient(await anyio.abc.SocketStream.from_socket(raw))
        srv.clients.append(stalled)
        await stalled.call("auth", {"token": TOKEN})
        await stalled.call("subscribe", {})
        reader = await srv.tcp()
        await reader.call("auth", {"token": TOKEN})
        await reader.call("subscribe", {})
        received: list[int] = []
        progress = anyio.Event()

        async def read_all() -> None:
            nonlocal progress
            while len(received) < count:
                received.append((await reader.read())["params"]["seq"])
                if len(received) % 32 == 0:
                    progress.set()
                    progress = anyio.Event()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            pad = "x" * size
            for i in range(count):
                srv.bus.publish("test.tick", None, {"i": i, "pad": pad})  # never blocks
                if i % 32 == 31:
                    await progress.wait()  # pace to the reading client only
        assert received == list(range(1, count + 1))
        assert srv.bus.subscriber_count == 1
        # the stalled client finds its queued events, then exactly one final notice
        seqs, notice = [], None
        while notice is None:
            message = await stalled.read()
            if message["params"]["type"] == "subscription.dropped":
                notice = message["params"]
            else:
                seqs.append(message["params"]["seq"])
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < count
        assert notice["seq"] == 0 and notice["data"]["since"] == seqs[-1]
        assert (await stalled.call("echo", {"after": "drop"}))["result"] == {"after": "drop"}


async def test_a_client_that_never_reads_its_replies_is_throttled_then_cut(tmp_path: Path) -> None:
    limits = Limits(read_pause_bytes=64 * 1024, max_pending_bytes=512 * 1024)
    async with running(tmp_path, limits) as srv:
        flooder = await srv.unix()
        request = (
            b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"p":"' + b"y" * 2000 + b'"}}\n'
        )
        with anyio.move_on_after(1.0):
            while True:  # stops when the server no longer reads (backpressure)
                await flooder.send(request * 64)
        conns = list(srv.server._connections)
        assert conns and all(c._out_bytes <= 1024 * 1024 for c in conns)
        # and a subscriber whose queue passes the hard cap is closed
        await flooder.aclose()
        srv.clients.remove(flooder)
        hog = await srv.unix()
        await hog.call("subscribe", {})
        other = await srv.unix()
        for i in range(3000):
            srv.bus.publish("test.big", None, {"pad": "z" * 4000})
            if i % 100 == 0:
                await anyio.sleep(0)
        with anyio.fail_after(5):
            while srv.server.connection_count > 1:
                await anyio.sleep(0.01)
        assert (await other.call("echo", {"ok": 1}))["result"] == {"ok": 1}


async def test_many_connections_opened_and_dropped_leave_the_server_healthy(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as srv:
        for i in range(150):
            if i % 2:
                stream = await anyio.connect_tcp("127.0.0.1", srv.port)
            else:
                stream = await anyio.connect_unix(srv.socket_path)
            client = LineClient(stream)
            match i % 5:
                case 0:
                    await client.send(b'{"jsonrpc":"2.0","id":1,"method":"ec')  # mid-line
                case 1:
                    await client.send(b'{"jsonrpc":"2.0","id":1,"method":"subscribe"}\n')
                case 2:
                    await client.send(b'{"jsonrpc":"2.0","id":1,"method":"publish"}\n' * 50)
                case 3:
                    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                    if raw.family != socket.AF_UNIX:  # vanish with a reset
                        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()
        with anyio.fail_after(10):
            while srv.server.connection_count:
                await anyio.sleep(0.02)
        assert srv.bus.subscriber_count == 0
        c = await srv.tcp()
        assert (await c.call("auth", {"token": TOKEN}))["result"] == {"ok": True}
        assert (await c.call("whoami"))["result"] == {"kind": "tcp", "authenticated": True}


async def test_a_hundred_subscribers_each_receive_every_event_in_order(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        clients = [await srv.unix() for _ in range(100)]
        for c in clients:
            await c.call("subscribe", {})
        for i in range(200):
            srv.bus.publish("test.tick", i % 7, {"i": i})
        for c in clients:
            assert [(await c.read())["params"]["seq"] for _ in range(200)] == list(range(1, 201))


async def test_job_filtered_subscription(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        c = await srv.unix()
        await c.call("subscribe", {"jobs": [2]})
        srv.bus.publish("job.queued", 1, {})
        srv.bus.publish("queue.paused", None, {})
        srv.bus.publish("job.queued", 2, {})
        srv.bus.publish("daemon.stopping", None, {})
        assert [(await c.read())["params"]["seq"] for _ in range(2)] == [3, 4]


async def test_unix_socket_is_0600_and_needs_no_auth(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        assert stat.S_IMODE(os.stat(srv.socket_path).st_mode) == 0o600
        c = await srv.unix()
        assert (await c.call("whoami"))["result"] == {"kind": "unix", "authenticated": True}
    assert not srv.socket_path.exists()  # removed on the way out


async def test_tcp_needs_auth_first(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        c = await srv.tcp()
        assert (await c.call("whoami"))["error"]["code"] == -32001
        assert (await c.call("nope"))["error"]["code"] == -32601
        assert (await c.call("auth", {"token": "guess"}))["error"]["code"] == -32001
        assert (await c.call("whoami"))["error"]["code"] == -32001
        assert (await c.call("auth", {"token": TOKEN}))["result"] == {"ok": True}
        assert (await c.call("whoami"))["result"]["authenticated"] is True
        other = await srv.tcp()  # authentication belongs to the connection
        assert (await other.call("whoami"))["error"]["code"] == -32001


async def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: what a killed daemon leaves
    async with running(tmp_path, tcp=False) as srv:
        assert (await (await srv.unix()).call("echo", {}))["result"] == {}
        second = Server(Dispatcher([]), EventBus(16))
        with pytest.raises(ListenError, match="already listening"):
            await second.serve(unix=path)
        assert (await (await srv.unix()).call("echo", {}))["result"] == {}
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(ListenError, match="not a socket"):
        await Server(Dispatcher([]), EventBus(16)).serve(unix=tmp_path / "plain")
    assert (tmp_path / "plain").read_text() == "not a socket"


async def test_an_inherited_listening_socket_is_served(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    bus = EventBus(16)
    server = Server(Dispatcher(transport_methods(bus)), bus)
    async with anyio.create_task_group() as tg:
        endpoint = await tg.start(
            lambda task_status: server.serve(sockets=[sock], task_status=task_status)
        )
        assert endpoint == {"tcp": ["127.0.0.1", port], "unix": None}
        c = LineClient(await anyio.connect_tcp("127.0.0.1", port))
        assert (await c.call("auth", {"token": TOKEN}))["result"] == {"ok": True}
        await c.aclose()
        tg.cancel_scope.cancel()


async def test_close_says_goodbye_and_flushes(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        idle = await srv.unix()
        watcher = await srv.unix()
        await watcher.call("subscribe", {})
        busy = await srv.unix()
        await busy.send({"jsonrpc": "2.0", "id": 9, "method": "sleep", "params": {"seconds": 0.3}})
        await anyio.sleep(0.05)
        srv.bus.publish("daemon.stopping", None, {"mode": "graceful"})
        with anyio.fail_after(5):
            await srv.server.close(grace=2.0)
        assert srv.server.connection_count == 0
        notice = await idle.read()
        assert notice["params"]["type"] == "daemon.stopping" and notice["params"]["seq"] == 0
        assert await idle.read_eof() == b""
        event = await watcher.read()  # the bus's numbered event, and no second notice
        assert event["params"]["type"] == "daemon.stopping" and event["params"]["seq"] == 1
        assert await watcher.read_eof() == b""
        assert (await busy.read())["id"] == 9  # the request in flight was answered first
        assert (await busy.read())["params"]["type"] == "daemon.stopping"
