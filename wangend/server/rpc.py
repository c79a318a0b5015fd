"""The daemon's method table: thin adapters from decoded params to the daemon's services.

Each handler gets its params already decoded into their protocol Struct (the dispatcher
did that, naming the field on error) and returns a protocol Struct. Errors are raised as
WangenError subclasses; the dispatcher maps them, in one place, to JSON-RPC errors.
Nothing here touches sockets: the connection's `Session` is the only link to the
transport, which is why the rules about ordering (the `subscribe` reply before its replay,
the `shutdown` reply before the stop) are kept by the Session, not re-implemented here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import anyio

from ..errors import ShuttingDown, Unauthorized
from ..protocol import (
    AbortParams,
    AuthParams,
    ClearResult,
    EnqueueResult,
    JobRecord,
    JobsParams,
    JobSpec,
    JobsResult,
    LorasParams,
    LorasResult,
    ModelsResult,
    MoveParams,
    MoveResult,
    OkResult,
    PauseParams,
    PresetsResult,
    QueueStateResult,
    RetryParams,
    ShutdownParams,
    StatusParams,
    StatusResult,
    SubscribeParams,
    SubscribeResult,
    ValidateResult,
    decode_job_spec,
)
from .jsonrpc import Dispatcher, Method

if TYPE_CHECKING:
    from ..queue.controller import QueueController
    from .connection import Session
    from .events import EventBus

__all__ = ["WRONG_TOKEN_DELAY", "Services", "build_dispatcher", "build_methods"]

# Slows token guessing. Only the guessing connection waits: anyio.sleep, not time.sleep.
WRONG_TOKEN_DELAY = 0.2


class Services(Protocol):
    """What the method table needs from the daemon (server/daemon.py implements it)."""

    controller: QueueController
    bus: EventBus
    accepting: bool  # False while shutting down: enqueue and retry answer -32005

    def status(self) -> StatusResult: ...
    def models(self) -> ModelsResult: ...
    def validate(self, spec: JobSpec) -> ValidateResult: ...
    def loras(self, model: str | None, state: bool) -> LorasResult: ...
    def presets(self) -> PresetsResult: ...
    def check_token(self, token: str) -> bool: ...  # constant-time inside
    def request_shutdown(self, mode: str) -> None: ...


def build_methods(services: Services) -> list[Method]:
    """The daemon's methods, bound to `services`."""

    def ensure_accepting() -> None:
        if not services.accepting:
            raise ShuttingDown("the daemon is shutting down and takes no new work")

    async def auth(session: Session, p: AuthParams) -> OkResult:
        if session.kind == "unix":  # the socket's 0600 mode is the check; no token here
            return OkResult()
        # Checked every time, also on a connection that already passed: a tool that
        # tests a token over an open connection must hear the truth. A wrong token does
        # not undo an earlier right one (the connection stays as it was).
        if not services.check_token(p.token):
            await anyio.sleep(WRONG_TOKEN_DELAY)
            raise Unauthorized("wrong token")
        session.authenticated = True
        return OkResult()

    async def enqueue(session: Session, spec: JobSpec) -> EnqueueResult:
        ensure_accepting()
        return await services.controller.enqueue_async(spec)

    async def status(session: Session, p: StatusParams) -> StatusResult | JobRecord:
        return services.status() if p.job is None else services.controller.job(p.job)

    async def pause(session: Session, p: PauseParams) -> QueueStateResult:
        return services.controller.pause(p.mode)

    async def resume(session: Session, p: None) -> QueueStateResult:
        return services.controller.resume()

    async def abort(session: Session, p: AbortParams) -> JobRecord:
        return services.controller.abort(p.job)

    async def subscribe(session: Session, p: SubscribeParams) -> SubscribeResult:
        return session.subscribe(p.since, p.jobs)

    async def unsubscribe(session: Session, p: None) -> OkResult:
        session.unsubscribe()
        return OkResult()

    async def jobs(session: Session, p: JobsParams) -> JobsResult:
        return services.controller.jobs(p.state, p.limit)

    async def clear(session: Session, p: None) -> ClearResult:
        return services.controller.clear()

    async def retry(session: Session, p: RetryParams) -> EnqueueResult:
        ensure_accepting()
        return services.controller.retry(p.job, enhance=p.enhance)

    async def move(session: Session, p: MoveParams) -> MoveResult:
        return services.controller.move(p.job, p.position)

    async def models(session: Session, p: None) -> ModelsResult:
        # Every folder in the models directory is checked (configs, weights headers).
        return await anyio.to_thread.run_sync(services.models)

    async def validate(session: Session, spec: JobSpec) -> ValidateResult:
        # Model and input checks read files: off the loop, so other clients stay served.
        return await anyio.to_thread.run_sync(services.validate, spec)

    async def loras(session: Session, p: LorasParams) -> LorasResult:
        return await anyio.to_thread.run_sync(services.loras, p.model, p.state)

    async def presets(session: Session, p: None) -> PresetsResult:
        return await anyio.to_thread.run_sync(services.presets)

    async def shutdown(session: Session, p: ShutdownParams) -> OkResult:
        mode = p.mode
        session.after_reply(lambda: services.request_shutdown(mode))  # the reply goes first
        return OkResult()

    return [
        Method("auth", auth, AuthParams, requires_auth=False),
        Method("enqueue", enqueue, JobSpec, decoder=decode_job_spec),
        Method("status", status, StatusParams),
        Method("pause", pause, PauseParams),
        Method("resume", resume),
        Method("abort", abort, AbortParams),
        Method("subscribe", subscribe, SubscribeParams),
        Method("unsubscribe", unsubscribe),
        Method("jobs", jobs, JobsParams),
        Method("clear", clear),
        Method("retry", retry, RetryParams),
        Method("move", move, MoveParams),
        Method("models", models),
        Method("shutdown", shutdown, ShutdownParams),
        Method("validate", validate, JobSpec, decoder=decode_job_spec),
        Method("loras", loras, LorasParams),
        Method("presets", presets),
    ]


def build_dispatcher(services: Services, **options: object) -> Dispatcher:
    """The daemon's Dispatcher; `options` go to Dispatcher (e.g. `engine=`)."""
    return Dispatcher(build_methods(services), **options)  # type: ignore[arg-type]
