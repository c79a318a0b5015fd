"""`wangenctl inspect`'s reader: settings come back from every output format the daemon
writes, and turn into enqueue params that reproduce the output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from PIL import Image

from tests.media.support import fast_ctx, gradient, make_job, make_matting, state_for
from wangenctl.errors import WangenctlError
from wangenctl.inspect import NoSettings, read_settings, spec_from_settings
from wangend.media.metadata import read_metadata
from wangend.media.persistence import write_image, write_video
from wangend.protocol import GenerateSpec, MatAnyOneSpec, decode_job_spec


@pytest.mark.parametrize(
    ("kind", "fmt", "mode"),
    [
        ("video", "mp4", "embedded"), ("video", "mkv", "embedded"), ("video", "mp4", "json"),
        ("image", "png", "embedded"), ("image", "jpeg", "embedded"),
        ("image", "webp", "embedded"), ("image", "png", "json"),
    ],
)  # fmt: skip
def test_reads_every_format(tmp_path: Path, kind: str, fmt: str, mode: str) -> None:
    state = state_for(make_job(prompt="雪の中の狐 🦊"), mode=mode)
    if kind == "video":
        path = write_video(gradient(2), tmp_path, "o", 8, fast_ctx(container=fmt), state)[0]
    else:
        path = write_image(gradient(1)[0], tmp_path, "o", fast_ctx(image_format=fmt), state)[0]
    document = read_settings(path)
    assert document == state.document == read_metadata(path)
    if mode == "json":
        assert read_settings(path.with_suffix(".json")) == document


def test_files_without_settings(tmp_path: Path) -> None:
    bare = write_video(gradient(2), tmp_path, "bare", 8, fast_ctx(), state_for(mode="none"))[0]
    with pytest.raises(NoSettings, match=r"bare\.mp4 carries no wangend settings"):
        read_settings(bare)
    plain = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(NoSettings, match="no wangend settings"):
        read_settings(plain)
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"not a video at all")
    with pytest.raises(NoSettings, match=r"broken\.mp4: cannot be read") as refused:
        read_settings(garbage)
    assert "Errno" not in str(refused.value) and str(refused.value).count("broken.mp4") == 1
    sidecar = tmp_path / "bare.json"
    sidecar.write_bytes(b"\xff\xfe not UTF-8")
    with pytest.raises(NoSettings, match=r"bare\.json: cannot be read"):
        read_settings(bare)
    with pytest.raises(WangenctlError, match="no such file"):
        read_settings(tmp_path / "missing.mp4")


def test_spec_reproduces_a_generation(tmp_path: Path) -> None:
    job = make_job(image=str(tmp_path / "start.png"), preset="cinematic")
    path = write_video(gradient(2), tmp_path, "o", 8, fast_ctx(), state_for(job))[0]
    params = spec_from_settings(read_settings(path), {})
    spec = decode_job_spec(msgspec.json.encode(params))
    assert isinstance(spec, GenerateSpec)
    assert params["kind"] == "generate" and spec.seed == 42 and spec.steps == 4
    assert spec.prompt == job.prompt and spec.enhance_prompt is False  # the enhanced prompt
    assert spec.image == job.image and spec.output_name == job.output_name
    assert [(lora.name, lora.multiplier) for lora in spec.loras] == [("style", "1,0.5")]
    for derived in ("source", "family", "inputs_sha256", "dtype", "original_prompt",
                    "enhancer", "preset"):  # fmt: skip
        assert derived not in params


def test_overrides_and_their_errors() -> None:
    document = state_for().document
    params = spec_from_settings(document, {"seed": 7, "steps": 30, "negative_prompt": None})
    assert (params["seed"], params["steps"]) == (7, 30) and "negative_prompt" not in params
    assert spec_from_settings(document["settings"], {})["seed"] == 42  # settings part alone
    with pytest.raises(ValueError, match=r"\$\.steps"):
        spec_from_settings(document, {"steps": 0})
    with pytest.raises(ValueError, match="unknown field `bogus`"):
        spec_from_settings(document, {"bogus": 1})
    with pytest.raises(NoSettings):
        spec_from_settings({"settings": {"kind": "paint"}}, {})


def test_spec_for_a_matting_run() -> None:
    job = make_matting(erode=3, rgba_zip=True)
    params = spec_from_settings(state_for(job).document, {"priority": 5})
    spec = decode_job_spec(msgspec.json.encode(params))
    assert isinstance(spec, MatAnyOneSpec)
    assert (spec.input, spec.mask, spec.erode, spec.rgba_zip) == (job.input, job.mask, 3, True)
    assert spec.end_frame == 9 and spec.priority == 5
    assert not {"frames", "width", "height", "fps", "seed"} & params.keys()


def test_inspect_imports_no_daemon_media_code() -> None:
    code = (
        "import sys, wangenctl.inspect; "
        "leaves = {'wangend.protocol', 'wangend.exif'}; "
        "bad = [m for m in sys.modules if m.startswith('wangend.') and m not in leaves];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
