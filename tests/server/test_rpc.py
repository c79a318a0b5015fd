"""The daemon's method table over a real transport, against a fake set of services.

Whether each method does the right thing to the queue is the controller's and the
end-to-end tests' business; here: names, params decoding, auth, error mapping, and the
ordering promises (subscribe's reply before its replay, shutdown's reply before the stop).
"""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from wangend.errors import UnknownJob
from wangend.protocol import (
    ClearResult,
    EnqueueResult,
    JobRecord,
    JobsResult,
    ModelsResult,
    MoveResult,
    QueueCounts,
    QueueStateResult,
    ResolvedGenerate,
    StatusResult,
)
from wangend.server.events import EventBus, notification_line
from wangend.server.rpc import WRONG_TOKEN_DELAY, build_dispatcher
from wangend.server.transport import Server

from .support import LineClient

pytestmark = pytest.mark.anyio

TOKEN = "correct-horse"
SPEC = ResolvedGenerate(
    model="tiny", source="tiny", prompt="p", negative_prompt="", width=32, height=32,
    frames=5, steps=2, guidance_scale=1.0, seed=1, fps=8, flow_shift=3.0, output_name="x",
)  # fmt: skip


def record(job: int) -> JobRecord:
    return JobRecord(id=job, state="queued", spec=SPEC)


class FakeController:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _note(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    async def enqueue_async(self, spec: Any) -> EnqueueResult:
        return self.enqueue(spec)

    def enqueue(self, spec: Any) -> EnqueueResult:
        self._note("enqueue", spec)
        return EnqueueResult(job=1, state="queued", position=0, spec=SPEC)

    def job(self, job_id: int) -> JobRecord:
        self._note("job", job_id)
        if job_id != 1:
            raise UnknownJob(job_id)
        return record(1)

    def pause(self, mode: str) -> QueueStateResult:
        self._note("pause", mode)
        return QueueStateResult(paused=True, mode=mode)

    def resume(self) -> QueueStateResult:
        self._note("resume")
        return QueueStateResult(paused=False)

    def abort(self, job_id: int | None) -> JobRecord:
        self._note("abort", job_id)
        return record(job_id or 1)

    def jobs(self, states: Any, limit: int) -> JobsResult:
        self._note("jobs", states, limit)
        return JobsResult(jobs=[record(1)])

    def clear(self) -> ClearResult:
        self._note("clear")
        return ClearResult(cancelled=[3, 4])

    def retry(self, job_id: int, enhance: bool = False) -> EnqueueResult:
        self._note("retry", job_id)
        return EnqueueResult(job=2, state="queued", position=0, spec=SPEC)

    def move(self, job_id: int, position: int) -> MoveResult:
        self._note("move", job_id, position)
        return MoveResult(job=job_id, position=position)


class FakeServices:
    def __init__(self, bus: EventBus) -> None:
        self.controller = FakeController()
        self.bus = bus
        self.accepting = True
        self.shutdowns: list[str] = []
        self.stop = anyio.Event()
        self.server: Server | None = None
        self.reply_was_queued: bool | None = None

    def status(self) -> StatusResult:
        return StatusResult(
            version="t", pid=1, uptime=0.0, device="cpu", paused=False, pause_mode=None,
            model=None, queue=QueueCounts(), running=None, last_seq=self.bus.last_seq,
        )  # fmt: skip

    def models(self) -> ModelsResult:
        return ModelsResult(models=[])

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), TOKEN.encode())

    def request_shutdown(self, mode: str) -> None:
        assert self.server is not None
        queued = [line for conn in self.server._connections for line, _ in conn._out]
        self.reply_was_queued = any(b'"result":{"ok":true}' in line for line in queued)
        self.shutdowns.append(mode)
        self.stop.set()


class Daemonish:
    def __init__(self, services: FakeServices, server: Server, endpoint: dict[str, Any]):
        self.services = services
        self.server = server
        self.endpoint = endpoint
        self.clients: list[LineClient] = []

    async def unix(self) -> LineClient:
        self.clients.append(LineClient(await anyio.connect_unix(self.endpoint["unix"])))
        return self.clients[-1]

    async def tcp(self) -> LineClient:
        port = self.endpoint["tcp"][1]
        self.clients.append(LineClient(await anyio.connect_tcp("127.0.0.1", port)))
        return self.clients[-1]


@contextlib.asynccontextmanager
async def daemonish(tmp_path: Path) -> AsyncIterator[Daemonish]:
    """The wiring server/daemon.py does, minus the queue: services, dispatcher, server."""
    bus = EventBus(100)
    services = FakeServices(bus)
    server = services.server = Server(build_dispatcher(services), bus)

    async def stop_on_request() -> None:
        await services.stop.wait()
        stopping = bus.publish("daemon.stopping", None, {"mode": services.shutdowns[-1]})
        await server.close(grace=1.0, goodbye=notification_line(stopping))

    async with anyio.create_task_group() as tg:
        endpoint = await tg.start(
            lambda task_status: server.serve(
                tcp=("127.0.0.1", 0), unix=tmp_path / "d.sock", task_status=task_status
            )
        )
        tg.start_soon(stop_on_request)
        d = Daemonish(services, server, endpoint)
        try:
            yield d
        finally:
            for c in d.clients:
                with contextlib.suppress(Exception):
                    await c.aclose()
            await server.close(grace=0.5)
            tg.cancel_scope.cancel()


async def test_every_method_maps_to_its_service(tmp_path: Path) -> None:
    async with daemonish(tmp_path) as d:
        c = await d.unix()
        ctl = d.services.controller
        assert (await c.call("enqueue", {"prompt": "a fox", "steps": 4}))["result"]["job"] == 1
        name, (spec,) = ctl.calls[-1]
        assert name == "enqueue" and spec.prompt == "a fox" and spec.steps == 4
        assert (await c.call("status"))["result"]["version"] == "t"
        assert (await c.call("status", {"job": 1}))["result"]["id"] == 1
        assert (await c.call("pause"))["result"] == {"paused": True, "mode": "now"}
        assert (await c.call("pause", {"mode": "after_current"}))["result"][
            "mode"
        ] == "after_current"
        assert (await c.call("resume", {}))["result"] == {"paused": False, "mode": None}
        assert (await c.call("abort"))["result"]["id"] == 1
        assert (await c.call("abort", {"job": 5}))["result"]["id"] == 5
        assert (await c.call("jobs", {"state": ["queued"], "limit": 5}))["result"]["jobs"][0][
            "id"
        ] == 1
        assert (await c.call("clear"))["result"] == {"cancelled": [3, 4]}
        assert (await c.call("retry", {"job": 1}))["result"]["job"] == 2
        assert (await c.call("move", {"job": 1, "position": 0}))["result"] == {
            "job": 1,
            "position": 0,
        }
        assert (await c.call("models"))["result"] == {"models": []}
        assert (await c.call("unsubscribe"))["result"] == {"ok": True}
        assert [name for name, _ in ctl.calls] == [
            "enqueue", "job", "pause", "pause", "resume", "abort", "abort", "jobs", "clear",
            "retry", "move",
        ]  # fmt: skip
        assert ctl.calls[-5] == ("abort", (5,)) and ctl.calls[-4] == ("jobs", (["queued"], 5))


async def test_errors_are_mapped(tmp_path: Path) -> None:
    async with daemonish(tmp_path) as d:
        c = await d.unix()
        error = (await c.call("enqueue", {"prompt": "x", "steps": 0}))["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.steps"
        error = (await c.call("enqueue", {"prompt": "x", "stepz": 3}))["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.stepz"
        error = (await c.call("pause", {"mode": "later"}))["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.mode"
        assert (await c.call("status", {"job": 99}))["error"]["code"] == -32002
        assert (await c.call("jobs", {"limit": 0}))["error"]["code"] == -32602
        assert (await c.call("clear", {"all": True}))["error"]["code"] == -32602
        d.services.accepting = False
        assert (await c.call("enqueue", {"prompt": "x"}))["error"]["code"] == -32005
        assert (await c.call("retry", {"job": 1}))["error"]["code"] == -32005
        assert "result" in await c.call("status")  # reads still work while stopping


async def test_tcp_auth_gate_and_a_slow_wrong_token(tmp_path: Path) -> None:
    async with daemonish(tmp_path) as d:
        guesser, other = await d.tcp(), await d.tcp()
        for method in ("enqueue", "status", "pause", "subscribe", "shutdown", "models"):
            assert (await guesser.call(method))["error"]["code"] == -32001
        assert (await guesser.call("no.such.method"))["error"]["code"] == -32001
        assert (await other.call("auth", {"token": TOKEN}))["result"] == {"ok": True}
        elapsed: dict[str, float] = {}

        async def guess() -> None:
            t0 = time.perf_counter()
            assert (await guesser.call("auth", {"token": "wrong"}))["error"]["code"] == -32001
            elapsed["guess"] = time.perf_counter() - t0

        async with anyio.create_task_group() as tg:
            tg.start_soon(guess)
            await anyio.sleep(0.02)
            t0 = time.perf_counter()
            assert "result" in await other.call("status")  # not held up by the guesser
            elapsed["other"] = time.perf_counter() - t0
        assert elapsed["guess"] >= WRONG_TOKEN_DELAY * 0.9
        assert elapsed["other"] < WRONG_TOKEN_DELAY / 2
        assert (await guesser.call("status"))["error"]["code"] == -32001
        unix = await d.unix()
        assert "result" in await unix.call("status")  # no token on the Unix socket
        assert (await unix.call("auth", {"token": "anything"}))["result"] == {"ok": True}


async def test_a_wrong_token_is_wrong_on_an_authenticated_connection_too(tmp_path: Path) -> None:
    async with daemonish(tmp_path) as d:
        c = await d.tcp()
        assert (await c.call("auth", {"token": TOKEN}))["result"] == {"ok": True}
        # a tool checking a token over an open connection must hear the truth ...
        reply = await c.call("auth", {"token": "definitely-wrong"})
        assert reply["error"] == {"code": -32001, "message": "wrong token"}
        # ... and the connection stays as it was: authenticated
        assert "result" in await c.call("status")
        assert (await c.call("auth", {"token": TOKEN}))["result"] == {"ok": True}


async def test_subscribe_replies_before_the_replay(tmp_path: Path) -> None:
    async with daemonish(tmp_path) as d:
        for job in (1, 2, 1):
            d.services.bus.publish("job.progress", job, {})
        c = await d.unix()
        await c.send(
            {"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": {"since": 0, "jobs": [1]}}
        )
        assert (await c.read())["result"] == {"last_seq": 3, "replayed": 2, "complete": True}
        assert [(await c.read())["params"]["seq"] for _ in range(2)] == [1, 3]
        d.services.bus.publish("job.progress", 1, {})
        assert (await c.read())["params"]["seq"] == 4


async def test_shutdown_replies_first_then_stops(tmp_path: Path) -> None:
    async with daemonish(tmp_path) as d:
        c = await d.unix()
        watcher = await d.unix()
        await watcher.call("subscribe", {})
        assert (await c.call("shutdown", {"mode": "finish"}))["result"] == {"ok": True}
        goodbye = await c.read()
        assert await c.read_eof() == b""
        event = await watcher.read()
        assert event["params"]["data"] == {"mode": "finish"}
        assert goodbye == event  # one event, one shape, for subscribers and the rest
        assert d.services.shutdowns == ["finish"] and d.services.reply_was_queued
