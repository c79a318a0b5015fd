"""Following a subscription across reconnects: every event once, in order.

This module exists because resuming is a policy on top of a connection, not part of
one: `EventFollower` opens connections with `connect()` (client.py), resubscribes with
`since` after a drop, skips what it already delivered, and notices a restarted daemon.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import anyio

from wangend.protocol import Event, StatusResult

from .client import Client, connect
from .errors import DaemonUnavailable

__all__ = ["EventFollower"]


class EventFollower:
    """Hands every event of a subscription to `handle` once and in order, across reconnects.

    When the connection drops (the daemon restarts, a subscriber is dropped for falling
    behind), it reconnects and resubscribes with `since` = the last seq it delivered, so
    the daemon's ring buffer fills the gap; replayed events it already delivered are
    skipped. A daemon that was never reached fails at once (nothing to resume); one that
    goes away is retried for `retry_for` seconds, and `on_notice` is told why the stream
    paused so a person watching is not left guessing.

    A restarted daemon is a new process (another pid or start time in `status`). Its
    sequence numbers go on after the old ones, so `since` still skips nothing new, and
    what it replays is all the new process holds; one that numbers afresh from 1 (an
    older wangend) is asked for everything. Either way the notice says the daemon
    restarted, not that events were dropped from its buffer: the old process's last
    events went with it, and the new one's `complete: false` only says so again.
    """

    def __init__(
        self,
        url: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        *,
        jobs: list[int] | None = None,
        since: int | None = None,
        env: Mapping[str, str] | None = None,
        retry_for: float = 30.0,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.token_file = token_file
        self.jobs = jobs
        self.env = env
        self.retry_for = retry_for
        self.on_notice = on_notice or (lambda _text: None)
        self.last_seq: int | None = since
        self.reconnects = 0
        self._daemon: tuple[int, float] | None = None  # (pid, start time) of the process

    async def run(self, handle: Callable[[Event], bool], client: Client | None = None) -> None:
        """Deliver events until `handle` returns True.

        `client`, when given, is a connection the caller has already subscribed (with
        `since` = this follower's `since`); it is used first, so a caller can subscribe,
        then enqueue, then follow without missing the events in between.
        """
        connected_once = client is not None
        # Reconnect to the address that answered, not to a fresh default lookup: while
        # the daemon restarts its socket file is briefly missing.
        url = client.where if client is not None else self.url
        lost_at: float | None = None
        delay = 0.1
        while True:
            try:
                if client is not None:
                    first, client = client, None
                    self._daemon = _process(await first.status())
                    if await self._pump(first, handle):
                        return
                else:
                    async with connect(url, self.token_file, env=self.env) as fresh:
                        if lost_at is not None:
                            self.on_notice(f"reconnected to {fresh.where}")
                        await self._subscribe(fresh)
                        if lost_at is not None:
                            self.reconnects += 1
                        connected_once, lost_at, delay = True, None, 0.1
                        url = fresh.where
                        if await self._pump(fresh, handle):
                            return
            except DaemonUnavailable as exc:
                if not connected_once:
                    raise
                now = anyio.current_time()
                if lost_at is None:
                    lost_at = now
                    self.on_notice(f"{exc}; reconnecting")
                elif now - lost_at >= self.retry_for:
                    raise
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _subscribe(self, client: Client) -> None:
        status = await client.status()
        daemon = _process(status)
        behind = self.last_seq is not None and status.last_seq < self.last_seq
        restarted = behind or _restarted(self._daemon, daemon)
        self._daemon = daemon
        if restarted and self.last_seq is not None:
            self.on_notice(
                f"the daemon restarted (now pid {status.pid}); catching up from its start"
            )
            if behind:  # it numbers from 1 again: our `since` would skip all it has
                self.last_seq = 0
        result = await client.subscribe(since=self.last_seq, jobs=self.jobs)
        if self.last_seq is None:
            self.last_seq = result.last_seq
        elif not result.complete and not restarted:
            self.on_notice(
                f"the daemon no longer holds the events after #{self.last_seq}; "
                "some progress was missed"
            )

    async def _pump(self, client: Client, handle: Callable[[Event], bool]) -> bool:
        """True when `handle` asked to stop; raises DaemonUnavailable when the link ends."""
        async for event in client.events():
            if event.seq == 0:
                # Out-of-sequence notices for this connection only.
                if event.type == "subscription.dropped":
                    self.on_notice("the daemon dropped this subscription; resubscribing")
                    await self._subscribe(client)
                continue
            if self.last_seq is not None and event.seq <= self.last_seq:
                continue  # already delivered before a reconnect
            self.last_seq = event.seq
            if handle(event):
                return True
        raise DaemonUnavailable(client.where, lost=True)


def _process(status: StatusResult) -> tuple[int, float]:
    """Which daemon process answered: its pid and when it started (to the second; a
    daemon older than `started_at` in `status` gives only its uptime)."""
    return status.pid, status.started_at or time.time() - status.uptime


def _restarted(before: tuple[int, float] | None, now: tuple[int, float]) -> bool:
    """A new pid, or the same pid started later (a container's pid 1 comes back as 1).
    A second's slack covers the clock moving between the two `status` calls."""
    if before is None:
        return False
    return now[0] != before[0] or now[1] - before[1] > 1.0
