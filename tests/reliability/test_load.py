"""200 subscribers and a stream of `status` calls while tiny jobs run; one client that
stops reading is dropped without holding the others back."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ..support.harness import DaemonProcess
from .conftest import rss_kib

pytestmark = pytest.mark.slow

SUBSCRIBERS = 200
JOBS = 3
STEPS = 200
TIMEOUT = 90.0
FIGURES: dict[str, Any] = {}


class Subscriber:
    """One raw Unix connection, read without blocking by the selector loop."""

    def __init__(self, path: Path, jobs: list[int] | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.jobs = jobs
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []

    def feed(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if message.get("method") == "event":
                self.events.append(message["params"])
            else:
                self.replies.append(message)

    def done(self, jobs: list[int]) -> bool:
        wanted = set(self.jobs or jobs)
        finished = {e["job"] for e in self.events if e["type"] == "job.succeeded"}
        return wanted <= finished


def status_stream(daemon: DaemonProcess, stop: threading.Event, latencies: list[float]) -> None:
    with daemon.unix(timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            client.result("status")
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)


def test_many_subscribers_get_every_event_and_a_stalled_one_is_dropped(
    tmp_path: Path,
) -> None:
    config = tmp_path / "wangend.toml"
    config.write_text("subscriber_buffer = 64\n")
    daemon = DaemonProcess(tmp_path, "--config", str(config)).start()
    subs: list[Subscriber] = []
    stop = threading.Event()
    latencies: list[float] = []
    try:
        with daemon.unix() as control:
            control.result("pause", {"mode": "now"})
            since = control.result("status")["last_seq"]
            spec = {"prompt": "load", "steps": STEPS, "width": 16, "height": 16, "frames": 1}
            jobs = [control.result("enqueue", {**spec, "seed": i})["job"] for i in range(JOBS)]
            rss_before = rss_kib(daemon.proc.pid)

            # A client that subscribes and then never reads. (Over Unix: over TCP the
            # kernel's autotuned buffers swallow this whole test's events.)
            stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stalled.connect(str(daemon.socket))
            request = {"jsonrpc": "2.0", "id": 0, "method": "subscribe", "params": {"since": since}}
            stalled.sendall(json.dumps(request).encode() + b"\n")

            selector = selectors.DefaultSelector()
            for i in range(SUBSCRIBERS):  # half watch everything, half one job each
                sub = Subscriber(daemon.socket, None if i % 2 == 0 else [jobs[i % JOBS]])
                params: dict[str, Any] = {"since": since}
                if sub.jobs:
                    params["jobs"] = sub.jobs
                request = {"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": params}
                sub.sock.sendall(json.dumps(request).encode() + b"\n")
                selector.register(sub.sock, selectors.EVENT_READ, sub)
                subs.append(sub)

            poller = threading.Thread(target=status_stream, args=(daemon, stop, latencies))
            poller.start()
            started = time.monotonic()
            control.result("resume")
            pending = set(range(SUBSCRIBERS))
            while pending:
                assert time.monotonic() - started < TIMEOUT, f"{len(pending)} still waiting"
                for key, _ in selector.select(timeout=1.0):
                    sub = key.data
                    data = sub.sock.recv(1 << 20)
                    assert data, "the daemon closed a subscriber that was reading"
                    sub.feed(data)
                pending = {i for i in pending if not subs[i].done(jobs)}
            elapsed = time.monotonic() - started
            stop.set()
            poller.join(30)
            rss_after = rss_kib(daemon.proc.pid)
            control.result("status")

        # The stalled client: its subscription was dropped, with one notice at the end.
        stalled.settimeout(10)
        stalled_events: list[dict[str, Any]] = []
        buf = b""
        while not any(e["type"] == "subscription.dropped" for e in stalled_events):
            chunk = stalled.recv(1 << 20)
            assert chunk, "closed without a subscription.dropped notice"
            buf += chunk
            *lines, buf = buf.split(b"\n")
            stalled_events += [
                m["params"] for m in map(json.loads, lines) if m.get("method") == "event"
            ]
        stalled.close()
    finally:
        stop.set()
        for sub in subs:
            sub.sock.close()
        daemon.stop()

    # Every subscriber that kept reading got every event of its jobs, in order.
    reference: dict[int, list[tuple[int, str]]] = {}
    for sub in subs:
        assert [r.get("result", {}).get("complete") for r in sub.replies] == [True], sub.replies
        seqs = [e["seq"] for e in sub.events]
        assert seqs == sorted(set(seqs)), "out of order or duplicated"
        if sub.jobs is None:  # the unfiltered stream has no gap at all
            assert seqs == list(range(since + 1, since + 1 + len(seqs)))
        for job in sub.jobs or jobs:
            mine = [(e["seq"], e["type"]) for e in sub.events if e["job"] == job]
            types = [t for _, t in mine]
            assert types[:2] == ["job.queued", "job.started"] and types[-1] == "job.succeeded"
            steps = [
                e["data"]["step"]
                for e in sub.events
                if e["job"] == job and e["data"].get("phase") == "denoising"
            ]
            assert steps == sorted(steps) and steps[-1] == STEPS
            assert mine == reference.setdefault(job, mine)  # the same stream for everyone
        if sub.jobs:
            assert {e["job"] for e in sub.events} <= {*sub.jobs, None}
    dropped = [e for e in stalled_events if e["type"] == "subscription.dropped"]
    assert len(dropped) == 1 and dropped[0]["seq"] == 0
    events = sum(len(s.events) for s in subs)
    FIGURES.update(
        subscribers=SUBSCRIBERS, events_delivered=events, seconds=round(elapsed, 1),
        status_calls=len(latencies), status_max_s=round(max(latencies), 3),
        rss_before_kib=rss_before, rss_after_kib=rss_after,
        stalled_got=len(stalled_events) - 1,
    )  # fmt: skip
    print(f"load: {FIGURES}")
    assert len(latencies) >= 20 and max(latencies) < 5.0
