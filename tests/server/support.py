"""A real transport + dispatcher + EventBus on real sockets, with a small method table
defined here, and a line-reading client. The daemon's own table is tested end to end
in tests/e2e."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from wangend.errors import Unauthorized
from wangend.protocol import AuthParams, OkResult, SubscribeParams
from wangend.server.connection import Limits, Session
from wangend.server.events import EventBus
from wangend.server.jsonrpc import Dispatcher, Method
from wangend.server.transport import Server

TOKEN = "sesame"


class PublishParams(msgspec.Struct, forbid_unknown_fields=True):
    n: int = 1
    size: int = 0
    job: int | None = None


class SleepParams(msgspec.Struct):
    seconds: float


def transport_methods(bus: EventBus) -> list[Method]:
    async def auth(session: Session, p: AuthParams) -> OkResult:
        if p.token != TOKEN:
            raise Unauthorized("wrong token")
        session.authenticated = True
        return OkResult()

    async def whoami(session: Session, p: None) -> dict[str, Any]:
        return {"kind": session.kind, "authenticated": session.authenticated}

    async def echo(session: Session, p: dict[str, Any]) -> dict[str, Any]:
        return p

    async def publish(session: Session, p: PublishParams) -> dict[str, int]:
        pad = "x" * p.size
        for i in range(p.n):
            bus.publish("test.tick", p.job, {"i": i, "pad": pad})
        return {"last_seq": bus.last_seq}

    async def subscribe(session: Session, p: SubscribeParams) -> Any:
        return session.subscribe(p.since, p.jobs)

    async def unsubscribe(session: Session, p: None) -> OkResult:
        return OkResult(ok=session.unsubscribe())

    async def sleep(session: Session, p: SleepParams) -> OkResult:
        await anyio.sleep(p.seconds)
        return OkResult()

    return [
        Method("auth", auth, AuthParams, requires_auth=False),
        Method("whoami", whoami),
        Method("echo", echo, dict[str, Any]),
        Method("publish", publish, PublishParams),
        Method("subscribe", subscribe, SubscribeParams),
        Method("unsubscribe", unsubscribe),
        Method("sleep", sleep, SleepParams),
    ]


class LineClient:
    """Speaks NDJSON over an anyio stream; keeps nothing hidden from the test."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self._buf = b""
        self._id = 0

    async def send(self, message: Any) -> None:
        raw = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        await self.stream.send(raw)

    async def read_line(self, timeout: float = 10.0) -> bytes:
        with anyio.fail_after(timeout):
            while b"\n" not in self._buf:
                self._buf += await self.stream.receive()
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    async def read(self, timeout: float = 10.0) -> Any:
        return json.loads(await self.read_line(timeout))

    async def read_eof(self, timeout: float = 10.0) -> bytes:
        """Everything until the server closes; raises TimeoutError if it does not."""
        rest = self._buf
        with anyio.fail_after(timeout):
            while True:
                try:
                    rest += await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return rest

    async def call(self, method: str, params: Any = None) -> Any:
        self._id += 1
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._id}
        if params is not None:
            request["params"] = params
        await self.send(request)
        reply = await self.read()
        assert reply.get("id") == self._id, reply
        return reply

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Running:
    server: Server
    bus: EventBus
    endpoint: dict[str, Any]
    clients: list[LineClient] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.endpoint["tcp"][1]

    @property
    def socket_path(self) -> Path:
        return Path(self.endpoint["unix"])

    async def tcp(self) -> LineClient:
        client = LineClient(await anyio.connect_tcp("127.0.0.1", self.port))
        self.clients.append(client)
        return client

    async def unix(self) -> LineClient:
        client = LineClient(await anyio.connect_unix(self.socket_path))
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, limits: Limits | None = None, *, tcp: bool = True, unix: bool = True
) -> AsyncIterator[Running]:
    bus = EventBus(1000)
    server = Server(Dispatcher(transport_methods(bus)), bus, limits=limits or Limits())
    async with anyio.create_task_group() as tg:
        endpoint = await tg.start(
            lambda task_status: server.serve(
                tcp=("127.0.0.1", 0) if tcp else None,
                unix=tmp_path / "s.sock" if unix else None,
                task_status=task_status,
            )
        )
        state = Running(server, bus, endpoint)
        try:
            yield state
        finally:
            for client in state.clients:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await server.close(grace=1.0)
            tg.cancel_scope.cancel()
