"""Control-plane figures: `status` round trip on one connection, and requests/s with many
concurrent clients. Prints numbers; asserts nothing.

Without --url it starts a server of its own in a child process (wangend's transport and
dispatcher with a trivial `status`), so server and clients each get a core:

    python bench/control_plane.py                      # built-in server, TCP 127.0.0.1
    python bench/control_plane.py --engine jsonrpcserver  # the dispatcher's other engine
    python bench/control_plane.py --url tcp://127.0.0.1:7870 --token-file TOKEN_FILE
    python bench/control_plane.py --url unix://$HOME/.local/state/wangend/wangend.sock
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"status"}\n'


# --- the built-in server (child process) -------------------------------------------------


def serve(engine: str) -> None:
    import anyio

    from wangend.protocol import QueueCounts, StatusParams, StatusResult
    from wangend.server.events import EventBus
    from wangend.server.jsonrpc import Dispatcher, Method
    from wangend.server.transport import Server

    started = time.time()

    async def status(session: object, p: StatusParams) -> StatusResult:
        return StatusResult(
            version="bench",
            pid=os.getpid(),
            uptime=time.time() - started,
            device="cpu",
            paused=False,
            pause_mode=None,
            model=None,
            queue=QueueCounts(),
            running=None,
            last_seq=0,
        )

    async def main() -> None:
        dispatcher = Dispatcher(
            [Method("status", status, StatusParams, requires_auth=False)], engine=engine
        )
        server = Server(dispatcher, EventBus(16))
        async with anyio.create_task_group() as tg:
            endpoint = await tg.start(
                lambda task_status: server.serve(tcp=("127.0.0.1", 0), task_status=task_status)
            )
            print(json.dumps(endpoint), flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
            tg.cancel_scope.cancel()

    anyio.run(main)


# --- clients ------------------------------------------------------------------------------------


def connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(parsed.path)
    else:
        sock = socket.create_connection((parsed.hostname, parsed.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def auth_line(token: str | None) -> bytes | None:
    if token is None:
        return None
    return (
        json.dumps(
            {"jsonrpc": "2.0", "id": 0, "method": "auth", "params": {"token": token}}
        ).encode()
        + b"\n"
    )


def round_trips(url: str, token: str | None, count: int) -> list[float]:
    """Sequential calls on one blocking socket: the server's latency, little client cost."""
    sock = connect(url)
    buf = b""

    def call(line: bytes) -> bytes:
        nonlocal buf
        sock.sendall(line)
        while b"\n" not in buf:
            buf += sock.recv(65536)
        reply, _, buf = buf.partition(b"\n")
        return reply

    if (line := auth_line(token)) is not None:
        call(line)
    first = json.loads(call(REQUEST))
    if "result" not in first:
        raise SystemExit(f"status failed: {first}")
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        call(REQUEST)
        times.append(time.perf_counter() - t0)
    sock.close()
    return times


class _Client(asyncio.Protocol):
    """One request in flight at a time, as a CLI or script would do."""

    def __init__(self, deadline: float, done: asyncio.Future[int], auth: bytes | None) -> None:
        self.deadline = deadline
        self.done = done
        self.auth = auth
        self.buf = b""
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.auth or REQUEST)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        replies = self.buf.count(b"\n")
        if not replies:
            return
        self.buf = self.buf[self.buf.rfind(b"\n") + 1 :]
        if self.auth is not None:
            self.auth, replies = None, replies - 1
        self.count += replies
        if time.perf_counter() >= self.deadline:
            self.transport.close()  # type: ignore[attr-defined]
            if not self.done.done():
                self.done.set_result(self.count)
            return
        self.transport.write(REQUEST)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.count)


async def throughput(url: str, token: str | None, clients: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    parsed = urlparse(url)
    futures = []
    deadline = time.perf_counter() + 0.3 + seconds
    for _ in range(clients):
        done: asyncio.Future[int] = loop.create_future()
        factory = lambda d=done: _Client(deadline, d, auth_line(token))  # noqa: E731
        if parsed.scheme == "unix":
            await loop.create_unix_connection(factory, parsed.path)
        else:
            await loop.create_connection(factory, parsed.hostname, parsed.port)
        futures.append(done)
    start = time.perf_counter()
    counts = await asyncio.gather(*futures)
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", help="tcp://host:port or unix:///path (default: a built-in server)"
    )
    parser.add_argument("--token-file", help="TCP token file (a real daemon needs one)")
    parser.add_argument("--engine", default="direct", choices=["direct", "jsonrpcserver"])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.engine)
        return
    token = Path(args.token_file).expanduser().read_text().strip() if args.token_file else None
    child = None
    url = args.url
    if url is None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--engine", args.engine],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        host, port = json.loads(child.stdout.readline())["tcp"]
        url = f"tcp://{host}:{port}"
    try:
        times = round_trips(url, token, args.round_trips)
        ms = sorted(t * 1000 for t in times)
        p50 = statistics.median(ms)
        p99 = ms[int(len(ms) * 0.99) - 1]
        label = f"built-in server, engine={args.engine}" if child else url
        print(f"control plane ({label}; {os.cpu_count()} cores)")
        print(
            f"  status round trip, 1 connection: p50 {p50:.3f} ms  p99 {p99:.3f} ms  (n={len(ms)})"
        )
        rate = asyncio.run(throughput(url, token, args.clients, args.seconds))
        print(f"  {args.clients} concurrent clients: {rate:,.0f} req/s over {args.seconds:g} s")
    finally:
        if child is not None:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=10)


if __name__ == "__main__":
    main()
