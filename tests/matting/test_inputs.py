"""Submit-time checks of a matting spec, on real files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wangend.config import MatAnyOneConfig
from wangend.errors import InvalidParams
from wangend.matting.inputs import MattingInputs
from wangend.protocol import MatAnyOneSpec

from .conftest import FPS, FRAMES, H, W


def resolve(**fields) -> object:
    return MattingInputs(MatAnyOneConfig()).resolve(MatAnyOneSpec(**fields))


def test_resolves_a_video_with_every_default_filled(media: dict[str, Path]) -> None:
    job = resolve(input=str(media["video"]), mask=str(media["mask"]))
    assert (job.frames, job.width, job.height, job.fps) == (FRAMES, W, H, FPS)
    assert (job.start_frame, job.end_frame, job.model, job.metadata) == (
        0,
        FRAMES,
        "tiny",
        "embedded",
    )
    assert Path(job.input).is_absolute() and Path(job.mask).is_absolute()
    assert set(job.inputs_sha256) == {"input", "mask"}
    assert all(len(v) == 64 for v in job.inputs_sha256.values())
    plan = MattingInputs.plan(job)
    assert plan["frames"] == FRAMES and plan["processing_size"] == [W, H] and plan["warnings"] == []


def test_frame_range_and_max_size_show_in_the_plan(media: dict[str, Path]) -> None:
    job = resolve(input=str(media["video"]), mask=str(media["mask"]), start_frame=1,
                  end_frame=4, max_size=32, rgba_zip=True)  # fmt: skip
    assert job.frames == 3
    plan = MattingInputs.plan(job)
    assert plan["processing_size"] == [32, 24]
    assert len(plan["outputs"]) == 2


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"input": "/nonexistent/clip.mp4"}, "$.params.input", "does not exist"),
        ({"mask": "/nonexistent/mask.png"}, "$.params.mask", "does not exist"),
        ({"mask": "empty_mask"}, "$.params.mask", "empty"),
        ({"start_frame": 3, "end_frame": 3}, "$.params.end_frame", "greater than"),
        ({"start_frame": FRAMES}, "$.params.start_frame", "past"),
        ({"end_frame": FRAMES + 1}, "$.params.end_frame", "past"),
        ({"output_name": "../escape"}, "$.params.output_name", "not a path"),
        ({"output_name": "{mask_kind}"}, "$.params.output_name", "not supported"),
        ({"model": "/nonexistent/matanyone.pth"}, "$.params.model", "not found"),
        ({"model": "what-is-this"}, "$.params.model", "neither"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(
    media: dict[str, Path], fields: dict, field: str, words: str
) -> None:
    spec = {"input": str(media["video"]), "mask": str(media["mask"])}
    spec.update({k: str(media[v]) if v in media else v for k, v in fields.items()})
    with pytest.raises(InvalidParams) as info:
        resolve(**spec)
    assert info.value.field == field
    assert words in info.value.message


def test_undecodable_input_and_mask(media: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(InvalidParams, match="cannot be decoded") as info:
        resolve(input=str(junk), mask=str(media["mask"]))
    assert info.value.field == "$.params.input"
    assert "[Errno" not in info.value.message  # FFmpeg's words, not PyAV's errno
    assert info.value.message.count(str(junk)) == 1
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"PNG? no")
    with pytest.raises(InvalidParams, match="cannot be decoded") as info:
        resolve(input=str(media["video"]), mask=str(bad_png))
    assert info.value.field == "$.params.mask"


def test_mask_of_another_size_is_accepted_with_a_warning(
    media: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        job = resolve(input=str(media["video"]), mask=str(media["big_mask"]))
    assert "resized to the frames" in caplog.text
    assert MattingInputs.plan(job)["warnings"] == [
        f"mask is 128x96 but the frames are {W}x{H}; it is resized to the frames"
    ]


def test_a_single_image_is_a_one_frame_video(media: dict[str, Path], tmp_path: Path) -> None:
    still = tmp_path / "still.png"
    Image.fromarray(np.full((H, W, 3), 128, dtype=np.uint8)).save(still)
    job = resolve(input=str(still), mask=str(media["mask"]))
    assert (job.frames, job.width, job.height) == (1, W, H)
