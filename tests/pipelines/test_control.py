"""JobControl's latches as the worker meets them: a suspend waits for the step boundary
only while the run can write a resume point there."""

from __future__ import annotations

import pytest

from wangend.pipelines.control import JobAborted, JobControl

from .conftest import RecordingHooks


def test_a_suspend_lands_at_once_while_the_run_cannot_resume() -> None:
    control = JobControl()
    control.request_suspend()  # loading, encoding, decoding: nothing to resume from
    with pytest.raises(JobAborted):
        control.check_abort()
    assert control.suspending  # the stop asked, not a user: the point is kept


def test_a_suspend_waits_for_the_step_boundary_and_saves_there() -> None:
    control, saved = JobControl(), []
    control.set_resumable(True)
    control.request_suspend()
    control.check_abort()  # blocks go on: the step ends first
    with pytest.raises(JobAborted):
        control.step_boundary(RecordingHooks(), 3, 10, save=lambda: saved.append(3))
    assert saved == [3]


def test_at_once_and_leaving_denoising_cut_the_wait_short() -> None:
    for cut in ("at_once", "decoding"):
        control = JobControl()
        control.set_resumable(True)
        control.request_suspend()
        if cut == "at_once":
            control.request_suspend(at_once=True)
        else:
            control.set_resumable(False)
        with pytest.raises(JobAborted):
            control.check_abort()


def test_an_abort_is_not_a_suspend() -> None:
    control = JobControl()
    control.set_resumable(True)
    control.request_suspend()
    control.request_abort()
    with pytest.raises(JobAborted):
        control.check_abort()
    assert not control.suspending  # a user's abort ends the job: its point goes


def test_no_latch_no_save() -> None:
    control, saved = JobControl(), []
    control.step_boundary(RecordingHooks(), 1, 10, save=lambda: saved.append(1))
    assert saved == []
