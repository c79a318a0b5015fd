"""The job-making commands against a real daemon, typed the way a user types them:
conditioning images, LoRAs, dry runs, `--from` an output, `inspect`, matting, the LoRA
and preset listings, previews saved while following, and the history export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ..adapters.lora_files import write_lora
from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames, write_clip

pytestmark = pytest.mark.slow

WANGENCTL = str(Path(sys.executable).with_name("wangenctl"))
WANGEND = str(Path(sys.executable).with_name("wangend"))
SMALL = ["--width", "32", "--height", "32", "--frames", "5", "--steps", "2"]


def ctl(daemon: DaemonProcess, *args: str, cwd: Path | None = None) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANGEN_")}
    env["COLUMNS"] = "200"
    cmd = [WANGENCTL, "--url", daemon.unix_url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def submitted(daemon: DaemonProcess, *args: str, cwd: Path | None = None) -> tuple[dict, str]:
    """Submit with --follow --json; the job's record and its (first) output."""
    done = ctl(daemon, "--json", "submit", *args, "--follow", cwd=cwd)
    assert done.returncode == 0, done.stderr
    job = json_lines(done.stdout)[0]["job"]
    record = json_lines(ctl(daemon, "--json", "status", str(job)).stdout)[0]
    assert record["state"] == "succeeded", record
    return record, record["outputs"][0]


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    path = folder / "start.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_an_image_given_by_a_relative_path_reaches_the_daemon_absolute(
    daemon: DaemonProcess, picture: Path
) -> None:
    record, output = submitted(
        daemon, "a kite", "--model", "tiny-i2v", "--image", picture.name, *SMALL, cwd=picture.parent
    )
    assert record["spec"]["image"] == str(picture)
    assert Path(output).is_file()


def test_a_missing_file_is_a_usage_error(daemon: DaemonProcess, tmp_path: Path) -> None:
    done = ctl(daemon, "submit", "p", "--image", str(tmp_path / "nope.png"))
    assert done.returncode == 2
    assert "nope.png" in done.stderr and "does not exist" in done.stderr


def test_loras_by_name_and_multiplier(daemon: DaemonProcess) -> None:
    folder = daemon.state_dir / "loras" / "wan_tiny"
    folder.mkdir(parents=True, exist_ok=True)
    write_lora(folder / "ink.safetensors", "kohya", seed=4)
    record, _ = submitted(daemon, "a heron", "--lora", "ink:0.7,0.2", "--seed", "2", *SMALL)
    [lora] = record["spec"]["loras"]
    assert (lora["name"], lora["multiplier"]) == ("ink", "0.7,0.2") and len(lora["sha256"]) == 64

    listed = ctl(daemon, "loras")
    assert listed.returncode == 0 and "ink" in listed.stdout and "kohya" in listed.stdout
    as_json = json_lines(ctl(daemon, "--json", "loras", "--state").stdout)[0]
    assert [x["name"] for x in as_json["loras"]] == ["ink"]
    assert as_json["state"] is not None

    bad = ctl(daemon, "submit", "p", "--lora", "nobody:1", *SMALL)
    assert bad.returncode == 1 and "nobody" in bad.stderr


def test_presets_are_listed_and_applied(daemon: DaemonProcess) -> None:
    folder = daemon.state_dir / "presets"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inked.lset").write_text(
        json.dumps({"loras": ["ink.safetensors"], "loras_mult": "0.5", "prompt": "ink style"})
    )
    write_lora(daemon.state_dir / "loras" / "wan_tiny" / "ink.safetensors", "kohya", seed=4)
    listed = ctl(daemon, "presets")
    assert listed.returncode == 0 and "inked" in listed.stdout
    record, _ = submitted(daemon, "a crane", "--preset", "inked", *SMALL)
    assert record["spec"]["preset"] == "inked"
    assert record["spec"]["prompt"].startswith("ink style")
    assert record["spec"]["loras"][0]["multiplier"] == "0.5"


def test_dry_run_shows_the_job_and_queues_nothing(daemon: DaemonProcess) -> None:
    before = json_lines(ctl(daemon, "--json", "status").stdout)[0]["queue"]
    jobs_before = ctl(daemon, "--json", "list").stdout
    done = ctl(daemon, "submit", "a dry run", "--seed", "9", "--dry-run", *SMALL)
    assert done.returncode == 0, done.stderr
    assert "nothing was queued" in done.stdout and "a dry run" in done.stdout
    [plan] = json_lines(ctl(daemon, "--json", "submit", "a dry run", "--dry-run", *SMALL).stdout)
    assert plan["spec"]["prompt"] == "a dry run" and plan["spec"]["steps"] == 2
    assert plan["plan"]
    assert json_lines(ctl(daemon, "--json", "status").stdout)[0]["queue"] == before
    assert ctl(daemon, "--json", "list").stdout == jobs_before
    refused = ctl(daemon, "submit", "p", "--frames", "6", "--dry-run")
    assert refused.returncode == 1 and "frames" in refused.stderr


def test_from_an_output_gives_the_same_frames_and_inspect_shows_its_settings(
    daemon: DaemonProcess,
) -> None:
    _, first = submitted(daemon, "a paper boat", "--seed", "77", *SMALL)
    record, again = submitted(daemon, "--from", first)
    assert again != first and record["spec"]["seed"] == 77
    frames_a, info_a = decode_frames(first)
    frames_b, info_b = decode_frames(again)
    assert (
        json.loads(info_a["comment"])["frames_sha256"]
        == json.loads(info_b["comment"])["frames_sha256"]
    )
    assert frames_a.shape == (5, 32, 32, 3) and np.array_equal(frames_a, frames_b)

    _, changed = submitted(daemon, "--from", first, "--seed", "78")
    assert json.loads(decode_frames(changed)[1]["comment"])["settings"]["seed"] == 78

    shown = ctl(daemon, "inspect", first)
    assert shown.returncode == 0 and "a paper boat" in shown.stdout and "77" in shown.stdout
    document = json_lines(ctl(daemon, "--json", "inspect", first).stdout)[0]
    assert document["settings"]["prompt"] == "a paper boat" and document["path"] == first


def test_inspect_of_a_file_without_settings_says_so(daemon: DaemonProcess, picture: Path) -> None:
    done = ctl(daemon, "inspect", str(picture))
    assert done.returncode == 1 and str(picture) in done.stderr


def test_previews_are_saved_while_following(daemon: DaemonProcess, tmp_path: Path) -> None:
    folder = tmp_path / "previews"
    done = ctl(
        daemon, "submit", "a comet", "--preview-every", "1", "--save-previews", str(folder),
        "--follow", *SMALL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = int(done.stderr.split()[1])  # "job 5 queued at position 0": stdout is the path
    assert Path(done.stdout.strip()).is_file()
    assert sorted(p.name for p in folder.iterdir()) == [f"{job}-1.jpg", f"{job}-2.jpg"]
    with Image.open(folder / f"{job}-2.jpg") as image:
        assert image.format == "JPEG"
    assert f"job {job}: preview 1/2" in done.stderr and f"job {job}: preview 2/2" in done.stderr

    as_json = ctl(daemon, "--json", "submit", "a comet", "--preview-every", "1", "-f", *SMALL)
    previews = [
        e["data"]["preview"] for e in json_lines(as_json.stdout)[1:] if "preview" in e["data"]
    ]
    assert [p["step"] for p in previews] == [1, 2]
    assert all("data" not in p and 0 < p["bytes"] <= 24 * 1024 for p in previews)


def test_matanyone_from_the_command_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    clip, mask = tmp_path / "clip.mp4", tmp_path / "mask.png"
    write_clip(clip, np.stack([np.full((24, 32, 3), 50 * i, dtype=np.uint8) for i in range(4)]))
    matte = np.zeros((24, 32), dtype=np.uint8)
    matte[4:20, 8:24] = 255
    Image.fromarray(matte).save(mask)

    dry = ctl(daemon, "matanyone", "--input", str(clip), "--mask", str(mask), "--dry-run")
    assert dry.returncode == 0 and "nothing was queued" in dry.stdout

    done = ctl(
        daemon, "--json", "matanyone", "--input", str(clip), "--mask", str(mask),
        "--warmup", "1", "--type", "greenscreen", "--follow",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = json_lines(done.stdout)[0]["job"]
    record = json_lines(ctl(daemon, "--json", "status", str(job)).stdout)[0]
    output = Path(record["outputs"][0])
    assert output.parent.name == "mask_outputs" and output.is_file()
    assert decode_frames(output)[0].shape == (4, 24, 32, 3)
    listed = ctl(daemon, "list")
    assert "matte clip.mp4 (greenscreen)" in listed.stdout


def test_history_export_writes_one_line_per_finished_job(daemon: DaemonProcess) -> None:
    submitted(daemon, "for the history", *SMALL)
    done = subprocess.run(
        [WANGEND, "history", "--state-dir", str(daemon.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stdout)
    assert lines and all(line["state"] in ("succeeded", "failed", "aborted") for line in lines)
    assert any(line["spec"].get("prompt") == "for the history" for line in lines)
    finished = json_lines(ctl(daemon, "--json", "list", "-s", "succeeded", "-s", "failed",
                              "-s", "aborted").stdout)  # fmt: skip
    assert sorted(line["id"] for line in lines) == sorted(r["id"] for r in finished)

    last = lines[-1]["timings"]["finished_at"]
    target = daemon.state_dir.parent / "recent.jsonl"
    since = subprocess.run(
        [WANGEND, "history", "--state-dir", str(daemon.state_dir), "--since", str(last),
         "--output", str(target)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert since.returncode == 0, since.stderr
    assert [json.loads(x)["id"] for x in target.read_text().splitlines()] == [lines[-1]["id"]]
