"""A ComfyUI user's session: the transformer file they already have, named once in the
config as [models.NAME] on a base model, is listed by `wangenctl models`, makes the same
video as the diffusers folder it came from, and is named in the output's settings; a
file that is gone is refused when the job is submitted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wangend.pipelines.tiny import ensure_tiny_model

from ..pipelines.checkpoint_files import write_checkpoint
from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames

pytestmark = pytest.mark.slow

WANGENCTL = str(Path(sys.executable).with_name("wangenctl"))
WANGEND = str(Path(sys.executable).with_name("wangend"))
SMALL = ["--width", "32", "--height", "32", "--frames", "5", "--steps", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("comfy")
    tiny = ensure_tiny_model(root / "elsewhere")  # the same seed: the daemon's own weights
    ckpt = root / "ComfyUI" / "models" / "diffusion_models" / "wan2.1_t2v_tiny.safetensors"
    write_checkpoint(tiny / "transformer", ckpt, prefix="model.diffusion_model.")
    config = root / "config.toml"
    config.write_text(
        f'[models."wan2.1-comfy"]\nbase = "tiny"\ntransformer = "{ckpt}"\n'
        'description = "my ComfyUI transformer"\n\n'
        f'[models.gone]\nbase = "tiny"\ntransformer = "{root / "deleted.safetensors"}"\n'
    )
    check = subprocess.run(
        [WANGEND, "config", "check", "--config", str(config)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    proc = DaemonProcess(root, "--config", str(config)).start()
    proc.ckpt = ckpt  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def ctl(daemon: DaemonProcess, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANGEN_")}
    env["COLUMNS"] = "200"
    cmd = [WANGENCTL, "--url", daemon.unix_url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_models_lists_the_file_model_and_the_broken_one(daemon: DaemonProcess) -> None:
    listed = ctl(daemon, "--json", "models")
    assert listed.returncode == 0, listed.stderr
    models = {m["name"]: m for m in map(json.loads, listed.stdout.splitlines())}
    mine = models["wan2.1-comfy"]
    assert mine["available"] and mine["family"] == "wan2.1-t2v"
    assert mine["files"] == {"transformer": str(daemon.ckpt)}
    assert not models["gone"]["available"] and "no such file" in models["gone"]["description"]
    table = ctl(daemon, "models").stdout
    assert "wan2.1-comfy" in table and "my ComfyUI transformer" in table


def test_the_file_makes_the_folders_video_and_the_output_names_it(daemon: DaemonProcess) -> None:
    made = ctl(daemon, "submit", "a fox in the snow", "--model", "wan2.1-comfy", *SMALL, "-f")
    assert made.returncode == 0, made.stderr
    frames, info = decode_frames(made.stdout.strip())
    assert frames.shape == (5, 32, 32, 3) and info["codec"] == "h264"
    meta = json.loads(info["comment"])
    assert meta["settings"]["model"] == "wan2.1-comfy"
    assert meta["settings"]["files"] == {"transformer": str(daemon.ckpt)}
    plain = ctl(daemon, "submit", "a fox in the snow", "--model", "tiny", *SMALL, "-f")
    assert plain.returncode == 0, plain.stderr
    # The generated frames (hashed before encoding) are the folder's, bit for bit.
    assert (
        meta["frames_sha256"]
        == json.loads(decode_frames(plain.stdout.strip())[1]["comment"])["frames_sha256"]
    )


def test_a_missing_file_is_refused_at_submit(daemon: DaemonProcess) -> None:
    refused = ctl(daemon, "submit", "a fox", "--model", "gone", *SMALL)
    assert refused.returncode != 0
    assert "model gone: transformer file" in refused.stderr and "no such file" in refused.stderr
    assert refused.stdout == ""
