"""`wangenctl import-queue`: a Wan2GP queue.zip built here (a manifest and a real PNG, as
Wan2GP's "Save Queue" writes them) imported into a real daemon, and the mapping itself."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from wangenctl.cli import app
from wangenctl.importer import QueueFile, QueueImportError, map_tasks, parse_model_map

from ..support.harness import DaemonProcess

TINY_MAP = ["--model-map", "t2v=tiny", "--model-map", "i2v=tiny-i2v"]


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def wan2gp_tasks() -> list[dict[str, Any]]:
    common = {"settings_version": 2.3, "negative_prompt": "", "activated_loras": []}
    return [
        {
            "id": 1,
            "params": {
                **common,
                "model_type": "t2v",
                "base_model_type": "t2v",
                "prompt": "a lighthouse at dusk",
                "negative_prompt": "blurry",
                "resolution": "64x48",
                "video_length": 5,
                "num_inference_steps": 3,
                "guidance_scale": 4.5,
                "flow_shift": 2.5,
                "seed": 42,
                "repeat_generation": 2,
                "prompt_enhancer": "T",
            },
        },
        {
            "id": 2,
            "params": {
                **common,
                "model_type": "i2v",
                "prompt": "a cat turns its head",
                "resolution": "64x64",
                "video_length": 5,
                "num_inference_steps": 2,
                "seed": -1,
                "image_prompt_type": "S",
                "image_start": "task2_image_start_0.png",
                "image_end": "task2_image_start_0.png",  # "S" only: not used
            },
        },
        {"id": 3, "params": {**common, "model_type": "hunyuan", "prompt": "a dog"}},
        {"id": 4, "params": {"mode": "edit_remux", "prompt": "x", "model_type": "t2v"}},
        {"id": 5, "params": {**common, "model_type": "t2v", "prompt": "x", "audio_guide": "a.wav"}},
    ]


@pytest.fixture
def queue_zip(tmp_path: Path) -> Path:
    path = tmp_path / "queue.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("queue.json", json.dumps(wan2gp_tasks(), indent=4))
        zf.writestr("task2_image_start_0.png", png_bytes())
    return path


@pytest.fixture
def refused_zip(tmp_path: Path) -> Path:
    """Two tasks the daemon takes and one it refuses: 65 is not a width the tiny model has."""
    bad = {"id": 6, "params": {"model_type": "t2v", "prompt": "too wide", "resolution": "65x48"}}
    path = tmp_path / "refused.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("queue.json", json.dumps([*wan2gp_tasks()[:2], bad]))
        zf.writestr("task2_image_start_0.png", png_bytes())
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def queued_jobs(daemon: DaemonProcess) -> list[int]:
    with daemon.unix() as client:
        return [r["id"] for r in client.result("jobs", {"state": ["queued"]})["jobs"]]


def test_import_into_a_real_daemon(daemon: DaemonProcess, queue_zip: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    with daemon.unix() as client:
        client.result("pause", {"mode": "now"})  # look at the jobs, do not run them
        try:
            result = invoke(
                "--url", daemon.unix_url, "--json", "import-queue", str(queue_zip),
                *TINY_MAP, "--media-dir", str(media),
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            lines = [json.loads(line) for line in result.stdout.splitlines()]
            queued = [t for t in lines if t["job"] is not None]
            skipped = {t["source_id"]: t["skipped"] for t in lines if t["skipped"]}
            assert [t["source_id"] for t in queued] == [1, 1, 2]
            assert "unknown model type 'hunyuan'" in skipped[3]
            assert "--model-map hunyuan=MODEL" in skipped[3]
            assert "edit_remux" in skipped[4] and "audio-driven" in skipped[5]

            records = [client.result("status", {"job": t["job"]}) for t in queued]
        finally:
            client.result("clear")
            client.result("resume")

    first, second, cat = (r["spec"] for r in records)
    assert all(r["state"] == "queued" for r in records)
    assert (first["model"], first["width"], first["height"], first["frames"]) == ("tiny", 64, 48, 5)
    assert (first["steps"], first["guidance_scale"], first["flow_shift"]) == (3, 4.5, 2.5)
    assert (first["negative_prompt"], first["prompt"]) == ("blurry", "a lighthouse at dusk")
    assert (first["seed"], second["seed"]) == (42, 43)  # repeat 2: the seed counts up
    assert "ignored: the prompt enhancer setting" in " ".join(queued[0]["notes"])
    extracted = media / "task2_image_start_0.png"
    assert cat["model"] == "tiny-i2v" and cat["image"] == str(extracted)
    assert cat["last_image"] is None  # image_prompt_type "S" has no end frame
    assert extracted.read_bytes() == png_bytes()
    assert sorted(p.name for p in media.iterdir()) == ["task2_image_start_0.png"]


def test_dry_run_prints_the_mapping_and_touches_nothing(
    daemon: DaemonProcess, queue_zip: Path, tmp_path: Path
) -> None:
    media = tmp_path / "imports" / "queue"
    before = queued_jobs(daemon)
    result = invoke(
        "--url", daemon.unix_url, "import-queue", str(queue_zip), "--dry-run", *TINY_MAP,
        "--media-dir", str(media),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "task 1 (Wan2GP id 1): would queue (tiny, 64x48)" in out
    # The daemon checked the start image too, though nothing is left extracted.
    assert "task 2 (Wan2GP id 2): would queue (tiny-i2v, 64x64, with image)" in out
    assert "task 3 (Wan2GP id 3): skipped: unknown model type 'hunyuan'" in out
    assert not (tmp_path / "imports").exists()
    assert queued_jobs(daemon) == before


def test_dry_run_says_what_the_daemon_would_refuse(
    daemon: DaemonProcess, refused_zip: Path, tmp_path: Path
) -> None:
    """As the import itself would: the same line, exit 1, and nothing queued."""
    before = queued_jobs(daemon)
    result = invoke(
        "--url", daemon.unix_url, "import-queue", str(refused_zip), "--dry-run", *TINY_MAP,
        "--media-dir", str(tmp_path / "media"),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("task 1 (Wan2GP id 1): would queue (tiny, 64x48)")
    assert lines[2].startswith("task 2 (Wan2GP id 2): would queue (tiny-i2v, 64x64, with image)")
    assert lines[3] == (
        "task 3 (Wan2GP id 6): refused by the daemon: "
        "width 65 is not a multiple of 16 for tiny; try 64 or 80 (tiny, 65x48)"
    )
    assert result.stderr == "error: the daemon would refuse 1 of 4 tasks\n"
    assert queued_jobs(daemon) == before
    assert not (tmp_path / "media").exists()

    json_run = invoke(
        "--url", daemon.unix_url, "--json", "import-queue", str(refused_zip), "--dry-run",
        *TINY_MAP, "--media-dir", str(tmp_path / "media"),
    )  # fmt: skip
    assert json_run.exit_code == 1
    *tasks, last = [json.loads(line) for line in json_run.stdout.splitlines()]
    assert [t["job"] for t in tasks] == [None] * 4
    assert [t["error"] for t in tasks][:3] == [None] * 3
    assert tasks[3]["error"]["type"] == "RpcError"
    assert last["error"]["code"] == -32602 and last["error"]["exit"] == 1


def test_json_import_of_a_refused_task_ends_with_the_error_object(
    daemon: DaemonProcess, refused_zip: Path, tmp_path: Path
) -> None:
    """Each refusal is `{type, message}` like a job record's error; the last line says why
    the command failed, as with every other --json failure; the other tasks are queued."""
    with daemon.unix() as client:
        client.result("pause", {"mode": "now"})
        try:
            result = invoke(
                "--url", daemon.unix_url, "--json", "import-queue", str(refused_zip),
                *TINY_MAP, "--media-dir", str(tmp_path / "media"),
            )  # fmt: skip
            queued = queued_jobs(daemon)
        finally:
            client.result("clear")
            client.result("resume")
    assert result.exit_code == 1, result.output
    *tasks, last = [json.loads(line) for line in result.stdout.splitlines()]
    refused = tasks[3]
    assert refused["job"] is None
    assert refused["error"] == {
        "type": "RpcError",
        "message": "width 65 is not a multiple of 16 for tiny; try 64 or 80",
    }
    assert [t["job"] for t in tasks[:3]] == queued[-3:]
    assert last == {
        "error": {
            "type": "RpcError",
            "message": "width 65 is not a multiple of 16 for tiny; try 64 or 80",
            "code": -32602,
            "data": {
                "field": "$.params.width",
                "message": "width 65 is not a multiple of 16 for tiny; try 64 or 80",
            },
            "exit": 1,
        }
    }
    assert result.stderr == "error: the daemon refused 1 of 4 tasks; the others are queued\n"


def test_a_bare_queue_json_keeps_paths_beside_it(tmp_path: Path) -> None:
    (tmp_path / "start.png").write_bytes(png_bytes())
    task = {
        "model_type": "i2v_2_2_lightning",
        "base_model_type": "i2v_2_2",
        "prompt": "waves",
        "image_start": ["start.png"],
        "guidance_phases": 2,
        "guidance_scale": 3.5,
        "guidance2_scale": 1.0,
        "switch_threshold": 900,
        "activated_loras": ["loras/i2v/lightx2v.safetensors", "style.safetensors"],
        "loras_multipliers": "# speed up\n1;0 0.5,0.8",
    }
    queue = QueueFile(path=tmp_path / "queue.json", tasks=[{"id": 9, "params": task}])
    (mapped,), extract = map_tasks(queue, parse_model_map([]), tmp_path / "unused")
    assert extract == {}  # nothing to extract: the files are already on disk
    assert mapped.spec == {
        "prompt": "waves",
        "model": "wan2.2-i2v-a14b",
        "guidance_scale": 3.5,
        "guidance_scale_2": 1.0,
        "boundary_ratio": 0.9,
        "image": str(tmp_path / "start.png"),
        "loras": [
            {"name": "lightx2v", "multiplier": "1;0"},
            {"name": "style", "multiplier": "0.5,0.8"},
        ],
    }
    assert "imported as its base type i2v_2_2" in mapped.notes[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 broken")
    result = invoke("import-queue", str(tmp_path / "not.zip"), "--dry-run")
    assert result.exit_code == 2 and "not valid JSON" in result.output
    result = invoke("import-queue", str(tmp_path / "missing.zip"), "--dry-run")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert result.output.startswith("error: ")  # as every other wangenctl error
    with pytest.raises(QueueImportError, match="WAN2GP_TYPE=MODEL"):
        parse_model_map(["t2v"])
