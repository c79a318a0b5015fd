"""kill -9 the daemon at seeded random moments while tiny jobs run; nothing is lost or
done twice.

N jobs (WANGEN_TORTURE_JOBS, default 12) are queued in waves between K kills
(WANGEN_TORTURE_KILLS, default 5), each after a seeded random delay
(WANGEN_TORTURE_SEED), so kills land while the model loads, mid-step and while an
output is encoded or renamed. `make torture` runs the long version.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from ..support.harness import DaemonProcess
from ..support.outputs import files_under
from .conftest import TERMINAL_STATES, dot_files, env_int, integrity, output_job_id

pytestmark = pytest.mark.slow

JOBS = env_int("WANGEN_TORTURE_JOBS", 12)
KILLS = env_int("WANGEN_TORTURE_KILLS", 5)
SEED = env_int("WANGEN_TORTURE_SEED", 20261124)
DRAIN_TIMEOUT = 60.0 + 3.0 * JOBS


def _jobs(daemon: DaemonProcess) -> dict[int, dict]:
    with daemon.unix() as client:
        return {r["id"]: r for r in client.result("jobs", {"limit": 10000})["jobs"]}


def _phase(daemon: DaemonProcess) -> str:
    """What the daemon was doing just before a kill (for the figures only)."""
    try:
        with daemon.unix(timeout=2) as client:
            running = client.result("status")["running"]
    except (OSError, AssertionError):
        return "busy"
    return running["phase"] or running["state"] if running else "idle"


def test_random_kill_9s_lose_no_job_and_finish_none_twice(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    config = tmp_path / "wangend.toml"
    # a resume point after every step: kills also land while one is written
    config.write_text("max_attempts = 100\n[engine]\nresume_every = 0.0\n")
    daemon = DaemonProcess(tmp_path, "--config", str(config)).start()
    waves = [JOBS // (KILLS + 1) + (i < JOBS % (KILLS + 1)) for i in range(KILLS + 1)]
    queued: list[int] = []
    kills = 0
    landed: Counter[str] = Counter()
    try:
        for wave, count in enumerate(waves):
            with daemon.unix() as client:
                for _ in range(count):
                    spec = {"prompt": f"torture {len(queued)}", "steps": rng.randint(2, 40)}
                    spec["seed"] = rng.randrange(2**31)
                    queued.append(client.result("enqueue", spec)["job"])
            if wave == KILLS:
                break
            time.sleep(rng.uniform(0.0, 2.5))  # 0..~2 s: model loading; later: steps, encode
            landed[_phase(daemon)] += 1
            daemon.kill9()
            kills += 1
            daemon.start()

        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            records = _jobs(daemon)
            if all(records[j]["state"] in TERMINAL_STATES for j in queued):
                break
            assert time.monotonic() < deadline, {j: records[j]["state"] for j in queued}
            time.sleep(0.2)
    finally:
        daemon.stop()

    attempts = sum(r["attempts"] for r in records.values())
    print(
        f"torture: seed {SEED}, {len(queued)} jobs, {kills} kill -9s survived, "
        f"{attempts} attempts in all; kills landed during {dict(landed)}"
    )
    assert kills == KILLS
    assert sorted(records) == sorted(queued)  # nothing lost, nothing invented
    failed = {j: r["error"] for j, r in records.items() if r["state"] != "succeeded"}
    assert failed == {}  # max_attempts = 100: every job must finish in the end
    outputs = [p for p in files_under(daemon.output_dir) if not p.name.startswith(".")]
    recorded = sorted(Path(r["outputs"][0]) for r in records.values())
    assert all(len(r["outputs"]) == 1 for r in records.values())
    # exactly one file per job on disk, and it is the one the job's record names
    by_job = Counter(output_job_id(p) for p in outputs)
    assert {j: n for j, n in by_job.items() if n != 1} == {}
    assert sorted(by_job) == sorted(queued)
    assert sorted(outputs) == recorded
    assert dot_files(daemon.output_dir) == []
    assert integrity(daemon.state_dir / "queue.sqlite3") == "ok"
    resume = daemon.state_dir / "resume"  # every point went with its job, temp files too
    leftover = sorted(resume.iterdir()) if resume.exists() else []
    assert leftover == []
