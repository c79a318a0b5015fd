"""What a matting run leaves behind, read back from the files: sound in sync with the
pictures (a later start frame, a variable frame rate), the daemon's metadata mode, the
names, an odd source size told truthfully, and each output's role."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from wangend.config import MatAnyOneConfig
from wangend.matting.inputs import MattingInputs
from wangend.matting.runtime import MattingRuntime, decode_frames
from wangend.media.metadata import read_metadata
from wangend.media.persistence import MediaPersistenceContext
from wangend.media.roles import output_roles
from wangend.pipelines.control import JobControl
from wangend.protocol import MatAnyOneSpec

from ..media.support import FFMPEG, audio_onset, ffmpeg_onset, make_click_source
from .conftest import RecordingHooks, make_mask


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matting-clips")
    steady = [i / 10 for i in range(10)] + [1.0 + i / 50 for i in range(20)]
    return {
        # 25 fps, 2.4 s, AAC click at 1.2 s (source frame 30)
        "clip": make_click_source(root / "clip.mp4", click_at=1.2, seconds=2.4, fps=25),
        # 10 fps for 1 s, then 50 fps; click at 1.0 s (frame 10)
        "vfr": make_click_source(root / "vfr.mp4", click_at=1.0, seconds=1.4, frame_times=steady),
        "mask": make_mask(root / "mask.png", (32, 32)),
    }


def resolve(metadata_default: str = "embedded", **fields) -> object:
    fields.setdefault("warmup", 0)
    inputs = MattingInputs(MatAnyOneConfig(), metadata_default=metadata_default)
    return inputs.resolve(MatAnyOneSpec(**fields))


def run(tmp_path: Path, job, ctx: MediaPersistenceContext | None = None) -> list[Path]:
    runtime = MattingRuntime(tmp_path, "tiny", "cpu", ctx)
    return [Path(p) for p in runtime.run(4, job, JobControl(), RecordingHooks())]


def picture_times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        return [float(f.pts * f.time_base) for f in container.decode(video=0)]


def audio_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        return sum(f.samples / f.sample_rate for f in container.decode(audio=0))


@pytest.mark.parametrize(("container", "mode"), [("mp4", "copy"), ("mkv", "flac")])
def test_a_later_start_frame_brings_its_own_sound(
    clips: dict[str, Path], tmp_path: Path, container: str, mode: str
) -> None:
    """Frames 20-40 of a 25 fps clip (0.8 s to 1.6 s): the click at 1.2 s plays 0.4 s
    in, and the track ends with the last picture (was: the sound from 0 s, 1 s late)."""
    job = resolve(input=str(clips["clip"]), mask=str(clips["mask"]), start_frame=20,
                  end_frame=40, rgba_zip=True)  # fmt: skip
    video, archive = run(tmp_path, job, MediaPersistenceContext(container=container))
    with zipfile.ZipFile(archive) as z:  # the first picture is source frame 20
        first = np.asarray(Image.open(io.BytesIO(z.read("frame_00000.png"))))[..., :3]
    assert np.array_equal(first, decode_frames(clips["clip"], 20, 21)[0])
    document = read_metadata(video)["audio"]
    assert (document["mode"], document["start"]) == (mode, 0.8)
    assert abs(audio_onset(video) - 0.4) < 0.002
    if FFMPEG is not None:
        assert abs(ffmpeg_onset(video) - 0.4) < 0.002
    assert 0.79 < audio_seconds(video) <= 0.8 + (1024 / 48000 if mode == "copy" else 0.001)


def test_a_variable_frame_rate_keeps_real_time(clips: dict[str, Path], tmp_path: Path) -> None:
    """Each picture keeps its source time, so the click at frame 10 (1.0 s) still plays
    with it (was: a constant average rate, frame 10 at 0.68 s against sound at 1.0 s)."""
    job = resolve(input=str(clips["vfr"]), mask=str(clips["mask"]), rgba_zip=True)
    video, archive = run(tmp_path, job)
    with av.open(str(clips["vfr"])) as container:
        source = [float(f.pts * f.time_base) for f in container.decode(video=0)]
    assert np.allclose(picture_times(video), source, atol=0.0015)
    assert abs(audio_onset(video) - 1.0) < 0.002
    document = read_metadata(video)
    assert document["variable_frame_rate"] is True
    with zipfile.ZipFile(archive) as z:
        assert len(z.namelist()) == len(source)
    # a constant-rate source stays constant-rate at exactly its rate
    steady, _zip = run(tmp_path, resolve(input=str(clips["clip"]), mask=str(clips["mask"]),
                                         end_frame=10, rgba_zip=True))  # fmt: skip
    with av.open(str(steady)) as container:
        assert container.streams.video[0].average_rate == 25
    assert "variable_frame_rate" not in read_metadata(steady)


def test_the_daemons_metadata_default_applies(clips: dict[str, Path], tmp_path: Path) -> None:
    """`[media] metadata = "json"` (handed in as `metadata_default`) is what a matting
    job without its own `metadata` gets, as a generation does; its own choice wins."""
    common = {"input": str(clips["clip"]), "mask": str(clips["mask"]), "end_frame": 2}
    job = resolve("json", **common)
    assert job.metadata == "json"
    assert resolve("json", metadata="embedded", **common).metadata == "embedded"
    assert resolve(**common).metadata == "embedded"
    video, sidecar = run(tmp_path, job)
    assert sidecar.name == f"{video.stem}.json"
    assert read_metadata(sidecar)["kind"] == "matanyone"
    with av.open(str(video)) as container:
        assert "comment" not in {k.lower() for k in container.metadata}


def test_names_say_the_output_type(clips: dict[str, Path], tmp_path: Path) -> None:
    common = {"input": str(clips["clip"]), "mask": str(clips["mask"]), "end_frame": 2}
    (video,) = run(tmp_path, resolve(mask_type="greenscreen", **common))
    assert video.name.endswith("_clip_greenscreen.mp4")  # default {date}_{input}_{mask_type}
    (named,) = run(tmp_path, resolve(mask_type="foreground", output_name="{input}_{mask_type}",
                                     **common))  # fmt: skip
    assert named.name == "clip_foreground.mp4"


def test_an_odd_source_size_is_told_truthfully(tmp_path: Path) -> None:
    """4:2:0 needs even sides: the video is padded by one repeated pixel, the document
    says so, and the ZIP keeps the source size so it overlays the source 1:1."""
    source = tmp_path / "odd.mp4"
    with av.open(str(source), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 65, 49, "yuv444p"
        for i in range(3):
            picture = np.full((49, 65, 3), 60 + i * 20, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    mask = make_mask(tmp_path / "mask65.png", (65, 49))
    job = resolve(input=str(source), mask=str(mask), rgba_zip=True)
    video, archive = run(tmp_path / "out", job)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (66, 50)
    document = read_metadata(video)
    assert (document["settings"]["width"], document["settings"]["height"]) == (65, 49)
    assert document["encoded_size"] == [66, 50]
    assert any("66x50" in w and "65x49" in w for w in document["warnings"])
    with zipfile.ZipFile(archive) as z:
        assert Image.open(io.BytesIO(z.read("frame_00000.png"))).size == (65, 49)
    (kept,) = run(tmp_path / "444", resolve(input=str(source), mask=str(mask)),
                  MediaPersistenceContext(pix_fmt="yuv444p"))  # fmt: skip
    assert "encoded_size" not in read_metadata(kept) and not read_metadata(kept)["warnings"]


def test_roles_of_what_a_run_wrote(clips: dict[str, Path], tmp_path: Path) -> None:
    common = {"input": str(clips["clip"]), "mask": str(clips["mask"]), "end_frame": 2}
    ctx = MediaPersistenceContext(save_masks=True, metadata="json")
    job = resolve(rgba_zip=True, metadata="json", output_name="x_alpha", **common)
    paths = run(tmp_path, job, ctx)
    assert output_roles({"kind": "matanyone", "mask_type": "alpha"}, [str(p) for p in paths]) == [
        "matte", "metadata", "frames_zip", "mask", "metadata",
    ]  # fmt: skip
    job = resolve(mask_type="foreground", output_name="y_matte", **common)
    (composite,) = run(tmp_path, job)
    assert output_roles({"kind": "matanyone", "mask_type": "foreground"}, [str(composite)]) == [
        "video"
    ]
