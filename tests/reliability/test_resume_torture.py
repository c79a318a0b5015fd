"""kill -9 one long job again and again: every restart goes on from its last resume
point, and the output has exactly the frames of an uninterrupted run.

One daemon writes a resume point after every step (`resume_every = 0`, max_attempts
high) and runs one long tiny-model job (128x128, 17 frames, WANGEN_TORTURE_STEPS steps,
default 160, fixed seed). It is killed with -9 WANGEN_TORTURE_KILLS times (default 6)
at moments drawn from WANGEN_TORTURE_SEED and started again each time on the same state
dir: while a (re)started attempt loads, right after a step's progress event, a random
fraction of a second after one (mid-step, mid point-write), and once the frames are
being decoded. It proves, from outside, with nothing but the socket and the files:

* a step the daemon reported before it died is on disk: after each kill the point holds
  at least the last step the dead daemon sent, and points never go backwards, until
  the job has ended;
* each restart goes on from exactly the point the kill left (its first denoising or
  decoding event says that step), never from step 0 once a point existed, and reports
  every step from there on once: no reported step is run twice;
* the job succeeds once, after one attempt per kill that found it unfinished plus one,
  with one output: an mp4 that decodes to all its frames, whose `frames_sha256` equals
  that of the same spec run again, uninterrupted, in the same daemon;
* nothing is left behind: no point or temp file in <state dir>/resume; in the output
  dir one file per job, the one its record names, and no hidden temp file.

A kill in the milliseconds between the video getting its final name and the runtime
noting it is test_output_claims.py's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wangend.media.metadata import read_metadata

from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames, files_under
from ..support.wire import WireClient, job_event
from .conftest import TERMINAL_STATES, dot_files, env_int, integrity

pytestmark = pytest.mark.slow

KILLS = env_int("WANGEN_TORTURE_KILLS", 6)
SEED = env_int("WANGEN_TORTURE_SEED", 20261124)
STEPS = env_int("WANGEN_TORTURE_STEPS", 160)
SPEC = {
    "prompt": "resume torture",
    "width": 128,
    "height": 128,
    "frames": 17,
    "steps": STEPS,
    "seed": 424242,
}
TERMINAL = tuple(f"job.{state}" for state in TERMINAL_STATES)
WORK = ("compiling", "denoising", "decoding")  # phases that start after the point is read
WAIT = 120.0  # the most one wait may take (a whole run takes 2-40 s here)

Event = dict[str, Any]


def _plan(rng: random.Random, kills: int, steps: int) -> list[tuple[str, int, float]]:
    """(kind, target step, delay after the trigger) for each kill, in order.

    The last: once decoding has begun ("decoding"). One lands while a restarted
    attempt loads ("loading"). The others land after a step event at targets spread over the run,
    right away ("event") or a random moment later ("mid-step")."""
    tail = ["decoding"][:kills]
    middle = max(kills - 2, 0)
    kinds = ["event", "mid-step"][:middle]
    kinds += [rng.choice(("event", "mid-step")) for _ in range(middle - len(kinds))]
    rng.shuffle(kinds)
    if kills >= 3:
        kinds.insert(rng.randint(0, len(kinds)), "loading")
    band = max((steps - 6) / max(middle, 1), 1.0)
    plan = []
    spot = 0
    for kind in kinds + tail:
        target = 0
        if kind in ("event", "mid-step"):
            low = 2 + int(spot * band)
            target = rng.randint(low, max(low, 2 + int((spot + 1) * band) - 1))
            spot += 1
        delay = {
            "loading": rng.uniform(0.0, 1.5),  # loading ~1.3 s here, then encoding
            "event": 0.0,
            "mid-step": rng.uniform(0.005, 0.3),  # a step, a point write: ms to tens of ms
            "decoding": rng.uniform(0.0, 0.2),  # decoding ~0.3 s here
        }[kind]
        plan.append((kind, target, delay))
    return plan


def _trigger(job: int, kind: str, target: int) -> Callable[[Event], bool]:
    def hit(event: Event) -> bool:
        if event.get("job") != job:
            return False
        if event["type"] in TERMINAL:
            return True  # too late for this kill: the caller says so
        if event["type"] != "job.progress":
            return False
        phase, step = event["data"]["phase"], event["data"]["step"]
        if kind == "loading":
            return phase == "loading"
        if kind == "decoding":
            return phase in ("decoding", "saving")
        return phase == "denoising" and step >= target

    return hit


def _drain(client: WireClient) -> None:
    """Read what the killed daemon had sent, up to the end of the stream."""
    try:
        while True:
            client.seen.append(client.next_event())
    except (ConnectionError, OSError):
        pass


def _point_done(path: Path) -> int | None:
    """`done` of the resume point at `path` (safetensors: u64 header size, JSON header
    whose __metadata__ holds the point's own JSON), or None when there is none."""
    if not path.exists():
        return None
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return int(json.loads(header["__metadata__"]["wangend"])["done"])


class Attempt:
    """What one daemon process said about the job."""

    def __init__(self, job: int, events: list[Event]) -> None:
        self.events = [e for e in events if e.get("job") == job]
        self.progress = [e["data"] for e in self.events if e["type"] == "job.progress"]
        self.started = sum(e["type"] == "job.started" for e in self.events)
        self.ended = next((e for e in self.events if e["type"] in TERMINAL), None)
        work = [p["step"] for p in self.progress if p["phase"] in WORK]
        self.resumed_at: int | None = work[0] if work else None  # the step it went on from
        self.denoised = [p["step"] for p in self.progress if p["phase"] == "denoising"]
        self.last_step = max(work, default=0)  # the last step it reported done

    @property
    def step_events(self) -> int:
        """Steps it reported finishing (the first denoising event marks the phase)."""
        return max(len(self.denoised) - 1, 0)

    def where(self, hit: Event, temps: list[str], named: bool) -> str:
        """Where a kill that ended this attempt landed (`hit`: the event it waited for,
        `temps`: the temp files it left in the resume folder, `named`: whether the
        output was under its final name)."""
        if self.ended is not None:
            return "after the end"
        if temps:
            return "mid point-write"
        last = self.progress[-1] if self.progress else {"phase": "queued"}
        if last["phase"] == "saving" and named:
            return "output saved, job not recorded"
        if last["phase"] != "denoising":
            return last["phase"]
        return "after a step event" if last == hit["data"] else "mid-step"


def _wait_end(daemon: DaemonProcess, client: WireClient, job: int) -> dict:
    """The job's record once it has ended; its events are read into `client.seen`."""
    deadline = time.monotonic() + WAIT
    while True:
        record = client.result("status", {"job": job})
        if record["state"] in TERMINAL_STATES:
            # it may have ended in this process just now: read its last events too
            if not any(e.get("job") == job and e["type"] in TERMINAL for e in client.seen):
                client.sock.settimeout(2.0)
                with contextlib.suppress(TimeoutError):  # else it ended before this start
                    client.wait_event(job_event(job, *TERMINAL), timeout=2.0)
            return record
        assert time.monotonic() < deadline, (record, daemon.log()[-3000:])
        client.sock.settimeout(5.0)
        with contextlib.suppress(TimeoutError):
            client.wait_event(job_event(job, *TERMINAL), timeout=5.0)


def _named(folder: Path) -> list[str]:
    """Files under their final names (not hidden temp files) in `folder`."""
    return sorted(p.name for p in files_under(folder) if not p.name.startswith("."))


def test_kill_9s_mid_job_resume_to_the_frames_of_an_uninterrupted_run(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    plan = _plan(rng, KILLS, STEPS)
    config = tmp_path / "wangend.toml"
    config.write_text("max_attempts = 100\n[engine]\nresume_every = 0.0\n")
    started = time.monotonic()
    daemon = DaemonProcess(tmp_path, "--config", str(config)).start()
    points = daemon.state_dir / "resume"
    attempts: list[Attempt] = []  # one per process, the last one uninterrupted
    after_kills: list[int | None] = []  # the point each kill left (None: no point)
    wheres: list[str] = []  # where each kill landed
    behind: list[str] = []  # kills after which the point was behind what was reported
    job = 0
    try:
        for number, (kind, target, delay) in enumerate(plan):
            with daemon.unix(timeout=WAIT) as client:
                client.result("subscribe", {"since": 0})  # from this process's first event
                if not job:
                    job = client.result("enqueue", SPEC)["job"]
                hit = client.wait_event(_trigger(job, kind, target), timeout=WAIT)
                assert hit["type"] not in TERMINAL, (number, kind, target, hit)
                time.sleep(delay)
                daemon.kill9()
                _drain(client)
            attempt = Attempt(job, client.seen)
            attempts.append(attempt)
            done = _point_done(points / f"{job}.safetensors")
            temps = sorted(p.name for p in points.glob(".*")) if points.exists() else []
            where = attempt.where(hit, temps, bool(_named(daemon.output_dir)))
            after_kills.append(done)
            daemon.start()
            with daemon.unix() as client:
                state = client.result("status", {"job": job})["state"]
            if state in TERMINAL_STATES:  # it ended before the kill (its event may have
                wheres.append("after the end")  # died with the daemon): no more kills
                break
            wheres.append(where)
            # a step the daemon reported is on disk, and points never go backwards (while
            # the job has not ended); checked once the run is over, to see what follows
            reported = max(a.last_step for a in attempts)
            before = next((p for p in reversed(after_kills[:-1]) if p is not None), None)
            if (reported or before) and (done or 0) < max(reported, before or 0):
                behind.append(f"kill {number} ({where}): point {done}, reported {reported}")

        with daemon.unix(timeout=WAIT) as client:
            client.result("subscribe", {"since": 0})
            if not job:  # WANGEN_TORTURE_KILLS=0: an uninterrupted run only
                job = client.result("enqueue", SPEC)["job"]
            record = _wait_end(daemon, client, job)
            attempts.append(Attempt(job, client.seen))
            client.sock.settimeout(WAIT)
            again = client.result("enqueue", SPEC)["job"]  # the same spec, no kill
            client.wait_event(job_event(again, *TERMINAL), timeout=WAIT)
            whole = client.result("status", {"job": again})
            uninterrupted = Attempt(again, client.seen)
    except BaseException:
        print(daemon.log()[-6000:])
        raise
    finally:
        daemon.stop()

    landed = Counter(wheres)
    resumed = read_metadata(record["outputs"][0])
    fresh = read_metadata(whole["outputs"][0])
    same = resumed["frames_sha256"] == fresh["frames_sha256"]
    step_events = sum(a.step_events for a in attempts)
    redone = sum(
        max(a.last_step - b.resumed_at, 0)
        for a, b in itertools.pairwise(attempts)
        if b.resumed_at is not None
    )
    print(
        f"resume torture: seed {SEED}, {STEPS} steps, {len(wheres)} of {len(plan)} planned "
        f"kill -9s ({', '.join(k for k, _, _ in plan)}) landed {dict(landed)}; points "
        f"after the kills {after_kills}, restarts resumed at "
        f"{[a.resumed_at for a in attempts[1:]]}; {step_events} step events for {STEPS} steps, "
        f"{redone} steps reported then run again; {record['attempts']} attempts; "
        f"same frames as uninterrupted: {same}; outputs on disk "
        f"{_named(daemon.output_dir)}; {time.monotonic() - started:.0f} s"
    )

    assert behind == [], behind
    # each restart went on from exactly the point the kill before it left
    for number, (attempt, point) in enumerate(zip(attempts[1:], after_kills, strict=True)):
        if attempt.resumed_at is not None:
            assert attempt.resumed_at == (point or 0), (number + 1, attempt.resumed_at, point)
            # and reported each step from there once, in order
            span = list(range(attempt.resumed_at, attempt.resumed_at + len(attempt.denoised)))
            assert attempt.denoised == span, (number + 1, attempt.denoised)
    assert attempts[0].resumed_at in (0, None), attempts[0].resumed_at
    assert redone == 0, [(a.last_step, b.resumed_at) for a, b in itertools.pairwise(attempts)]

    ends = [a.ended["type"] for a in attempts if a.ended is not None]
    # once, and a success (whose event may have died with a killed daemon)
    assert ends == ["job.succeeded"] or (not ends and attempts[-1].started == 0), ends
    assert record["state"] == "succeeded", record
    assert len(record["outputs"]) == 1, record
    assert record["attempts"] == sum(a.started for a in attempts), record["attempts"]
    assert record["attempts"] == len(wheres) + 1 - landed["after the end"], record["attempts"]

    assert whole["state"] == "succeeded" and whole["attempts"] == 1, whole
    assert uninterrupted.denoised == list(range(STEPS + 1)), uninterrupted.denoised
    assert resumed["frames_sha256"] == fresh["frames_sha256"], (resumed["notes"], fresh["notes"])
    last = [a.resumed_at for a in attempts if a.resumed_at is not None][-1]
    if last:
        assert f"resumed after step {last} of {STEPS} " in " ".join(resumed.get("notes", [])), (
            resumed.get("notes"),
            last,
        )
    frames, info = decode_frames(record["outputs"][0])
    assert frames.shape == (SPEC["frames"], SPEC["height"], SPEC["width"], 3), frames.shape
    assert (info["codec"], info["width"], info["height"]) == ("h264", 128, 128), info

    leftover = sorted(p.name for p in points.iterdir()) if points.exists() else []
    assert leftover == []  # every point and temp file went with the job
    # one file per job, the one its record names: none written twice, no temp file left
    expected = sorted(Path(r["outputs"][0]).name for r in (record, whole))
    on_disk = _named(daemon.output_dir)
    hidden = [p.name for p in dot_files(daemon.output_dir)]
    assert (on_disk, hidden) == (expected, []), f"on disk {on_disk} {hidden}, recorded {expected}"
    assert integrity(daemon.state_dir / "queue.sqlite3") == "ok"
