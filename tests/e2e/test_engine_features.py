"""The engine's features through a real daemon: other Wan families, LoRAs (and a corrupt
one), previews, sidecar metadata, dry runs and matting jobs, each on tiny models."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..adapters.lora_files import write_lora
from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames, write_clip
from ..support.wire import job_event

TERMINAL = ("job.succeeded", "job.failed", "job.aborted")
SMALL = {"width": 32, "height": 32, "frames": 5, "steps": 2, "fps": 8}


def run_to_end(daemon: DaemonProcess, spec: dict) -> tuple[dict, list[dict]]:
    with daemon.unix() as client:
        client.result("subscribe", {"since": client.result("status")["last_seq"]})
        job = client.result("enqueue", spec)["job"]
        final = client.wait_event(job_event(job, *TERMINAL))
        events = [e for e in client.seen if e.get("job") == job]
    return final, events


def settings_of(output: str) -> dict:
    return json.loads(decode_frames(output)[1]["comment"])


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A start image, a short clip and a first-frame mask, made here."""
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(7)
    image = folder / "start frame.png"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    ramp = np.stack([np.full((24, 32, 3), 40 * i, dtype=np.uint8) for i in range(6)])
    clip = write_clip(folder / "clip.mp4", ramp)
    mask = folder / "mask.png"
    matte = np.zeros((24, 32), dtype=np.uint8)
    matte[6:18, 8:24] = 255
    Image.fromarray(matte).save(mask)
    return {"image": image, "clip": clip, "mask": mask}


def test_image_to_video_records_its_start_image(daemon: DaemonProcess, media) -> None:
    spec = {"prompt": "a kite", "model": "tiny-i2v", "image": str(media["image"]), "seed": 3}
    final, _ = run_to_end(daemon, {**spec, **SMALL})
    assert final["type"] == "job.succeeded", final
    settings = settings_of(final["data"]["outputs"][0])["settings"]
    assert settings["family"] == "wan2.1-i2v" and settings["image"] == str(media["image"])
    assert len(settings["inputs_sha256"]["image"]) == 64


def test_a_text_model_refuses_an_image_naming_the_field(daemon: DaemonProcess, media) -> None:
    with daemon.unix() as client:
        reply = client.call("enqueue", {"prompt": "p", "image": str(media["image"])})
    assert reply["error"]["code"] == -32602
    assert reply["error"]["data"]["field"] == "$.params.image"
    assert "tiny-i2v" in reply["error"]["message"]


def test_loras_apply_and_a_zero_multiplier_gives_the_base_frames(daemon: DaemonProcess) -> None:
    folder = daemon.state_dir / "loras" / "wan_tiny"
    folder.mkdir(parents=True, exist_ok=True)
    write_lora(folder / "glow.safetensors", "wan", seed=1, scale=2.0)
    base = {"prompt": "a lantern", "seed": 21, **SMALL}
    runs = {}
    for label, extra in (
        ("base", {}),
        ("zero", {"loras": [{"name": "glow", "multiplier": "0"}]}),
        ("full", {"loras": [{"name": "glow", "multiplier": "1"}]}),
        ("schedule", {"loras": [{"name": "glow", "multiplier": "1,0"}]}),
    ):
        final, _ = run_to_end(daemon, {**base, **extra})
        assert final["type"] == "job.succeeded", (label, final)
        runs[label] = settings_of(final["data"]["outputs"][0])
    assert runs["zero"]["frames_sha256"] == runs["base"]["frames_sha256"]
    assert runs["full"]["frames_sha256"] != runs["base"]["frames_sha256"]
    assert runs["schedule"]["frames_sha256"] not in {
        runs["full"]["frames_sha256"],
        runs["base"]["frames_sha256"],
    }
    [lora] = runs["full"]["settings"]["loras"]
    assert lora["name"] == "glow" and len(lora["sha256"]) == 64

    with daemon.unix() as client:
        listed = client.result("loras", {"model": "tiny"})
    assert [entry["name"] for entry in listed["loras"]] == ["glow"]
    assert listed["loras"][0]["format"] == "wan"


def test_a_corrupt_lora_is_refused_and_one_spoiled_later_fails_only_its_job(
    daemon: DaemonProcess,
) -> None:
    folder = daemon.state_dir / "loras" / "wan_tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with daemon.unix() as client:
        reply = client.call("enqueue", {"prompt": "p", "loras": [{"name": "broken"}], **SMALL})
    assert reply["error"]["code"] == -32602
    assert reply["error"]["data"]["field"] == "$.params.loras[0]"

    # A good file, queued while the queue is paused, then spoiled before it runs.
    spoiled = write_lora(folder / "later.safetensors", "wan", seed=2)
    with daemon.unix() as client:
        client.result("pause")
        client.result("subscribe", {"since": client.result("status")["last_seq"]})
        bad = client.result("enqueue", {"prompt": "p", "loras": [{"name": "later"}], **SMALL})
        good = client.result("enqueue", {"prompt": "after the bad one", **SMALL})
        spoiled.write_bytes(spoiled.read_bytes()[:100])
        client.result("resume")
        failed = client.wait_event(job_event(bad["job"], *TERMINAL))
        after = client.wait_event(job_event(good["job"], *TERMINAL))
    assert failed["type"] == "job.failed"
    assert failed["data"]["error"]["type"] == "LoraUnavailable"
    assert "later.safetensors" in failed["data"]["error"]["message"]
    assert after["type"] == "job.succeeded"


def test_previews_arrive_as_small_jpegs(daemon: DaemonProcess) -> None:
    spec = {"prompt": "a comet", "seed": 5, "preview_every": 1, **SMALL, "steps": 3}
    final, events = run_to_end(daemon, spec)
    assert final["type"] == "job.succeeded"
    previews = [e["data"]["preview"] for e in events if "preview" in e.get("data", {})]
    assert [p["step"] for p in previews] == [1, 2, 3]
    for preview in previews:
        data = base64.b64decode(preview["data"])
        assert len(data) <= 24 * 1024 and preview["mime"] == "image/jpeg"
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and max(image.size) <= 256


def test_json_metadata_goes_to_a_sidecar_only(daemon: DaemonProcess) -> None:
    final, _ = run_to_end(daemon, {"prompt": "a pier", "seed": 2, "metadata": "json", **SMALL})
    video, sidecar = final["data"]["outputs"]
    assert sidecar.endswith(".json") and Path(sidecar).stem == Path(video).stem
    assert json.loads(Path(sidecar).read_text())["settings"]["prompt"] == "a pier"
    assert not decode_frames(video)[1]["comment"]


def test_validate_is_a_dry_run(daemon: DaemonProcess, media) -> None:
    with daemon.unix() as client:
        before = client.result("status")["queue"]
        answer = client.result(
            "validate",
            {"kind": "matanyone", "input": str(media["clip"]), "mask": str(media["mask"])},
        )
        assert client.result("status")["queue"] == before
    assert answer["spec"]["kind"] == "matanyone" and answer["plan"]["frames"] == 6


def test_matting_job_runs_beside_generations(daemon: DaemonProcess, media) -> None:
    spec = {
        "kind": "matanyone",
        "input": str(media["clip"]),
        "mask": str(media["mask"]),
        "warmup": 1,
        "rgba_zip": True,
    }
    final, events = run_to_end(daemon, spec)
    assert final["type"] == "job.succeeded", final
    video, *rest = final["data"]["outputs"]
    assert Path(video).parent == daemon.output_dir / "mask_outputs"
    frames, info = decode_frames(video)
    assert frames.shape == (6, 24, 32, 3)
    assert json.loads(info["comment"])["settings"]["kind"] == "matanyone"
    assert any(p.endswith("_rgba.zip") for p in rest)
    phases = {e["data"]["phase"] for e in events if e["type"] == "job.progress"}
    assert "matting" in phases
