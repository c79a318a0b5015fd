"""A user's session with a real daemon process over its real sockets, on the tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np

from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames, files_under
from ..support.wire import job_event, progressed

TERMINAL = ("job.succeeded", "job.failed", "job.aborted")


def run_to_end(daemon: DaemonProcess, spec: dict) -> tuple[int, dict, list[dict]]:
    """Enqueue over the Unix socket, follow the job's events to its end."""
    with daemon.unix() as client:
        client.result("subscribe", {"since": client.result("status")["last_seq"]})
        job = client.result("enqueue", spec)["job"]
        final = client.wait_event(job_event(job, *TERMINAL))
        events = [e for e in client.seen if e.get("job") == job]
    return job, final, events


def test_submit_follow_and_read_back_the_mp4(daemon: DaemonProcess) -> None:
    spec = {
        "prompt": "a lighthouse at dusk, été",
        "width": 64,
        "height": 48,
        "frames": 9,
        "steps": 4,
        "seed": 11,
        "fps": 12,
    }
    job, final, events = run_to_end(daemon, spec)
    assert final["type"] == "job.succeeded", final
    types = [e["type"] for e in events]
    assert types[0] == "job.queued" and types[1] == "job.started" and types[-1] == "job.succeeded"
    steps = [
        e["data"]["step"]
        for e in events
        if e["type"] == "job.progress" and e["data"]["phase"] == "denoising"
    ]
    assert steps[-1] == 4 and steps == sorted(steps)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    [output] = final["data"]["outputs"]
    frames, info = decode_frames(output)
    assert frames.shape == (9, 48, 64, 3)
    assert (info["codec"], info["pix_fmt"], info["fps"]) == ("h264", "yuv420p", 12.0)
    meta = json.loads(info["comment"])
    assert len(meta["frames_sha256"]) == 64
    assert meta["settings"]["prompt"] == spec["prompt"]
    assert meta["settings"]["seed"] == 11

    if shutil.which("ffprobe"):  # what other tools see (ffprobe is optional here)
        probe = json.loads(
            subprocess.run(
                [
                    "ffprobe",
                    "-v",
                    "error",
                    "-show_entries",
                    "stream=codec_name,pix_fmt,width,height,r_frame_rate,nb_frames:format_tags=comment",
                    "-of",
                    "json",
                    output,
                ],
                capture_output=True,
                check=True,
                text=True,
            ).stdout
        )
        stream = probe["streams"][0]
        assert (stream["codec_name"], stream["pix_fmt"]) == ("h264", "yuv420p")
        assert (stream["width"], stream["height"], stream["nb_frames"]) == (64, 48, "9")
        assert stream["r_frame_rate"] == "12/1"
        assert json.loads(probe["format"]["tags"]["comment"]) == meta

    with daemon.unix() as client:
        record = client.result("status", {"job": job})
    assert record["state"] == "succeeded" and record["outputs"] == [output]
    assert record["attempts"] == 1 and record["spec"]["steps"] == 4


def test_same_job_over_tcp_needs_the_token(daemon: DaemonProcess) -> None:
    with daemon.tcp(authed=False) as anonymous:
        reply = anonymous.call("enqueue", {"prompt": "x"})
        assert reply["error"]["code"] == -32001
        assert anonymous.call("auth", {"token": "wrong"})["error"]["code"] == -32001
        assert anonymous.call("status")["error"]["code"] == -32001
    with daemon.tcp() as client:
        client.result("subscribe", {})
        job = client.result("enqueue", {"prompt": "over tcp", "steps": 2, "seed": 1})["job"]
        final = client.wait_event(job_event(job, *TERMINAL))
    assert final["type"] == "job.succeeded"


def test_pause_now_then_resume_gives_the_same_frames(daemon: DaemonProcess) -> None:
    spec = {"prompt": "pause me", "steps": 30, "seed": 1234, "width": 32, "height": 32}
    _, plain, _ = run_to_end(daemon, spec)
    with daemon.unix() as client:
        client.result("subscribe", {"since": client.result("status")["last_seq"]})
        job = client.result("enqueue", spec)["job"]
        client.wait_event(progressed(job, 2))
        assert client.result("pause", {"mode": "now"})["paused"] is True
        held = client.wait_event(job_event(job, "job.paused", *TERMINAL))
        assert held["type"] == "job.paused", "the job should hold at a step boundary"
        status = client.result("status")
        assert status["paused"] is True and status["running"]["state"] == "paused"
        step_held = held["data"]["step"]
        assert client.result("status", {"job": job})["state"] == "paused"
        client.result("resume")
        final = client.wait_event(job_event(job, *TERMINAL))
    assert final["type"] == "job.succeeded"
    assert 2 <= step_held < 30
    a, plain_info = decode_frames(plain["data"]["outputs"][0])
    b, paused_info = decode_frames(final["data"]["outputs"][0])
    # The generated frames are identical bit for bit (their hash is in the metadata);
    # the decoded mp4s match up to the H.264 encoder's own run-to-run wobble.
    plain_hash = json.loads(plain_info["comment"])["frames_sha256"]
    assert json.loads(paused_info["comment"])["frames_sha256"] == plain_hash
    assert np.abs(a.astype(int) - b).mean() < 2.0


def test_abort_a_running_job_then_the_next_one_runs(daemon: DaemonProcess) -> None:
    before = set(files_under(daemon.output_dir))
    with daemon.unix() as client:
        client.result("subscribe", {"since": client.result("status")["last_seq"]})
        slow = client.result("enqueue", {"prompt": "long", "steps": 200, "seed": 2})["job"]
        nxt = client.result("enqueue", {"prompt": "next", "steps": 2, "seed": 3})["job"]
        client.wait_event(progressed(slow, 1))
        record = client.result("abort", {})
        assert record["id"] == slow
        ended = client.wait_event(job_event(slow, *TERMINAL))
        assert ended["type"] == "job.aborted"
        assert ended["data"]["error"]["type"] == "Aborted"
        done = client.wait_event(job_event(nxt, *TERMINAL))
    assert done["type"] == "job.succeeded"
    new_files = set(files_under(daemon.output_dir)) - before
    assert {str(p) for p in new_files} == set(done["data"]["outputs"])  # nothing from the abort


def test_cancel_queued_jobs_and_clear(daemon: DaemonProcess) -> None:
    with daemon.unix() as client:
        client.result("pause", {"mode": "after_current"})
        try:
            a = client.result("enqueue", {"prompt": "a", "steps": 2})["job"]
            b = client.result("enqueue", {"prompt": "b", "steps": 2})["job"]
            c = client.result("enqueue", {"prompt": "c", "steps": 2, "priority": 5})["job"]
            queued = client.result("jobs", {"state": ["queued"]})["jobs"]
            assert [j["id"] for j in queued] == [c, a, b]  # priority first, then FIFO
            assert client.result("move", {"job": b, "position": 0})["position"] == 0
            assert client.result("abort", {"job": a})["state"] == "aborted"
            assert client.call("abort", {"job": a})["error"]["code"] == -32003
            assert client.result("clear")["cancelled"] == [b, c]
            for job in (a, b, c):
                record = client.result("status", {"job": job})
                assert record["state"] == "aborted" and record["error"]["type"] == "Cancelled"
            retried = client.result("retry", {"job": a})
            assert (
                retried["job"] > c
                and retried["spec"]["seed"] == client.result("status", {"job": a})["spec"]["seed"]
            )
            client.result("clear")
        finally:
            client.result("resume")


def test_models_lists_the_builtin_tiny_model(daemon: DaemonProcess) -> None:
    with daemon.unix() as client:
        models = {m["name"]: m for m in client.result("models")["models"]}
    assert models["tiny"]["default"] is True and models["tiny"]["available"] is True


def test_no_temporary_files_left_in_the_output_dir(daemon: DaemonProcess) -> None:
    for path in files_under(daemon.output_dir):
        assert not path.name.startswith("."), path
        assert path.suffix == ".mp4", path
