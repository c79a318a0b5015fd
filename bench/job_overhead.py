"""What the daemon adds on top of diffusers, measured in one run on one warm pipeline.

* overhead: a tiny job (64x64, 9 frames, 4 steps) from `enqueue` to `job.succeeded`,
  against the same pipeline call plus the same PyAV encode made directly on the daemon's
  warm pipeline, in the same process; ratio of medians.
* abort: from the `abort` reply to the `job.aborted` event, next to one transformer
  block's time.
* pause: from the `pause` reply to the `job.paused` event, next to one step's time.
* events: 100 subscribers on one daemon each receive every event of a job, in order.

Prints figures; asserts nothing. Run: `.venv/bin/python bench/job_overhead.py`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from engine_common import Line, running_daemon  # bench/ is on the path as a script

from wangend.media.metadata import MetadataState
from wangend.media.persistence import MediaPersistenceContext, write_video
from wangend.pipelines.runtime import to_uint8
from wangend.server.daemon import Daemon

SPEC = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "frames": 9, "steps": 4}


def direct_run(daemon: Daemon, seed: int, out: Path) -> float:
    pipe = daemon.engine.production.pipeline
    t0 = time.perf_counter()
    frames = pipe(
        prompt=SPEC["prompt"],
        negative_prompt=daemon.engine.registry.resolve("tiny").defaults.negative_prompt,
        height=SPEC["height"],
        width=SPEC["width"],
        num_frames=SPEC["frames"],
        num_inference_steps=SPEC["steps"],
        guidance_scale=daemon.engine.registry.resolve("tiny").defaults.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).frames[0]
    state = MetadataState(mode="embedded", document={"seed": seed})
    write_video(to_uint8(frames), out, f"direct-{seed}", 16, MediaPersistenceContext(), state)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--subscribers", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same thread budget for both sides

    with tempfile.TemporaryDirectory() as tmp, running_daemon(Path(tmp)) as (daemon, c):
        root = Path(tmp)
        socket_path = str(root / "d.sock")

        def via_daemon(seed: int) -> float:
            t0 = time.perf_counter()
            reply, _ = c.call("enqueue", {**SPEC, "seed": seed})
            job = reply["result"]["job"]
            _, t1 = c.until(lambda e: e.get("job") == job and e["type"] == "job.succeeded")
            return t1 - t0

        via_daemon(0)  # warm: loads the model
        direct_run(daemon, 0, root / "out")
        daemon_times, direct_times = [], []
        for i in range(args.runs):  # interleaved so drift hits both sides alike
            daemon_times.append(via_daemon(100 + i))
            direct_times.append(direct_run(daemon, 100 + i, root / "out"))
        d, p = statistics.median(daemon_times), statistics.median(direct_times)
        print(f"overhead: tiny job 64x64x9, 4 steps, {args.runs} runs each")
        print(f"  through the daemon (enqueue -> job.succeeded): median {d * 1000:.1f} ms")
        print(f"  direct pipeline call + encode:                median {p * 1000:.1f} ms")
        print(f"  ratio: {d / p:.3f}")

        def latency(method: str, params: dict, ends: str, seed: int) -> float:
            """Start a long job, wait for step 3, send `method`; reply -> `ends` event."""
            reply, _ = c.call("enqueue", {**SPEC, "steps": 400, "seed": seed})
            job = reply["result"]["job"]
            c.until(
                lambda e: (
                    e.get("job") == job
                    and e["type"] == "job.progress"
                    and e["data"].get("step", 0) >= 3
                )
            )
            rid = c.send(method, params)
            while c.read().get("id") != rid:
                pass
            t0 = time.perf_counter()
            _, t1 = c.until(lambda e: e.get("job") == job and e["type"] == ends)
            if method == "pause":  # clean up: end the held job, reopen the queue
                c.call("abort", {"job": job})
                c.call("resume")
                c.until(lambda e: e.get("job") == job and e["type"] == "job.aborted")
            return t1 - t0

        blocks = len(daemon.engine.production.pipeline.transformer.blocks)
        step_s = (d * 0.7) / SPEC["steps"]
        abort_lat = [latency("abort", {}, "job.aborted", i) for i in range(5)]
        print(
            f"abort: reply -> job.aborted median {statistics.median(abort_lat) * 1000:.2f} ms, "
            f"max {max(abort_lat) * 1000:.2f} ms (one transformer block ~ "
            f"{step_s / (2 * blocks) * 1000:.2f} ms estimated, {blocks} blocks, "
            "CFG = 2 passes/step)"
        )
        pause_lat = [latency("pause", {"mode": "now"}, "job.paused", i) for i in range(5)]
        print(
            f"pause: reply -> job.paused median {statistics.median(pause_lat) * 1000:.2f} ms, "
            f"max {max(pause_lat) * 1000:.2f} ms (one step ~ {step_s * 1000:.1f} ms)"
        )

        # fan-out: N subscribers, each must see every event of one job, in order
        subs = [Line(socket_path) for _ in range(args.subscribers)]
        for s in subs:
            s.call("subscribe", {})
        reply, _ = c.call("enqueue", {**SPEC, "seed": 5})
        job = reply["result"]["job"]
        c.until(lambda e: e.get("job") == job and e["type"] == "job.succeeded")
        complete = 0
        counts = set()
        for s in subs:
            seqs = []
            while True:
                e, _ = s.until(lambda e: e.get("job") == job)
                seqs.append(e["seq"])
                if e["type"] == "job.succeeded":
                    break
            complete += seqs == sorted(seqs)
            counts.add(len(seqs))
        print(
            f"events: {complete}/{len(subs)} subscribers got every event of the job in order "
            f"({sorted(counts)} events each)"
        )


if __name__ == "__main__":
    main()
