"""EventBus without sockets: numbering, the ring buffer, filters, the slow-consumer rule."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from wangend.server.events import EventBus


class Sink:
    def __init__(self, budget: int = 1_000_000) -> None:
        self.budget = budget
        self.lines: list[bytes] = []
        self.dropped_reasons: list[str] = []

    def deliver(self, seq: int, line: bytes) -> bool:
        if len(self.lines) >= self.budget:
            return False
        self.lines.append(line)
        return True

    def dropped(self, reason: str) -> None:
        self.dropped_reasons.append(reason)

    def seqs(self) -> list[int]:
        return [json.loads(line)["params"]["seq"] for line in self.lines]


def seqs_of(lines: list[bytes]) -> list[int]:
    return [json.loads(line)["params"]["seq"] for line in lines]


def test_publish_numbers_from_one_and_encodes_one_notification_line() -> None:
    bus = EventBus(10, clock=lambda: 123.5)
    assert bus.last_seq == 0
    sink = Sink()
    bus.subscribe(sink)
    event = bus.publish("job.queued", 7, {"position": 0})
    assert (event.seq, event.ts, event.job) == (1, 123.5, 7) and bus.last_seq == 1
    (line,) = sink.lines
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "jsonrpc": "2.0",
        "method": "event",
        "params": {"seq": 1, "ts": 123.5, "type": "job.queued", "job": 7, "data": {"position": 0}},
    }
    other = Sink()
    bus.subscribe(other)
    bus.publish("queue.paused", None, {"mode": "now"})
    assert other.lines[0] is sink.lines[1]  # encoded once, shared


@pytest.mark.parametrize(
    ("since", "replayed", "complete"),
    [
        (None, [], True),
        (0, [6, 7, 8, 9, 10], False),  # what is left; seq 1..5 have left the ring
        (5, [6, 7, 8, 9, 10], True),  # exactly the oldest kept - 1
        (7, [8, 9, 10], True),
        (10, [], True),
        (11, [], False),  # from an earlier daemon process
    ],
)
def test_replay_from_the_ring(since: int | None, replayed: list[int], complete: bool) -> None:
    bus = EventBus(5)
    for i in range(10):
        bus.publish("job.progress", 1, {"i": i})
    result, replay = bus.subscribe(Sink(), since)
    assert seqs_of(replay) == replayed
    assert (result.last_seq, result.replayed, result.complete) == (10, len(replayed), complete)


def test_an_empty_bus_replays_nothing_completely() -> None:
    result, replay = EventBus(5).subscribe(Sink(), since=0)
    assert replay == [] and result.complete and result.last_seq == 0


def test_job_filter_keeps_the_jobs_and_daemon_wide_lifecycle_events() -> None:
    bus = EventBus(100)
    watched, everything = Sink(), Sink()
    bus.subscribe(watched, jobs=[2, 3])
    bus.subscribe(everything)
    for type_, job in [
        ("job.queued", 1),
        ("job.queued", 2),
        ("queue.paused", None),
        ("model.loading", None),
        ("job.progress", 3),
        ("daemon.stopping", None),
    ]:
        bus.publish(type_, job, {})
    assert watched.seqs() == [2, 5, 6]
    assert everything.seqs() == [1, 2, 3, 4, 5, 6]
    _, replay = bus.subscribe(Sink(), since=0, jobs=[1])
    assert seqs_of(replay) == [1, 6]
    # subscribing again replaces the filter
    bus.subscribe(watched)
    bus.publish("queue.resumed", None, {})
    assert watched.seqs()[-1] == 7


def test_a_subscriber_over_budget_is_dropped_once_and_others_go_on() -> None:
    bus = EventBus(100)
    slow, fast = Sink(budget=3), Sink()
    bus.subscribe(slow)
    bus.subscribe(fast)
    for _ in range(10):
        bus.publish("job.progress", 1, {})
    assert slow.seqs() == [1, 2, 3] and len(slow.dropped_reasons) == 1
    assert "since" in slow.dropped_reasons[0]
    assert fast.seqs() == list(range(1, 11))
    assert bus.subscriber_count == 1 and not bus.is_subscribed(slow)
    assert bus.unsubscribe(fast) is True and bus.unsubscribe(fast) is False


def test_a_failing_subscriber_is_dropped_and_bad_data_still_publishes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Sink):
        def deliver(self, seq: int, line: bytes) -> bool:
            raise RuntimeError("boom")

    bus = EventBus(100)
    broken, fine = Broken(), Sink()
    bus.subscribe(broken)
    bus.subscribe(fine)
    with caplog.at_level(logging.ERROR, logger="wangend.events"):
        bus.publish("job.progress", 1, {})
        event = bus.publish("job.failed", 1, {"error": object()})
    assert broken.dropped_reasons and fine.seqs() == [1, 2]
    assert event.seq == 2 and event.data == {"error": "event data could not be encoded"}


def test_notice_is_outside_the_sequence() -> None:
    bus = EventBus(10)
    bus.publish("job.queued", 1, {})
    notice: Any = json.loads(bus.notice("subscription.dropped", {"reason": "slow"}))
    assert notice["params"]["seq"] == 0 and notice["params"]["type"] == "subscription.dropped"
    assert bus.last_seq == 1
