"""Giving a video the sound of another file, in sync with its pictures.

The sound comes from the first audio track of `source`: a video (a V2V source, the input
of a matting job) or an audio file. `start` is the source time (seconds, on the source's
own timeline) that plays together with the video's first picture: for a matting job the
time of its first frame (`start_frame`), otherwise the source's own start: its first
video frame when it has video, else its first audio sample. Timing is kept relative to
that point: a track that starts later than the source's pictures starts later in the
output too, and the samples an encoder puts in front (AAC priming, the MP3 encoder
delay), which the source marks to be skipped, stay skipped.

Copied or encoded:
* mp4 copies aac, mp3, alac, ac3 and eac3 packet for packet (bit-exact, costs nothing).
  Its edit list says where the track starts, to the sample, so a copy may begin inside
  a packet: the packets from a little before `start` are copied (a decoder needs the
  ones before to rebuild the first samples) and the edit list skips what lies before
  `start`; a track that starts late gets an empty edit in front.
* mkv copies any codec, but Matroska has no edit list: a copy is exact only when the
  first packet kept starts at `start` or later (or is the source's own first packet
  at its zero: Opus keeps its pre-skip in the codec header). Packets wholly before
  `start`, AAC priming among them, are left out: the muxer would otherwise shift every
  stream, pictures included. Otherwise the track is decoded and stored as FLAC
  (16-bit, lossless), which starts on the sample.
* anything else is encoded as AAC (96 kb/s per channel: 192 kb/s for stereo).
An encoded track is cut to the sample at both ends; a copied one ends within one packet
after the last picture (about 21 ms for AAC, up to ~0.1 s for PCM).
The channel layout is kept (AAC and FLAC hold 5.1 and 7.1); a layout or rate the
encoder refuses becomes the nearest it takes (the plan's `source_layout` then says what
the source had).

Demuxers end a stream with an empty flush packet whose `dts` is None; muxing it would
fail, so it is skipped.

Two ways in:

    plan = plan_audio(source, "mp4", start=1.0)   # None: the source has no audio track
    writer = AudioWriter(output_container, plan)  # before the first video packet
    ... mux the video ...
    writer.write(duration_seconds)

    attach_audio(video_path, source)              # a finished file: remux, replace in place
"""

from __future__ import annotations

import functools
import os
import secrets
from collections import deque
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import msgspec
import numpy as np

__all__ = [
    "COPY_CODECS",
    "AudioPlan",
    "AudioWriter",
    "attach_audio",
    "plan_audio",
    "source_start",
]

COPY_CODECS: dict[str, frozenset[str] | None] = {
    "mp4": frozenset({"aac", "mp3", "alac", "ac3", "eac3"}),
    "mkv": None,  # Matroska takes any codec
}
ENCODER_FORMATS: Mapping[str, str] = MappingProxyType({"aac": "fltp", "flac": "s16"})
AAC_BIT_RATE_PER_CHANNEL = 96_000
PREROLL_SECONDS = 0.1  # copied before a cut inside the source: the decoder's run-up
PREROLL_PACKETS = 2
EDGE = 0.001  # seconds: Matroska's timestamps are milliseconds
DEFAULT_LAYOUTS: Mapping[int, str] = MappingProxyType(
    {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
)
Mode = Literal["copy", "aac", "flac"]


class AudioPlan(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What will happen to the audio; it is also recorded in the output's document."""

    source: str
    codec: str  # the source track's codec ("mp3", not the decoder's name "mp3float")
    mode: Mode
    sample_rate: int  # of the output's track
    channels: int  # of the output's track
    layout: str  # of the output's track, e.g. "stereo", "5.1"
    start: float  # the source time (s) that plays with the video's first picture
    source_layout: str | None = None  # set when the output's layout differs from it
    reason: str | None = None  # why a codec the container takes is encoded after all


def source_start(handle: Any) -> float:
    """Where a source's own timeline begins: its first video frame (attached cover
    pictures aside), else its first audio sample; 0 when the container does not say."""
    from av.stream import Disposition

    videos = [s for s in handle.streams.video if not (s.disposition & Disposition.attached_pic)]
    for stream in videos[:1] or list(handle.streams.audio[:1]):
        if stream.start_time is not None:
            return float(stream.start_time * stream.time_base)
    return 0.0


def plan_audio(source: Path | str, container: str, start: float | None = None) -> AudioPlan | None:
    """Look at `source`'s first audio track; None when it has none. `start`: the source
    time that plays with the first picture (None: the source's own start). Raises
    OSError or ValueError (PyAV's errors derive from both) when the file cannot be read,
    and ValueError when its audio ends before `start`."""
    import av

    with av.open(str(source)) as handle:
        if not handle.streams.audio:
            return None
        stream = handle.streams.audio[0]
        context = stream.codec_context
        codec = _codec_name(context)
        origin = source_start(handle) if start is None else float(start)
        end = _track_end(handle, stream)
        if end is not None and end <= origin:
            raise ValueError(f"its audio ends at {end:.3f} s, before the first picture's time")
        rate = context.sample_rate or 48_000
        layout = context.layout.name
        channels = context.layout.nb_channels or context.channels or 2
        fits = COPY_CODECS.get(container, frozenset())
        reason = None
        mode: Mode = "copy"
        if fits is not None and codec not in fits:
            mode = "aac"
        elif container == "mkv" and _starts_inside_a_packet(handle, stream, origin):
            mode = "flac"
            reason = "Matroska cannot start a copied track inside a packet"
    source_abs = str(Path(source).absolute())
    if mode == "copy":
        return AudioPlan(source=source_abs, codec=codec, mode=mode, sample_rate=rate,
                         channels=channels, layout=layout, start=round(origin, 6))  # fmt: skip
    if layout.endswith(" channels"):  # no channel order given (a WAV without a mask)
        layout = DEFAULT_LAYOUTS.get(channels, layout)
    out_rate, out_layout = _encodable(mode, rate, layout, channels)
    return AudioPlan(
        source=source_abs,
        codec=codec,
        mode=mode,
        sample_rate=out_rate,
        channels=av.AudioLayout(out_layout).nb_channels,
        layout=out_layout,
        start=round(origin, 6),
        source_layout=None if out_layout == layout else layout,
        reason=reason,
    )


def _track_end(handle: Any, stream: Any) -> float | None:
    """When the track ends, from what the container says (None: it does not say)."""
    if stream.duration is not None:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    if handle.duration is not None:
        return ((handle.start_time or 0) + handle.duration) / 1e6
    return None


def _codec_name(context: Any) -> str:
    """The codec's own name: PyAV's `name` is the decoder's (`mp3float`, `aac_fixed`)."""
    try:
        return context.codec.canonical_name
    except Exception:  # no decoder for it here
        return context.name


def _start_of(packet: Any) -> int:
    return packet.pts if packet.pts is not None else packet.dts


def _starts_inside_a_packet(handle: Any, stream: Any, origin: float) -> bool:
    """Whether the first packet that reaches past `origin` begins before it, other than
    a source's own first packet at its own zero (Opus pre-skip, which the codec's header
    carries and the decoder drops)."""
    tb = stream.time_base
    first = True
    for packet in handle.demux(stream):
        if packet.dts is None:
            continue
        begin = _start_of(packet)
        if (begin + (packet.duration or 0)) * tb > origin:
            if first and origin == 0:
                return False
            return bool(begin * tb < origin - EDGE)
        first = False
    return False


@functools.lru_cache(maxsize=64)
def _opens(encoder: str, rate: int, layout: str) -> bool:
    import av

    try:
        context = av.CodecContext.create(encoder, "w")
        context.sample_rate = rate
        context.layout = layout
        context.format = ENCODER_FORMATS[encoder]
        context.open()
    except Exception:  # refused: another layout or rate is tried
        return False
    return True


def _encodable(encoder: str, rate: int, layout: str, channels: int) -> tuple[int, str]:
    """The (rate, layout) nearest to the source's that `encoder` takes."""
    layouts = [layout, DEFAULT_LAYOUTS.get(channels, "stereo"), "stereo"]
    for out_rate in (rate, 48_000):
        for candidate in layouts:
            if _opens(encoder, out_rate, candidate):
                return out_rate, candidate
    return 48_000, "stereo"


class AudioWriter:
    """Adds the audio stream to an open output container (before any packet is muxed,
    because the header lists every stream) and later writes the trimmed audio into it."""

    def __init__(self, output: Any, plan: AudioPlan) -> None:
        import av

        self.plan = plan
        self.output = output
        self._edit_list = output.format.name in ("mp4", "mov")
        self._input = av.open(plan.source)
        try:
            self._in_stream = self._input.streams.audio[0]
            if plan.mode == "copy":
                self._out_stream = output.add_stream_from_template(self._in_stream)
            else:
                self._out_stream = output.add_stream(plan.mode, rate=plan.sample_rate)
                self._out_stream.layout = plan.layout
                self._out_stream.format = ENCODER_FORMATS[plan.mode]
                if plan.mode == "aac":
                    self._out_stream.bit_rate = AAC_BIT_RATE_PER_CHANNEL * plan.channels
        except BaseException:
            self._input.close()
            raise

    def write(self, duration: float) -> None:
        """Mux the audio from `plan.start` for `duration` seconds, then close the source."""
        try:
            if self.plan.mode == "copy":
                self._copy(duration)
            else:
                self._transcode(duration)
        finally:
            self._input.close()

    def close(self) -> None:
        self._input.close()

    def _copy(self, duration: float) -> None:
        stream = self._in_stream
        tb = stream.time_base
        origin = round(Fraction(self.plan.start) / tb)
        end = origin + Fraction(duration) / tb
        run_up: deque[Any] = deque()  # packets wholly before `start`, the last few
        started = False
        for packet in self._input.demux(stream):
            if packet.dts is None:  # the demuxer's flush packet
                continue
            begin = _start_of(packet)
            if not started:
                if begin + (packet.duration or 0) <= origin:
                    run_up.append(packet)
                    while len(run_up) > PREROLL_PACKETS and (
                        (origin - _start_of(run_up[1])) * tb >= PREROLL_SECONDS
                    ):
                        run_up.popleft()
                    continue
                started = True
                # MP4's edit list skips the run-up. Matroska has none: the muxer would
                # shift every stream to fit it in, so the first picture would start
                # late; there the first packet kept is decoded without its run-up.
                if self._edit_list:
                    for early in run_up:
                        self._mux_shifted(early, origin)
                run_up.clear()
            if begin >= end:
                break
            self._mux_shifted(packet, origin)

    def _mux_shifted(self, packet: Any, origin: int) -> None:
        packet.pts = None if packet.pts is None else packet.pts - origin
        packet.dts = packet.dts - origin
        packet.stream = self._out_stream
        self.output.mux(packet)

    def _transcode(self, duration: float) -> None:
        import av

        out = self._out_stream
        rate = out.codec_context.sample_rate
        size = out.codec_context.frame_size or 4096
        channels = out.layout.nb_channels
        resampler = av.AudioResampler(format="fltp", layout=out.layout.name, rate=rate)
        limit = round(duration * rate)  # samples to keep
        origin = Fraction(self.plan.start)
        pending = np.zeros((channels, 0), dtype=np.float32)
        written = 0
        skip: int | None = None  # samples still to drop before `start`

        def take(chunks: list[Any]) -> None:
            nonlocal pending, skip
            for chunk in chunks:
                data = chunk.to_ndarray().reshape(channels, -1)
                cut = min(skip or 0, data.shape[1])
                skip = (skip or 0) - cut
                pending = np.concatenate([pending, data[:, cut:]], axis=1)

        for frame in self._input.decode(self._in_stream):
            if skip is None:  # the first samples' place on the output's timeline
                first = frame.pts * frame.time_base if frame.pts is not None else origin
                lead = round((first - origin) * rate)
                if lead > 0:  # the track starts after the first picture: silence first
                    pending = np.zeros((channels, lead), dtype=np.float32)
                skip = max(0, -lead)
            take(resampler.resample(frame))
            while pending.shape[1] >= size and written < limit:
                written = self._encode(pending[:, :size], written, limit)
                pending = pending[:, size:]
            if written >= limit:
                break
        else:
            take(resampler.resample(None))
        while pending.shape[1] and written < limit:
            written = self._encode(pending[:, :size], written, limit)
            pending = pending[:, size:]
        self.output.mux(out.encode(None))

    def _encode(self, data: np.ndarray, written: int, limit: int) -> int:
        """Encode `data` ((channels, n) float) at sample `written`, cut at `limit`."""
        import av

        data = data[:, : limit - written]
        layout = self._out_stream.layout.name
        if self.plan.mode == "flac":
            pcm = np.clip(np.rint(data * 32768.0), -32768, 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1), format="s16", layout=layout)
        else:
            planar = np.ascontiguousarray(data, dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        rate = self._out_stream.codec_context.sample_rate
        frame.sample_rate = rate
        frame.pts = written
        frame.time_base = Fraction(1, rate)
        self.output.mux(self._out_stream.encode(frame))
        return written + data.shape[1]


def attach_audio(
    video_path: Path | str, source: Path | str, start: float | None = None
) -> AudioPlan | None:
    """Give the finished video at `video_path` the audio of `source` (from source time
    `start`, by default its own start), in place: the pictures and the container's
    comment (the settings document) are copied as they are into a temp file next to it,
    which then replaces the original in one rename, so the name never points at a
    half-written file. Returns the plan, or None (and leaves the video alone) when
    `source` has no audio track. Raises OSError/ValueError on I/O or decode errors; the
    temp file never stays."""
    import av

    video_path = Path(video_path)
    container = "mkv" if video_path.suffix.lower() in (".mkv", ".webm") else "mp4"
    plan = plan_audio(source, container, start)
    if plan is None:
        return None
    temp = video_path.with_name(f".{video_path.stem}.{secrets.token_hex(4)}.tmp{video_path.suffix}")
    try:
        with av.open(str(video_path)) as src:
            in_video = src.streams.video[0]
            frames = in_video.frames
            rate = in_video.average_rate
            duration = float(frames / rate) if frames and rate else (src.duration or 0) / 1e6
            fmt = "matroska" if container == "mkv" else "mp4"
            options = {"movflags": "+faststart"} if fmt == "mp4" else {}
            with av.open(str(temp), mode="w", format=fmt, options=options) as out:
                for key, value in src.metadata.items():
                    if key.lower() in ("comment", "title"):
                        out.metadata[key.lower()] = value
                out_video = out.add_stream_from_template(in_video)
                writer = AudioWriter(out, plan)
                try:
                    for packet in src.demux(in_video):
                        if packet.dts is None:
                            continue
                        packet.stream = out_video
                        out.mux(packet)
                except BaseException:
                    writer.close()
                    raise
                writer.write(duration)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, video_path)
    finally:
        temp.unlink(missing_ok=True)
    return plan
