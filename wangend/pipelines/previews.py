"""Previews: a small JPEG of the latents every few steps, without touching the VAE.

Decoding with the VAE would cost a large share of a step, so a preview is a linear map
from the latent channels straight to RGB, one (C x 3) matrix and an RGB offset per
latent-channel count: 16 (the Wan 2.1 VAE) and 48 (the Wan 2.2 VAE). The middle latent
frame is projected, scaled (up from latent resolution) so its longest side is `max_side`,
which the runtime sets no larger than the video's own longest side, and encoded as JPEG,
lowering the quality until it fits `max_bytes`.

Where the numbers come from: `fit_projection` decodes random latents (standard normal in
the pipeline's normalised latent space, as the denoiser sees them) with a VAE, averages
each decoded pixel block down to latent resolution, and solves least squares for
RGB = latent @ W + b. The tables below were fitted that way on wangend's tiny Wan 2.1
VAE (16 channels) and a tiny Wan 2.2-shaped VAE (48 channels), both random, seed 0. They
are therefore only approximate for the released Wan VAEs: a preview shows layout and
motion, not true colour. `fit_projection(pipe.vae)` gives a table for a real checkpoint.

How to call it (latents from `callback_on_step_end` with
`callback_on_step_end_tensor_inputs=["latents"]`)::

    maker = PreviewMaker.for_channels(pipe.transformer.config.out_channels, job.preview_every)
    preview = maker.maybe(i + 1, steps, callback_kwargs["latents"])  # dict or None
    hooks.progress(i + 1, steps, "denoising", preview=preview)
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch

__all__ = ["PREVIEW_MAX_SIDE", "PROJECTIONS", "PreviewMaker", "fit_projection"]

Row = tuple[float, float, float]
# Fitted with fit_projection (see the module docstring): (weights C x 3, offset 3).
PROJECTIONS: dict[int, tuple[tuple[Row, ...], Row]] = {
    16: (
        (
            (-0.0010, 0.0002, -0.0010),
            (-0.0008, -0.0011, -0.0008),
            (-0.0009, 0.0003, -0.0012),
            (-0.0011, -0.0002, -0.0010),
            (-0.0004, 0.0001, -0.0003),
            (-0.0005, -0.0005, -0.0004),
            (-0.0008, -0.0002, -0.0008),
            (-0.0000, -0.0008, 0.0000),
            (-0.0004, 0.0004, -0.0006),
            (0.0000, 0.0005, -0.0001),
            (0.0008, 0.0002, 0.0010),
            (-0.0008, -0.0005, -0.0007),
            (-0.0004, 0.0001, -0.0005),
            (-0.0008, -0.0012, -0.0008),
            (-0.0005, -0.0000, -0.0005),
            (-0.0009, -0.0009, -0.0010),
        ),
        (-0.2544, -0.1560, -0.3215),
    ),
    48: (
        (
            (-0.0000, 0.0007, 0.0001),
            (0.0002, 0.0002, 0.0001),
            (0.0004, 0.0006, 0.0001),
            (-0.0003, -0.0002, 0.0005),
            (-0.0001, -0.0002, -0.0006),
            (0.0001, 0.0002, -0.0002),
            (0.0001, -0.0002, 0.0001),
            (0.0005, 0.0008, 0.0002),
            (-0.0005, -0.0013, 0.0003),
            (0.0002, 0.0008, -0.0002),
            (-0.0004, -0.0009, 0.0004),
            (-0.0004, -0.0009, 0.0003),
            (-0.0002, -0.0004, -0.0004),
            (0.0001, -0.0001, -0.0002),
            (0.0006, 0.0021, -0.0002),
            (-0.0007, -0.0020, 0.0001),
            (-0.0003, -0.0006, -0.0002),
            (-0.0006, -0.0008, -0.0001),
            (0.0004, 0.0011, -0.0003),
            (0.0004, 0.0013, -0.0001),
            (0.0004, 0.0011, -0.0006),
            (0.0002, 0.0005, 0.0001),
            (0.0001, -0.0009, 0.0008),
            (0.0004, 0.0010, -0.0004),
            (0.0009, 0.0021, -0.0003),
            (0.0002, 0.0014, -0.0000),
            (0.0002, 0.0011, -0.0005),
            (-0.0001, -0.0001, 0.0001),
            (-0.0002, -0.0006, -0.0002),
            (-0.0006, -0.0009, 0.0001),
            (-0.0003, -0.0011, 0.0005),
            (-0.0000, 0.0005, 0.0006),
            (0.0000, 0.0000, 0.0005),
            (0.0002, 0.0004, 0.0001),
            (-0.0001, -0.0003, -0.0000),
            (-0.0000, 0.0003, -0.0002),
            (0.0008, 0.0020, -0.0003),
            (-0.0001, -0.0013, 0.0006),
            (0.0001, 0.0009, -0.0004),
            (-0.0004, -0.0005, 0.0001),
            (0.0000, 0.0006, 0.0003),
            (0.0005, 0.0001, 0.0006),
            (0.0003, 0.0006, -0.0003),
            (0.0007, 0.0008, 0.0004),
            (-0.0002, -0.0004, 0.0003),
            (0.0000, 0.0006, -0.0002),
            (-0.0007, -0.0008, -0.0001),
            (0.0001, 0.0001, 0.0004),
        ),
        (-0.0334, -0.0190, 0.0709),
    ),
}


def fit_projection(vae: Any, samples: int = 4, size: int = 8, seed: int = 0) -> np.ndarray:
    """Least-squares (C+1) x 3 map from normalised latents to RGB in [-1, 1] for `vae`;
    the last row is the offset."""
    config = vae.config
    channels = int(config.z_dim)
    mean, std = torch.zeros(channels), torch.ones(channels)
    if len(config.latents_mean) == channels == len(config.latents_std):  # else unnormalised
        mean, std = torch.tensor(config.latents_mean), torch.tensor(config.latents_std)
    mean, std = mean.view(1, channels, 1, 1, 1), std.view(1, channels, 1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    rows, targets = [], []
    with torch.no_grad():
        for _ in range(samples):
            z = torch.randn(1, channels, 1, size, size, generator=gen)
            rgb = vae.decode((z * std + mean).to(vae.dtype)).sample.float()[0, :, 0]
            block = rgb.shape[-1] // size
            pooled = torch.nn.functional.avg_pool2d(rgb[None], block)[0]  # 3, size, size
            rows.append(z[0, :, 0].reshape(channels, -1).T)
            targets.append(pooled.reshape(3, -1).T)
    x = torch.cat(rows).numpy().astype(np.float64)
    y = torch.cat(targets).numpy().astype(np.float64)
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    solution, *_ = np.linalg.lstsq(x, y, rcond=None)
    return solution


PREVIEW_MAX_SIDE = 256  # pixels, the longest side of a preview (the runtime caps it at the video's)


class PreviewMaker:
    """Turns latents (B, C, F, H, W) into a bounded JPEG every `every` steps."""

    def __init__(
        self,
        projection: np.ndarray,
        every: int,
        *,
        max_side: int = PREVIEW_MAX_SIDE,
        max_bytes: int = 24 * 1024,
    ) -> None:
        self.weights = np.asarray(projection, dtype=np.float32)
        self.every = every
        self.max_side = max_side
        self.max_bytes = max_bytes

    @classmethod
    def for_channels(cls, channels: int, every: int, **kwargs: Any) -> PreviewMaker:
        """The maker for a latent-channel count (16 or 48); ValueError for others."""
        if channels not in PROJECTIONS:
            known = ", ".join(map(str, sorted(PROJECTIONS)))
            raise ValueError(f"no preview projection for {channels} latent channels ({known})")
        weights, offset = PROJECTIONS[channels]
        return cls(np.vstack([np.asarray(weights), np.asarray(offset)[None]]), every, **kwargs)

    def due(self, step: int, steps: int) -> bool:
        """Every `every` steps (1-based, after the step) and always after the last one."""
        return self.every > 0 and (step % self.every == 0 or step == steps)

    def maybe(self, step: int, steps: int, latents: torch.Tensor) -> dict[str, Any] | None:
        """A preview dict when one is due at `step`, else None."""
        if not self.due(step, steps):
            return None
        return {"step": step, "steps": steps, **self.render(latents)}

    def render(self, latents: torch.Tensor) -> dict[str, Any]:
        from PIL import Image

        frame = latents.shape[2] // 2
        z = latents[0, :, frame].detach().float().cpu().numpy()  # C, H, W
        channels, h, w = z.shape
        if channels + 1 != self.weights.shape[0]:
            raise ValueError(
                f"latents have {channels} channels, the projection expects "
                f"{self.weights.shape[0] - 1}"
            )
        rgb = np.tensordot(z, self.weights[:-1], axes=([0], [0])) + self.weights[-1]
        # Stretch to the 1st..99th percentile: the fitted maps are approximate, so the
        # preview shows relative brightness and colour, never absolute values.
        low, high = np.percentile(rgb, [1.0, 99.0])
        rgb = (rgb - low) / max(float(high - low), 1e-6)
        pixels = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        scale = self.max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        data = b""
        for quality in (80, 65, 50, 35, 20, 10):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            data = buffer.getvalue()
            if len(data) <= self.max_bytes:
                break
        while len(data) > self.max_bytes and max(image.size) > 16:
            image = image.resize((max(1, image.width // 2), max(1, image.height // 2)))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=10)
            data = buffer.getvalue()
        return {
            "mime": "image/jpeg",
            "width": image.width,
            "height": image.height,
            "frame": frame,
            "data": base64.b64encode(data).decode("ascii"),
        }
