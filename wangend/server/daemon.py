"""The daemon's lifecycle, top to bottom: build, start, serve, stop.

`Daemon` builds every long-lived object in one place, in dependency order, and tears them
down in reverse. It is also the `Services` object the RPC method table talks to, so the
methods never reach into the objects' wiring.

    startup    state dir, lock, token, store (recovers after a crash), registry, warm-model
               manager, runtime, inputs, event bus, queue controller, listeners
    serve      the controller's scheduling loop and the listeners run in one task group;
               `endpoint.json` tells clients where the daemon listens
    shutdown   on SIGTERM/SIGINT, the `shutdown` call or the test's trigger: stop taking
               work; give the running job `stop_grace` seconds to finish (0: none), then
               suspend it at its next step boundary (its resume point is written) and put
               it back in the queue (a second signal cuts the grace short); say goodbye
               to connections, close the store, release the lock

Startup failures are StartupErrors with one clear sentence and an exit code (cli.py):
2 for what a restart cannot fix (bad state dir, token file, a corrupt or newer queue
database), 3 for what another process holds (the state dir's lock file, the SQLite
database, the TCP port or the Unix socket), 1 for anything else.

Under systemd (server/systemd.py) the daemon says READY=1 once the store is open and the
listeners are up (before any model loads), keeps STATUS= current (at most once a second),
pings the watchdog from the event loop and says STOPPING=1 when it starts to stop. With
socket activation it serves the inherited sockets and binds nothing itself. SIGHUP
re-reads the config: `log_level` applies at once, other changes are logged as needing a
restart.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from .. import __version__
from ..config import ConfigError, ServerConfig
from ..errors import StoreUnavailable
from ..logs import set_log_level
from ..pipelines.production import resolve_device
from ..protocol import (
    JobSpec,
    LorasResult,
    ModelsResult,
    PresetsResult,
    StatusResult,
    ValidateResult,
)
from ..queue.controller import QueueController
from ..queue.store import JobStore
from .engine import Engine
from .events import EventBus, notification_line
from .rpc import build_dispatcher
from .statedir import (
    StartupError,
    StateLock,
    database_errors,
    is_loopback,
    load_or_create_token,
    prepare_state_dir,
    socket_host,
    tokens_match,
)
from .systemd import Notifier, watchdog_interval
from .transport import ListenError, Server

__all__ = ["Daemon", "StartupError", "run_daemon"]

log = logging.getLogger("wangend")

SEQ_META_KEY = "event_seq_reserved"
SEQ_BLOCK = 100_000
STATUS_INTERVAL = 1.0  # seconds between STATUS= updates to systemd, at most one each
# keys SIGHUP applies at once ([lora] folders and [enhancer] through the engine)
RELOADABLE = frozenset({"log_level", "stop_grace", "lora", "enhancer", "models"})


def check_device(device: str) -> None:
    """Refuse, before anything is built, a `device` this machine cannot give ("cuda"
    without a GPU, "gpu0"): a restart cannot fix it, so it is a config error (exit 2)
    told in one line, not a traceback from deep inside the engine."""
    try:
        resolve_device(device)
    except ValueError as exc:  # a GPU asked for that this machine does not have
        raise StartupError(f"invalid value for device: {exc}; use cpu or auto", 2) from None
    except RuntimeError:  # torch's answer to a string that names no device
        raise StartupError(
            f"invalid value for device: {device!r} is no device; use auto, cpu, cuda or cuda:N",
            2,
        ) from None


class Daemon:
    """Owns the daemon's objects and implements the RPC layer's `Services`."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        notifier: Notifier | None = None,
        sockets: list[socket.socket] | None = None,
        watchdog: float | None = None,
    ) -> None:
        """`sockets`: inherited listeners (socket activation), served instead of the
        configured addresses. `watchdog`: seconds between WATCHDOG=1 pings."""
        self.config = config
        self.notifier = notifier or Notifier(None)
        self._sockets = sockets
        self._watchdog = watchdog
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
        check_device(cfg.device)
        prepare_state_dir(cfg.state_path)
        self._lock.acquire()
        self._token = load_or_create_token(cfg.token_path)
        self._warn_if_exposed()
        try:
            cfg.output_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cannot create output dir {cfg.output_dir}: {exc.strerror}"
            raise StartupError(msg, 2) from None
        with database_errors(cfg.db_path):
            self.store = JobStore(cfg.db_path)
        quiet_library_progress_bars()
        try:
            self.engine = Engine(cfg)
        except ConfigError as exc:
            raise StartupError(f"config: {exc}", 2) from None
        for name, why in self.engine.registry.unusable([cfg.model, *cfg.models]).items():
            log.warning("model %s cannot be used now (jobs naming it are refused): %s", name, why)
        with database_errors(cfg.db_path):  # the first reads and the crash recovery
            self.bus = EventBus(
                cfg.event_buffer,
                start_after=int(self.store.get_meta(SEQ_META_KEY) or 0),
                reserve=self._reserve_seqs,
            )
            self.controller = QueueController(
                self.store,
                self.engine.router,
                self.engine,
                self.bus.publish,
                max_attempts=cfg.max_attempts,
            )
            self.engine.sweep_resume_points(self.store.queue_order())
        self.server = Server(
            build_dispatcher(self),
            self.bus,
            max_line_bytes=cfg.max_line_bytes,
            subscriber_buffer=cfg.subscriber_buffer,
            auth_timeout=cfg.auth_timeout,
        )

    def _warn_if_exposed(self) -> None:
        """TCP on an address other hosts can reach: say so, loudly, once. The token
        file (created just before) is what stands between the network and the GPU."""
        cfg = self.config
        if self._sockets is not None:
            addresses = [socket_host(s) for s in self._sockets]
        else:
            addresses = [cfg.host] if cfg.tcp else []
        for host in addresses:
            if host is None or is_loopback(host):
                continue
            if not cfg.token_path.is_file():  # build() made it; never listen without one
                raise StartupError(f"no token file {cfg.token_path}; refusing to listen on {host}")
            log.warning(
                "TCP listens on %s, reachable from other machines: every client needs the "
                "token in %s (keep it 0600); firewall the port or bind 127.0.0.1 if that "
                "is not what you want",
                host,
                cfg.token_path,
            )

    def _reserve_seqs(self, seq: int) -> int:
        """Persist a new upper bound for event numbers: one write per SEQ_BLOCK events,
        and a restart (even after kill -9) continues above every number ever used."""
        limit = seq + SEQ_BLOCK
        try:
            self.store.set_meta(SEQ_META_KEY, str(limit))
        except StoreUnavailable as exc:  # a full disk must not stop every event
            log.error("event numbers past %d are not reserved: %s", seq, exc.message)
        return limit

    def _teardown(self) -> None:
        self.notifier.close()
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
        failure: StartupError | None = None
        served = False
        try:
            self.build()
            async with anyio.create_task_group() as tg:
                # Listen first: an address in use must stop the start before any job runs.
                try:
                    endpoint = await tg.start(self._serve_listeners)
                except ListenError as exc:  # raised here, unwrapped by the task group
                    failure = StartupError(_listen_failure(exc), 3)
                else:
                    served = True
                    await self._serving(tg, endpoint, shutdown_trigger, task_status)
                    tg.cancel_scope.cancel()
        finally:
            self._teardown()
            if served:  # a refused start says only why (the caller logs that)
                log.info("wangend stopped")
        if failure is not None:
            raise failure

    async def _serving(
        self,
        tg: anyio.abc.TaskGroup,
        endpoint: dict[str, Any],
        shutdown_trigger: Callable[[], Awaitable[Any]] | None,
        task_status: anyio.abc.TaskStatus[dict[str, Any]],
    ) -> None:
        """The listeners are up: start the queue, say ready, wait for the stop."""
        await tg.start(self.controller.run)
        self.accepting = True
        self._write_endpoint(endpoint)
        log.info("wangend %s ready (%s)", __version__, self._describe(endpoint))
        self.notifier.ready(self.status_line())
        if self.notifier.enabled:
            tg.start_soon(self._report_status)
            if self._watchdog:
                tg.start_soon(self._ping_watchdog, self._watchdog)
        task_status.started(endpoint)
        if shutdown_trigger is not None:
            tg.start_soon(self._stop_on, shutdown_trigger)
        await self._stop_requested.wait()
        await self._shutdown()

    async def _serve_listeners(self, *, task_status: anyio.abc.TaskStatus[dict[str, Any]]) -> None:
        cfg = self.config
        if self._sockets is not None:  # socket activation: systemd owns the addresses
            await self.server.serve(sockets=self._sockets, task_status=task_status)
            return
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
        mode = self._stop_mode
        grace = self.config.stop_grace if mode == "graceful" else 0.0
        log.info("shutting down (%s%s)", mode, f", {grace:g} s grace" if grace else "")
        self.notifier.stopping(f"stopping ({mode})")
        stopping = self.bus.publish("daemon.stopping", None, {"mode": mode, "grace": grace})
        with anyio.CancelScope(shield=True):
            await self.controller.stop(mode, grace=grace)
            await self.server.close(goodbye=notification_line(stopping))

    async def _report_status(self) -> None:
        """Keep systemd's STATUS= current: woken by any event, at most once a second."""
        changed = _ChangeFlag()
        self.bus.subscribe(changed)
        last = ""
        try:
            while True:
                await changed.wait()
                if not self.accepting:  # STOPPING=1 has said the last word
                    return
                text = self.status_line()
                if text != last:
                    self.notifier.status(text)
                    last = text
                await anyio.sleep(STATUS_INTERVAL)
        finally:
            self.bus.unsubscribe(changed)

    async def _ping_watchdog(self, interval: float) -> None:
        """From the event loop, so a wedged loop stops the pings and systemd restarts us."""
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    def status_line(self) -> str:
        """One line for `systemctl status`: queue depth and the running job's step."""
        paused, _mode, counts, running = self.controller.snapshot()
        parts = [f"{counts.queued} queued"]
        if running is not None:
            step = f" step {running.step}/{running.steps}" if running.steps else ""
            parts.append(f"job {running.job} {running.state}{step} ({running.phase})")
        if paused:
            parts.append("queue paused")
        return "; ".join(parts)

    def reload_config(self, new: ServerConfig) -> list[str]:
        """Apply what SIGHUP may change; log the rest as needing a restart. Returns the
        names of the keys that changed."""
        old = msgspec.structs.asdict(self.config)
        fresh = msgspec.structs.asdict(new)
        changed = sorted(k for k in fresh if fresh[k] != old[k])
        if not changed:
            log.info("config reloaded: nothing changed")
            return changed
        applied = {k: fresh[k] for k in changed if k in RELOADABLE}
        if "log_level" in applied:
            set_log_level(applied["log_level"])
        if {"lora", "enhancer", "models"} & applied.keys() and hasattr(self, "engine"):
            done = self.engine.reload(new)
            if "models" in applied and "models" not in done:  # refused: logged there
                del applied["models"]
                changed.remove("models")
        for key in changed:
            if key in applied:
                log.info("config reloaded: %s = %r (applied)", key, fresh[key])
            else:
                log.warning("config reloaded: %s changed; takes effect after a restart", key)
        self.config = msgspec.structs.replace(self.config, **applied)
        return changed

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

    @property
    def stopping(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.is_set()

    def requeue_now(self) -> bool:
        """A second stop signal: end the grace period, requeue the running job now.
        False when there is nothing left to hurry (the caller then exits at once)."""
        return hasattr(self, "controller") and self.controller.requeue_running()

    def check_token(self, token: str) -> bool:
        return tokens_match(self._token, token)

    def status(self) -> StatusResult:
        paused, pause_mode, counts, running = self.controller.snapshot()
        return StatusResult(
            version=__version__,
            pid=os.getpid(),
            uptime=time.time() - self.started_at,
            device=self.engine.router.device,
            paused=paused,
            pause_mode=pause_mode,
            model=self.engine.router.loaded_model,
            queue=counts,
            running=running,
            last_seq=self.bus.last_seq,
            started_at=self.started_at,
            pause_reason=self.controller.pause_reason if paused else None,
        )

    def models(self) -> ModelsResult:
        return self.engine.models()

    def validate(self, spec: JobSpec) -> ValidateResult:
        return self.engine.validate(spec)

    def loras(self, model: str | None, state: bool) -> LorasResult:
        return self.engine.loras(model, state)

    def presets(self) -> PresetsResult:
        return self.engine.presets()


class _ChangeFlag:
    """A bus subscriber that only notes that something happened."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def deliver(self, seq: int, line: bytes) -> bool:
        self._event.set()
        return True

    def dropped(self, reason: str) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


def _listen_failure(exc: ListenError) -> str:
    """One line for an address the daemon cannot listen on, and what to do."""
    message = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE and "another daemon" not in message:
        return f"{message}; another program holds it: stop it, or choose another --port/--socket"
    return message


def quiet_library_progress_bars() -> None:
    """tqdm bars from diffusers/transformers would flood the daemon's log; the daemon
    reports loading and steps as events instead. The libraries' own log handlers go
    too: their records reach the daemon's handler (level, time, journald priority)
    instead of being printed a second time, raw."""
    import diffusers.utils.logging
    import huggingface_hub.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()
    logging.getLogger("huggingface_hub").handlers.clear()
    huggingface_hub.utils.logging.enable_propagation()


def run_daemon(
    config: ServerConfig,
    *,
    reload: Callable[[], ServerConfig] | None = None,
    sockets: list[socket.socket] | None = None,
) -> int:
    """Run until stopped. The first SIGTERM/SIGINT stops gracefully (with the config's
    `stop_grace`); a second one during the grace period requeues the running job now,
    and one after that exits at once with 1.
    SIGHUP calls `reload()` for a fresh config (an error there is logged, nothing more).
    `sockets`: inherited listeners (server/systemd.py `listen_sockets`)."""

    async def main() -> None:
        daemon = Daemon(
            config, notifier=Notifier.from_env(), sockets=sockets, watchdog=watchdog_interval()
        )
        try:
            daemon.build()  # outside the task group, so a StartupError arrives unwrapped
        except BaseException:
            daemon._teardown()
            raise
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                with anyio.open_signal_receiver(*wanted) as signals:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            reload_now()
                            continue
                        name = signal.Signals(signum).name
                        if daemon.stopping:
                            if daemon.requeue_now():
                                log.warning(
                                    "%s while stopping: hurrying the running job back to the queue",
                                    name,
                                )
                                continue
                            log.warning("another %s: stopping now", name)
                            os._exit(1)
                        log.info("%s received", name)
                        daemon.request_shutdown("graceful")

            def reload_now() -> None:
                if reload is None:
                    log.info("SIGHUP received; nothing to reload")
                    return
                log.info("SIGHUP received: reloading the config")
                try:
                    daemon.reload_config(reload())
                except Exception as exc:  # a broken file must not stop a running daemon
                    log.error("config reload failed, keeping the old config: %s", exc)

            tg.start_soon(on_signals)
            try:
                await daemon.serve()
            except StartupError as exc:  # outside the task group, so it arrives unwrapped
                failure.append(exc)
            tg.cancel_scope.cancel()

    failure: list[StartupError] = []
    anyio.run(main)
    if failure:
        raise failure[0]
    return 0
