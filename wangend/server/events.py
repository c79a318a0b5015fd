"""EventBus: the daemon-wide event sequence, a ring buffer for resync, and fan-out.

Why it looks like this:

* `publish` is synchronous and never waits. It runs on the event loop thread (the queue
  controller calls it; worker-thread hooks reach it through `anyio.from_thread`), so a
  slow client can never hold up a job or another client.
* Each event is encoded once, into the exact notification line (newline included) that
  goes on the wire; all subscribers and the ring buffer share those bytes.
* A subscriber's `deliver` only queues the line. When it answers False (its connection
  already holds `subscriber_buffer` unsent events) the bus forgets it and calls its
  `dropped` hook, which sends one final `subscription.dropped` notice. The client
  resubscribes with `since` and the ring buffer fills the gap.
* `subscribe` registers and collects the replay in one synchronous call, so no event can
  fall between the replayed ones and the live ones, and none is sent twice.

Filtering: a subscription without `jobs` gets every event. With `jobs` it gets the
events of those jobs, plus the daemon-wide lifecycle events in `BROADCAST_TYPES`
(`daemon.stopping`), which every watcher needs; `queue.*` and `model.*` events are left
out, since they are not about the watched jobs.

Resync: `subscribe(since=n)` replays the buffered events after `n`. When events after `n`
have already left the ring, what is left is replayed and `complete` is False. Sequence
numbers keep increasing across restarts: the daemon reserves them in blocks in its
database (`reserve`) and a new process starts after the last reserved block, so a
`since` from before a restart replays nothing and says `complete: False` rather than
silently skipping new events. A `since` larger than `last_seq` is from nowhere we know:
nothing is replayed and `complete` is False. Either way the
client re-reads state with `status`/`jobs` instead of trusting a gap-free stream.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import msgspec

from ..protocol import Event, SubscribeResult

__all__ = ["BROADCAST_TYPES", "EventBus", "Subscriber", "notification_line"]

log = logging.getLogger("wangend.events")

# Job-filtered subscriptions still receive these (they carry no job id).
BROADCAST_TYPES = frozenset({"daemon.stopping"})

_PREFIX = b'{"jsonrpc":"2.0","method":"event","params":'
_SUFFIX = b"}\n"


def notification_line(event: Event, encode: Callable[[Any], bytes] | None = None) -> bytes:
    """The wire form of an event: one JSON-RPC notification line, newline included."""
    return _PREFIX + (encode or msgspec.json.encode)(event) + _SUFFIX


class Subscriber(Protocol):
    """What the bus needs from a subscriber (a connection implements it)."""

    def deliver(self, seq: int, line: bytes) -> bool:
        """Queue one notification line without blocking; False when over budget."""
        ...

    def dropped(self, reason: str) -> None:
        """The bus has removed this subscriber; queue a final notice for the client."""
        ...


class _Entry(NamedTuple):
    seq: int
    job: int | None
    type: str
    line: bytes


def _wanted(entry_job: int | None, entry_type: str, jobs: frozenset[int] | None) -> bool:
    return jobs is None or entry_job in jobs or entry_type in BROADCAST_TYPES


class EventBus:
    """Numbers, buffers and fans out events. Loop thread only; nothing here awaits."""

    def __init__(
        self,
        buffer: int = 10_000,
        clock: Callable[[], float] = time.time,
        *,
        start_after: int = 0,
        reserve: Callable[[int], int] | None = None,
    ) -> None:
        """`start_after`: the first event gets this + 1. `reserve(seq)` is called when
        the numbers reach the reserved limit and returns the new limit (it persists it)."""
        if buffer < 1:
            raise ValueError("the event buffer must hold at least one event")
        self._ring: deque[_Entry] = deque(maxlen=buffer)
        self._subs: dict[Subscriber, frozenset[int] | None] = {}
        self._seq = start_after
        self._reserve = reserve
        self._reserved = reserve(start_after) if reserve is not None else None
        self._clock = clock
        self._encode = msgspec.json.Encoder().encode

    @property
    def last_seq(self) -> int:
        """The newest published sequence number (0 before the first event)."""
        return self._seq

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def is_subscribed(self, subscriber: Subscriber) -> bool:
        return subscriber in self._subs

    def publish(
        self, type: str, job: int | None = None, data: dict[str, Any] | None = None
    ) -> Event:
        """Number, buffer and hand out one event; returns it. Never blocks."""
        event = Event(seq=self._seq + 1, ts=self._clock(), type=type, job=job, data=data or {})
        try:
            body = self._encode(event)
        except (TypeError, ValueError, OverflowError):
            # A bug in whoever built `data` must not stop the job that published it.
            log.exception("event %s has data that cannot be encoded; sent without it", type)
            event.data = {"error": "event data could not be encoded"}
            body = self._encode(event)
        self._seq = event.seq
        if self._reserved is not None and self._seq >= self._reserved:
            self._reserved = self._reserve(self._seq)  # type: ignore[misc]
        line = _PREFIX + body + _SUFFIX
        self._ring.append(_Entry(event.seq, job, type, line))
        over_budget: list[Subscriber] = []
        for sub, jobs in tuple(self._subs.items()):  # a snapshot: hooks may unsubscribe
            if jobs is not None and job not in jobs and type not in BROADCAST_TYPES:
                continue
            try:
                accepted = sub.deliver(event.seq, line)
            except Exception:
                log.exception("an event subscriber failed; dropping it")
                accepted = False
            if not accepted:
                over_budget.append(sub)
        for sub in over_budget:
            self._drop(sub, "the client fell behind; subscribe again with since")
        return event

    def subscribe(
        self,
        subscriber: Subscriber,
        since: int | None = None,
        jobs: Iterable[int] | None = None,
    ) -> tuple[SubscribeResult, list[bytes]]:
        """Register `subscriber` (replacing its earlier filter) and return the replay.

        The caller must queue the reply first, then the replay lines, then whatever
        `deliver` hands it from now on; it must do so without awaiting in between.
        """
        wanted = frozenset(jobs) if jobs is not None else None
        self._subs[subscriber] = wanted
        replay: list[bytes] = []
        complete = True
        if since is not None:
            if since > self._seq:
                complete = False  # a sequence number from an earlier daemon process
            elif self._ring:
                oldest = self._ring[0].seq
                complete = since >= oldest - 1
                start = max(0, since + 1 - oldest)  # seqs in the ring are contiguous
                replay = [
                    e.line
                    for e in itertools.islice(self._ring, start, None)
                    if _wanted(e.job, e.type, wanted)
                ]
            else:
                complete = since == self._seq
        result = SubscribeResult(last_seq=self._seq, replayed=len(replay), complete=complete)
        return result, replay

    def unsubscribe(self, subscriber: Subscriber) -> bool:
        """Forget `subscriber`; True if it was subscribed. No notice is sent."""
        if subscriber in self._subs:
            del self._subs[subscriber]
            return True
        return False

    def _drop(self, subscriber: Subscriber, reason: str) -> None:
        if subscriber in self._subs:
            del self._subs[subscriber]
            try:
                subscriber.dropped(reason)
            except Exception:
                log.exception("a dropped subscriber's hook failed")

    def notice(self, type: str, data: dict[str, Any] | None = None) -> bytes:
        """A notification line for one connection only, outside the sequence (seq 0).

        Used for `subscription.dropped` and the goodbye on shutdown: they concern one
        client, so they must not take a number that every other client would see missing.
        """
        event = Event(seq=0, ts=self._clock(), type=type, job=None, data=data or {})
        return _PREFIX + self._encode(event) + _SUFFIX
