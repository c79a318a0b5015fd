"""The daemon's lifecycle, top to bottom: build, start, serve, stop.

`Daemon` builds every long-lived object in one place, in dependency order, and tears them
down in reverse. It is also the `Services` object the RPC method table talks to, so the
methods never reach into the objects' wiring.

    startup    state dir, lock, token, store (recovers after a crash), registry, warm-model
               manager, runtime, inputs, event bus, queue controller, listeners
    serve      the controller's scheduling loop and the listeners run in one task group;
               `endpoint.json` tells clients where the daemon listens
    shutdown   on SIGTERM/SIGINT, the `shutdown` call or the test's trigger: stop taking
               work, hold the running job at its next step and put it back in the queue,
               say goodbye to connections, close the store, release the lock
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from .. import __version__
from ..config import ServerConfig
from ..pipelines.inputs import TaskInputManager
from ..pipelines.production import ProductionManager
from ..pipelines.registry import ModelRegistry
from ..pipelines.runtime import GenerationRuntime
from ..protocol import ModelsResult, StatusResult
from ..queue.controller import QueueController
from ..queue.store import JobStore
from .events import EventBus
from .rpc import build_dispatcher
from .statedir import StartupError, StateLock, load_or_create_token, prepare_state_dir, tokens_match
from .transport import Server

__all__ = ["Daemon", "StartupError", "run_daemon"]

log = logging.getLogger("wangend")

SEQ_META_KEY = "event_seq_reserved"
SEQ_BLOCK = 100_000


class Daemon:
    """Owns the daemon's objects and implements the RPC layer's `Services`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.accepting = False
        self.started_at = time.time()
        self._stop_requested: anyio.Event | None = None
        self._stop_mode = "graceful"
        self._lock = StateLock(Path(config.state_dir))
        self._endpoint_file = Path(config.state_dir) / "endpoint.json"
        self._endpoint_written = False

    # --- building ---------------------------------------------------------------------

    def build(self) -> None:
        """Create every object; raises StartupError with a clear message. Idempotent."""
        if hasattr(self, "server"):
            return
        cfg = self.config
        prepare_state_dir(cfg.state_path)
        self._lock.acquire()
        self._token = load_or_create_token(cfg.token_path)
        try:
            cfg.output_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cannot create output dir {cfg.output_dir}: {exc.strerror}"
            raise StartupError(msg, 2) from None
        try:
            self.store = JobStore(cfg.db_path)
        except Exception as exc:  # a locked or corrupt database must be a clear message
            raise StartupError(f"cannot open the queue database {cfg.db_path}: {exc}", 1) from exc
        quiet_library_progress_bars()
        self.registry = ModelRegistry(cfg.models_path)
        self.production = ProductionManager(self.registry, cfg.device, cfg.dtype)
        self.runtime = GenerationRuntime(self.production, cfg.output_path)
        self.inputs = TaskInputManager(self.registry, cfg.model, self.production.dtype_name)
        self.bus = EventBus(
            cfg.event_buffer,
            start_after=int(self.store.get_meta(SEQ_META_KEY) or 0),
            reserve=self._reserve_seqs,
        )
        self.controller = QueueController(
            self.store, self.runtime, self.inputs, self.bus.publish, max_attempts=cfg.max_attempts
        )
        self.server = Server(
            build_dispatcher(self),
            self.bus,
            max_line_bytes=cfg.max_line_bytes,
            subscriber_buffer=cfg.subscriber_buffer,
        )

    def _reserve_seqs(self, seq: int) -> int:
        """Persist a new upper bound for event numbers: one write per SEQ_BLOCK events,
        and a restart (even after kill -9) continues above every number ever used."""
        limit = seq + SEQ_BLOCK
        self.store.set_meta(SEQ_META_KEY, str(limit))
        return limit

    def _teardown(self) -> None:
        if self._endpoint_written:  # never another daemon's
            with contextlib.suppress(FileNotFoundError):
                self._endpoint_file.unlink()
        for close in ("store", "production"):
            obj = getattr(self, close, None)
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close() if close == "store" else obj.release()
        self._lock.release()

    # --- lifecycle ----------------------------------------------------------------------

    async def serve(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
        task_status: anyio.abc.TaskStatus[dict[str, Any]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        self._stop_requested = anyio.Event()
        try:
            self.build()
            async with anyio.create_task_group() as tg:
                await tg.start(self.controller.run)
                endpoint = await tg.start(self._serve_listeners)
                self.accepting = True
                self._write_endpoint(endpoint)
                log.info("wangend %s ready (%s)", __version__, self._describe(endpoint))
                task_status.started(endpoint)
                if shutdown_trigger is not None:
                    tg.start_soon(self._stop_on, shutdown_trigger)
                await self._stop_requested.wait()
                await self._shutdown()
                tg.cancel_scope.cancel()
        finally:
            self._teardown()
            log.info("wangend stopped")

    async def _serve_listeners(self, *, task_status: anyio.abc.TaskStatus[dict[str, Any]]) -> None:
        cfg = self.config
        await self.server.serve(
            tcp=(cfg.host, cfg.port) if cfg.tcp else None,
            unix=Path(cfg.socket) if not cfg.no_socket else None,
            task_status=task_status,
        )

    async def _stop_on(self, trigger: Callable[[], Awaitable[Any]]) -> None:
        await trigger()
        self.request_shutdown("graceful")

    async def _shutdown(self) -> None:
        self.accepting = False
        log.info("shutting down (%s)", self._stop_mode)
        self.bus.publish("daemon.stopping", None, {"mode": self._stop_mode})
        with anyio.CancelScope(shield=True):
            await self.controller.stop(self._stop_mode)
            await self.server.close()

    def _write_endpoint(self, endpoint: dict[str, Any]) -> None:
        data = {"pid": os.getpid(), "version": __version__, **endpoint}
        tmp = self._endpoint_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._endpoint_file)
        self._endpoint_written = True

    @staticmethod
    def _describe(endpoint: dict[str, Any]) -> str:
        parts = []
        if endpoint.get("tcp"):
            host, port = endpoint["tcp"]
            parts.append(f"tcp://{host}:{port}")
        if endpoint.get("unix"):
            parts.append(f"unix://{endpoint['unix']}")
        return ", ".join(parts)

    # --- Services ------------------------------------------------------------------------

    def request_shutdown(self, mode: str = "graceful") -> None:
        self._stop_mode = mode
        if self._stop_requested is not None:
            self._stop_requested.set()

    def check_token(self, token: str) -> bool:
        return tokens_match(self._token, token)

    def status(self) -> StatusResult:
        paused, pause_mode, counts, running = self.controller.snapshot()
        return StatusResult(
            version=__version__,
            pid=os.getpid(),
            uptime=time.time() - self.started_at,
            device=self.runtime.device,
            paused=paused,
            pause_mode=pause_mode,
            model=self.runtime.loaded_model,
            queue=counts,
            running=running,
            last_seq=self.bus.last_seq,
        )

    def models(self) -> ModelsResult:
        return ModelsResult(
            models=self.registry.list(default=self.config.model, loaded=self.runtime.loaded_model)
        )


def quiet_library_progress_bars() -> None:
    """tqdm bars from diffusers/transformers would flood the daemon's log; the daemon
    reports loading and steps as events instead."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def run_daemon(config: ServerConfig) -> int:
    """Run until stopped; the first SIGTERM/SIGINT stops gracefully, a second one at once."""

    async def main() -> None:
        daemon = Daemon(config)
        try:
            daemon.build()  # outside the task group, so a StartupError arrives unwrapped
        except BaseException:
            daemon._teardown()
            raise
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        if daemon._stop_requested is not None and daemon._stop_requested.is_set():
                            log.warning("second %s: stopping now", signal.Signals(signum).name)
                            os._exit(1)
                        log.info("%s received", signal.Signals(signum).name)
                        daemon.request_shutdown("graceful")

            tg.start_soon(on_signals)
            await daemon.serve()
            tg.cancel_scope.cancel()

    anyio.run(main)
    return 0


def endpoint_of(state_dir: Path) -> dict[str, Any] | None:
    try:
        return msgspec.json.decode((state_dir / "endpoint.json").read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
