"""Small building blocks shared by the encoders, the fuser and the decoder.

Tensors that carry one feature map per object are 5-D: (batch, objects, C, H, W).
"Group" modules fold the object axis into the batch for the convolution and unfold it
after, so one set of weights serves any number of objects.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CAResBlock",
    "DecoderFeatureProcessor",
    "GConv2d",
    "GroupFeatureFusionBlock",
    "GroupResBlock",
    "MaskUpsampleBlock",
    "PositionalEncoding",
    "SensoryDeepUpdater",
    "SensoryUpdater",
    "gru_update",
    "resize_groups",
]


def resize_groups(g: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    """Resize a (B, N, C, H, W) tensor by `scale` (bilinear up, area down)."""
    b, n = g.shape[:2]
    align = False if mode == "bilinear" else None
    out = F.interpolate(g.flatten(0, 1), scale_factor=scale, mode=mode, align_corners=align)
    return out.view(b, n, *out.shape[1:])


class GConv2d(nn.Conv2d):
    """A Conv2d applied to every object of a (B, N, C, H, W) tensor."""

    def forward(self, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, n = g.shape[:2]
        out = super().forward(g.flatten(0, 1))
        return out.view(b, n, *out.shape[1:])


class GroupResBlock(nn.Module):
    """Pre-activation residual block over objects; a 1x1 shortcut when widths differ."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = GConv2d(in_dim, out_dim, 3, padding=1)
        self.conv2 = GConv2d(out_dim, out_dim, 3, padding=1)
        self.downsample: nn.Module = (
            nn.Identity() if in_dim == out_dim else GConv2d(in_dim, out_dim, 1)
        )

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(F.relu(g))))
        return y + self.downsample(g)


class CAResBlock(nn.Module):
    """Residual block with efficient channel attention: a 1-D convolution over the
    pooled channel descriptor gives each channel a gate (kernel size from the width)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        t = int((abs(math.log2(out_dim)) + 1) // 2)
        k = t if t % 2 else t + 1
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.downsample: nn.Module = (
            nn.Identity() if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(F.relu(x))))
        b, c = y.shape[:2]
        gate = self.conv(self.pool(y).view(b, 1, c)).view(b, c, 1, 1).sigmoid()
        return y * gate + self.downsample(x)


class _Distributor(nn.Module):
    """Adds a shared (B, C, H, W) map to every object's map, each optionally projected."""

    def __init__(
        self, x_transform: nn.Module | None = None, g_transform: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.x_transform = x_transform
        self.g_transform = g_transform

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.x_transform is not None:
            x = self.x_transform(x)
        if self.g_transform is not None:
            g = self.g_transform(g)
        return g + x.unsqueeze(1)


class GroupFeatureFusionBlock(nn.Module):
    """Fuse shared pixel features with per-object features, then two CA residual blocks."""

    def __init__(self, x_in_dim: int, g_in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.distributor = _Distributor(
            nn.Conv2d(x_in_dim, out_dim, 1), GConv2d(g_in_dim, out_dim, 1)
        )
        self.block1 = CAResBlock(out_dim, out_dim)
        self.block2 = CAResBlock(out_dim, out_dim)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        b, n = g.shape[:2]
        y = self.distributor(x, g).flatten(0, 1)
        y = self.block2(self.block1(y))
        return y.view(b, n, *y.shape[1:])


class MaskUpsampleBlock(nn.Module):
    """x2 bilinear upsampling, add the skip features, then a group residual block."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.distributor = _Distributor()
        self.out_conv = GroupResBlock(in_dim, out_dim)

    def forward(self, g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.out_conv(self.distributor(skip, resize_groups(g, 2, "bilinear")))


class DecoderFeatureProcessor(nn.Module):
    """1x1 projections of the encoder's skip features to the decoder's widths."""

    def __init__(self, in_dims: list[int], out_dims: list[int]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(
            nn.Conv2d(i, o, 1) for i, o in zip(in_dims, out_dims, strict=True)
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t(f) for t, f in zip(self.transforms, feats, strict=True)]


def gru_update(h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A GRU-style step: `values` holds forget, update and candidate gates, in that order."""
    c = values.shape[2] // 3
    forget = torch.sigmoid(values[:, :, :c])
    update = torch.sigmoid(values[:, :, c : 2 * c])
    candidate = torch.tanh(values[:, :, 2 * c :])
    return forget * h * (1 - update) + update * candidate


class SensoryUpdater(nn.Module):
    """Updates the sensory memory from the decoder's features at every stride (16..1)."""

    def __init__(self, g_dims: list[int], mid_dim: int, sensory_dim: int) -> None:
        super().__init__()
        self.g16_conv = GConv2d(g_dims[0], mid_dim, 1)
        self.g8_conv = GConv2d(g_dims[1], mid_dim, 1)
        self.g4_conv = GConv2d(g_dims[2], mid_dim, 1)
        self.g2_conv = GConv2d(g_dims[3], mid_dim, 1)
        self.g1_conv = GConv2d(g_dims[4], mid_dim, 1)
        self.transform = GConv2d(mid_dim + sensory_dim, sensory_dim * 3, 3, padding=1)
        nn.init.xavier_normal_(self.transform.weight)

    def forward(self, g: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        x = self.g16_conv(g[0])
        for conv, feat, scale in (
            (self.g8_conv, g[1], 1 / 2),
            (self.g4_conv, g[2], 1 / 4),
            (self.g2_conv, g[3], 1 / 8),
            (self.g1_conv, g[4], 1 / 16),
        ):
            x = x + conv(resize_groups(feat, scale, "area"))
        values = self.transform(torch.cat([x.float(), h.float()], dim=2))
        return gru_update(h.float(), values)


class SensoryDeepUpdater(nn.Module):
    """Updates the sensory memory from a freshly encoded mask value."""

    def __init__(self, f_dim: int, sensory_dim: int) -> None:
        super().__init__()
        self.transform = GConv2d(f_dim + sensory_dim, sensory_dim * 3, 3, padding=1)
        nn.init.xavier_normal_(self.transform.weight)

    def forward(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        values = self.transform(torch.cat([g.float(), h.float()], dim=2))
        return gru_update(h.float(), values)


class PositionalEncoding(nn.Module):
    """2-D sine/cosine encoding over normalised coordinates: the first half of the
    channels encodes x, the second y, each as interleaved sin/cos pairs.

    `inv_freq` is a persistent buffer because the published checkpoints carry it."""

    def __init__(self, dim: int, scale: float, temperature: float, channel_last: bool) -> None:
        super().__init__()
        half = int(math.ceil(dim / 4) * 2)
        self.half = half
        inv_freq = 1.0 / temperature ** (torch.arange(0, half, 2).float() / half)
        self.register_buffer("inv_freq", inv_freq)
        self.scale = scale
        self.channel_last = channel_last

    def forward(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(H, W, C) when channel_last, else (C, H, W)."""
        eps = 1e-6
        ys = torch.arange(h, device=device, dtype=self.inv_freq.dtype)
        xs = torch.arange(w, device=device, dtype=self.inv_freq.dtype)
        ys = ys / (ys[-1] + eps) * self.scale
        xs = xs / (xs[-1] + eps) * self.scale

        def embed(pos: torch.Tensor) -> torch.Tensor:
            angles = pos[:, None] * self.inv_freq[None, :]
            return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)

        emb = torch.zeros(h, w, self.half * 2, device=device, dtype=dtype)
        emb[:, :, : self.half] = embed(xs)[None, :, :]
        emb[:, :, self.half :] = embed(ys)[:, None, :]
        return emb if self.channel_last else emb.permute(2, 0, 1)
