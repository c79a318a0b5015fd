"""The tiny network end to end through MattingRuntime, on real files decoded back."""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from wangend.config import MatAnyOneConfig
from wangend.matting.inputs import MattingInputs
from wangend.matting.postprocess import GREEN, composite, dilate, erode, refine_mask
from wangend.matting.runtime import MattingRuntime
from wangend.media.writers import read_video_metadata
from wangend.pipelines.control import JobAborted, JobControl
from wangend.protocol import MatAnyOneSpec

from .conftest import FRAMES, H, RecordingHooks, W


def job_for(media: dict[str, Path], mask: str = "mask", **fields):
    fields.setdefault("warmup", 2)
    spec = MatAnyOneSpec(input=str(media["video"]), mask=str(media[mask]), **fields)
    return MattingInputs(MatAnyOneConfig()).resolve(spec)


def decode(path: Path) -> tuple[np.ndarray, list[str]]:
    with av.open(str(path)) as c:
        kinds = [s.type for s in c.streams]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return frames, kinds


def test_alpha_video_zip_and_audio(media: dict[str, Path], tmp_path: Path, hooks) -> None:
    runtime = MattingRuntime(tmp_path, "tiny", "cpu")
    job = job_for(media, rgba_zip=True, dilate=2, erode=2)
    paths = [Path(p) for p in runtime.run(7, job, JobControl(), hooks)]
    video, archive = paths
    assert video.parent == tmp_path / "mask_outputs" and video.suffix == ".mp4"
    frames, kinds = decode(video)
    assert frames.shape == (FRAMES, H, W, 3)
    assert kinds == ["video", "audio"]  # the source's AAC track came along
    # gray: the three channels agree up to chroma subsampling noise
    assert np.abs(frames[..., 0].astype(int) - frames[..., 1].astype(int)).max() <= 12
    meta = read_video_metadata(video)
    assert meta is not None and meta["kind"] == "matanyone" and meta["job"] == 7

    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert names == [f"frame_{i:05d}.png" for i in range(FRAMES)]
        img = Image.open(io.BytesIO(z.read(names[0])))
        assert img.mode == "RGBA" and img.size == (W, H)
    steps = [e[1] for e in hooks.events if e[0] == "progress" and e[1][2] == "matting"]
    assert steps == [(i, FRAMES, "matting") for i in range(1, FRAMES + 1)]


def test_alpha_is_in_range_and_frame0_follows_the_mask(
    media: dict[str, Path], tmp_path: Path
) -> None:
    runtime = MattingRuntime(tmp_path, "tiny", "cpu")
    job = job_for(media, warmup=0)
    net = runtime.network("tiny", 0, RecordingHooks())
    from wangend.matting.inputs import load_mask
    from wangend.matting.runtime import decode_frames

    frames = decode_frames(Path(job.input), 0, job.frames)
    mask = load_mask(Path(job.mask))
    alpha = runtime._matte(net, frames, mask, job, JobControl(), RecordingHooks())
    assert alpha.shape == (FRAMES, H, W)
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    assert np.array_equal(alpha[0], (mask >= 0.5).astype(np.float32))  # no warm-up: the mask


def test_downscaled_processing_restores_the_source_size(
    media: dict[str, Path], tmp_path: Path, hooks
) -> None:
    runtime = MattingRuntime(tmp_path, "tiny", "cpu")
    job = job_for(media, max_size=32, mask_type="greenscreen", reattach_audio=False,
                  start_frame=2, end_frame=5, mask="big_mask")  # fmt: skip
    (path,) = runtime.run(1, job, JobControl(), hooks)
    frames, kinds = decode(Path(path))
    assert frames.shape == (3, H, W, 3) and kinds == ["video"]
    meta = read_video_metadata(Path(path))
    assert meta["processing_size"] == [32, 24] and meta["warnings"]


def test_network_is_kept_warm_between_runs(media: dict[str, Path], tmp_path: Path) -> None:
    runtime = MattingRuntime(tmp_path, "tiny", "cpu")
    first, second = RecordingHooks(), RecordingHooks()
    runtime.run(1, job_for(media, end_frame=2), JobControl(), first)
    runtime.run(2, job_for(media, end_frame=2), JobControl(), second)
    assert ("loading", "tiny") in first.events
    assert ("loading", "tiny") not in second.events
    assert len(list((tmp_path / "mask_outputs").glob("*.mp4"))) == 2  # (2) suffix, no overwrite


def test_model_events_name_the_device_and_why(media: dict[str, Path], tmp_path: Path) -> None:
    """As a generation's load events do: wangenctl prints "loading model tiny on cpu" from them."""
    runtime = MattingRuntime(tmp_path, "tiny", "cpu")
    first, second = RecordingHooks(), RecordingHooks()
    runtime.run(1, job_for(media, end_frame=2), JobControl(), first)
    loading, loaded = first.model_data
    assert loading["device"] == loaded["device"] == "cpu"
    assert loading["reason"] == "cold"
    runtime.network("tiny", 5, second)  # another seed of the tiny weights: a new network
    assert second.model_data[0]["reason"] == "switch"


def test_abort_between_frames_writes_nothing(media: dict[str, Path], tmp_path: Path) -> None:
    control = JobControl()

    class AbortAtTwo(RecordingHooks):
        def progress(self, step, steps, phase, preview=None):
            super().progress(step, steps, phase, preview)
            if phase == "matting" and step == 2:
                control.request_abort()

    hooks = AbortAtTwo()
    with pytest.raises(JobAborted):
        MattingRuntime(tmp_path, "tiny", "cpu").run(
            1, job_for(media, rgba_zip=True), control, hooks
        )
    matting = [e for e in hooks.events if e[0] == "progress" and e[1][2] == "matting"]
    assert matting[-1][1][0] == 2
    assert not any(tmp_path.rglob("*"))


def test_pause_holds_between_frames(media: dict[str, Path], tmp_path: Path) -> None:
    control = JobControl()
    held = threading.Event()

    class Hooks(RecordingHooks):
        def paused(self, step, steps):
            super().paused(step, steps)
            held.set()

    hooks = Hooks()
    control.request_pause()
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(
            MattingRuntime(tmp_path, "tiny", "cpu").run(1, job_for(media), control, hooks)
        )
    )
    worker.start()
    assert held.wait(60)
    # held at the boundary after frame 1: nothing further has run or been written
    assert hooks.events[-1] == ("paused", 1)
    assert not (tmp_path / "mask_outputs").exists()
    control.release_pause()
    worker.join(60)
    assert result and Path(result[0][0]).is_file()
    assert ("resumed", 1) in hooks.events


def test_morphology_and_compositing() -> None:
    mask = torch.zeros(21, 21)
    mask[10, 10] = 1
    grown = dilate(mask, 3)
    assert int(grown.sum()) > 9 and grown[10, 13] == 1 and grown[7, 7] == 0  # a disc, not a box
    assert torch.equal(erode(grown, 3), mask)
    holey = torch.ones(15, 15)
    holey[7, 7] = 0
    assert torch.equal(refine_mask(holey, 1, 1), torch.ones(15, 15))  # closing fills the hole

    frames = np.full((1, 2, 2, 3), 200, dtype=np.uint8)
    alpha = np.array([[[1.0, 0.0], [0.5, 0.0]]], dtype=np.float32)
    green = composite(frames, alpha, "greenscreen")
    assert tuple(green[0, 0, 1]) == GREEN and tuple(green[0, 0, 0]) == (200, 200, 200)
    fg = composite(frames, alpha, "foreground")
    assert tuple(fg[0, 0, 1]) == (0, 0, 0) and tuple(fg[0, 1, 0]) == (100, 100, 100)
    assert tuple(composite(frames, alpha, "alpha")[0, 1, 0]) == (128, 128, 128)


def test_silent_source_and_single_image(media: dict[str, Path], tmp_path: Path, hooks) -> None:
    runtime = MattingRuntime(tmp_path, "tiny", "cpu")
    spec = MatAnyOneSpec(input=str(media["silent"]), mask=str(media["mask"]), end_frame=2)
    (path,) = runtime.run(1, MattingInputs(MatAnyOneConfig()).resolve(spec), JobControl(), hooks)
    assert decode(Path(path))[1] == ["video"]

    still = tmp_path / "still.png"
    Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(still)
    spec = MatAnyOneSpec(input=str(still), mask=str(media["mask"]), rgba_zip=True,
                         mask_type="foreground")  # fmt: skip
    video, archive = runtime.run(
        2, MattingInputs(MatAnyOneConfig()).resolve(spec), JobControl(), hooks
    )
    assert decode(Path(video))[0].shape == (1, H, W, 3)
    with zipfile.ZipFile(archive) as z:
        assert z.namelist() == ["frame_00000.png"]


def test_save_masks_and_a_json_sidecar(media: dict[str, Path], tmp_path: Path, hooks) -> None:
    """The debug toggle keeps the mask the network started from (after erode/dilate),
    and `metadata: json` puts the document next to the video instead of inside it, and
    next to the mask."""
    from wangend.media.metadata import read_metadata
    from wangend.media.persistence import MediaPersistenceContext

    ctx = MediaPersistenceContext(save_masks=True, image_format="jpeg")
    runtime = MattingRuntime(tmp_path, "tiny", "cpu", ctx)
    job = job_for(media, dilate=3, metadata="json")
    video, sidecar, mask, mask_sidecar = (Path(p) for p in runtime.run(8, job, JobControl(), hooks))
    assert sidecar.suffix == ".json" and mask.name == f"{video.stem}_mask.png"  # png: lossless
    assert mask_sidecar.name == f"{video.stem}_mask.json"
    assert read_video_metadata(video) is None
    assert read_metadata(mask)["role"] == "mask" and "role" not in read_metadata(video)
    with Image.open(mask) as image:
        saved = np.asarray(image)
    assert saved.shape == (H, W)
    given = np.asarray(Image.open(media["mask"]).convert("L")) >= 128
    assert (saved >= 128).sum() > given.sum()  # dilated: it grew


def test_a_saved_mask_carries_the_document(media: dict[str, Path], tmp_path: Path, hooks) -> None:
    """Embedded mode: the PNG's iTXt `wangend` chunk, as for any image output; the
    source images are stored once, with the video."""
    from wangend.media.metadata import read_metadata
    from wangend.media.persistence import MediaPersistenceContext

    ctx = MediaPersistenceContext(save_masks=True, embed_source_images=True)
    runtime = MattingRuntime(tmp_path, "tiny", "cpu", ctx)
    paths = [Path(p) for p in runtime.run(9, job_for(media), JobControl(), hooks)]
    video, source, mask = paths
    assert source.name == f"{video.stem}.source-1.png" and mask.name == f"{video.stem}_mask.png"
    with Image.open(mask) as image:
        image.load()
        assert "wangend" in image.text
    document = read_metadata(mask)
    assert document["role"] == "mask" and document["job"] == 9
    assert document["settings"] == read_metadata(video)["settings"]
