"""Writing a run's outputs: videos, images and the metadata that goes with them.

Everything is written through `atomic.publish` (temp file in the same folder, fsync,
no-overwrite claim of `stem.ext` / `stem(2).ext` ..., retries on transient errors,
`JobFailure("OutputWriteFailed", ...)` at the end, no temp file left behind).

Use (the daemon builds the context once from its config, the state once per run):

    ctx = MediaPersistenceContext.from_config(config.media)
    state = MetadataState.for_run(job_id, job, timings=t, device=dev, frames=frames)
    paths = write_video(frames, out_dir, stem, job.fps, ctx, state, audio=job.audio)
    paths = write_image(alpha, out_dir, f"{stem}_alpha", ctx, state)

Each returns the absolute paths it made, the main output first, then its companions
(the `<stem>.json` sidecar in mode "json", `<stem>.source-N.png` with
`embed_source_images`). Source images are stored next to the output rather than inside
it: an attached-picture stream is not kept by every player, remuxer or Matroska tool, a
PNG next to the file is. The document lists them by suffix (`"file_suffix":
".source-1.png"`), so they pair with whatever `(N)` the output got.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from ..config import MediaConfig
from ..errors import JobFailure
from ..exif import encode_user_comment
from ..protocol import ResolvedGenerate, ResolvedMatAnyOne
from .atomic import RetryPolicy, publish
from .audio import AudioPlan, AudioWriter, plan_audio
from .metadata import EXIF_IFD, EXIF_USER_COMMENT, PNG_KEY, MetadataState

__all__ = [
    "MediaPersistenceContext",
    "codec_problem",
    "encoded_size",
    "write_image",
    "write_metadata_bundle",
    "write_video",
]

log = logging.getLogger("wangend.media")

CONTAINER_FORMATS = {"mp4": "mp4", "mkv": "matroska"}
IMAGE_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
JPEG_EXIF_LIMIT = 65_000  # a JPEG APP1 segment holds at most 65,533 bytes
FALLBACK_CODEC = "libx264"
VFR_TIME_BASE = Fraction(1, 90_000)  # divides ms, 1/24, 1/25, 1/30, 1/50, 1/60 exactly
AVCOL_SPC_BT709 = 1  # FFmpeg's AVColorSpace value (PyAV has no enum for the matrix tag)


def codec_problem(codec: str, pix_fmt: str = "yuv420p") -> str | None:
    """None when `codec` can encode here, else why not. h264_nvenc is in most FFmpeg
    builds but opens only with an NVIDIA GPU and driver, so it is opened once for real."""
    import av

    try:
        context = av.CodecContext.create(codec, "w")
        context.width, context.height = 256, 256
        context.pix_fmt = pix_fmt
        if codec == "libx265":
            context.options = {"x265-params": "log-level=error"}
        context.time_base = Fraction(1, 16)
        context.open()
    except Exception as exc:  # any failure means "not usable here"
        return str(exc) or type(exc).__name__
    return None


class MediaPersistenceContext(msgspec.Struct, frozen=True, kw_only=True):
    """How this daemon writes outputs, from `[media]` in the config. `codec` is the one
    that will be used (h264_nvenc already checked, libx264 in its place if it failed).
    `metadata` is the daemon's default mode; a run's MetadataState.mode decides."""

    codec: str = "libx264"
    crf: int = 18
    pix_fmt: str = "yuv420p"
    container: str = "mp4"
    image_format: str = "png"
    image_quality: int = 95
    metadata: str = "embedded"
    save_masks: bool = False
    embed_source_images: bool = False
    write_retries: int = 3
    retry_backoff: float = 0.2  # seconds before the first retry; tripled each time

    @classmethod
    def from_config(
        cls, config: MediaConfig, *, check_codec: bool = True
    ) -> MediaPersistenceContext:
        codec = config.codec
        if check_codec and codec != FALLBACK_CODEC:
            problem = codec_problem(codec, config.pix_fmt)
            if problem is not None:
                log.warning("video codec %s cannot be used here (%s); using %s instead",
                            codec, problem, FALLBACK_CODEC)  # fmt: skip
                codec = FALLBACK_CODEC
        return cls(
            codec=codec,
            crf=config.crf,
            pix_fmt=config.pix_fmt,
            container=config.container,
            image_format=config.image_format,
            image_quality=config.image_quality,
            metadata=config.metadata,
            save_masks=config.save_masks,
            embed_source_images=config.embed_source_images,
            write_retries=config.write_retries,
        )

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.write_retries, backoff=self.retry_backoff)


# --- video --------------------------------------------------------------------------


def write_video(
    frames: np.ndarray,
    folder: Path,
    stem: str,
    fps: float,
    ctx: MediaPersistenceContext,
    metadata_state: MetadataState,
    audio: Path | str | None = None,
    on_claim: Callable[[Path], None] | None = None,
    *,
    audio_start: float | None = None,
    timestamps: Sequence[float] | None = None,
) -> list[Path]:
    """Encode `frames` ((F, H, W, 3) uint8 RGB) to `folder/stem.<container>` (or the
    first free `stem(N)`), with `audio`'s sound when given; returns [video, companions...].
    `on_claim`: see atomic.publish; called for the video and each companion.

    `audio_start`: the time in the audio source that plays with the first frame (None:
    the source's own start; see audio.py). `timestamps`: each frame's time in seconds
    from the first, for a variable frame rate (None: every 1/fps); the last frame lasts
    as long as the one before it. Pictures are converted with the BT.709 matrix into
    limited range, and the stream says so (primaries, transfer and matrix BT.709).

    An audio source that cannot be read or has no audio track does not cost the frames:
    the video is written silent, a warning logged and the reason put in the document."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    times = _frame_times(len(frames), fps, timestamps)
    state, plan = _with_audio_plan(metadata_state, audio, ctx.container, audio_start)
    state = _with_source_list(state, ctx)
    padded = encoded_size(frames.shape[2], frames.shape[1], ctx.pix_fmt)
    if padded != (frames.shape[2], frames.shape[1]):
        state = state.with_fields(encoded_size=list(padded))
    if timestamps is not None:
        state = state.with_fields(variable_frame_rate=True)
    comment = state.text() if state.embedded else None

    def encode(temp: Path) -> None:
        _encode(frames, temp, fps, ctx, comment, plan, times)

    path = publish(
        Path(folder), stem, f".{ctx.container}", encode, ctx.retry_policy,
        reserve=_companion_suffixes(state, ctx), on_claim=on_claim,
    )  # fmt: skip
    return [path, *write_metadata_bundle(path, ctx, state, on_claim=on_claim)]


def _frame_times(count: int, fps: float, timestamps: Sequence[float] | None) -> list[float] | None:
    """The frames' start times and, last, the video's end (None: a constant rate)."""
    if timestamps is None:
        return None
    times = [float(t) for t in timestamps]
    if len(times) != count or any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"timestamps must be {count} increasing times, one per frame")
    last = times[-1] - times[-2] if count >= 2 else 1.0 / float(fps)
    return [t - times[0] for t in times] + [times[-1] - times[0] + last]


def encoded_size(width: int, height: int, pix_fmt: str) -> tuple[int, int]:
    """The size the encoder gets: 4:2:0 chroma is subsampled 2x2, so both sides even."""
    if pix_fmt == "yuv420p":
        return width + width % 2, height + height % 2
    return width, height


def _with_audio_plan(
    state: MetadataState, audio: Path | str | None, container: str, start: float | None
) -> tuple[MetadataState, AudioPlan | None]:
    if audio is None:
        return state, None
    try:
        plan = plan_audio(audio, container, start)
    except (OSError, ValueError) as exc:
        log.warning("audio from %s is left out: %s", audio, exc)
        return state.with_fields(audio={"source": str(audio), "error": str(exc)}), None
    if plan is None:
        log.info("%s has no audio track; the video is silent", audio)
        return state.with_fields(audio={"source": str(audio), "error": "no audio track"}), None
    return state.with_fields(audio=msgspec.to_builtins(plan)), plan


def _encode(
    frames: np.ndarray,
    path: Path,
    fps: float,
    ctx: MediaPersistenceContext,
    comment: str | None,
    plan: AudioPlan | None,
    times: list[float] | None = None,
) -> None:
    import av

    width, height = encoded_size(frames.shape[2], frames.shape[1], ctx.pix_fmt)
    if (width, height) != (frames.shape[2], frames.shape[1]):  # repeat the edge pixels
        pad = ((0, 0), (0, height - frames.shape[1]), (0, width - frames.shape[2]), (0, 0))
        frames = np.pad(frames, pad, mode="edge")
    fmt = CONTAINER_FORMATS[ctx.container]
    options = {"movflags": "+faststart"} if fmt == "mp4" else {}
    try:
        with av.open(str(path), mode="w", format=fmt, options=options) as out:
            if comment is not None:
                out.metadata["comment"] = comment
            stream = out.add_stream(ctx.codec, rate=_rate(fps))
            stream.width, stream.height = width, height
            stream.pix_fmt = ctx.pix_fmt
            stream.options = _codec_options(ctx)
            _tag_bt709(stream.codec_context)
            if ctx.codec == "libx265" and fmt == "mp4":
                stream.codec_tag = "hvc1"  # the tag Apple players need for HEVC in mp4
            ticks = None
            if times is not None:  # variable rate: each frame at its own time
                stream.codec_context.time_base = stream.time_base = VFR_TIME_BASE
                ticks = [round(t / VFR_TIME_BASE) for t in times]
            writer = AudioWriter(out, plan) if plan is not None else None
            try:
                _encode_pictures(out, stream, frames, ctx.pix_fmt, ticks)
            except BaseException:
                if writer is not None:
                    writer.close()
                raise
            if writer is not None:
                writer.write(times[-1] if times is not None else len(frames) / float(fps))
    except OSError:
        raise  # retried or reported by atomic.publish
    except av.FFmpegError as exc:  # bad option, codec refused the size, ...: not transient
        raise JobFailure("OutputWriteFailed", f"could not encode {path.name}: {exc}") from exc


def _tag_bt709(context: Any) -> None:
    """Say how the pictures were converted: BT.709 primaries, transfer and matrix,
    limited range. Without tags players guess by size (BT.601 below 720 lines, BT.709
    from there), so one untagged matrix is wrong at one size or the other."""
    from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc

    context.color_range = ColorRange.MPEG
    context.color_primaries = ColorPrimaries.BT709
    context.color_trc = ColorTrc.BT709
    context.colorspace = AVCOL_SPC_BT709


def _encode_pictures(
    out: Any, stream: Any, frames: np.ndarray, pix_fmt: str, ticks: list[int] | None
) -> None:
    import av
    from av.video.reformatter import ColorRange, Colorspace

    durations: dict[int, int] = {}
    if ticks is not None:
        durations = {ticks[i]: ticks[i + 1] - ticks[i] for i in range(len(frames))}

    def mux(packets: list[Any]) -> None:
        for packet in packets:
            if packet.pts in durations:
                packet.duration = durations[packet.pts]
            out.mux(packet)

    for i, frame in enumerate(frames):
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), "rgb24")
        # Converted here, not by the encoder: PyAV's own conversion uses BT.601.
        picture = picture.reformat(format=pix_fmt, dst_colorspace=Colorspace.ITU709,
                                   dst_color_range=ColorRange.MPEG)  # fmt: skip
        if ticks is not None:
            picture.pts, picture.time_base = ticks[i], VFR_TIME_BASE
        mux(stream.encode(picture))
    mux(stream.encode(None))


def _rate(fps: float) -> Fraction | int:
    return Fraction(fps).limit_denominator(1001) if fps != int(fps) else int(fps)


def _codec_options(ctx: MediaPersistenceContext) -> dict[str, str]:
    if ctx.codec == "h264_nvenc":
        return {"rc": "vbr", "cq": str(ctx.crf), "preset": "p5"}
    if ctx.codec == "libx265":
        return {"crf": str(ctx.crf), "x265-params": "log-level=error"}
    return {"crf": str(ctx.crf)}


# --- images -------------------------------------------------------------------------


def write_image(
    image: Any,
    folder: Path,
    stem: str,
    ctx: MediaPersistenceContext,
    metadata_state: MetadataState,
    *,
    image_format: str | None = None,
) -> list[Path]:
    """Save `image` (a PIL image or an (H, W), (H, W, 3) or (H, W, 4) uint8 array) as
    png, jpeg or webp (`image_format`, else the context's); returns [image, companions...].
    JPEG has no alpha (it is dropped) and EXIF of at most 64 KB: a longer document goes
    to the sidecar instead, with a log line."""
    from PIL import Image

    fmt = image_format or ctx.image_format
    if fmt not in IMAGE_SUFFIXES:
        raise ValueError(f"image format must be png, jpeg or webp, not {fmt!r}")
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if fmt == "jpeg" and picture.mode not in ("RGB", "L"):
        picture = picture.convert("RGB")
    state = _with_source_list(metadata_state, ctx)
    save_args = _image_args(fmt, ctx, state)
    if save_args is None:  # too big for JPEG's EXIF: keep the document, next to the file
        log.info("metadata of %s is too long for JPEG EXIF; writing a sidecar", stem)
        state = MetadataState(mode="json", document=state.document)
        save_args = _image_args(fmt, ctx, state) or {}

    def save(temp: Path) -> None:
        picture.save(temp, format=fmt.upper(), **save_args)

    path = publish(
        Path(folder), stem, IMAGE_SUFFIXES[fmt], save, ctx.retry_policy,
        reserve=_companion_suffixes(state, ctx),
    )  # fmt: skip
    return [path, *write_metadata_bundle(path, ctx, state)]


def _image_args(fmt: str, ctx: MediaPersistenceContext, state: MetadataState) -> dict | None:
    from PIL import Image, PngImagePlugin

    args: dict[str, Any] = {}
    if fmt in ("jpeg", "webp"):
        args["quality"] = ctx.image_quality
    if not state.embedded:
        return args
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt(PNG_KEY, state.text())
        args["pnginfo"] = info
        return args
    exif = Image.Exif()
    exif.endian = "<"  # encode_user_comment writes UTF-16-LE to match
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = encode_user_comment(state.text())
    raw = exif.tobytes()
    if fmt == "jpeg" and len(raw) > JPEG_EXIF_LIMIT:
        return None
    args["exif"] = raw
    return args


# --- companions ---------------------------------------------------------------------


def _source_inputs(job: Any) -> list[tuple[str, str]]:
    """(field, path) of the job's inputs that may be images."""
    if isinstance(job, ResolvedGenerate):
        pairs = [("image", job.image), ("last_image", job.last_image), ("mask", job.mask)]
        pairs += [(f"reference_images[{i}]", p) for i, p in enumerate(job.reference_images)]
    elif isinstance(job, ResolvedMatAnyOne):
        pairs = [("input", job.input), ("mask", job.mask)]
    else:
        pairs = []
    return [(field, path) for field, path in pairs if path]


def _is_image(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) == 1
    except (OSError, ValueError):
        return False


def _with_source_list(state: MetadataState, ctx: MediaPersistenceContext) -> MetadataState:
    """The document with `source_images` listed (before anything is written, because an
    embedded document is final once the file is)."""
    if not ctx.embed_source_images or "source_images" in state.document:
        return state
    try:
        job = msgspec.convert(state.document.get("settings"), ResolvedGenerate | ResolvedMatAnyOne)
    except (msgspec.ValidationError, TypeError):
        return state
    entries = [
        {"input": field, "path": path, "file_suffix": f".source-{n}.png"}
        for n, (field, path) in enumerate(
            [(f, p) for f, p in _source_inputs(job) if _is_image(p)], start=1
        )
    ]
    return state.with_fields(source_images=entries) if entries else state


def _companion_suffixes(state: MetadataState, ctx: MediaPersistenceContext) -> list[str]:
    suffixes = [".json"] if state.mode == "json" else []
    return suffixes + [e["file_suffix"] for e in state.document.get("source_images", [])]


def write_metadata_bundle(
    output: Path,
    ctx: MediaPersistenceContext,
    metadata_state: MetadataState,
    on_claim: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write the companions of an already written `output`: the sidecar `<stem>.json`
    (mode "json") and the source images listed in the document. Also for outputs made by
    other means (a frames zip). Returns the paths written. A source image that has gone
    since enqueue is skipped with a warning; a failed write raises OutputWriteFailed."""
    from PIL import Image

    state = _with_source_list(metadata_state, ctx)
    output = Path(output).absolute()
    folder, stem, policy = output.parent, output.stem, ctx.retry_policy
    written: list[Path] = []
    for entry in state.document.get("source_images", []):
        try:
            with Image.open(entry["path"]) as source:
                source.load()
                picture = source.copy()
        except (OSError, ValueError) as exc:
            log.warning("source image %s is not stored: %s", entry["path"], exc)
            continue
        suffix = entry["file_suffix"]
        name_stem = stem + suffix.removesuffix(".png")
        written.append(
            publish(
                folder,
                name_stem,
                ".png",
                lambda t, p=picture: p.save(t, "PNG"),
                policy,
                on_claim=on_claim,
            )
        )
    if state.mode == "json":
        data = (state.text() + "\n").encode("utf-8")
        sidecar = publish(
            folder, stem, ".json", lambda t: t.write_bytes(data), policy, on_claim=on_claim
        )
        if sidecar.name != f"{stem}.json":
            log.warning("%s.json was taken; the metadata of %s is in %s", stem, output, sidecar)
        written.append(sidecar)
    return written
