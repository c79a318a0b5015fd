"""Mask morphology, compositing and the files a matting run leaves behind.

Outputs (`mask_type`):
    alpha        the matte as a gray video (R = G = B = alpha)
    foreground   the subject with the background removed: source x alpha over black
                 (black, not a checkerboard, because video has no transparency; use
                 `rgba_zip` when real transparency is needed)
    greenscreen  source x alpha + green (120, 255, 155) x (1 - alpha), for keying later
The RGBA ZIP holds one PNG per frame (source colours, alpha channel = the matte).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..media.atomic import RetryPolicy, publish

__all__ = [
    "GREEN",
    "composite",
    "dilate",
    "ellipse_kernel",
    "erode",
    "refine_mask",
    "write_rgba_zip",
]

GREEN = (120, 255, 155)


def ellipse_kernel(radius: int) -> torch.Tensor:
    """A (2r+1)^2 elliptic (here circular) footprint of ones and zeros."""
    size = 2 * radius + 1
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = radius
    return (((yy - c) / (c + 0.5)) ** 2 + ((xx - c) / (c + 0.5)) ** 2 <= 1.0).float()


def _filter(mask: torch.Tensor, radius: int) -> torch.Tensor:
    k = ellipse_kernel(radius).to(mask)
    x = F.pad(mask[None, None], (radius,) * 4, mode="replicate")
    return F.conv2d(x, k[None, None])[0, 0], k.sum()


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a (H, W) mask (>= 0.5 is inside) with an elliptic kernel."""
    if radius <= 0:
        return mask
    hits, _ = _filter((mask >= 0.5).float(), radius)
    return (hits > 0.5).float()


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion; the image border does not erode (it is replicated outward)."""
    if radius <= 0:
        return mask
    hits, full = _filter((mask >= 0.5).float(), radius)
    return (hits >= full - 0.5).float()


def refine_mask(mask: torch.Tensor, dilate_r: int, erode_r: int) -> torch.Tensor:
    """Dilate then erode (closing when both are equal): fills small holes in the
    user's mask without growing it."""
    return erode(dilate(mask, dilate_r), erode_r)


def composite(frames: np.ndarray, alpha: np.ndarray, mask_type: str) -> np.ndarray:
    """frames (F, H, W, 3) uint8, alpha (F, H, W) float in [0, 1] -> (F, H, W, 3) uint8."""
    a = alpha[..., None].astype(np.float32)
    if mask_type == "alpha":
        out = np.repeat(a * 255.0, 3, axis=-1)
    elif mask_type == "foreground":
        out = frames.astype(np.float32) * a
    elif mask_type == "greenscreen":
        green = np.asarray(GREEN, dtype=np.float32)
        out = frames.astype(np.float32) * a + green * (1.0 - a)
    else:
        raise ValueError(f"unknown mask_type {mask_type!r}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_rgba_zip(
    frames: np.ndarray, alpha: np.ndarray, folder: Path, stem: str, policy: RetryPolicy
) -> Path:
    """A ZIP of frame_00000.png ... with the matte as the alpha channel, published like
    every output: a temp name, then the first free `stem(N).zip`, retried on transient
    errors."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        a8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
        for i in range(frames.shape[0]):
            rgba = np.concatenate([frames[i], a8[i][..., None]], axis=-1)
            png = io.BytesIO()
            Image.fromarray(rgba, mode="RGBA").save(png, format="PNG")
            archive.writestr(f"frame_{i:05d}.png", png.getvalue())
    return publish(folder, stem, ".zip", lambda temp: temp.write_bytes(buffer.getvalue()), policy)
