"""Giving a video the sound of another file.

The audio comes from the first audio track of `source`: a video (a V2V source, the input
of a matting job) or an audio file. It is copied packet for packet when its codec fits
the container (aac, mp3, alac, ac3, eac3 in mp4; anything in mkv), which keeps it
bit-exact and costs nothing, and otherwise decoded and encoded as AAC (192 kb/s).
Either way it is cut at the video's duration: a copied track to the packet (it ends at
most one packet after the last picture: about 23 ms for AAC, up to ~0.1 s for PCM), a
transcoded one to the sample.

Demuxers end a stream with an empty flush packet whose `dts` is None; muxing it would
fail, so it is skipped.

Two ways in:

    plan = plan_audio(source, "mp4")          # None: the source has no audio track
    writer = AudioWriter(output_container, plan)  # before the first video packet
    ... mux the video ...
    writer.write(duration_seconds)

    attach_audio(video_path, source)          # a finished file: remux, replace in place
"""

from __future__ import annotations

import os
import secrets
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = ["COPY_CODECS", "AudioPlan", "AudioWriter", "attach_audio", "plan_audio"]

COPY_CODECS: dict[str, frozenset[str] | None] = {
    "mp4": frozenset({"aac", "mp3", "alac", "ac3", "eac3"}),
    "mkv": None,  # Matroska takes any codec
}
AAC_BIT_RATE = 192_000
AAC_FRAME = 1024


class AudioPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What will happen to the audio; it is also recorded in the output's document."""

    source: str
    codec: str  # the source track's codec
    mode: Literal["copy", "aac"]
    sample_rate: int
    channels: int


def plan_audio(source: Path | str, container: str) -> AudioPlan | None:
    """Look at `source`'s first audio track; None when it has none. Raises OSError or
    ValueError (PyAV's errors derive from both) when the file cannot be read."""
    import av

    with av.open(str(source)) as handle:
        if not handle.streams.audio:
            return None
        stream = handle.streams.audio[0]
        codec = stream.codec_context.name
        fits = COPY_CODECS.get(container, frozenset())
        mode: Literal["copy", "aac"] = "copy" if fits is None or codec in fits else "aac"
        return AudioPlan(
            source=str(Path(source).absolute()),
            codec=codec,
            mode=mode,
            sample_rate=stream.codec_context.sample_rate or 48_000,
            channels=stream.codec_context.channels or 2,
        )


class AudioWriter:
    """Adds the audio stream to an open output container (before any packet is muxed,
    because the header lists every stream) and later writes the trimmed audio into it."""

    def __init__(self, output: Any, plan: AudioPlan) -> None:
        import av

        self.plan = plan
        self.output = output
        self._input = av.open(plan.source)
        try:
            self._in_stream = self._input.streams.audio[0]
            if plan.mode == "copy":
                self._out_stream = output.add_stream_from_template(self._in_stream)
            else:
                rate = plan.sample_rate
                self._out_stream = output.add_stream("aac", rate=rate)
                self._out_stream.layout = "stereo" if plan.channels >= 2 else "mono"
                self._out_stream.bit_rate = AAC_BIT_RATE
        except BaseException:
            self._input.close()
            raise

    def write(self, duration: float) -> None:
        """Mux the audio up to `duration` seconds, then close the source."""
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
        stream, out = self._in_stream, self._out_stream
        offset: int | None = None
        for packet in self._input.demux(stream):
            if packet.dts is None:  # the demuxer's flush packet
                continue
            if offset is None:
                offset = packet.pts if packet.pts is not None else packet.dts
            start = (packet.pts if packet.pts is not None else packet.dts) - offset
            if start * packet.time_base >= duration:
                break
            packet.pts = None if packet.pts is None else packet.pts - offset
            packet.dts = packet.dts - offset
            packet.stream = out
            self.output.mux(packet)

    def _transcode(self, duration: float) -> None:
        import av

        out = self._out_stream
        rate = out.codec_context.sample_rate
        resampler = av.AudioResampler(
            format="fltp", layout=out.layout.name, rate=rate, frame_size=AAC_FRAME
        )
        limit = round(duration * rate)  # samples to keep
        written = 0
        for frame in self._input.decode(self._in_stream):
            for chunk in resampler.resample(frame):
                written = self._encode_chunk(chunk, written, limit)
            if written >= limit:
                break
        else:
            for chunk in resampler.resample(None):
                written = self._encode_chunk(chunk, written, limit)
        self.output.mux(out.encode(None))

    def _encode_chunk(self, chunk: Any, written: int, limit: int) -> int:
        import av

        if written >= limit:
            return written
        keep = min(chunk.samples, limit - written)
        if keep < chunk.samples:  # the last one: cut to the sample
            data = chunk.to_ndarray()[:, :keep]
            cut = av.AudioFrame.from_ndarray(data, format=chunk.format.name, layout=chunk.layout)
            cut.sample_rate = chunk.sample_rate
            chunk = cut
        chunk.pts = written
        chunk.time_base = Fraction(1, self._out_stream.codec_context.sample_rate)
        self.output.mux(self._out_stream.encode(chunk))
        return written + keep


def attach_audio(video_path: Path | str, source: Path | str) -> AudioPlan | None:
    """Give the finished video at `video_path` the audio of `source`, in place: the
    pictures and the container's comment (the settings document) are copied as they are
    into a temp file next to it, which then replaces the original in one rename, so the
    name never points at a half-written file. Returns the plan, or None (and leaves the
    video alone) when `source` has no audio track. Raises OSError/ValueError on I/O or
    decode errors; the temp file never stays."""
    import av

    video_path = Path(video_path)
    container = "mkv" if video_path.suffix.lower() in (".mkv", ".webm") else "mp4"
    plan = plan_audio(source, container)
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
