"""The daemon's method table: thin adapters from decoded params to the services.

Each method's params arrive already decoded into their protocol Struct (the dispatcher
did that); each returns a protocol Struct. Errors are raised as WangenError subclasses
and mapped to JSON-RPC errors in one place, the dispatcher.
"""

from __future__ import annotations

from typing import Any, Protocol

import anyio

from ..errors import ShuttingDown, Unauthorized
from ..protocol import (
    AbortParams,
    AuthParams,
    JobRef,
    JobsParams,
    JobSpec,
    ModelsResult,
    MoveParams,
    OkResult,
    PauseParams,
    ShutdownParams,
    StatusParams,
    StatusResult,
    SubscribeParams,
)
from .jsonrpc import Dispatcher, Method

__all__ = ["Services", "build_dispatcher"]

WRONG_TOKEN_DELAY = 0.2  # slows guessing; only the guessing connection waits


class Services(Protocol):
    controller: Any  # queue.controller.QueueController
    bus: Any  # events.EventBus
    accepting: bool

    def status(self) -> StatusResult: ...
    def models(self) -> ModelsResult: ...
    def check_token(self, token: str) -> bool: ...
    def request_shutdown(self, mode: str) -> None: ...


def build_dispatcher(services: Services) -> Dispatcher:
    def accepting() -> None:
        if not services.accepting:
            raise ShuttingDown("the daemon is shutting down and takes no new work")

    async def auth(conn: Any, p: AuthParams) -> OkResult:
        if not services.check_token(p.token):
            await anyio.sleep(WRONG_TOKEN_DELAY)
            raise Unauthorized("wrong token")
        conn.authenticated = True
        return OkResult()

    async def enqueue(conn: Any, spec: JobSpec) -> Any:
        accepting()
        return services.controller.enqueue(spec)

    async def status(conn: Any, p: StatusParams) -> Any:
        return services.status() if p.job is None else services.controller.job(p.job)

    async def pause(conn: Any, p: PauseParams) -> Any:
        return services.controller.pause(p.mode)

    async def resume(conn: Any, p: None) -> Any:
        return services.controller.resume()

    async def abort(conn: Any, p: AbortParams) -> Any:
        return services.controller.abort(p.job)

    async def subscribe(conn: Any, p: SubscribeParams) -> Any:
        result, replay = services.bus.subscribe(conn, p.since, p.jobs)
        conn.hold_events_until_reply(replay)
        return result

    async def unsubscribe(conn: Any, p: None) -> OkResult:
        services.bus.unsubscribe(conn)
        return OkResult()

    async def jobs(conn: Any, p: JobsParams) -> Any:
        return services.controller.jobs(p.state, p.limit)

    async def clear(conn: Any, p: None) -> Any:
        return services.controller.clear()

    async def retry(conn: Any, p: JobRef) -> Any:
        accepting()
        return services.controller.retry(p.job)

    async def move(conn: Any, p: MoveParams) -> Any:
        return services.controller.move(p.job, p.position)

    async def models(conn: Any, p: None) -> Any:
        return services.models()

    async def shutdown(conn: Any, p: ShutdownParams) -> OkResult:
        # The reply is queued before the stop begins, so the caller sees it.
        services.request_shutdown(p.mode)
        return OkResult()

    return Dispatcher(
        [
            Method("auth", auth, AuthParams, requires_auth=False),
            Method("enqueue", enqueue, JobSpec),
            Method("status", status, StatusParams),
            Method("pause", pause, PauseParams),
            Method("resume", resume),
            Method("abort", abort, AbortParams),
            Method("subscribe", subscribe, SubscribeParams),
            Method("unsubscribe", unsubscribe),
            Method("jobs", jobs, JobsParams),
            Method("clear", clear),
            Method("retry", retry, JobRef),
            Method("move", move, MoveParams),
            Method("models", models),
            Method("shutdown", shutdown, ShutdownParams),
        ]
    )
