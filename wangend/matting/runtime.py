"""Running one matting job: decode, matte frame by frame, composite, save.

    1. loading   the network for the job's weights (kept warm for the next job that
                 names the same weights)
    2. matting   frame 0 with the mask (+ warm-up passes), then one step per frame; after
                 each frame: progress, then the abort/pause boundary
    3. saving    composite, encode under <output_dir>/mask_outputs/, reattach audio,
                 write the RGBA ZIP

Nothing is written before phase 3 begins, and phase 3 begins only after a last abort
check, so an aborted job leaves no file behind.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import msgspec
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import JobFailure
from ..media.metadata import MetadataState
from ..media.naming import render_output_name
from ..media.persistence import (
    MediaPersistenceContext,
    encoded_size,
    write_image,
    write_video,
)
from ..pipelines.control import JobControl, RunHooks
from ..protocol import ResolvedMatAnyOne
from .engine import MattingEngine
from .inputs import IMAGE_FPS, IMAGE_SUFFIXES, OUTPUT_FOLDER, load_mask, mask_warnings
from .network import MatAnyOneNet
from .postprocess import composite, refine_mask, write_rgba_zip
from .weights import WeightsError, build_network

__all__ = [
    "MattingRuntime",
    "decode_frames",
    "decode_timed_frames",
    "processing_size",
    "variable_timestamps",
]

MAX_STEM_BYTES = 180


def processing_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """The (width, height) the network sees: the longest side capped at `max_size`,
    aspect kept, even numbers."""
    if not max_size or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def decode_frames(path: Path, start: int, end: int) -> np.ndarray:
    """Frames [start, end) as (F, H, W, 3) uint8 RGB."""
    return decode_timed_frames(path, start, end)[0]


def decode_timed_frames(path: Path, start: int, end: int) -> tuple[np.ndarray, list[float]]:
    """Frames [start, end) as (F, H, W, 3) uint8 RGB, and the time of each in seconds on
    the source's own timeline (a still image: [0.0])."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))[None].copy(), [0.0]
    import av

    out: list[np.ndarray] = []
    times: list[float] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or IMAGE_FPS
        first = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        for i, frame in enumerate(container.decode(stream)):
            if i >= end:
                break
            if i >= start:
                out.append(frame.to_ndarray(format="rgb24"))
                known = frame.pts is not None and frame.time_base is not None
                times.append(float(frame.pts * frame.time_base) if known else first + i / rate)
    if len(out) != end - start:
        raise ValueError(f"expected {end - start} frames from {path}, decoded {len(out)}")
    return np.stack(out), times


def variable_timestamps(times: list[float], fps: float) -> list[float] | None:
    """None when the frames lie on a constant `fps` grid (within half a frame, so the
    output at `fps` stays in sync with the sound), else the times to write them at.
    Times that do not increase (a broken source) cannot be kept: None too."""
    steady = all(abs(t - times[0] - i / fps) <= 0.5 / fps for i, t in enumerate(times))
    increasing = all(b > a for a, b in itertools.pairwise(times))
    return None if steady or not increasing else times


def _pad16(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % 16, 0, (-h) % 16), mode="replicate")


class MattingRuntime:
    """Owns the warm network (one, keyed by its weights) and runs matting jobs."""

    def __init__(
        self,
        output_dir: Path,
        weights: str = "tiny",
        device: str = "auto",
        media: MediaPersistenceContext | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.media = media or MediaPersistenceContext()
        self.default_weights = weights
        self.device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self._net: MatAnyOneNet | None = None
        self._net_key: tuple[str, int] | None = None
        self._net_source = ""

    @property
    def loaded_weights(self) -> str | None:
        return self._net_key[0] if self._net_key else None

    def network(self, weights: str, seed: int, hooks: RunHooks) -> MatAnyOneNet:
        key = (weights, seed if weights == "tiny" else 0)
        if self._net is not None and self._net_key == key:
            return self._net
        reason = "cold" if self._net is None else "switch"
        self._net = self._net_key = None  # drop the old one before building the next
        # The fields a generation's load reports too, so a client shows both alike.
        hooks.model_loading(weights, {"kind": "matanyone", "reason": reason, "device": self.device})
        started = time.perf_counter()
        try:
            net, source = build_network(weights, self.device, seed=key[1])
        except WeightsError as exc:
            raise JobFailure("ModelUnavailable", str(exc)) from None
        self._net, self._net_key, self._net_source = net, key, source
        seconds = round(time.perf_counter() - started, 3)
        hooks.model_loaded(
            weights,
            {"kind": "matanyone", "source": source, "device": self.device, "seconds": seconds},
        )
        return net

    def run(
        self, job_id: int, job: ResolvedMatAnyOne, control: JobControl, hooks: RunHooks
    ) -> list[str]:
        """Matte one job; returns the absolute output paths."""
        control.check_abort()
        n = job.frames
        hooks.progress(0, n, "loading")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        net = self.network(job.model or self.default_weights, job.seed, hooks)
        try:
            frames, times = decode_timed_frames(Path(job.input), job.start_frame, job.end_frame)
            mask = load_mask(Path(job.mask))
        except Exception as exc:
            raise JobFailure("InvalidInput", f"cannot read the inputs: {exc}") from None
        timings["load"] = time.perf_counter() - started
        control.check_abort()

        started = time.perf_counter()
        alpha = self._matte(net, frames, mask, job, control, hooks)
        timings["matting"] = time.perf_counter() - started

        control.check_abort()  # the last chance: from here on files get written
        hooks.progress(n, n, "saving")
        started = time.perf_counter()
        paths = self._save(job_id, job, frames, times, alpha, mask, timings)
        timings["save"] = time.perf_counter() - started
        return [str(p) for p in paths]

    def _matte(
        self,
        net: MatAnyOneNet,
        frames: np.ndarray,
        mask: np.ndarray,
        job: ResolvedMatAnyOne,
        control: JobControl,
        hooks: RunHooks,
    ) -> np.ndarray:
        n, h, w = frames.shape[:3]
        pw, ph = processing_size(w, h, job.max_size)
        dev = torch.device(self.device)
        m = torch.from_numpy(mask)
        if m.shape != (h, w):
            m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[
                0, 0
            ]
        m = refine_mask(m, job.dilate, job.erode)
        if (pw, ph) != (w, h):
            m = F.interpolate(m[None, None], size=(ph, pw), mode="area")[0, 0]
        m = _pad16(m[None].to(dev))[0]

        def prepare(i: int) -> torch.Tensor:
            x = torch.from_numpy(frames[i]).to(dev).permute(2, 0, 1).float() / 255.0
            if (pw, ph) != (w, h):
                x = F.interpolate(x[None], size=(ph, pw), mode="area")[0]
            return _pad16(x)

        def restore(a: torch.Tensor) -> np.ndarray:
            a = a[:ph, :pw]
            if (pw, ph) != (w, h):
                a = F.interpolate(a[None, None], size=(h, w), mode="bilinear",
                                  align_corners=False)[0, 0]  # fmt: skip
            return a.clamp(0, 1).float().cpu().numpy()

        engine = MattingEngine(net, net.cfg.memory)
        out = np.empty((n, h, w), dtype=np.float32)
        for i in range(n):
            a = engine.first(prepare(0), m, job.warmup) if i == 0 else engine.step(prepare(i))
            out[i] = restore(a)
            hooks.progress(i + 1, n, "matting")
            control.step_boundary(hooks, i + 1, n)
        return out

    def _save(
        self,
        job_id: int,
        job: ResolvedMatAnyOne,
        frames: np.ndarray,
        times: list[float],
        alpha: np.ndarray,
        mask: np.ndarray,
        timings: dict[str, float],
    ) -> list[Path]:
        mask_shape = mask.shape
        folder = self.output_dir / OUTPUT_FOLDER
        stem = render_output_name(job.output_name, job_id=job_id, job=job)
        warnings = mask_warnings((mask_shape[1], mask_shape[0]), (job.width, job.height))
        video_size = encoded_size(job.width, job.height, self.media.pix_fmt)
        if video_size != (job.width, job.height):
            warnings.append(
                f"the video is {video_size[0]}x{video_size[1]}: {self.media.pix_fmt} needs even "
                "sides, so the last column or row is repeated; the source and the RGBA ZIP are "
                f"{job.width}x{job.height} (crop the video to overlay it, or use yuv444p)"
            )
        state = MetadataState.for_run(
            job_id, job, timings=timings, device=self.device, frames=alpha
        ).with_fields(
            weights=self._net_source,
            processing_size=list(processing_size(job.width, job.height, job.max_size)),
            warnings=warnings,
        )
        is_video = Path(job.input).suffix.lower() not in IMAGE_SUFFIXES
        audio = job.input if job.reattach_audio and is_video else None
        written = write_video(
            composite(frames, alpha, job.mask_type), folder, stem, job.fps, self.media, state,
            audio, audio_start=times[0], timestamps=variable_timestamps(times, job.fps),
        )  # fmt: skip
        paths = list(written)
        if job.rgba_zip:
            policy = self.media.retry_policy
            paths.append(write_rgba_zip(frames, alpha, folder, f"{written[0].stem}_rgba", policy))
        if self.media.save_masks:  # the debug toggle: the mask the network really started from
            mask_state = state.with_fields(role="mask")
            paths += self._save_mask(job, mask, folder, f"{written[0].stem}_mask", mask_state)
        return paths

    def _save_mask(
        self,
        job: ResolvedMatAnyOne,
        mask: np.ndarray,
        folder: Path,
        stem: str,
        state: MetadataState,
    ) -> list[Path]:
        """The first-frame mask after resizing to the frames and erode/dilate, as a PNG
        (lossless whatever `image_format` says: a mask's edges are the point) carrying
        the job's document like any output (`role: "mask"`). The source images are
        stored once, with the video."""
        m = torch.from_numpy(mask)
        if m.shape != (job.height, job.width):
            size = (job.height, job.width)
            m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        refined = refine_mask(m, job.dilate, job.erode).clamp(0, 1).numpy()
        pixels = np.clip(np.rint(refined * 255.0), 0, 255).astype(np.uint8)
        ctx = msgspec.structs.replace(self.media, embed_source_images=False)
        return write_image(pixels, folder, stem, ctx, state, image_format="png")
