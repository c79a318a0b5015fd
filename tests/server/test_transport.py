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
from wangend.server.events import EventBus, notification_line
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
        assert (await c.call("nope"))["error"]["code"] == -32001  # no list of what exists
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
        guest = await srv.tcp()  # never authenticated
        watcher = await srv.unix()
        await watcher.call("subscribe", {})
        busy = await srv.unix()
        await busy.send({"jsonrpc": "2.0", "id": 9, "method": "sleep", "params": {"seconds": 0.3}})
        await anyio.sleep(0.05)
        stopping = srv.bus.publish("daemon.stopping", None, {"mode": "graceful", "grace": 0.0})
        with anyio.fail_after(5):
            await srv.server.close(grace=2.0, goodbye=notification_line(stopping))
        assert srv.server.connection_count == 0
        event = await watcher.read()  # the bus's numbered event, and no second one
        assert event["params"]["type"] == "daemon.stopping" and event["params"]["seq"] == 1
        assert await watcher.read_eof() == b""
        # everyone else gets that very event, not a look-alike of another shape
        assert await idle.read() == event
        assert await idle.read_eof() == b""
        assert await guest.read() == event
        assert (await busy.read())["id"] == 9  # the request in flight was answered first
        assert await busy.read() == event


# --- bounds: what a client can make the server do ----------------------------------------


async def test_a_last_line_without_newline_is_answered_at_eof(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        tcp = await srv.tcp()
        await tcp.call("auth", {"token": TOKEN})
        for client in (await srv.unix(), tcp):
            # what `printf '%s' '{...}' | socat - UNIX-CONNECT:...` sends: no newline, EOF
            await client.send(b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"a":1}}\n')
            await client.send(b'{"jsonrpc":"2.0","id":"last","method":"echo","params":{"b":2}}')
            await client.stream.send_eof()
            assert (await client.read())["result"] == {"a": 1}
            assert await client.read() == {"jsonrpc": "2.0", "id": "last", "result": {"b": 2}}
            assert await client.read_eof() == b""
        truncated = await srv.unix()
        await truncated.send(b'{"jsonrpc":"2.0","id":"x"')
        await truncated.stream.send_eof()
        assert (await truncated.read())["error"]["code"] == -32700
        assert await truncated.read_eof() == b""


async def test_tcp_without_auth_in_time_is_told_and_closed(tmp_path: Path) -> None:
    async with running(tmp_path, Limits(auth_timeout=0.5)) as srv:
        silent = await srv.tcp()
        chatty = await srv.tcp()
        member = await srv.tcp()
        await member.call("auth", {"token": TOKEN})
        local = await srv.unix()
        started = anyio.current_time()
        for _ in range(3):  # requests do not buy time; only auth does
            assert (await chatty.call("whoami"))["error"]["code"] == -32001
            await anyio.sleep(0.1)
        for client in (silent, chatty):
            goodbye = await client.read(timeout=5)
            assert goodbye["id"] is None and goodbye["error"]["code"] == -32001
            assert goodbye["error"]["data"] == {"timeout": 0.5}
            assert await client.read_eof(timeout=5) == b""
        assert anyio.current_time() - started >= 0.4
        await anyio.sleep(0.3)  # past the deadline: the others are still served
        assert (await member.call("echo", {"in": 1}))["result"] == {"in": 1}
        assert (await local.call("echo", {"in": 2}))["result"] == {"in": 2}


async def test_a_batch_is_capped_and_cheap_before_auth(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        guest = await srv.tcp()
        # the audit's line: 1 MiB of `[1,1,...]` once came back as 40 MB of replies
        await guest.send(b"[" + b",".join([b"1"] * 524_287) + b"]\n")
        reply = await guest.read_line()
        assert len(reply) < 300
        assert json.loads(reply)["error"] == {
            "code": -32600,
            "message": "a batch may hold at most 1000 requests; this one holds 524287 "
            "(nothing was run)",
            "data": {"limit": 1000},
        }
        calls = [{"jsonrpc": "2.0", "id": i, "method": "publish"} for i in range(1000)]
        await guest.send(calls)
        replies = await guest.read()
        assert {r["error"]["code"] for r in replies} == {-32001} and len(replies) == 1000
        assert srv.bus.last_seq == 0  # nothing ran
        assert (await guest.call("auth", {"token": TOKEN}))["result"] == {"ok": True}


async def test_a_reply_too_large_for_the_connection_is_an_error_not_a_hangup(
    tmp_path: Path,
) -> None:
    limits = Limits(max_pending_bytes=256 * 1024)  # one reply may take 128 KiB
    async with running(tmp_path, limits) as srv:
        c = await srv.unix()
        reply = await c.call("echo", {"p": "y" * 300_000})
        assert reply["error"]["code"] == -32006 and reply["error"]["data"]["limit"] == 128 * 1024
        # a batch whose replies together would pass the budget: every element runs and
        # is answered; those past the limit say so with their own id
        batch = [
            {"jsonrpc": "2.0", "id": i, "method": "echo", "params": {"p": "z" * 10_000}}
            for i in range(30)
        ]
        batch.append({"jsonrpc": "2.0", "id": "tick", "method": "publish"})
        await c.send(batch)
        replies = await c.read()
        assert [r["id"] for r in replies] == [*range(30), "tick"]
        fitted = [r for r in replies[:30] if "result" in r]
        assert 10 <= len(fitted) < 30
        assert all(r["error"]["code"] == -32006 for r in replies[len(fitted) : 30])
        assert replies[-1]["result"] == {"last_seq": 1}  # ran, and its reply fitted
        assert (await c.call("echo", {"still": "here"}))["result"] == {"still": "here"}
