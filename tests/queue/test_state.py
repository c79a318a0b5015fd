"""QueueStateTracker: live progress and the ETA a user watches, on a fake clock."""

from __future__ import annotations

import pytest

from wangend.pipelines.control import JobControl
from wangend.protocol import JobRecord
from wangend.queue.state import QueueStateTracker

from .conftest import make_spec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracking(clock: Clock) -> QueueStateTracker:
    tracker = QueueStateTracker(clock=clock)
    tracker.begin(JobRecord(id=7, state="running", spec=make_spec()), JobControl())
    return tracker


def test_eta_is_unknown_until_a_step_is_timed_then_follows_the_step_time() -> None:
    clock = Clock()
    tracker = tracking(clock)
    assert tracker.update(0, 10, "loading").eta is None
    assert tracker.update(0, 10, "denoising").eta is None  # nothing timed yet
    clock.now += 2.0
    assert tracker.update(1, 10, "denoising").eta == pytest.approx(18.0)  # 2 s x 9 left
    clock.now += 4.0
    assert tracker.update(2, 10, "denoising").eta == pytest.approx(24.0)  # 3 s x 8 left
    assert tracker.update(10, 10, "decoding").eta is None  # decoding is not step-shaped
    assert tracker.running.progress.phase == "decoding"


def test_one_slow_first_step_does_not_inflate_the_eta() -> None:
    """A compile (or kernel autotuning) makes the first step take a minute; the steps
    after it take a second, and so should the ETA say as soon as they dominate."""
    clock = Clock()
    tracker = tracking(clock)
    tracker.update(0, 50, "denoising")
    clock.now += 60.0
    tracker.update(1, 50, "denoising")
    for step in (2, 3):
        clock.now += 1.0
        eta = tracker.update(step, 50, "denoising").eta
    assert eta == pytest.approx(47.0)  # 1 s x 47 left (the mean would say 21 s/step)


def test_a_hold_never_counts_as_step_time() -> None:
    clock = Clock()
    tracker = tracking(clock)
    tracker.update(0, 4, "denoising")
    clock.now += 1.0
    tracker.update(1, 4, "denoising")
    tracker.held()
    assert tracker.running.held
    clock.now += 600.0  # a long pause
    tracker.resumed()
    clock.now += 1.0
    assert tracker.update(2, 4, "denoising").eta == pytest.approx(2.0)
    assert not tracker.running.held


def test_the_pause_latch_and_the_running_job() -> None:
    tracker = QueueStateTracker("after_current")
    assert tracker.paused and tracker.running is None
    tracker.pause_mode = None
    assert not tracker.paused
    with pytest.raises(ValueError):
        QueueStateTracker("later")
    tracker.begin(JobRecord(id=3, state="running", spec=make_spec()), JobControl())
    assert tracker.running.id == 3 and tracker.running.progress.phase == "starting"
    tracker.end()
    assert tracker.running is None
