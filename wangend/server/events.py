"""EventBus: daemon-wide event sequence, a ring buffer for resync, fan-out.

`publish` is synchronous and never waits: each event is encoded once into its
notification line and offered to every matching subscriber without blocking. A
subscriber that cannot take it (its connection's queue is full because the client stopped
reading) is dropped and told so; the daemon and the other subscribers never wait for it.
A client that reconnects asks `subscribe {"since": seq}` and gets what the ring buffer
still holds after `seq`, so it misses nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from ..protocol import Event, SubscribeResult

__all__ = ["EventBus", "Subscriber"]


class Subscriber(Protocol):
    def deliver(self, seq: int, line: bytes) -> bool:
        """Queue one notification line without blocking; False when over budget."""

    def dropped(self, reason: str) -> None:
        """The bus has removed this subscriber; tell the client (a final notice)."""


@dataclass(slots=True)
class _Entry:
    event: Event
    line: bytes


class _Notification(msgspec.Struct):
    params: Event
    jsonrpc: str = "2.0"
    method: str = "event"


class EventBus:
    def __init__(self, buffer: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._ring: deque[_Entry] = deque(maxlen=buffer)
        self._subs: dict[Subscriber, frozenset[int] | None] = {}
        self._seq = 0
        self._clock = clock
        self._encode = msgspec.json.Encoder().encode

    @property
    def last_seq(self) -> int:
        return self._seq

    def publish(self, type: str, job: int | None, data: dict[str, Any]) -> Event:
        self._seq += 1
        event = Event(seq=self._seq, ts=self._clock(), type=type, job=job, data=data)
        line = self._encode(_Notification(params=event)) + b"\n"
        self._ring.append(_Entry(event, line))
        overflowing = [
            sub
            for sub, jobs in self._subs.items()
            if (jobs is None or job in jobs) and not sub.deliver(event.seq, line)
        ]
        for sub in overflowing:
            self._drop(sub, "the client fell behind; resubscribe with since")
        return event

    def subscribe(
        self, sub: Subscriber, since: int | None = None, jobs: list[int] | None = None
    ) -> tuple[SubscribeResult, list[bytes]]:
        """Register `sub` (replacing its previous filter) and return the replay.

        Registration and replay happen in one synchronous call on the loop thread, so no
        event can fall between them: the caller sends the reply, then the replayed lines,
        and live events queue up behind them.
        """
        wanted = frozenset(jobs) if jobs is not None else None
        self._subs[sub] = wanted
        replay: list[bytes] = []
        complete = True
        if since is not None:
            oldest = self._ring[0].event.seq if self._ring else self._seq + 1
            complete = since >= oldest - 1
            replay = [
                e.line
                for e in self._ring
                if e.event.seq > since and (wanted is None or e.event.job in wanted)
            ]
        result = SubscribeResult(last_seq=self._seq, replayed=len(replay), complete=complete)
        return result, replay

    def unsubscribe(self, sub: Subscriber) -> bool:
        return self._subs.pop(sub, False) is not False

    def _drop(self, sub: Subscriber, reason: str) -> None:
        if self._subs.pop(sub, False) is not False:
            sub.dropped(reason)

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def notice(self, type: str, data: dict[str, Any]) -> bytes:
        """An out-of-sequence notification line (seq 0) for one connection only."""
        event = Event(seq=0, ts=self._clock(), type=type, job=None, data=data)
        return self._encode(_Notification(params=event)) + b"\n"
