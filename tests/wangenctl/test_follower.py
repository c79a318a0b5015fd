"""EventFollower: every event once and in order across drops, restarts and resubscribes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from wangenctl.errors import DaemonUnavailable
from wangenctl.follower import EventFollower
from wangend.protocol import Event

from .fake_daemon import IDLE_STATUS, FakeConnection, FakeDaemon, running

pytestmark = pytest.mark.anyio


async def test_follower_resubscribes_with_since_and_skips_duplicates(short_dir: Path) -> None:
    async def subscribe(conn: FakeConnection, params: dict[str, Any]) -> Any:
        if conn.number == 1:

            async def stream_then_drop() -> None:
                await anyio.sleep(0.05)
                for seq in (11, 12, 13):
                    await conn.event(seq, "job.progress", 5, step=seq - 10, steps=5)
                await conn.stream.aclose()  # the daemon restarts

            conn.spawn(stream_then_drop)
            return {"last_seq": 10, "replayed": 0, "complete": True}

        async def replay() -> None:
            await anyio.sleep(0.05)
            # The ring buffer replays from `since`; 13 again must be skipped.
            for seq in (13, 14):
                await conn.event(seq, "job.progress", 5, step=seq - 10, steps=5)
            await conn.event(15, "job.succeeded", 5, outputs=["/out/a.mp4"])

        conn.spawn(replay)
        return {"last_seq": 15, "replayed": 2, "complete": True}

    same_process = {**IDLE_STATUS, "last_seq": 15}
    fake = FakeDaemon({"subscribe": subscribe, "status": lambda conn, p: _value(same_process)})
    notices: list[str] = []
    delivered: list[int] = []

    def handle(event: Event) -> bool:
        delivered.append(event.seq)
        return event.type == "job.succeeded"

    with running(fake, unix=short_dir / "d.sock") as url:
        follower = EventFollower(url, on_notice=notices.append, retry_for=5)
        with anyio.fail_after(10):
            await follower.run(handle)
    assert delivered == [11, 12, 13, 14, 15]
    subscribes = [(n, p) for n, m, p in fake.calls if m == "subscribe"]
    assert subscribes == [(1, {}), (2, {"since": 13})]
    assert follower.reconnects == 1
    assert any("reconnecting" in n for n in notices)


async def test_follower_catches_up_from_the_start_after_a_restart(short_dir: Path) -> None:
    """A restarted daemon numbers events from 1 again; `since` from before means nothing."""

    async def status(conn: FakeConnection, params: dict[str, Any]) -> Any:
        if conn.number == 1:
            return {**IDLE_STATUS, "pid": 100, "last_seq": 40}
        return {**IDLE_STATUS, "pid": 200, "last_seq": 2}

    async def subscribe(conn: FakeConnection, params: dict[str, Any]) -> Any:
        async def first_life() -> None:
            await anyio.sleep(0.05)
            await conn.event(41, "job.started", 5, attempt=1, model="tiny")
            await conn.stream.aclose()

        async def second_life() -> None:
            await anyio.sleep(0.05)
            await conn.event(1, "job.started", 5, attempt=2, model="tiny")
            await conn.event(2, "job.progress", 5, step=1, steps=2, phase="denoising")
            await conn.event(3, "job.succeeded", 5, outputs=["/out/5.mp4"])

        conn.spawn(first_life if conn.number == 1 else second_life)
        return {"last_seq": 40 if conn.number == 1 else 2, "replayed": 0, "complete": True}

    fake = FakeDaemon({"status": status, "subscribe": subscribe})
    delivered: list[tuple[int, str]] = []
    notices: list[str] = []

    def handle(event: Event) -> bool:
        delivered.append((event.seq, event.type))
        return event.type == "job.succeeded"

    with running(fake, unix=short_dir / "d.sock") as url:
        follower = EventFollower(url, jobs=[5], on_notice=notices.append, retry_for=5)
        with anyio.fail_after(10):
            await follower.run(handle)
    assert delivered == [
        (41, "job.started"),
        (1, "job.started"),
        (2, "job.progress"),
        (3, "job.succeeded"),
    ]
    subscribes = [p for n, m, p in fake.calls if m == "subscribe"]
    assert subscribes == [{"jobs": [5]}, {"since": 0, "jobs": [5]}]
    assert any("restarted" in n for n in notices)


def two_lives(first: dict[str, Any], second: dict[str, Any], complete: bool) -> FakeDaemon:
    """A daemon that sends event 41 and goes away, then comes back numbering on from 1025
    (wangend reserves sequence numbers in blocks), as `status` `first`, then `second`."""

    async def status(conn: FakeConnection, params: dict[str, Any]) -> Any:
        life, last_seq = (first, 40) if conn.number == 1 else (second, 1026)
        return {
            **IDLE_STATUS,
            **life,
            "uptime": time.time() - life["started"],
            "last_seq": last_seq,
        }

    async def subscribe(conn: FakeConnection, params: dict[str, Any]) -> Any:
        async def first_life() -> None:
            await anyio.sleep(0.05)
            await conn.event(41, "job.started", 5, attempt=1, model="tiny")
            await conn.stream.aclose()

        async def second_life() -> None:
            await anyio.sleep(0.05)
            await conn.event(1025, "job.started", 5, attempt=2, model="tiny")
            await conn.event(1026, "job.succeeded", 5, outputs=["/out/5.mp4"])

        conn.spawn(first_life if conn.number == 1 else second_life)
        if conn.number == 1:
            return {"last_seq": 40, "replayed": 0, "complete": True}
        return {"last_seq": 1026, "replayed": 2, "complete": complete}

    return FakeDaemon({"status": status, "subscribe": subscribe})


async def follow(fake: FakeDaemon, short_dir: Path) -> tuple[list[int], list[str]]:
    delivered: list[int] = []
    notices: list[str] = []

    def handle(event: Event) -> bool:
        delivered.append(event.seq)
        return event.type == "job.succeeded"

    with running(fake, unix=short_dir / "d.sock") as url:
        follower = EventFollower(url, jobs=[5], on_notice=notices.append, retry_for=5)
        with anyio.fail_after(10):
            await follower.run(handle)
    return delivered, notices


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"pid": 100, "started": 1000.0}, {"pid": 200, "started": 2000.0}),
        # A container's daemon is pid 1 every time: its start time tells the lives apart.
        ({"pid": 1, "started": 1000.0}, {"pid": 1, "started": 2000.0}),
    ],
)
async def test_a_restart_is_said_plainly_and_nothing_is_skipped(
    short_dir: Path, first: dict[str, Any], second: dict[str, Any]
) -> None:
    """The new process's numbers go on after the old ones: `since` stays, nothing is
    replayed twice, and its `complete: false` is not reported as lost events."""
    fake = two_lives(first, second, complete=False)
    delivered, notices = await follow(fake, short_dir)
    assert delivered == [41, 1025, 1026]
    subscribes = [p for n, m, p in fake.calls if m == "subscribe"]
    assert subscribes == [{"jobs": [5]}, {"since": 41, "jobs": [5]}]
    assert f"the daemon restarted (now pid {second['pid']}); catching up from its start" in notices
    assert not any("no longer holds" in n or "#0" in n for n in notices), notices


async def test_a_gap_in_the_same_process_is_still_reported(short_dir: Path) -> None:
    """The same daemon whose buffer no longer reaches back: that is missed progress."""
    same = {"pid": 100, "started": 1000.0}
    delivered, notices = await follow(two_lives(same, same, complete=False), short_dir)
    assert delivered == [41, 1025, 1026]
    assert "the daemon no longer holds the events after #41; some progress was missed" in notices
    assert not any("restarted" in n for n in notices)


async def test_follower_fails_at_once_when_there_never_was_a_daemon(short_dir: Path) -> None:
    follower = EventFollower(f"unix://{short_dir}/none.sock", retry_for=30)
    with anyio.fail_after(5), pytest.raises(DaemonUnavailable, match="wangend serve"):
        await follower.run(lambda e: True)


# --- helpers ---------------------------------------------------------------------------------


async def _value(value: Any) -> Any:
    return value
