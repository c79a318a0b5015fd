"""EventFollower: every event once and in order across drops, restarts and resubscribes."""

from __future__ import annotations

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


async def test_follower_fails_at_once_when_there_never_was_a_daemon(short_dir: Path) -> None:
    follower = EventFollower(f"unix://{short_dir}/none.sock", retry_for=30)
    with anyio.fail_after(5), pytest.raises(DaemonUnavailable, match="wangend serve"):
        await follower.run(lambda e: True)


# --- helpers ---------------------------------------------------------------------------------


async def _value(value: Any) -> Any:
    return value
