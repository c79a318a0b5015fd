"""From a `MatAnyOneSpec` to a checked, fully filled `ResolvedMatAnyOne`.

Everything that can be refused is refused here, when the job is submitted, so a bad
request never waits in the queue: files exist and decode, the mask is not empty, the
frame range lies inside the video, the output name is a safe template. Paths become
absolute and the inputs' sha256 are recorded, so the job record says exactly what ran.

A mask whose size differs from the frames is accepted and resized when the job runs;
the warning is logged here and listed in `plan()` (and in the output's metadata).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MatAnyOneConfig
from ..errors import InvalidParams
from ..media.access import InputAccess, readable_message, sha256_file
from ..media.naming import check_output_name
from ..protocol import MatAnyOneSpec, ResolvedMatAnyOne

__all__ = [
    "DEFAULT_OUTPUT_NAME",
    "IMAGE_SUFFIXES",
    "MattingInputs",
    "load_mask",
    "mask_warnings",
    "probe_media",
]

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_NAME = "{date}_{input}_{mask_type}"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
IMAGE_FPS = 25.0  # a single image becomes a one-frame video at this rate
OUTPUT_FOLDER = "mask_outputs"


def probe_media(path: Path) -> tuple[int, int, int, float]:
    """(frames, width, height, fps) of a video or still image; raises ValueError/OSError."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            return 1, img.width, img.height, IMAGE_FPS
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else IMAGE_FPS
        count, width, height = 0, stream.codec_context.width, stream.codec_context.height
        # Counting decoded frames is the only count every container gets right.
        for frame in container.decode(stream):
            count += 1
            width, height = frame.width, frame.height
    if count == 0:
        raise ValueError("the video holds no frames")
    return count, width, height, fps


def load_mask(path: Path) -> np.ndarray:
    """The mask as (H, W) float32 in [0, 1]: luminance, or the alpha channel when the
    image has one (a cut-out PNG is a natural mask)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA") or "transparency" in img.info:
            gray = img.convert("RGBA").getchannel("A")
        else:
            gray = img.convert("L")
        return np.asarray(gray, dtype=np.float32) / 255.0


def mask_warnings(mask_size: tuple[int, int], frame_size: tuple[int, int]) -> list[str]:
    if mask_size == frame_size:
        return []
    return [
        f"mask is {mask_size[0]}x{mask_size[1]} but the frames are "
        f"{frame_size[0]}x{frame_size[1]}; it is resized to the frames"
    ]


def _existing_file(value: str, field: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise InvalidParams(f"{what} file not found: {path}", field=field)
    return path.resolve()


class MattingInputs:
    """Resolves matting specs against the `[matanyone]` config (the default weights)
    and the daemon's default metadata mode."""

    def __init__(
        self,
        config: MatAnyOneConfig,
        access: InputAccess | None = None,
        *,
        metadata_default: str = "embedded",
    ) -> None:
        """`metadata_default`: `[media] metadata`, for jobs that do not say (as for
        generation jobs)."""
        self.config = config
        self.access = access or InputAccess()
        self.metadata_default = metadata_default

    def resolve(self, spec: MatAnyOneSpec) -> ResolvedMatAnyOne:
        source = self.access.check(spec.input, "$.params.input", "input").resolve()
        mask_path = self.access.check(spec.mask, "$.params.mask", "mask").resolve()
        try:
            frames, width, height, fps = probe_media(source)
        except Exception as exc:
            why = readable_message(str(exc), source)
            raise InvalidParams(f"input cannot be decoded as a video or image: {source} ({why})",
                                field="$.params.input") from None  # fmt: skip
        try:
            mask = load_mask(mask_path)
        except Exception as exc:
            why = readable_message(str(exc), mask_path)
            raise InvalidParams(f"mask cannot be decoded as an image: {mask_path} ({why})",
                                field="$.params.mask") from None  # fmt: skip
        if not (mask >= 0.5).any():
            raise InvalidParams("mask is empty: no pixel is foreground (>= 50% white)",
                                field="$.params.mask")  # fmt: skip
        for warning in mask_warnings((mask.shape[1], mask.shape[0]), (width, height)):
            log.warning("%s: %s", mask_path, warning)

        start = spec.start_frame
        if start >= frames:
            raise InvalidParams(f"start_frame {start} is past the input's {frames} frames",
                                field="$.params.start_frame")  # fmt: skip
        end = spec.end_frame if spec.end_frame is not None else frames
        if end > frames:
            raise InvalidParams(f"end_frame {end} is past the input's {frames} frames",
                                field="$.params.end_frame")  # fmt: skip
        if end <= start:
            raise InvalidParams(f"end_frame {end} must be greater than start_frame {start}",
                                field="$.params.end_frame")  # fmt: skip

        output_name = spec.output_name if spec.output_name is not None else DEFAULT_OUTPUT_NAME
        check_output_name(output_name)
        return ResolvedMatAnyOne(
            input=str(source),
            mask=str(mask_path),
            model=self._model(spec.model or self.config.weights),
            start_frame=start,
            end_frame=end,
            frames=end - start,
            width=width,
            height=height,
            fps=fps,
            erode=spec.erode,
            dilate=spec.dilate,
            warmup=spec.warmup,
            max_size=spec.max_size,
            mask_type=spec.mask_type,
            rgba_zip=spec.rgba_zip,
            reattach_audio=spec.reattach_audio,
            output_name=output_name,
            metadata=spec.metadata or self.metadata_default,
            inputs_sha256={"input": sha256_file(source), "mask": sha256_file(mask_path)},
        )

    @staticmethod
    def _model(name: str) -> str:
        """'tiny', a hub id, or a weights file (made absolute; it must exist now)."""
        if name == "tiny":
            return name
        path = Path(name).expanduser()
        looks_like_file = path.suffix in (".pth", ".pt", ".safetensors") or path.is_absolute()
        if looks_like_file or path.exists():
            return str(_existing_file(name, "$.params.model", "weights"))
        if name.partition(":")[0].count("/") != 1:
            raise InvalidParams(
                f"model {name!r} is neither 'tiny', a weights file nor a hub id (owner/repo)",
                field="$.params.model",
            )
        return name

    @staticmethod
    def plan(job: ResolvedMatAnyOne) -> dict[str, Any]:
        """What a run would do, without doing it (for dry runs)."""
        from .runtime import processing_size

        mask_h, mask_w = load_mask(Path(job.mask)).shape
        pw, ph = processing_size(job.width, job.height, job.max_size)
        outputs = [f"{OUTPUT_FOLDER}/<name>.mp4 ({job.mask_type})"]
        if job.rgba_zip:
            outputs.append(f"{OUTPUT_FOLDER}/<name>_rgba.zip (RGBA PNG frames)")
        return {
            "kind": "matanyone",
            "input": job.input,
            "mask": job.mask,
            "model": job.model,
            "frames": job.frames,
            "frame_range": [job.start_frame, job.end_frame],
            "source_size": [job.width, job.height],
            "processing_size": [pw, ph],
            "fps": job.fps,
            "warmup": job.warmup,
            "mask_refine": {"dilate": job.dilate, "erode": job.erode},
            "reattach_audio": job.reattach_audio,
            "outputs": outputs,
            "warnings": mask_warnings((mask_w, mask_h), (job.width, job.height)),
        }
